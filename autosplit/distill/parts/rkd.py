"""RKD: the base mimics the teacher's last map; an assistant learns the detached residual."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from autosplit.distill._base import Outputs, Part, PartContext, need_teacher
from autosplit.distill.losses import normalized_mse
from autosplit.distill.student import resize as resize_map


@dataclass(frozen=True)
class RKDParams:
    """The ``assistant`` structure's loss parameters (read from ``candidate.structure``)."""

    mimic_weight: float = 1.0
    residual_weight: float = 1.0
    mimic_stages: Literal["last", "all"] = "last"


class RKD(Part):
    """Gao, Shen, Li & Loy, "Residual Knowledge Distillation", arXiv 2002.09168, 2020.

    Matches the teacher's last feature map with the sum of the base's (through the deployed
    adapter r) and an assistant's: ``mimic_weight * nMSE(r(F_S), F_T)`` trains the base,
    ``residual_weight * nMSE(F_A, sg(F_T - r(F_S)))`` trains the assistant on what the base
    misses. nMSE = MSE / mean square of its target (scale-free). Reading (the paper's taps and
    schedule are not public, METHODS.md): taps = the last stage (``mimic_stages: all`` adds
    every earlier stage, paired from the end, through training-only 1x1 conv + BN adapters);
    the schedule is the candidate's (``staged``: base mimics, then assistant + head).
    ``mimic_stages`` is read from the structure's params when they have it (else ``last``).
    """

    Params = RKDParams

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.teacher_tap = ctx.teacher_stages[-1]
        pairs: list[tuple[str, str]] = []
        if params.mimic_stages == "all":  # earlier stages, paired from the end
            pairs = list(
                zip(reversed(ctx.base_stages[:-1]), reversed(ctx.teacher_stages[:-1]), strict=False)
            )[::-1]
        self.pairs = pairs
        self.adapters = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(ctx.base_shapes[s][0], ctx.teacher_shapes[t][0], 1, bias=False),
                nn.BatchNorm2d(ctx.teacher_shapes[t][0]),
            )
            for s, t in pairs
        )
        self.sizes = [tuple(ctx.teacher_shapes[t][1:]) for _, t in pairs]

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({self.teacher_tap, *(t for _, t in self.pairs)})

    def extend(self, outputs: Outputs) -> None:
        taps = outputs["base_taps"]
        steps = zip(self.adapters, self.pairs, self.sizes, strict=True)
        outputs["rkd_mimic"] = [
            adapter(resize_map(taps[student_tap], size))  # (B, C_t, H_t, W_t)
            for adapter, (student_tap, _), size in steps
        ]

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        feat_teacher = need_teacher(teacher_outputs, self.teacher_tap, "rkd")  # (B, C_t, H, W)
        feat_base = outputs["feat_base"]  # r(F_S), (B, C_t, H, W)
        mimic = normalized_mse(feat_base, feat_teacher)
        for adapted, (_, tap) in zip(outputs["rkd_mimic"], self.pairs, strict=True):
            mimic = mimic + normalized_mse(adapted, need_teacher(teacher_outputs, tap, "rkd"))
        # The assistant's target is detached: the residual never pushes the base.
        target = (feat_teacher - feat_base).detach()
        residual = normalized_mse(outputs["feat_assistant"], target)
        return {
            "loss_rkd_mimic": self.params.mimic_weight * mimic,
            "loss_rkd_residual": self.params.residual_weight * residual,
        }

    def term_stages(self) -> dict[str, int]:
        return {"loss_rkd_mimic": 0, "loss_rkd_residual": 1}
