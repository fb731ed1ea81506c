"""The uniform surface every zoo model offers: named feature taps, a pooled vector, a linear head.

Distillation methods pick features by tap name, never by layer index. Tap names:

- ``stage1`` ... ``stageN`` — the stage output maps, shape (B, C, H, W), in forward order;
- ``pooled`` — the vector the classifier reads, shape (B, C_pooled);
- ``logits`` — shape (B, num_classes).

``head`` is always one ``nn.Linear`` from ``pooled`` to ``logits``, so a teacher's head can be
reused on another network's pooled feature (ERA's TWI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FeatureTap:
    """A named place in the network where a method may read a feature.

    ``stride`` is the spatial reduction relative to the input (1 for vectors and logits is
    meaningless, so vectors carry ``stride=0``).
    """

    name: str
    channels: int
    stride: int
    kind: Literal["map", "vector"]


class ZooModel(nn.Module):
    """Base class: subclasses implement ``forward_stages`` and set ``head`` and ``feature_info``."""

    head: nn.Linear
    feature_info: list[FeatureTap]

    def forward_stages(self, images: Tensor) -> dict[str, Tensor]:
        """Stage maps in forward order: {"stage1": (B,C1,H1,W1), ..., "stageN": ...}."""
        raise NotImplementedError

    @property
    def stage_names(self) -> list[str]:
        return [tap.name for tap in self.feature_info if tap.kind == "map"]

    @property
    def last_stage(self) -> FeatureTap:
        return [tap for tap in self.feature_info if tap.kind == "map"][-1]

    def tap(self, name: str) -> FeatureTap:
        for tap in self.feature_info:
            if tap.name == name:
                return tap
        known = ", ".join(t.name for t in self.feature_info)
        raise KeyError(f"{type(self).__name__} has no tap {name!r}; taps: {known}")

    def pool(self, feature_map: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C): the map-to-vector step before the head."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(feature_map, 1), 1)

    def forward_taps(self, images: Tensor) -> dict[str, Tensor]:
        """Every tap at once: stage maps, ``pooled`` and ``logits``."""
        taps = self.forward_stages(images)
        pooled = self.pool(taps[self.last_stage.name])
        taps["pooled"] = pooled
        taps["logits"] = self.head(pooled)
        return taps

    def forward(self, images: Tensor) -> Tensor:
        stages = self.forward_stages(images)
        return self.head(self.pool(stages[self.last_stage.name]))


def scale_channels(channels: int, width: float) -> int:
    """The one width rule of the CIFAR-style families: ``c -> max(1, round(c * width))``.

    Rounding to the nearest integer (not to a multiple of 8) keeps FLOPs a fine-grained,
    non-decreasing step function of ``width``, which is what the width solver bisects on.
    """
    return max(1, round(channels * width))


def describe_taps(
    stages: list[tuple[int, int]], pooled_channels: int, num_classes: int
) -> list[FeatureTap]:
    """``feature_info`` from (channels, stride) per stage, plus the ``pooled`` and ``logits`` vectors."""
    taps = [
        FeatureTap(f"stage{i}", channels, stride, "map")
        for i, (channels, stride) in enumerate(stages, start=1)
    ]
    taps.append(FeatureTap("pooled", pooled_channels, 0, "vector"))
    taps.append(FeatureTap("logits", num_classes, 0, "vector"))
    return taps
