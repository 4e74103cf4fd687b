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
