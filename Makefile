# dpdiff: `make demo` runs the default DP fine-tuning demo, `make test` runs the tests.
# Both set everything up on a fresh machine: a .venv with the versions pinned in constraints.txt
# (those the test suite passed with; the accountants' epsilons depend on opacus and dp-accounting).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
PIP_INSTALL = -m pip install --quiet -c $(CONSTRAINTS)
# torch is installed first, at the version pinned in constraints.txt, as pip's indexes offer it: there
# is no CUDA detection. From PyPI on Linux x86_64 that is the CUDA build (which also runs on CPU only);
# where a local CPU build of that version is offered too (pip find-links), pip takes that one (2.13.0+cpu
# sorts above 2.13.0). For the CPU-only build on any machine add PyTorch's CPU wheel index:
#   make test TORCH_INDEX_ARGS="--extra-index-url URL"
TORCH_INDEX_ARGS ?=

.PHONY: setup demo test test-slow test-all bench lint lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) $(PIP_INSTALL) $(TORCH_INDEX_ARGS) torch
	$(PY) $(PIP_INSTALL) -e ".[dev,wandb]"
	touch $@

# Upgrade the pins: resolve the newest versions pyproject.toml allows in a scratch venv and write them to
# constraints.txt (without dpdiff itself and without local build labels such as +cpu). Then run
# `rm -rf $(VENV) && make test` and commit constraints.txt if the tests pass.
lock:
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip && \
	"$$tmp/venv/bin/python" -m pip install --quiet $(TORCH_INDEX_ARGS) torch && \
	"$$tmp/venv/bin/python" -m pip install --quiet -e ".[dev,wandb]" && \
	{ printf '%s\n' \
	  "# The versions \`make setup\` installs (pip install -c constraints.txt): those the test suite passed with." \
	  "# Regenerate with \`make lock\` (the newest versions pyproject.toml allows), run \`make test\` on a fresh .venv," \
	  "# commit. Local build labels (+cpu, +cu121) are dropped: pip takes the build its indexes offer for the machine." && \
	  "$$tmp/venv/bin/python" -c 'import platform, sys; print(f"# Resolved with Python {platform.python_version()} on {sys.platform}/{platform.machine()}.")' && \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^#' | grep -iv -e '^dpdiff==' -e '^pip==' | sed -E 's/\+[0-9A-Za-z.]+$$//'; \
	} > $(CONSTRAINTS).new && grep -q '^torch==' $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

demo: setup
	$(VENV)/bin/dpdiff finetune

# Fast suite (< 15 min on 2 cores): everything but the tests marked slow; the 15 slowest tests are listed.
test: setup
	$(PY) -m pytest -q -m "not slow" -n 2 --durations=15

# Long integration tests (over-trained models flagged by the probes, audits, multi-process runs; about
# 15 min on 2 cores). CI runs them after the fast suite (.ci/run).
test-slow: setup
	$(PY) -m pytest -q -m slow --durations=15

test-all: test test-slow

bench: setup
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/privacy_checks.py

lint: setup
	$(VENV)/bin/ruff check dpdiff recipes tests benchmarks

clean:
	rm -rf runs outputs multirun .pytest_cache
