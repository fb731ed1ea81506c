"""Small things done to networks and feature maps in several places, written once: freezing a
network, running it in eval mode for a moment without disturbing any submodule's own training
flag, and resizing a feature map to another's spatial size."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn


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


def resize(feature_map: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, *size): average-pool down, bilinear up, as is when equal."""
    if tuple(feature_map.shape[-2:]) == tuple(size):
        return feature_map
    if feature_map.shape[-2] >= size[0] and feature_map.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feature_map, size)
    return F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)
