"""AEKT: adaptive explicit (target) and implicit (non-target) knowledge, on a separate head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from autosplit.distill._base import LogitPart, Outputs, PartContext, linear_warmup, need_teacher
from autosplit.distill.losses import aekt_loss
from autosplit.distill.registry import LOGIT_LOSSES
from autosplit.errors import UserError


@LOGIT_LOSSES.register("aekt")
class AEKT(LogitPart):
    """Park & Lee, "Adaptive Explicit Knowledge Transfer for Knowledge Distillation", arXiv, 2024.

    Matches the teacher's non-target distribution (implicit knowledge, NCKD, weight ``beta``)
    and its target confidence (explicit knowledge, TCKD, adaptive weight ``w``) on distillation
    logits z_dist, while CE trains the classification logits z_cls that are deployed:
    ``ce_weight * CE(z_cls) + tau^2 * mean(beta * NCKD + w * TCKD)(z_dist)``.

    Layout ``serial``: z_dist = FC_ser(z_cls), FC_ser C x C initialised near identity;
    ``parallel``: z_dist from its own head beside the deployed one. Both heads are training-only.
    Reading (the paper's weight function is not public, docs/methods.md): ``w = clip(sg(p^T_t /
    p^S_t), w_min, w_max) ** power``; ``w_min``, ``w_max`` have no published values.
    ``fixed_weight`` replaces ``w`` by a constant (ablations, tests). The transfer term warms up
    linearly over ``warmup_epochs`` as DKD's does (AEKT builds on DKD's decoupling; without it the
    serial head's early gradients at tau^2 * beta = 128 diverged in short runs here).
    """

    @dataclass(frozen=True)
    class Params:
        ce_weight: float = 1.0
        beta: float = 8.0
        temperature: float = 4.0
        w_min: float = 0.5
        w_max: float = 2.0
        power: float = 1.0
        layout: Literal["serial", "parallel"] = "serial"
        fixed_weight: float | None = None
        warmup_epochs: int = 20

    terms = ("ce", "aekt")

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        classes = ctx.num_classes
        if params.layout == "parallel":
            if ctx.stream_feature_dim is None or len(ctx.stream_stages) != 1:
                raise UserError(
                    f"logit_loss.layout: 'parallel' needs one feature the head reads; structure "
                    f"{ctx.structure!r} has {len(ctx.stream_stages)} logit streams; use 'serial'"
                )
            self.heads = nn.ModuleList([nn.Linear(ctx.stream_feature_dim, classes)])
        else:  # one FC_ser per stream, near identity: z_dist starts as z_cls
            self.heads = nn.ModuleList([_near_identity(classes) for _ in ctx.stream_stages])

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({"logits"})

    def stage_parameters(self) -> dict[int, list[nn.Parameter]]:
        stages: dict[int, list[nn.Parameter]] = {}
        for stage, head in zip(self.stream_stages, self.heads, strict=False):
            stages.setdefault(stage, []).extend(head.parameters())
        return stages

    def extend(self, outputs: Outputs) -> None:
        if self.params.layout == "parallel":
            outputs["aekt_dist"] = [self.heads[0](outputs["stream_feature"])]  # [(B, C)]
        else:
            outputs["aekt_dist"] = [
                head(logits)
                for head, logits in zip(self.heads, outputs["logit_streams"], strict=True)
            ]

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
        logits_teacher = need_teacher(teacher_outputs, "logits", "aekt")  # (B, C)
        p = self.params
        logits_dist = outputs["aekt_dist"][stream]  # (B, C)
        weight = None
        if p.fixed_weight is not None:
            weight = torch.full_like(labels, p.fixed_weight, dtype=logits_dist.dtype)
        transfer = aekt_loss(
            logits_dist,
            logits_teacher,
            labels,
            beta=p.beta,
            temperature=p.temperature,
            w_min=p.w_min,
            w_max=p.w_max,
            power=p.power,
            weight=weight,
        )
        warm = linear_warmup(epoch, p.warmup_epochs)
        return {"ce": p.ce_weight * self.ce(logits, labels), "aekt": warm * transfer}


def _near_identity(classes: int) -> nn.Linear:
    layer = nn.Linear(classes, classes)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(classes) + 1e-3 * torch.randn(classes, classes))
        layer.bias.zero_()
    return layer
