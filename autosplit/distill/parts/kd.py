"""KD: Hinton et al.'s soft targets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from autosplit.distill._base import LogitPart, Outputs, need_teacher
from autosplit.distill.losses import kd_loss
from autosplit.distill.registry import LOGIT_LOSSES


@LOGIT_LOSSES.register("kd")
class KD(LogitPart):
    """Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS-W, 2015.

    Matches the teacher's softened class distribution: ``ce_weight * CE + kd_weight * tau^2 *
    KL(p_tau(z_T) || p_tau(z_S))``. Defaults are the CIFAR protocol's (tau 4, 0.1 / 0.9).
    """

    @dataclass(frozen=True)
    class Params:
        temperature: float = 4.0
        ce_weight: float = 0.1
        kd_weight: float = 0.9

    terms = ("ce", "kd")

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({"logits"})

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
        logits_teacher = need_teacher(teacher_outputs, "logits", "kd")  # (B, C)
        p = self.params
        return {
            "ce": p.ce_weight * self.ce(logits, labels),
            "kd": p.kd_weight * kd_loss(logits, logits_teacher, temperature=p.temperature),
        }
