"""The student: the deployable network a candidate builds, and what it costs.

A ``Student`` is a base zoo model plus the structure's residual parts (an RKD assistant, ResKD
res-students or ERA branches) and whatever they need at inference (adapters, a head). FLOPs are
counted on it and only on it: training-only modules (loss adapters, IE-KD encoders, AEKT's
FC_ser, the TWI projector of a single student) live in the Distiller.

Widths come from fractions: the candidate's ``budget_share`` of ``max_flops`` is the student's
target, the base gets ``base_share`` of it and the parts share the rest; ``flops.solve_width``
finds the widest network of a family under each figure. Explicit widths skip the solver.

The structures are the ``Student`` subclasses in :mod:`autosplit.distill.structures`, one file
each, registered in ``STRUCTURES`` by key. Their residual parts are top-level children named by
part (``res1``, ``branch2``, ``assistant`` ...), so fvcore's per-module count is the per-part
cost. Adding a structure is one file there plus its import line in that package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from autosplit.config import from_dict
from autosplit.distill.candidate import Candidate, PartSpec
from autosplit.distill.registry import STRUCTURES
from autosplit.errors import UserError
from autosplit.flops import BudgetTooSmall, count_flops_report, solve_width
from autosplit.models import ZooModel, create_model
from autosplit.modules import eval_mode

if TYPE_CHECKING:
    from autosplit.distill._base import Part


class Student(nn.Module):
    """Base class of the structures: one class owns all of a structure's plumbing.

    ``forward`` is the deployed inference. ``forward_train`` returns everything the losses need
    (always ``logits`` (B, C) and ``base_taps``, the base's ``forward_taps``); subclasses add
    their own keys. The Distiller, the candidate checks and the search ask these hooks and never
    test a structure's name; the defaults are ``single``'s (the base alone).
    """

    kind: ClassVar[str] = ""  # the registry key
    Params: ClassVar[type]  # its frozen dataclass: the candidate's ``structure.*`` keys
    part_names: tuple[str, ...] = ()  # children that are residual parts, in order
    part_networks: ClassVar[bool] = False  # parts are zoo models (student.part_*, split.part_*)
    exit_gate: ClassVar[bool] = False  # a sample-adaptive exit (``Params.exit_threshold``)
    loss_part: ClassVar[type[Part] | None] = None  # the structure's own loss, on ``params``
    twi_part: ClassVar[type[Part] | None] = None  # what ``twi: true`` adds, if not built in
    base_side_prefixes: ClassVar[tuple[str, ...]] = ()  # non-base parameters trained with it

    def __init__(
        self, base: ZooModel, *, params: Any, base_width: float, part_width: float | None = None
    ) -> None:
        super().__init__()
        self.base = base
        self.params = params
        self.base_width = base_width  # widths actually built: export pins them
        self.part_width = part_width
        self.exit_threshold: float | None = None  # the exit gate's; None: no gate

    @classmethod
    def build(cls, ctx: BuildContext, params: Any) -> Student:
        raise NotImplementedError

    # -- what the candidate and the search ask ---------------------------------------------------

    @classmethod
    def check(cls, candidate: Candidate) -> None:
        """Refuse a candidate whose other choices mean nothing with this structure."""

    @classmethod
    def label(cls, spec: PartSpec) -> str:
        """The structure's part of a trial's label (``res_chain K=3``)."""
        return spec.name

    @classmethod
    def narrowest_widths(cls, smallest: float) -> dict[str, float | None]:
        """Dotted split values that build this structure at its smallest widths."""
        return {
            "split.base_width": smallest,
            "split.part_width": smallest if cls.part_networks else None,
        }

    # -- what the Distiller asks -----------------------------------------------------------------

    @property
    def parts(self) -> nn.ModuleList:
        """The residual parts in order (a view: their parameters, for freezing or staging)."""
        return nn.ModuleList(getattr(self, name) for name in self.part_names)

    def stream_stages(self) -> tuple[int, ...]:
        """The stage each logit stream trains in (one stream, the logits, by default)."""
        return (0,)

    def stream_weights(self) -> tuple[float, ...]:
        """The weight of each stream's logit-loss terms."""
        return (1.0,) * len(self.stream_stages())

    def logit_streams(self, outputs: dict[str, Any]) -> list[Tensor]:
        """The logit streams (B, C) the logit loss is applied to, from ``forward_train``."""
        return [outputs["logits"]]

    def stream_feature(self, outputs: dict[str, Any]) -> Tensor | None:
        """The vector (B, D) the deployed head reads (AEKT's parallel layout puts its head
        beside it); None when no single one does."""
        return outputs["base_taps"]["pooled"]

    @property
    def stream_feature_dim(self) -> int | None:
        """D of ``stream_feature``."""
        return self.base.tap("pooled").channels

    def part_stage(self, k: int) -> int:
        """The stage residual part k (1-based) trains in under a ``staged`` schedule."""
        return 1

    def stage_parameters(self) -> dict[int, list[nn.Parameter]]:
        """Stage of every parameter: the base 0; part k ``part_stage(k)``; everything else
        (head, adapters, projector) 1, unless named by ``base_side_prefixes``."""
        stages: dict[int, list[nn.Parameter]] = {0: list(self.base.parameters())}
        for k, part in enumerate(self.parts, start=1):
            stages.setdefault(self.part_stage(k), []).extend(part.parameters())
        placed = {id(p) for params in stages.values() for p in params}
        for name, p in self.named_parameters():
            if id(p) not in placed:
                stage = 0 if name.startswith(self.base_side_prefixes) else 1
                stages.setdefault(stage, []).append(p)
        return stages

    def staged_logits(self, images: Tensor, stage: int) -> Tensor:
        """The logits to judge while ``stage`` trains (later stages are still untrained)."""
        return self(images)

    def freeze_unused(self) -> None:
        """Freeze what no loss reaches, before the Distiller collects the trainable parameters."""

    # -- what runs -------------------------------------------------------------------------------

    def forward(self, images: Tensor) -> Tensor:
        return self.base(images)

    def forward_train(self, images: Tensor) -> dict[str, Any]:
        taps = self.base.forward_taps(images)
        return {"logits": taps["logits"], "base_taps": taps}

    def inference_modules(self) -> list[tuple[str, nn.Module]]:
        """The children that run at deployment, by part name (``base`` first)."""
        return [("base", self.base)]


@dataclass(frozen=True)
class BuildContext:
    """Everything a structure needs to build itself, and the width-solver plumbing."""

    candidate: Candidate
    teacher: ZooModel
    num_classes: int
    in_channels: int
    input_shape: tuple[int, int, int]

    @property
    def target_flops(self) -> float:
        """The whole student's FLOPs target: ``budget_share * max_flops``."""
        return self.candidate.split.budget_share * self.candidate.max_flops

    def base(self, width: float) -> ZooModel:
        spec = self.candidate.student
        return create_model(
            spec.family,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            width=width,
            depth=spec.depth,
        )

    def part(self, width: float) -> ZooModel:
        spec = self.candidate.student
        return create_model(
            spec.part_family or spec.family,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            width=width,
            depth=spec.part_depth,
        )

    def teacher_head(self) -> nn.Module:
        """A frozen copy of the teacher's classifier (TWI), which must speak the data's classes."""
        head = self.teacher.head
        if head.out_features != self.num_classes:
            raise UserError(
                f"teacher: its head has {head.out_features} classes, the data "
                f"{self.num_classes}; reusing the head (twi / branches) needs them equal"
            )
        return frozen_copy(head)

    def width(
        self,
        explicit: float | None,
        what: str,
        build: Callable[[float], nn.Module],
        target_flops: float,
    ) -> float:
        """``explicit`` if pinned, else the widest ``build(width)`` under ``target_flops``."""
        if explicit is not None:
            return explicit
        if target_flops < 1:
            raise BudgetTooSmall(
                f"{what}: its share of the budget is {target_flops:.0f} FLOPs; "
                "raise max_flops or the share"
            )
        try:
            return solve_width(build, self.input_shape, int(target_flops))
        except BudgetTooSmall as exc:
            raise BudgetTooSmall(f"{what}: {exc}") from None


@dataclass(frozen=True)
class StudentFlops:
    """fvcore FLOPs of one image: every part run (``worst_case``) and per deployed part.

    ``by_part`` sums to ``worst_case``; glue ops outside the parts (pooling the fused map,
    mixing logits) are booked to ``base``.
    """

    worst_case: int
    by_part: dict[str, int]


def build_student(
    candidate: Candidate,
    *,
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, int, int],
    teacher: ZooModel,
) -> Student:
    """The deployable student of ``candidate``, widths solved from its split (or pinned)."""
    cls = STRUCTURES.get(candidate.structure.name)
    params = from_dict(cls.Params, candidate.structure.as_dict(), "structure")
    ctx = BuildContext(candidate, teacher, num_classes, in_channels, tuple(input_shape))
    student = cls.build(ctx, params)
    student.exit_threshold = getattr(params, "exit_threshold", None)
    return student


def student_flops(student: Student, input_shape: tuple[int, int, int]) -> StudentFlops:
    """Count the deployed student on one image with every part run (the gate switched off)."""
    threshold, student.exit_threshold = student.exit_threshold, None
    try:
        report = count_flops_report(student, tuple(input_shape))
    finally:
        student.exit_threshold = threshold
    by_part = {name: report.by_module.get(name, 0) for name, _ in student.inference_modules()}
    by_part["base"] += report.total - sum(by_part.values())
    return StudentFlops(worst_case=report.total, by_part=by_part)


def expected_flops(flops: StudentFlops, reach_rates: list[float]) -> float:
    """ResKD's expected cost ``FLOPs(S) + sum_k q_k FLOPs(R_k)``, q_k = share reaching R_k.

    Structures without res-students take ``[]`` and cost their worst case.
    """
    res_parts = [f"res{k}" for k in range(1, len(flops.by_part) + 1) if f"res{k}" in flops.by_part]
    if len(reach_rates) != len(res_parts):
        raise ValueError(
            f"need one reach rate per res-student ({len(res_parts)}), got {len(reach_rates)}"
        )
    skipped = sum(
        (1.0 - q) * flops.by_part[name] for q, name in zip(reach_rates, res_parts, strict=True)
    )
    return flops.worst_case - skipped


# --- pieces shared by the structures -----------------------------------------------------------


def at_least(path: str, params: Any, **minimums: float) -> None:
    """Range checks of a ``Params``: ``key=minimum`` for each field, naming the dotted path at
    fault; a None value passes."""
    for key, minimum in minimums.items():
        value = getattr(params, key)
        if value is not None and value < minimum:
            raise UserError(f"{path}.{key}: must be >= {minimum}, got {value}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that never trains (TWI: the teacher's classifier reused as is)."""
    import copy

    clone = copy.deepcopy(module)
    clone.requires_grad_(False)
    return clone


@torch.no_grad()
def stage_size(model: ZooModel, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """Spatial size (H, W) of ``model``'s last stage map for one input; no state is touched."""
    parameter = next(model.parameters())
    with eval_mode(model):
        images = torch.zeros((1, *input_shape), device=parameter.device, dtype=parameter.dtype)
        last = model.forward_stages(images)[model.last_stage.name]  # (1, C, H, W)
    return int(last.shape[-2]), int(last.shape[-1])
