"""CE: the student alone, trained on the labels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from autosplit.distill._base import LogitPart, Outputs
from autosplit.distill.registry import LOGIT_LOSSES


@LOGIT_LOSSES.register("ce")
class CrossEntropy(LogitPart):
    """The CE baseline (no paper): cross-entropy of the student's logits with the labels.

    Matches nothing of the teacher; label smoothing comes from ``train.label_smoothing``.
    """

    @dataclass(frozen=True)
    class Params:
        weight: float = 1.0  # weight of CE

    terms = ("ce",)

    @classmethod
    def ce_weight_of(cls, params: Any) -> float:
        return float(params.weight)

    def stream_loss(
        self,
        stream: int,
        logits: Tensor,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        return {"ce": self.params.weight * self.ce(logits, labels)}
