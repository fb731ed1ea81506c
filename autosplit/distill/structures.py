"""The four student structures, each a ``Student`` subclass registered in ``STRUCTURES``.

Each has a frozen ``Params`` dataclass (in :mod:`autosplit.distill.structure_params`) whose
fields are the candidate's ``structure.*`` keys. The structures' loss terms live in
``autosplit.distill.parts`` and read the same params; here is only what is built and what runs.

- ``single``: the base alone.
- ``assistant``: RKD (Gao et al., "Residual Knowledge Distillation", arXiv 2002.09168, 2020).
- ``res_chain``: ResKD (Li et al., "ResKD: Residual-Guided Knowledge Distillation", IEEE TIP 2021).
- ``branches``: ERA (Yan et al., "Expandable Residual Approximation", arXiv 2508.16050, 2025).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from autosplit.distill.registry import STRUCTURES
from autosplit.distill.structure_params import (
    AssistantParams,
    BranchesParams,
    ResChainParams,
    SingleParams,
)
from autosplit.distill.student import (
    BuildContext,
    Student,
    resize,
    stage_size,
)
from autosplit.errors import UserError
from autosplit.flops import count_flops
from autosplit.models import ZooModel

# --- single ---------------------------------------------------------------------------------


@STRUCTURES.register("single")
class SingleStudent(Student):
    """The base alone: the whole target goes to one network (``base_share`` is ignored)."""

    kind = "single"
    Params = SingleParams

    @classmethod
    def build(cls, ctx: BuildContext, params: Any) -> Student:
        width = ctx.width(
            ctx.candidate.split.base_width, "student base", ctx.base, ctx.target_flops
        )
        return cls(ctx.base(width), params=params, base_width=width)


# --- assistant (RKD) --------------------------------------------------------------------------


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
        return self.head(torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1))


@STRUCTURES.register("assistant")
class AssistantStudent(Student):
    """RKD: F = r(F_S) + F_A at the teacher's last-stage shape -> pool -> head.

    Base and assistant run in parallel; both adapters and the head are deployed (counted). The
    head is new, or with ``twi`` a frozen copy of the teacher's (it reads C_t features).
    """

    kind = "assistant"
    Params = AssistantParams
    part_names = ("assistant",)

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
        logits = self.head(torch.flatten(F.adaptive_avg_pool2d(fused, 1), 1))  # (B, classes)
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


# --- res_chain (ResKD) ------------------------------------------------------------------------


@STRUCTURES.register("res_chain")
class ResChainStudent(Student):
    """ResKD: z^(0) = z_S, z^(k) = z^(k-1) + z_Rk; thin res-students all see the image.

    In eval mode with ``exit_threshold`` set, a sample stops after z^(k) once its max softmax
    reaches the threshold, and only the samples still going run R_(k+1).
    """

    kind = "res_chain"
    Params = ResChainParams

    def __init__(self, base: ZooModel, res_students: list[ZooModel], **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        self.part_names = tuple(f"res{k}" for k in range(1, len(res_students) + 1))
        for name, model in zip(self.part_names, res_students, strict=True):
            self.add_module(name, model)

    @classmethod
    def build(cls, ctx: BuildContext, params: Any) -> Student:
        split, target = ctx.candidate.split, ctx.target_flops
        base_width = ctx.width(
            split.base_width, "student base", ctx.base, split.base_share * target
        )
        part_width = ctx.width(
            split.part_width,
            "res-students",
            ctx.part,
            (1.0 - split.base_share) * target / params.n_parts,
        )
        res_students = [ctx.part(part_width) for _ in range(params.n_parts)]
        return cls(
            ctx.base(base_width),
            res_students,
            params=params,
            base_width=base_width,
            part_width=part_width,
        )

    def forward(self, images: Tensor) -> Tensor:
        if self.training or self.exit_threshold is None:
            logits = self.base(images)  # (B, C)
            for res_student in self.parts:
                logits = logits + res_student(images)
            return logits
        return self._gated(images, self.exit_threshold)

    def _gated(self, images: Tensor, threshold: float) -> Tensor:
        logits = self.base(images)  # z^(0), (B, C)
        out = logits
        index = torch.arange(images.shape[0], device=images.device)  # samples still going
        for res_student in self.parts:
            going = F.softmax(logits.float(), dim=1).amax(dim=1) < threshold  # (b,)
            if not bool(going.any()):
                break
            index, logits = index[going], logits[going]
            logits = logits + res_student(images[index])  # z^(k) of the samples still going
            out = out.index_copy(0, index, logits.to(out.dtype))
        return out

    def forward_train(self, images: Tensor) -> dict[str, Any]:
        taps = self.base.forward_taps(images)
        partial, part_logits = [taps["logits"]], []
        for res_student in self.parts:
            part_logits.append(res_student(images))  # z_Rk, (B, C)
            partial.append(partial[-1] + part_logits[-1])  # z^(k)
        return {
            "logits": partial[-1],
            "base_taps": taps,
            "partial_logits": partial,
            "part_logits": part_logits,
        }

    def inference_modules(self) -> list[tuple[str, nn.Module]]:
        return [("base", self.base), *((name, getattr(self, name)) for name in self.part_names)]


# --- branches (ERA) ---------------------------------------------------------------------------


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
    projector, branches and teacher head are training-only and not counted).
    """

    kind = "branches"
    Params = BranchesParams

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

    def _reconstruct(self, pooled: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        pooled_proj = self.projector(pooled)  # P f_S, (B, C_t)
        deltas = [branch(pooled) for branch in self.parts]  # M x (B, C_t)
        recon, recon_logits = pooled_proj, []
        for delta in deltas:
            recon = recon + delta  # f^(i)
            recon_logits.append(self.teacher_head(recon))  # (B, classes)
        return pooled_proj, deltas, recon_logits

    def _mix(self, logits_student: Tensor, logits_recon: Tensor) -> Tensor:
        alpha = self.params.mix_alpha
        return logits_recon if alpha == 1 else (1 - alpha) * logits_student + alpha * logits_recon

    def forward(self, images: Tensor) -> Tensor:
        if self.params.mix_alpha == 0:
            return self.base(images)
        pooled = self.base.pool(self.base.forward_stages(images)[self.base.last_stage.name])
        logits_recon = self._reconstruct(pooled)[2][-1]
        if self.params.mix_alpha == 1:
            return logits_recon  # the base's own head is not run
        return self._mix(self.base.head(pooled), logits_recon)

    def forward_train(self, images: Tensor) -> dict[str, Any]:
        taps = self.base.forward_taps(images)
        pooled_proj, deltas, recon_logits = self._reconstruct(taps["pooled"])
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
            "deltas": deltas,
            "recon_logits": recon_logits,
            "proj_logits": self.teacher_head(pooled_proj),
        }

    def inference_modules(self) -> list[tuple[str, nn.Module]]:
        if self.params.mix_alpha == 0:
            return [("base", self.base)]
        names = ("base", "projector", *self.part_names, "teacher_head")
        return [(name, getattr(self, name)) for name in names]
