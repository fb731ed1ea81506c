"""FitNets: the student's middle stage regresses the teacher's through a training-only adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from autosplit.distill._base import Outputs, Part, PartContext, need_teacher
from autosplit.distill.losses import hint_loss
from autosplit.distill.registry import FEATURE_LOSSES
from autosplit.modules import resize as resize_map


def middle(stages: tuple[str, ...]) -> str:
    """The middle map tap (rounding towards the input; never the last of two or more)."""
    return stages[(len(stages) - 1) // 2]


@FEATURE_LOSSES.register("hint")
class Hint(Part):
    """Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR, 2015.

    Matches the teacher's middle-stage feature map with the base's middle-stage map through an
    adapter (resize to the teacher's size, 3x3 conv + BN + ReLU to its channels):
    ``weight * MSE(adapter(F_S), F_T)``, ``weight`` 100 on raw MSE as in the CRD benchmark.
    The adapter is training-only: not deployed, not counted.
    """

    @dataclass(frozen=True)
    class Params:
        weight: float = 100.0

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.student_tap = middle(ctx.base_stages)
        self.teacher_tap = middle(ctx.teacher_stages)
        channels_in = ctx.base_shapes[self.student_tap][0]
        channels_out, *self.size = ctx.teacher_shapes[self.teacher_tap]  # C_t, [H_t, W_t]
        self.adapter = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
        )

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({self.teacher_tap})

    def extend(self, outputs: Outputs) -> None:
        feat = outputs["base_taps"][self.student_tap]  # (B, C_s, H_s, W_s)
        feat = resize_map(feat, tuple(self.size))  # (B, C_s, H_t, W_t)
        outputs["hint_feat"] = self.adapter(feat)  # (B, C_t, H_t, W_t)

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        feat_teacher = need_teacher(teacher_outputs, self.teacher_tap, "hint")
        return {"loss_hint": self.params.weight * hint_loss(outputs["hint_feat"], feat_teacher)}

    def term_stages(self) -> dict[str, int]:
        return {"loss_hint": 0}
