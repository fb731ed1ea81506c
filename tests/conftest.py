"""Shared fixtures: tiny real data (scikit-learn digits) and a CPU runtime."""

from __future__ import annotations

import os

import pytest
import torch

# Tests are CPU-only and quiet; two threads match the CI machine.
os.environ.setdefault("AUTOSPLIT_NO_PROGRESS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits_splits():
    from autosplit.config import DataConfig
    from autosplit.data import load_splits

    return load_splits(DataConfig(name="digits", val_fraction=0.2, augment=False))


@pytest.fixture(scope="session")
def cpu():
    from autosplit.device import resolve_runtime

    # fp32 on every machine: a CPU with native bf16 would otherwise autocast (auto), and unit
    # tests check figures by hand.
    return resolve_runtime("cpu", precision="fp32")
