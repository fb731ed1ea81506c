"""``res_chain``: ResKD's chain of res-students with its early exit, and its residual loss.

Li, Li, Omar, Wu & Li, "ResKD: Residual-Guided Knowledge Distillation", IEEE TIP, 2021.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from autosplit.distill._base import Outputs, Part, PartContext, TeacherOutputs, need_teacher
from autosplit.distill.candidate import PartSpec
from autosplit.distill.losses import reskd_residual_mse
from autosplit.distill.parts.twi import TWI
from autosplit.distill.registry import STRUCTURES
from autosplit.distill.student import BuildContext, Student, at_least
from autosplit.errors import UserError
from autosplit.models import ZooModel


@dataclass(frozen=True)
class ResChainParams:
    """ResKD: ``n_parts`` = K res-students; ``residual`` = "kd" (KD through the partial sum
    z^(k), training R_k) or "mse" (MSE(z_Rk, sg(z_T - z^(k-1)))); ``residual_weight`` its
    weight.

    The exit gate: ``exit_threshold`` theta on max softmax (> 1 never exits); None = calibrate
    it after training on the first ``calibration_share`` of the (class-interleaved) training
    rows, held out from training: the cheapest theta within ``exit_max_drop`` accuracy points of running the whole
    chain there, or, with ``exit_flops_share`` set, the most accurate theta whose expected FLOPs
    are within that share of the worst case."""

    n_parts: int = 2
    exit_threshold: float | None = None
    residual: Literal["kd", "mse"] = "kd"
    residual_weight: float = 1.0
    calibration_share: float = 0.1
    exit_max_drop: float = 0.1
    exit_flops_share: float | None = None

    def validate(self, path: str = "structure") -> None:
        at_least(path, self, n_parts=1, exit_threshold=0, residual_weight=0, exit_max_drop=0)
        if not 0.0 < self.calibration_share < 1.0:
            raise UserError(
                f"{path}.calibration_share: must be in (0, 1), got {self.calibration_share}"
            )
        share = self.exit_flops_share
        if share is not None and not 0.0 < share <= 1.0:
            raise UserError(f"{path}.exit_flops_share: must be in (0, 1] or null, got {share}")


class ResKD(Part):
    """Li, Li, Omar, Wu & Li, "ResKD: Residual-Guided Knowledge Distillation", IEEE TIP, 2021.

    Matches the remaining teacher-student logit gap with res-student k, z^(k) = z^(k-1) + z_Rk,
    training only R_k. ``residual: kd`` (KD through the sum): the candidate's logit loss is
    applied to sg(z^(k-1)) + z_Rk, weighted by ``residual_weight`` (the student's logit
    streams; this part adds no term). ``residual: mse``: ``residual_weight * MSE(z_Rk,
    sg(z_T - z^(k-1)))``, and the logit loss sees z^(0) only. Reading (docs/methods.md): the paper's
    stopping rule is not public, so K (``n_parts``) is a search knob and the exit gate's
    threshold is calibrated on training rows held out for it, with a cost rule (see
    ``ResChainParams``).
    """

    Params = ResChainParams

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.n_parts = ctx.n_parts

    @property
    def teacher_taps(self) -> frozenset[str]:
        return frozenset({"logits"}) if self.params.residual == "mse" else frozenset()

    def loss(
        self, outputs: Outputs, teacher_outputs: TeacherOutputs, labels: Tensor, *, epoch: int
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


@STRUCTURES.register("res_chain")
class ResChainStudent(Student):
    """ResKD: z^(0) = z_S, z^(k) = z^(k-1) + z_Rk; thin res-students all see the image.

    In eval mode with ``exit_threshold`` set, a sample stops after z^(k) once its max softmax
    reaches the threshold, and only the samples still going run R_(k+1). Staged, res-student k
    trains in stage k; with ``residual: kd`` the logit loss trains every partial sum z^(k) in
    its stage.
    """

    kind = "res_chain"
    Params = ResChainParams
    part_networks = True
    exit_gate = True
    loss_part = ResKD
    twi_part = TWI

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

    @classmethod
    def label(cls, spec: PartSpec) -> str:
        return f"{spec.name} K={spec.get('n_parts')}"

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

    # -- plumbing ------------------------------------------------------------------------------

    def stream_stages(self) -> tuple[int, ...]:
        return tuple(range(len(self.part_names) + 1)) if self.params.residual == "kd" else (0,)

    def stream_weights(self) -> tuple[float, ...]:
        if self.params.residual == "kd":
            return (1.0,) + (float(self.params.residual_weight),) * len(self.part_names)
        return (1.0,)

    def logit_streams(self, outputs: dict[str, Any]) -> list[Tensor]:
        partial, part_logits = outputs["partial_logits"], outputs["part_logits"]
        streams = [partial[0]]  # z^(0) = z_S
        if self.params.residual == "kd":
            # KD through the sum trains only R_k: sg(z^(k-1)) + z_Rk.
            streams += [
                partial[k - 1].detach() + part_logits[k - 1] for k in range(1, len(partial))
            ]
        return streams

    def stream_feature(self, outputs: dict[str, Any]) -> Tensor | None:
        return None  # the deployed logits are a sum of heads: no one feature

    @property
    def stream_feature_dim(self) -> int | None:
        return None

    def part_stage(self, k: int) -> int:
        return k

    def staged_logits(self, images: Tensor, stage: int) -> Tensor:
        # While part k trains, the later parts are untrained: judge z^(k), not the chain.
        return self.forward_train(images)["partial_logits"][stage]
