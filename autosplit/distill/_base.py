"""The Distiller: one candidate's training task, a Student plus the loss parts of its recipe.

A candidate names a structure (the deployable ``Student``), a logit loss, a feature loss and the
TWI switch. The Distiller owns the Student and one small ``Part`` per loss: the structure's own
residual loss (RKD, ResKD, ERA), the logit loss, the feature loss and TWI's CE term. Each part
adds its training-only heads to the outputs (``extend``) and returns weighted ``loss_<term>``
tensors; the Distiller sums them into ``loss``. It implements ``autosplit.train.Task``, so
``fit`` trains every recipe the same way.

Stages. A ``staged`` schedule trains the base first, then each residual part with the earlier
parts frozen. Every part says which stage each of its terms optimises (``term_stages``) and
which stage its own modules belong to (``stage_parameters``); ``set_stage`` then restricts the
trainable parameters and the loss terms, and keeps frozen batch-norms in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from autosplit.config import from_dict
from autosplit.distill.registry import FEATURE_LOSSES, LOGIT_LOSSES
from autosplit.distill.student import Student, build_student
from autosplit.errors import UserError
from autosplit.modules import eval_mode

if TYPE_CHECKING:
    from autosplit.device import Runtime
    from autosplit.distill.candidate import Candidate
    from autosplit.models import ZooModel
    from autosplit.train import TeacherSource

Outputs = dict[str, Any]  # tensors, lists of tensors, and the base's tap dict
TeacherOutputs = Mapping[str, Tensor] | None  # tap -> (B, ...); None: no teacher


@dataclass(frozen=True)
class Stage:
    """One fit of a ``staged`` schedule (a ``joint`` schedule is one stage with every term).

    ``index`` 0 is the base; k >= 1 is residual part k (for branches: the branch network).
    ``terms`` are the loss keys this stage optimises; ``None`` means all of them.
    """

    name: str
    index: int
    parameters: tuple[nn.Parameter, ...] = field(repr=False)
    terms: frozenset[str] | None = None


@dataclass(frozen=True)
class PartContext:
    """What a part may know about the candidate, the student and the teacher when it is built.

    Shapes are per sample (no batch dim), measured by one forward pass at build time.
    """

    structure: str  # the structure's registry key (for messages)
    n_parts: int  # residual parts K (0 for single)
    twi: bool
    num_classes: int
    label_smoothing: float
    stream_stages: tuple[int, ...]  # the stage of each logit stream (see Distiller.forward)
    stream_weights: tuple[float, ...]  # the weight of each stream's logit-loss terms
    base_shapes: Mapping[str, tuple[int, ...]]  # base tap -> shape, e.g. "stage3": (64, 8, 8)
    teacher_shapes: Mapping[str, tuple[int, ...]]
    base_stages: tuple[str, ...]  # map taps in forward order
    teacher_stages: tuple[str, ...]
    teacher_head: nn.Linear = field(repr=False)  # the teacher's own: copy it, never register it
    stream_feature_dim: int | None = None  # width of the vector the deployed head reads
    ce_weight: float = 1.0  # the logit loss's weight on CE with the labels (TWI's CEs take it)


class Part(nn.Module):
    """One loss of a recipe, with its training-only modules. Subclasses set ``Params``.

    ``loss`` returns weighted ``loss_<term>`` tensors; ``term_stages`` names the stage each
    term trains in a staged schedule; the part's own parameters train in stage ``home_stage``
    unless ``stage_parameters`` says otherwise.
    """

    Params: ClassVar[type]
    home_stage: int = 0

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__()
        self.params = params

    @property
    def teacher_taps(self) -> frozenset[str]:
        """Teacher taps the loss reads (the teacher cache stores exactly these)."""
        return frozenset()

    def extend(self, outputs: Outputs) -> None:
        """Add this part's training-only outputs (adapters, extra heads) to ``outputs``."""

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def term_stages(self) -> dict[str, int]:
        """Loss key -> stage index that optimises it."""
        raise NotImplementedError

    def stage_parameters(self) -> dict[int, list[nn.Parameter]]:
        own = [p for p in self.parameters() if p.requires_grad]
        return {self.home_stage: own} if own else {}

    @property
    def prepare_passes(self) -> int:
        """Passes over the training rows ``prepare`` makes when it has work to do (a search
        plans a job's cost from it: IE-KD's auto-encoder epochs); 0 for none."""
        return 0

    def prepare(
        self, teacher_source: TeacherSource, train_loader: Iterable[Any], runtime: Runtime
    ) -> int:
        """Work before training (e.g. pre-train a frozen teacher auto-encoder). Returns the
        images that work trained over (0: none, or reused from earlier in the process)."""
        return 0

    def prepare_seconds_per_image(self, runtime: Runtime, batch_size: int) -> float:
        """Seconds an image of one ``prepare`` pass takes here, timed on a few steps of
        synthetic data (0.0: no prepare work). A search plans a trial's first rung from it
        before any rung has measured the real work."""
        return 0.0


@FEATURE_LOSSES.register("none")
class NoLoss(Part):
    """No loss at all: the feature loss ``none``."""

    @dataclass(frozen=True)
    class Params:
        pass

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        return {}

    def term_stages(self) -> dict[str, int]:
        return {}


class LogitPart(Part):
    """A logit loss, applied to every logit stream (one for most structures; z^(0)..z^(K) for
    res_chain). With one stream the keys are ``loss_<term>``, else ``loss_<term>_z<k>``."""

    terms: ClassVar[tuple[str, ...]]

    def __init__(self, params: Any, ctx: PartContext) -> None:
        super().__init__(params, ctx)
        self.stream_stages = ctx.stream_stages
        self.stream_weights = ctx.stream_weights
        self.label_smoothing = ctx.label_smoothing
        self.num_classes = ctx.num_classes

    @classmethod
    def ce_weight_of(cls, params: Any) -> float:
        """The weight these ``params`` put on CE with the labels."""
        return float(params.ce_weight)

    def key(self, term: str, stream: int) -> str:
        return f"loss_{term}" if len(self.stream_stages) == 1 else f"loss_{term}_z{stream}"

    def term_stages(self) -> dict[str, int]:
        return {
            self.key(term, k): stage
            for k, stage in enumerate(self.stream_stages)
            for term in self.terms
        }

    def ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        terms = {}
        for k, logits in enumerate(outputs["logit_streams"]):
            weight = self.stream_weights[k]
            for term, value in self.stream_loss(
                k, logits, outputs, teacher_outputs, labels, epoch=epoch
            ).items():
                terms[self.key(term, k)] = value if weight == 1.0 else weight * value
        return terms

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
        """Weighted terms (keys without ``loss_``) for one stream's logits (B, C)."""
        raise NotImplementedError


# DKD's warm-up spans 20 of its 240 epochs; AEKT, built on DKD's decoupling, takes the same.
WARMUP_SHARE = 20 / 240


def warmup_epochs_for(run_epochs: int) -> int:
    """The warm-up the shipped spaces give DKD and AEKT for a run of ``run_epochs``: DKD's share
    of the run, rounded up, at least one epoch (so a run under 12 epochs does not warm up: the
    factor is 1 from the first epoch)."""
    return max(1, math.ceil(run_epochs * WARMUP_SHARE))


def linear_warmup(epoch: int, warmup_epochs: int) -> float:
    """DKD's warm-up factor ``min((epoch + 1) / warmup_epochs, 1)`` at 0-based ``epoch``."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


def need_teacher(teacher_outputs: Mapping[str, Tensor] | None, tap: str, who: str) -> Tensor:
    if teacher_outputs is None or tap not in teacher_outputs:
        have = "none" if teacher_outputs is None else ", ".join(sorted(teacher_outputs))
        raise KeyError(f"{who} needs the teacher's {tap!r} output; got: {have}")
    return teacher_outputs[tap]


# ---------------------------------------------------------------------------------------------


class Distiller(nn.Module):
    """A candidate's training task: its Student and its loss parts (``autosplit.train.Task``).

    Whatever depends on the structure (its logit streams, the feature its head reads, its own
    loss, whether TWI joins, the stage of each parameter) the Distiller asks the Student.
    """

    def __init__(
        self,
        candidate: Candidate,
        student: Student,
        teacher: ZooModel,
        *,
        input_shape: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.candidate = candidate
        self.student = student
        logit_cls = LOGIT_LOSSES.get(candidate.logit_loss.name)
        logit_params = from_dict(logit_cls.Params, candidate.logit_loss.as_dict(), "logit_loss")
        ctx = PartContext(
            structure=candidate.structure.name,
            n_parts=len(student.parts),
            twi=candidate.twi,
            num_classes=teacher.head.out_features,
            label_smoothing=candidate.train.label_smoothing,
            stream_stages=student.stream_stages(),
            stream_weights=student.stream_weights(),
            base_shapes=_tap_shapes(student.base, input_shape),
            teacher_shapes=_tap_shapes(teacher, input_shape),
            base_stages=tuple(student.base.stage_names),
            teacher_stages=tuple(teacher.stage_names),
            teacher_head=teacher.head,
            stream_feature_dim=student.stream_feature_dim,
            ce_weight=logit_cls.ce_weight_of(logit_params),
        )
        self.parts = nn.ModuleDict(build_parts(candidate, student, ctx))
        student.freeze_unused()
        # Frozen from the start (teacher heads, pre-trained encoders) stay frozen forever.
        self._trainable = [p for p in self.parameters() if p.requires_grad]
        self._stage: Stage | None = None
        self.train(self.training)  # frozen batch-norms (teacher auto-encoder) in eval from now on

    # -- the Task protocol ---------------------------------------------------------------------

    def forward(self, images: Tensor) -> Outputs:
        outputs: Outputs = self.student.forward_train(images)
        outputs["logit_streams"] = self.student.logit_streams(outputs)  # list of (B, C)
        outputs["stream_feature"] = self.student.stream_feature(outputs)  # (B, D) or None
        for part in self.parts.values():
            part.extend(outputs)
        return outputs

    def loss(
        self,
        outputs: Outputs,
        teacher_outputs: Mapping[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for part in self.parts.values():
            for key, value in part.loss(outputs, teacher_outputs, labels, epoch=epoch).items():
                if key in terms:
                    raise RuntimeError(f"two parts return the loss term {key!r}")
                terms[key] = value
        if self._stage is not None and self._stage.terms is not None:
            terms = {k: v for k, v in terms.items() if k in self._stage.terms}
        if not terms:  # e.g. a stage whose terms all vanished: keep the graph valid
            terms["loss_zero"] = outputs["logits"].sum() * 0.0
        total = sum(terms.values())  # not stack: under autocast the terms' dtypes may differ
        return {"loss": total, **terms}

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self._stage is not None:
            return list(self._stage.parameters)
        return list(self._trainable)

    def predict(self, images: Tensor) -> Tensor:
        """The deployed logits; during a stage, those of what is trained so far (the
        Student's ``staged_logits``)."""
        if self._stage is not None:
            return self.student.staged_logits(images, self._stage.index)
        return self.student(images)

    @property
    def teacher_taps(self) -> set[str]:
        taps: set[str] = set()
        for part in self.parts.values():
            taps |= part.teacher_taps
        return taps

    @property
    def prepare_passes(self) -> int:
        return sum(part.prepare_passes for part in self.parts.values())

    def prepare(
        self, teacher_source: TeacherSource, train_loader: Iterable[Any], runtime: Runtime
    ) -> int:
        """Every part's work before training; the images it trained over."""
        return sum(
            part.prepare(teacher_source, train_loader, runtime) for part in self.parts.values()
        )

    def prepare_seconds_per_image(self, runtime: Runtime, batch_size: int) -> float:
        """Seconds per image and pass of every part's ``prepare`` work, timed here: each part's
        rate weighted by its share of ``prepare_passes``."""
        passes = self.prepare_passes
        if not passes:
            return 0.0
        return (
            sum(
                part.prepare_seconds_per_image(runtime, batch_size) * part.prepare_passes
                for part in self.parts.values()
                if part.prepare_passes
            )
            / passes
        )

    # -- stages --------------------------------------------------------------------------------

    def stages(self, schedule: str | None = None) -> list[Stage]:
        """One stage for ``joint``; base, then each residual part, for ``staged``.

        ``schedule`` defaults to the candidate's.
        """
        if (schedule or self.candidate.schedule) == "joint":
            return [Stage("joint", 0, tuple(self._trainable), None)]
        by_stage: dict[int, list[nn.Parameter]] = {}
        for index, params in self.student.stage_parameters().items():
            by_stage.setdefault(index, []).extend(params)
        terms: dict[int, set[str]] = {}
        for part in self.parts.values():
            for index, params in part.stage_parameters().items():
                by_stage.setdefault(index, []).extend(params)
            for key, index in part.term_stages().items():
                terms.setdefault(index, set()).add(key)
        trainable = {id(p) for p in self._trainable}
        stages = []
        for index in sorted(by_stage):
            params = _unique(p for p in by_stage[index] if id(p) in trainable)
            if params:
                name = "base" if index == 0 else f"part{index}"
                stages.append(Stage(name, index, tuple(params), frozenset(terms.get(index, ()))))
        return stages

    def set_stage(self, stage: Stage | None) -> None:
        """Train only ``stage``'s parameters and terms (``None``: everything, as built)."""
        self._stage = stage
        active = {id(p) for p in (stage.parameters if stage is not None else self._trainable)}
        for p in self._trainable:
            p.requires_grad_(id(p) in active)
        self.train(self.training)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if mode:  # a frozen batch-norm must not drift: its running statistics stay as they are
            for module in self.modules():
                if (
                    isinstance(module, _BatchNorm)
                    and module.weight is not None
                    and not module.weight.requires_grad
                ):
                    module.eval()
        return self


@torch.no_grad()
def _tap_shapes(model: ZooModel, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Per-sample shape of every tap, from one eval-mode pass on zeros (modes restored)."""
    device = next(model.parameters()).device
    with eval_mode(model):
        taps = model.forward_taps(torch.zeros(2, *input_shape, device=device))
    return {name: tuple(value.shape[1:]) for name, value in taps.items()}


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def build_parts(candidate: Candidate, student: Student, ctx: PartContext) -> dict[str, Part]:
    """The candidate's loss parts by role: structure (if it has one), logit, feature, twi (if
    set and the structure leaves TWI to a part)."""
    parts: dict[str, Part] = {}
    if student.loss_part is not None:
        parts["structure"] = student.loss_part(student.params, ctx)
    for role, spec, registry in (
        ("logit", candidate.logit_loss, LOGIT_LOSSES),
        ("feature", candidate.feature_loss, FEATURE_LOSSES),
    ):
        cls = registry.get(spec.name)
        parts[role] = cls(from_dict(cls.Params, spec.as_dict(), f"{role}_loss"), ctx)
    if candidate.twi and student.twi_part is not None:
        parts["twi"] = student.twi_part(student.twi_part.Params(), ctx)
    return parts


def build_distiller(
    candidate: Candidate,
    *,
    teacher: ZooModel,
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, int, int],
) -> Distiller:
    """The Student the candidate describes, wrapped with its loss parts."""
    if teacher.head.out_features != num_classes:
        raise UserError(f"teacher has {teacher.head.out_features} classes, the data {num_classes}")
    student = build_student(
        candidate,
        num_classes=num_classes,
        in_channels=in_channels,
        input_shape=input_shape,
        teacher=teacher,
    )
    return Distiller(candidate, student, teacher, input_shape=input_shape)
