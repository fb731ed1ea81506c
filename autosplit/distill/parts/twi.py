"""TWI as a loss part: the teacher's frozen head classifies the projected base feature."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from autosplit.distill._base import Outputs, Part, PartContext
from autosplit.distill.student import frozen_copy


class TWI(Part):
    """Yan et al., "Expandable Residual Approximation for Knowledge Distillation", arXiv, 2025
    (its Teacher Weight Integration, on a structure without branches).

    Matches the teacher's classifier: the base's pooled feature, through a training-only
    projector P (Linear C_s -> C_t), must be classified right by the teacher's frozen head:
    ``a_ce * CE(W_T P f_S + b_T, y)``, a_ce = the logit loss's CE weight (as ERA's code scales
    its TWI terms). Candidates switch it with ``twi: true``; it has no params of its own. The
    head copy never trains; P is not deployed and not counted.
    """

    @dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.ce_weight = ctx.ce_weight
        self.projector = nn.Linear(ctx.base_shapes["pooled"][0], ctx.teacher_head.in_features)
        self.teacher_head = frozen_copy(ctx.teacher_head)

    def extend(self, outputs: Outputs) -> None:
        projected = self.projector(outputs["base_taps"]["pooled"])  # (B, C_t)
        outputs["proj_logits"] = self.teacher_head(projected)  # (B, classes)

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        ce = nn.functional.cross_entropy(outputs["proj_logits"], labels)
        return {"loss_twi": self.ce_weight * ce}

    def term_stages(self) -> dict[str, int]:
        return {"loss_twi": 0}
