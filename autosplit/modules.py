"""Two things done to a network in several places, written once: freezing it, and running it in
eval mode for a moment without disturbing any submodule's own training flag."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter trainable (a teacher); returned for chaining."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards every submodule's training flag is
    what it was (a frozen teacher inside a training student stays in eval)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode
