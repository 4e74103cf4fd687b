# dpdiff: `make demo` runs the default DP fine-tuning demo, `make test` runs the tests.
# Both set everything up on a fresh machine (a .venv with a CPU torch unless CUDA is present).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first: on a machine without CUDA, the pinned CPU build; elsewhere pip's default build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow test-all bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,wandb]"
	touch $@

demo: setup
	$(VENV)/bin/dpdiff finetune

# Fast suite (< 15 min on 2 cores): everything but the tests marked slow.
test: setup
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadgroup

# Long integration tests (over-trained models flagged by the probes, audits, multi-process runs).
test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: test test-slow

bench: setup
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/privacy_checks.py

lint: setup
	$(VENV)/bin/ruff check dpdiff recipes tests benchmarks

clean:
	rm -rf runs outputs multirun .pytest_cache
