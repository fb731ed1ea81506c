"""``branches``: ERA's residual branches on the base's pooled feature, and their loss.

Yan, Chen, Liu & Ye, "Expandable Residual Approximation for Knowledge Distillation", arXiv
2508.16050, 2025.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autosplit.distill._base import Outputs, Part, PartContext, TeacherOutputs, need_teacher
from autosplit.distill.candidate import Candidate, PartSpec
from autosplit.distill.losses import era_residual_loss, era_targets
from autosplit.distill.registry import STRUCTURES
from autosplit.distill.student import BuildContext, Student, at_least
from autosplit.errors import UserError
from autosplit.models import ZooModel


@dataclass(frozen=True)
class BranchesParams:
    """ERA: ``n_parts`` = M branches; ``mix_alpha`` = alpha of z = (1-a) z_S + a W_T f^(M) (0 =
    branches training-only); ``lambda_f`` on MSE(P f_S, f_T), ``lambda_g`` on the branch MSEs,
    ``gamma`` their decay; ``hidden`` = branch hidden width (None = C_t). Paper: 4, -, 5, 1, 0.5."""

    n_parts: int = 4
    mix_alpha: float = 0.0
    lambda_f: float = 5.0
    lambda_g: float = 1.0
    gamma: float = 0.5
    hidden: int | None = None

    def validate(self, path: str = "structure") -> None:
        at_least(path, self, n_parts=1, mix_alpha=0, lambda_f=0, lambda_g=0, hidden=1)
        if self.mix_alpha > 1:
            raise UserError(f"{path}.mix_alpha: must be in [0, 1], got {self.mix_alpha}")
        if self.gamma <= 0:
            raise UserError(f"{path}.gamma: must be > 0, got {self.gamma}")


class ERA(Part):
    """Yan, Chen, Liu & Ye, "Expandable Residual Approximation for Knowledge Distillation",
    arXiv 2508.16050, 2025.

    Matches the teacher's pooled feature f_T in residual steps: ``lambda_f * MSE(P f_S, sg f_T)``
    + ``(1/M) sum_i gamma^(i-1) lambda_g MSE(Delta_i, r_i)`` with r_1 = sg(f_T - P f_S),
    r_(i+1) = sg(r_i - Delta_i). With ``twi`` (Teacher Weight Integration) the teacher's frozen
    head must classify P f_S and every reconstruction: ``a_ce * [CE(W_T P f_S + b_T, y) + (1/M)
    sum_i gamma^(i-1) CE(W_T f^(i) + b_T, y)]``, a_ce = the logit loss's CE weight (ERA's code
    scales them so). The candidate's logit loss trains z_S (KD-base). Defaults: the paper's
    lambda_f 5, lambda_g 1, gamma 0.5.
    """

    Params = BranchesParams
    home_stage = 1

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.twi = ctx.twi
        self.ce_weight = ctx.ce_weight

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({"pooled"})

    def loss(
        self, outputs: Outputs, teacher_outputs: TeacherOutputs, labels: Tensor, *, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        feat_teacher = need_teacher(teacher_outputs, "pooled", "era")  # (B, C_t)
        projected, deltas = outputs["pooled_proj"], outputs["deltas"]  # (B, C_t), M x (B, C_t)
        targets = era_targets(feat_teacher, projected, deltas)
        terms = {
            "loss_era_feat": p.lambda_f * F.mse_loss(projected, feat_teacher.detach()),
            "loss_era_residual": p.lambda_g * era_residual_loss(deltas, targets, gamma=p.gamma),
        }
        if self.twi:  # TWI's cross-entropies take the KD base's CE weight, as in ERA's code
            recon = outputs["recon_logits"]  # M x (B, C)
            ce = [p.gamma**i * F.cross_entropy(z, labels) for i, z in enumerate(recon)]
            proj_ce = F.cross_entropy(outputs["proj_logits"], labels)
            terms["loss_era_proj_ce"] = self.ce_weight * proj_ce
            terms["loss_era_recon_ce"] = self.ce_weight * torch.stack(ce).sum() / len(recon)
        return terms

    def term_stages(self) -> dict[str, int]:
        keys = ["loss_era_feat", "loss_era_residual"]
        if self.twi:
            keys += ["loss_era_proj_ce", "loss_era_recon_ce"]
        return dict.fromkeys(keys, 1)


class ResidualBranch(nn.Sequential):
    """One MBRNet branch: Linear+BN1d+ReLU, Linear+BN1d; (B, C_s) -> Delta_i (B, C_t)."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__(
            nn.Linear(in_features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features, bias=False),
            nn.BatchNorm1d(out_features),
        )


@STRUCTURES.register("branches")
class BranchesStudent(Student):
    """ERA: f^(i) = P f_S + sum_{j<=i} Delta_j, classified by the teacher's frozen head (TWI).

    Deployed logits ``(1 - a) z_S + a W_T f^(M) + b_T``; with a = 0 only the base runs (the
    projector, branches and teacher head are training-only and not counted). The logit loss
    trains z_S; staged, the base trains first, then the projector and every branch together.
    """

    kind = "branches"
    Params = BranchesParams
    loss_part = ERA

    def __init__(self, base: ZooModel, teacher_head: nn.Module, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        in_features, out_features = base.tap("pooled").channels, teacher_head.in_features
        hidden = self.params.hidden or out_features
        self.projector = nn.Linear(in_features, out_features)  # P: C_s -> C_t
        self.part_names = tuple(f"branch{i}" for i in range(1, self.params.n_parts + 1))
        for name in self.part_names:
            self.add_module(name, ResidualBranch(in_features, hidden, out_features))
        self.teacher_head = teacher_head  # frozen (BuildContext.teacher_head)

    @classmethod
    def build(cls, ctx: BuildContext, params: Any) -> Student:
        def assemble(width: float) -> Student:
            return cls(ctx.base(width), ctx.teacher_head(), params=params, base_width=width)

        deployed = assemble if params.mix_alpha > 0 else ctx.base  # what the budget must hold
        width = ctx.width(
            ctx.candidate.split.base_width, "student base", deployed, ctx.target_flops
        )
        return assemble(width)

    @classmethod
    def check(cls, candidate: Candidate) -> None:
        if candidate.structure.get("mix_alpha", 0.0) > 0 and not candidate.twi:
            raise UserError(
                "structure.mix_alpha: > 0 deploys the teacher's classifier on the branches' "
                "reconstruction (ERA's TWI); set twi: true, or mix_alpha: 0"
            )

    @classmethod
    def label(cls, spec: PartSpec) -> str:
        return f"{spec.name} K={spec.get('n_parts')}"

    def _reconstruct(self, pooled: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """P f_S (B, C_t), the branches' Delta_i and the reconstructions f^(i) = P f_S +
        sum_{j<=i} Delta_j (M x (B, C_t) each)."""
        pooled_proj = self.projector(pooled)  # P f_S, (B, C_t)
        deltas = [branch(pooled) for branch in self.parts]
        recon, recons = pooled_proj, []
        for delta in deltas:
            recon = recon + delta  # f^(i)
            recons.append(recon)
        return pooled_proj, deltas, recons

    def _classify(self, features: list[Tensor]) -> list[Tensor]:
        """W_T x + b_T for each (B, C_t) in ``features``, in one head call: stacked along the
        batch (the head is per-sample), so it runs once per training forward too."""
        logits = self.teacher_head(torch.cat(features))  # (n * B, classes)
        return list(logits.split(features[0].shape[0]))

    def _mix(self, logits_student: Tensor, logits_recon: Tensor) -> Tensor:
        alpha = self.params.mix_alpha
        return logits_recon if alpha == 1 else (1 - alpha) * logits_student + alpha * logits_recon

    def forward(self, images: Tensor) -> Tensor:
        if self.params.mix_alpha == 0:
            return self.base(images)
        pooled = self.base.pool(self.base.forward_stages(images)[self.base.last_stage.name])
        # Only f^(M) is deployed: one head pass on it, W_T f^(M) + b_T (bias added once).
        logits_recon = self.teacher_head(self._reconstruct(pooled)[2][-1])  # (B, classes)
        if self.params.mix_alpha == 1:
            return logits_recon  # the base's own head is not run
        return self._mix(self.base.head(pooled), logits_recon)

    def forward_train(self, images: Tensor) -> dict[str, Any]:
        taps = self.base.forward_taps(images)
        pooled_proj, deltas, recons = self._reconstruct(taps["pooled"])
        proj_logits, *recon_logits = self._classify([pooled_proj, *recons])
        logits = (
            taps["logits"]
            if self.params.mix_alpha == 0
            else self._mix(taps["logits"], recon_logits[-1])
        )
        return {
            "logits": logits,
            "base_taps": taps,
            "logits_student": taps["logits"],
            "pooled_proj": pooled_proj,
            "deltas": deltas,  # M x (B, C_t)
            "recon_logits": recon_logits,  # M x (B, classes)
            "proj_logits": proj_logits,  # (B, classes)
        }

    def inference_modules(self) -> list[tuple[str, nn.Module]]:
        if self.params.mix_alpha == 0:
            return [("base", self.base)]
        names = ("base", "projector", *self.part_names, "teacher_head")
        return [(name, getattr(self, name)) for name in names]

    # -- plumbing ------------------------------------------------------------------------------

    def logit_streams(self, outputs: dict[str, Any]) -> list[Tensor]:
        return [outputs["logits_student"]]  # z_S; the branches learn features, not logits

    def staged_logits(self, images: Tensor, stage: int) -> Tensor:
        if stage == 0:  # the branches are untrained: judge the base alone
            return self.forward_train(images)["logits_student"]
        return self(images)
