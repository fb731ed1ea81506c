"""DKD: KD decoupled into target-class and non-target-class terms, with a warm-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from autosplit.distill._base import LogitPart, Outputs, linear_warmup, need_teacher
from autosplit.distill.losses import dkd_loss
from autosplit.distill.registry import LOGIT_LOSSES


@LOGIT_LOSSES.register("dkd")
class DKD(LogitPart):
    """Zhao et al., "Decoupled Knowledge Distillation", CVPR, 2022.

    Matches the teacher's target-class confidence (TCKD) and its distribution over the
    non-target classes (NCKD) with separate weights: ``ce_weight * CE + warm(epoch) * tau^2 *
    (alpha * TCKD + beta * NCKD)``, ``warm = min((epoch + 1) / warmup_epochs, 1)``.
    ``epoch`` is 0-based as ``fit`` passes it (mdistiller counts from 1, hence the +1). Paper
    defaults: alpha 1, beta 8, tau 4, 20 warm-up epochs (short runs want fewer).
    """

    @dataclass(frozen=True)
    class Params:
        alpha: float = 1.0
        beta: float = 8.0
        temperature: float = 4.0
        ce_weight: float = 1.0
        warmup_epochs: int = 20

    terms = ("ce", "dkd")

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({"logits"})

    def warm(self, epoch: int) -> float:
        """The DKD weight's linear warm-up factor at 0-based ``epoch``."""
        return linear_warmup(epoch, self.params.warmup_epochs)

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
        logits_teacher = need_teacher(teacher_outputs, "logits", "dkd")  # (B, C)
        p = self.params
        decoupled = dkd_loss(
            logits, logits_teacher, labels, alpha=p.alpha, beta=p.beta, temperature=p.temperature
        )
        return {"ce": p.ce_weight * self.ce(logits, labels), "dkd": self.warm(epoch) * decoupled}
