"""ResKD: a chain of res-students, each learning the logit gap left by the ones before it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from autosplit.distill._base import Outputs, Part, PartContext, need_teacher
from autosplit.distill.losses import reskd_residual_mse


@dataclass(frozen=True)
class ResKDParams:
    """The ``res_chain`` structure's loss parameters (read from ``candidate.structure``)."""

    residual: Literal["kd", "mse"] = "kd"
    residual_weight: float = 1.0


class ResKD(Part):
    """Li, Li, Omar, Wu & Li, "ResKD: Residual-Guided Knowledge Distillation", IEEE TIP, 2021.

    Matches the remaining teacher-student logit gap with res-student k, z^(k) = z^(k-1) + z_Rk,
    training only R_k. ``residual: kd`` (KD through the sum): the candidate's logit loss is
    applied to sg(z^(k-1)) + z_Rk, weighted by ``residual_weight`` (the Distiller's logit
    streams; this part adds no term). ``residual: mse``: ``residual_weight * MSE(z_Rk,
    sg(z_T - z^(k-1)))``, and the logit loss sees z^(0) only. Reading (METHODS.md): the paper's
    stopping rule is not public, so K (``n_parts``) is a search knob and the exit gate's
    threshold is calibrated on validation.
    """

    Params = ResKDParams

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.n_parts = ctx.n_parts

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({"logits"}) if self.params.residual == "mse" else frozenset()

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        if self.params.residual != "mse":
            return {}
        logits_teacher = need_teacher(teacher_outputs, "logits", "reskd")  # (B, C)
        partial, part_logits = outputs["partial_logits"], outputs["part_logits"]
        return {
            f"loss_reskd_{k}": self.params.residual_weight
            * reskd_residual_mse(part_logits[k - 1], logits_teacher, partial[k - 1])
            for k in range(1, len(partial))
        }

    def term_stages(self) -> dict[str, int]:
        if self.params.residual != "mse":
            return {}
        return {f"loss_reskd_{k}": k for k in range(1, self.n_parts + 1)}
