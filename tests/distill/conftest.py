"""Fixtures shared by the method tests: one torch thread and a tiny frozen-able teacher."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from autosplit.models import ZooModel, create_model

CLASSES = 10


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()  # tiny models on a shared CPU: one thread is far faster
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_teacher() -> ZooModel:
    """Left trainable on purpose: distillers themselves must keep gradients and steps off it."""
    torch.manual_seed(0)
    return create_model("tiny", num_classes=CLASSES, in_channels=1, width=1.5).eval()
