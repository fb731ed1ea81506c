"""ERA: residual branches approximate the teacher's pooled feature step by step (+ TWI)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from autosplit.distill._base import Outputs, Part, PartContext, need_teacher
from autosplit.distill.losses import era_residual_loss, era_targets


@dataclass(frozen=True)
class ERAParams:
    """The ``branches`` structure's loss parameters (read from ``candidate.structure``)."""

    lambda_f: float = 5.0
    lambda_g: float = 1.0
    gamma: float = 0.5


class ERA(Part):
    """Yan, Chen, Liu & Ye, "Expandable Residual Approximation for Knowledge Distillation",
    arXiv 2508.16050, 2025.

    Matches the teacher's pooled feature f_T in residual steps: ``lambda_f * MSE(P f_S, sg f_T)``
    + ``(1/M) sum_i gamma^(i-1) lambda_g MSE(Delta_i, r_i)`` with r_1 = sg(f_T - P f_S),
    r_(i+1) = sg(r_i - Delta_i). With ``twi`` (Teacher Weight Integration) the teacher's frozen
    head must classify P f_S and every reconstruction: ``CE(W_T P f_S + b_T, y) + (1/M) sum_i
    gamma^(i-1) CE(W_T f^(i) + b_T, y)``. The candidate's logit loss trains z_S (KD-base).
    Defaults: the paper's lambda_f 5, lambda_g 1, gamma 0.5.
    """

    Params = ERAParams
    home_stage = 1

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.twi = ctx.twi

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({"pooled"})

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        p = self.params
        feat_teacher = need_teacher(teacher_outputs, "pooled", "era")  # (B, C_t)
        projected, deltas = outputs["pooled_proj"], outputs["deltas"]  # (B, C_t), M x (B, C_t)
        targets = era_targets(feat_teacher, projected, deltas)
        terms = {
            "loss_era_feat": p.lambda_f * F.mse_loss(projected, feat_teacher.detach()),
            "loss_era_residual": p.lambda_g * era_residual_loss(deltas, targets, gamma=p.gamma),
        }
        if self.twi:
            recon = outputs["recon_logits"]  # M x (B, C)
            ce = [p.gamma**i * F.cross_entropy(z, labels) for i, z in enumerate(recon)]
            terms["loss_era_proj_ce"] = F.cross_entropy(outputs["proj_logits"], labels)
            terms["loss_era_recon_ce"] = torch.stack(ce).sum() / len(recon)
        return terms

    def term_stages(self) -> dict[str, int]:
        keys = ["loss_era_feat", "loss_era_residual"]
        if self.twi:
            keys += ["loss_era_proj_ce", "loss_era_recon_ce"]
        return dict.fromkeys(keys, 1)
