"""What the contract and the method tests build from: tiny candidates on digits-sized input
with pinned widths (no width solving), and one seeded batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from autosplit.config import DataConfig, TeacherConfig, TrainConfig
from autosplit.distill import STRUCTURES, Candidate, PartSpec, SplitSpec, StudentSpec

INPUT_SHAPE = (1, 8, 8)  # digits
CLASSES = 10
# The structures whose residual parts are zoo networks of their own (assistant, res_chain).
WITH_PARTS = tuple(name for name in STRUCTURES.names() if STRUCTURES.get(name).part_networks)


def make_candidate(
    structure: str = "single",
    logit: str = "kd",
    feature: str = "none",
    *,
    twi: bool = False,
    schedule: str = "joint",
    structure_params: Mapping[str, Any] | None = None,
    **values: Any,
) -> Candidate:
    """Tiny models with pinned widths; ``values`` are dotted overrides."""
    parts = structure in WITH_PARTS
    candidate = Candidate(
        data=DataConfig(name="digits", augment=False),
        teacher=TeacherConfig(model="tiny", width=1.5),
        max_flops=10**6,
        student=StudentSpec(family="tiny"),
        split=SplitSpec(
            base_share=0.7 if parts else 1.0, base_width=0.5, part_width=0.25 if parts else None
        ),
        structure=PartSpec(structure, tuple((structure_params or {}).items())),
        logit_loss=PartSpec(logit),
        feature_loss=PartSpec(feature),
        twi=twi,
        schedule=schedule,
        train=TrainConfig(epochs=2, batch_size=32),
    )
    return candidate.with_values(values) if values else candidate


def batch(size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random images of ``INPUT_SHAPE`` and labels, the same for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, *INPUT_SHAPE, generator=gen), torch.randint(
        0, CLASSES, (size,), generator=gen
    )
