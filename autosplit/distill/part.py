"""The loss part: one loss of a recipe with its training-only modules, and what it may know.

Every logit loss, feature loss and structure loss is a ``Part`` subclass with a frozen ``Params``
dataclass; the Distiller (:mod:`autosplit.distill._base`) builds one per role and sums their
``loss_<term>`` tensors. This module imports nothing of the structures or the Distiller, so
both can import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from autosplit.distill.registry import FEATURE_LOSSES

if TYPE_CHECKING:
    from autosplit.device import Runtime
    from autosplit.train import TeacherSource

Outputs = dict[str, Any]  # tensors, lists of tensors, and the base's tap dict


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

    def prepare(
        self, teacher_source: TeacherSource, train_loader: Iterable[Any], runtime: Runtime
    ) -> None:
        """Work before training (e.g. pre-train a frozen teacher auto-encoder)."""


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


def linear_warmup(epoch: int, warmup_epochs: int) -> float:
    """DKD's warm-up factor ``min((epoch + 1) / warmup_epochs, 1)`` at 0-based ``epoch``."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


def need_teacher(teacher_outputs: Mapping[str, Tensor] | None, tap: str, who: str) -> Tensor:
    if teacher_outputs is None or tap not in teacher_outputs:
        have = "none" if teacher_outputs is None else ", ".join(sorted(teacher_outputs))
        raise KeyError(f"{who} needs the teacher's {tap!r} output; got: {have}")
    return teacher_outputs[tap]
