"""Shared fixtures: no network, tiny models built from config or the shipped tiny base."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # two workers on two cores



@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same state of torch's, numpy's and Python's global generators: a test that draws
    from them (torch.randn without a generator, np.random.*, random.*) is deterministic, so its false-failure
    probability is 0, not the tail of its bound. Tests of fresh-entropy paths (the DP noise, privacy.secure_rng)
    draw their own and state their probability in the docstring."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _dpdiff_home(tmp_path_factory):
    """A private DPDIFF_HOME per test session (materialised demo data, caches)."""
    home = tmp_path_factory.mktemp("dpdiff_home")
    os.environ["DPDIFF_HOME"] = str(home)
    yield home


@pytest.fixture(scope="session")
def tiny_unet_config():
    from dpdiff.models import tiny

    return tiny.unet_config()
