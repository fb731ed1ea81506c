"""``assistant``: RKD's base and assistant, fused at the teacher's last map, and their loss.

Gao, Shen, Li & Loy, "Residual Knowledge Distillation", arXiv 2002.09168, 2020.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from autosplit.distill._base import Outputs, Part, PartContext, TeacherOutputs, need_teacher
from autosplit.distill.losses import normalized_mse
from autosplit.distill.registry import STRUCTURES
from autosplit.distill.student import BuildContext, Student, at_least, stage_size
from autosplit.errors import UserError
from autosplit.flops import count_flops
from autosplit.models import ZooModel
from autosplit.modules import resize


@dataclass(frozen=True)
class AssistantParams:
    """RKD: ``mimic_weight`` on each L_S^k = normalized_mse(r_k(F_S^k), F_T^k), ``residual_weight``
    on L_A = normalized_mse(feat_assistant, sg(F_T - feat_base)) at the teacher's last stage;
    ``mimic_stages`` = "all" (the base mimics the teacher at every stage, docs/methods.md) or "last"
    (at the last stage only)."""

    mimic_weight: float = 1.0
    residual_weight: float = 1.0
    mimic_stages: Literal["all", "last"] = "all"

    def validate(self, path: str = "structure") -> None:
        at_least(path, self, mimic_weight=0, residual_weight=0)


class RKD(Part):
    """Gao, Shen, Li & Loy, "Residual Knowledge Distillation", arXiv 2002.09168, 2020.

    Matches the teacher's feature maps with the base's, and the teacher's last map with the sum
    of the base's (through the deployed adapter r) and an assistant's: ``mimic_weight *
    nMSE(r_k(F_S^k), F_T^k)`` for each mimicked stage k trains the base,
    ``residual_weight * nMSE(F_A, sg(F_T - r(F_S)))`` trains the assistant on what the base
    misses. nMSE = MSE / mean square of its target (scale-free). ``mimic_stages: all`` pairs the
    stages from the last one backwards (the last pair uses the deployed r; the earlier ones
    training-only 1x1 conv + BN adapters r_k after resizing F_S^k to the teacher's size, not
    counted); ``last`` mimics the last stage only. Reading (the paper's taps and schedule are
    not public, docs/methods.md): taps are stage outputs; the schedule is the candidate's
    (``staged``: base mimics, then assistant + head).
    """

    Params = AssistantParams

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.teacher_tap = ctx.teacher_stages[-1]
        # (base stage, teacher stage) pairs before the last, from the end: depths may differ.
        pairs = list(zip(ctx.base_stages[-2::-1], ctx.teacher_stages[-2::-1], strict=False))
        self.early_pairs = pairs[::-1] if params.mimic_stages == "all" else []
        self.adapters = nn.ModuleDict()  # teacher stage -> r_k (training-only)
        self.sizes: dict[str, tuple[int, int]] = {}
        for base_tap, teacher_tap in self.early_pairs:
            channels, *size = ctx.teacher_shapes[teacher_tap]
            self.adapters[teacher_tap] = _adapter(ctx.base_shapes[base_tap][0], channels)
            self.sizes[teacher_tap] = (size[0], size[1])

    @property
    def mimicked(self) -> tuple[str, ...]:
        """The teacher stages the base mimics, in forward order."""
        return (*(teacher_tap for _, teacher_tap in self.early_pairs), self.teacher_tap)

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset(self.mimicked)

    def extend(self, outputs: Outputs) -> None:
        taps = outputs["base_taps"]
        outputs["rkd_mimic"] = {  # teacher stage -> r_k(F_S^k), (B, C_t^k, H_t^k, W_t^k)
            teacher_tap: self.adapters[teacher_tap](resize(taps[base_tap], self.sizes[teacher_tap]))
            for base_tap, teacher_tap in self.early_pairs
        }
        outputs["rkd_mimic"][self.teacher_tap] = outputs["feat_base"]  # r(F_S), deployed

    def loss(
        self, outputs: Outputs, teacher_outputs: TeacherOutputs, labels: Tensor, *, epoch: int
    ) -> dict[str, Tensor]:
        terms = {
            f"loss_rkd_mimic_{tap}": self.params.mimic_weight
            * normalized_mse(feat, need_teacher(teacher_outputs, tap, "rkd"))
            for tap, feat in outputs["rkd_mimic"].items()
        }
        feat_teacher = need_teacher(teacher_outputs, self.teacher_tap, "rkd")  # (B, C_t, H, W)
        # The assistant's target is detached: the residual never pushes the base.
        target = (feat_teacher - outputs["feat_base"]).detach()
        residual = normalized_mse(outputs["feat_assistant"], target)
        return {**terms, "loss_rkd_residual": self.params.residual_weight * residual}

    def term_stages(self) -> dict[str, int]:
        return {
            **{f"loss_rkd_mimic_{tap}": 0 for tap in self.mimicked},
            "loss_rkd_residual": 1,
        }


def _adapter(in_channels: int, out_channels: int) -> nn.Sequential:
    """RKD's r: 1x1 conv + BN onto the teacher's last-stage channels."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
    )


class _MapBranch(nn.Module):
    """Backbone -> last stage -> resize -> adapter: one side of RKD's fused map (for the solver)."""

    def __init__(self, backbone: ZooModel, adapter: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.backbone, self.adapter, self.size = backbone, adapter, size

    def forward(self, images: Tensor) -> Tensor:
        stages = self.backbone.forward_stages(images)
        return self.adapter(resize(stages[self.backbone.last_stage.name], self.size))


class _PoolHead(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.head(_pool(feature_map))


def _pool(feature_map: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C): global average pooling."""
    return torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1)


@STRUCTURES.register("assistant")
class AssistantStudent(Student):
    """RKD: F = r(F_S) + F_A at the teacher's last-stage shape -> pool -> head.

    Base and assistant run in parallel; both adapters and the head are deployed (counted). The
    head is new, or with ``twi`` a frozen copy of the teacher's (it reads C_t features). The
    logit loss trains the fused head with the assistant (stage 1); the base adapter r is the
    base's mimicry path and trains with the base.
    """

    kind = "assistant"
    Params = AssistantParams
    part_names = ("assistant",)
    part_networks = True
    loss_part = RKD
    base_side_prefixes = ("adapter_base.",)

    def __init__(
        self,
        base: ZooModel,
        assistant: ZooModel,
        head: nn.Module,
        feat_channels: int,
        feat_size: tuple[int, int],
        **kwargs: Any,
    ) -> None:
        super().__init__(base, **kwargs)
        self.assistant = assistant
        self.adapter_base = _adapter(base.last_stage.channels, feat_channels)
        self.adapter_assistant = _adapter(assistant.last_stage.channels, feat_channels)
        self.head = head
        self.feat_channels = feat_channels  # the teacher's last-stage C_t
        self.feat_size = feat_size  # the teacher's last-stage (H, W)

    @classmethod
    def build(cls, ctx: BuildContext, params: Any) -> Student:
        teacher, split = ctx.teacher, ctx.candidate.split
        channels, size = teacher.last_stage.channels, stage_size(teacher, ctx.input_shape)
        if ctx.candidate.twi:
            if teacher.head.in_features != channels:
                raise UserError(
                    f"twi: the teacher's head reads {teacher.head.in_features} features, "
                    f"not its last stage's {channels} channels, so it cannot classify "
                    "the assistant's fused map; set twi: false"
                )
            head: nn.Module = ctx.teacher_head()
        else:
            head = nn.Linear(channels, ctx.num_classes)
        head_flops = count_flops(_PoolHead(head), (channels, *size))

        def base_side(width: float) -> nn.Module:
            model = ctx.base(width)
            return _MapBranch(model, _adapter(model.last_stage.channels, channels), size)

        def assistant_side(width: float) -> nn.Module:
            model = ctx.part(width)
            return _MapBranch(model, _adapter(model.last_stage.channels, channels), size)

        target = ctx.target_flops
        base_width = ctx.width(
            split.base_width, "student base", base_side, split.base_share * target - head_flops
        )
        part_width = ctx.width(
            split.part_width, "assistant", assistant_side, (1.0 - split.base_share) * target
        )
        return cls(
            ctx.base(base_width),
            ctx.part(part_width),
            head,
            channels,
            size,
            params=params,
            base_width=base_width,
            part_width=part_width,
        )

    def _fuse(self, base_map: Tensor, images: Tensor) -> dict[str, Tensor]:
        feat_base = self.adapter_base(resize(base_map, self.feat_size))  # (B, C_t, H_t, W_t)
        assistant_map = self.assistant.forward_stages(images)[self.assistant.last_stage.name]
        feat_assistant = self.adapter_assistant(resize(assistant_map, self.feat_size))
        fused = feat_base + feat_assistant  # (B, C_t, H_t, W_t)
        logits = self.head(_pool(fused))  # (B, classes)
        return {"logits": logits, "feat_base": feat_base, "feat_assistant": feat_assistant}

    def forward(self, images: Tensor) -> Tensor:
        base_map = self.base.forward_stages(images)[self.base.last_stage.name]
        return self._fuse(base_map, images)["logits"]

    def forward_train(self, images: Tensor) -> dict[str, Any]:
        taps = self.base.forward_taps(images)
        return {**self._fuse(taps[self.base.last_stage.name], images), "base_taps": taps}

    def inference_modules(self) -> list[tuple[str, nn.Module]]:
        names = ("base", "assistant", "adapter_base", "adapter_assistant", "head")
        return [(name, getattr(self, name)) for name in names]

    # -- plumbing ------------------------------------------------------------------------------

    def stream_stages(self) -> tuple[int, ...]:
        return (1,)  # the head reads r(F_S) + F_A: trained with the assistant

    def stream_feature(self, outputs: dict[str, Any]) -> Tensor | None:
        return _pool(outputs["feat_base"] + outputs["feat_assistant"])  # (B, C_t)

    @property
    def stream_feature_dim(self) -> int | None:
        return self.feat_channels

    def freeze_unused(self) -> None:
        # The fused map has its own head: the base's and the assistant's zoo heads never see a
        # loss, so they are frozen rather than handed to the optimiser unused.
        for model in (self.base, *self.parts):
            model.head.requires_grad_(False)
