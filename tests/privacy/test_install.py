"""Installs that reproduce: the accountants' epsilons and the engines depend on the exact versions of
opacus, dp-accounting, torch, numpy and scipy, so `make` installs the versions the suite passed with
(constraints.txt), and hard dependencies are imported by the tests, never skipped when missing."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys

from helpers import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself needs tomli before 3.11
    import tomli as tomllib

PRIVACY_CRITICAL = ["opacus", "dp-accounting", "torch", "numpy", "scipy"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extras=("dev", "wandb")) -> list[Requirement]:
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][0-9A-Za-z.!]*)", line.strip())
        assert m, f"constraints.txt: {line!r} is not a plain name==version pin (no local label, no -e, no URL)"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_hard_dependencies_are_imported_not_skipped():
    """pytest.importorskip of a declared dependency turns a broken install into silently skipped checks."""
    hard = {canonicalize_name(r.name) for r in _requirements()}
    dists_of = md.packages_distributions()
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for module in re.findall(r"importorskip\(\s*[\"']([\w.]+)[\"']", line):
                dists = {canonicalize_name(d) for d in dists_of.get(module.split(".")[0], [])}
                if dists & hard:
                    bad.append(f"{path.relative_to(ROOT)}:{n} importorskip({module!r})")
    assert not bad, "import hard dependencies normally: " + ", ".join(bad)


def test_constraints_pin_every_requirement_within_pyproject():
    pins = _pins()
    assert "dpdiff" not in pins
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt has no pin for {req.name} (run `make lock`)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"


def test_numpy_requirement_excludes_numpy_1():
    (numpy,) = [r for r in _requirements(extras=()) if canonicalize_name(r.name) == "numpy"]
    assert not numpy.specifier.contains("1.26.4")  # the code calls np.bitwise_count (numpy >= 2.0)
    assert numpy.specifier.contains("2.0.0")


def test_make_setup_installs_the_pinned_versions(tmp_path):
    """`make -n` prints the commands `make setup` would run on a fresh machine without running them."""
    out = subprocess.run(["make", "-n", "setup", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    installs = [line for line in out.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert len(installs) >= 2 and any(" torch" in line for line in installs), out
    for line in installs:
        assert "-c constraints.txt" in line, f"installs without the pins: {line}"
    assert not re.search(r"torch==\d", (ROOT / "Makefile").read_text()), "torch's version belongs in constraints.txt"
    subprocess.run(["make", "-n", "lock"], cwd=ROOT, capture_output=True, text=True, check=True)


def test_the_privacy_critical_libraries_are_the_pinned_versions():
    pins = _pins()
    for name in PRIVACY_CRITICAL:
        installed = Version(md.version(name)).public
        assert installed == pins[canonicalize_name(name)], (
            f"{name} {installed} is installed but constraints.txt pins {pins[canonicalize_name(name)]}: "
            "reinstall with `make setup`, or re-pin with `make lock` and rerun the tests")
