"""Train one candidate end to end: build, count, prepare, fit (joint or staged), calibrate.

``train_candidate`` is what a search trial and ``autosplit train --config`` both call:

1. build the Distiller (the Student and its loss parts) and count the Student's FLOPs with
   fvcore *before* any training, so the cost is known even if training fails;
2. ``prepare`` (e.g. IE-KD's teacher auto-encoder);
3. ``joint``: one ``fit`` with every term; ``staged``: one ``fit`` per stage (the base, then each
   residual part with the earlier ones frozen), ``train.epochs`` split evenly over the stages
   so a staged candidate gets the same training budget as a joint one;
4. a structure with an exit gate (``res_chain``): profile the partial sums on validation and
   set the gate. A threshold in the candidate is used as is; ``None`` is calibrated: the most
   accurate threshold on validation, ties to the cheapest (ResKD's stopping rule is not
   public: a reading).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from autosplit.data import Split, Splits, TensorLoader, eval_loader
from autosplit.errors import UserError
from autosplit.train import EpochStats, TeacherSource, evaluate, fit, seed_everything

if TYPE_CHECKING:
    from autosplit.config import TrainConfig
    from autosplit.device import Runtime
    from autosplit.distill._base import Distiller
    from autosplit.distill.candidate import Candidate
    from autosplit.distill.exit import ExitChoice
    from autosplit.distill.student import Student, StudentFlops
    from autosplit.models import ZooModel

log = logging.getLogger(__name__)


@dataclass
class CandidateResult:
    """What training one candidate measured. FLOPs are fvcore's (one multiply-add = one FLOP)."""

    student: Student
    val_acc: float  # top-1 % on the validation split, of the deployed student (gate applied)
    history: list[EpochStats]  # every epoch of every stage, numbered 1..train.epochs
    flops: StudentFlops  # worst case (every part runs) and per deployed part
    expected_flops: float  # with the res_chain gate's measured reach rates; else worst case
    params: int  # parameters of the deployed modules
    seconds: float
    stages: list[tuple[str, int]]  # (stage name, epochs) as trained
    exit: ExitChoice | None = None  # res_chain only

    @property
    def worst_case_flops(self) -> int:
        return self.flops.worst_case


def deployed_parameters(student: Student) -> int:
    """Parameters of what runs at deployment (training-only modules are not counted)."""
    seen: dict[int, nn.Parameter] = {}
    for _, module in student.inference_modules():
        for p in module.parameters():
            seen[id(p)] = p
    return sum(p.numel() for p in seen.values())


def split_epochs(epochs: int, n_stages: int) -> list[int]:
    """``epochs`` shared over ``n_stages`` as evenly as possible, earlier stages first."""
    if epochs < n_stages:
        raise UserError(
            f"train.epochs: a staged schedule here has {n_stages} stages and needs at "
            f"least that many epochs, got {epochs}; raise it or use schedule: joint"
        )
    share, rest = divmod(epochs, n_stages)
    return [share + (1 if i < rest else 0) for i in range(n_stages)]


def stage_config(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """``cfg`` for a stage of ``epochs`` epochs: warm-up and milestones scaled to it."""
    scale = epochs / cfg.epochs
    milestones = tuple(sorted({max(1, round(m * scale)) for m in cfg.milestones}))
    return dataclasses.replace(
        cfg, epochs=epochs, milestones=milestones, warmup_epochs=min(cfg.warmup_epochs, epochs)
    )


def build_and_count(
    candidate: Candidate, teacher: ZooModel, splits: Splits
) -> tuple[Distiller, StudentFlops]:
    """The candidate's Distiller and its Student's FLOPs, counted before any training."""
    from autosplit.distill.student import student_flops

    distiller = _build(candidate, teacher, splits)
    return distiller, student_flops(distiller.student, splits.info.input_shape)


def _build(candidate: Candidate, teacher: ZooModel, splits: Splits) -> Distiller:
    from autosplit.distill._base import build_distiller

    info = splits.info
    return build_distiller(
        candidate,
        teacher=teacher,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_shape=info.input_shape,
    )


def train_candidate(
    candidate: Candidate,
    splits: Splits,
    teacher: ZooModel,
    runtime: Runtime,
    *,
    teacher_source: TeacherSource | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    flops: StudentFlops | None = None,
) -> CandidateResult:
    """Train ``candidate`` on ``splits.train`` and measure it on ``splits.val``.

    ``teacher_source`` gives the teacher's outputs per batch (a ``CachedTeacher`` holding at
    least ``distiller.teacher_taps``); by default the teacher runs live. ``on_epoch_end`` sees
    every epoch with its number across stages, and may raise ``StopTraining``. ``flops``, when
    the caller already counted this candidate's student (the search does, to decide
    feasibility), skips counting it again.
    """
    from autosplit.cache import LiveTeacher

    started = time.perf_counter()
    cfg = candidate.train
    seed_everything(cfg.seed)
    if flops is None:
        distiller, flops = build_and_count(candidate, teacher, splits)
    else:
        distiller = _build(candidate, teacher, splits)
    log.info(
        "candidate %s/%s/%s: %d FLOPs worst case",
        candidate.structure.name,
        candidate.logit_loss.name,
        candidate.feature_loss.name,
        flops.worst_case,
    )
    distiller = runtime.prepare(distiller)
    if teacher_source is None:
        teacher_source = LiveTeacher(teacher, sorted(distiller.teacher_taps | {"logits"}), runtime)
    _check_taps(teacher_source, distiller.teacher_taps)
    train_split = _limit(splits.train, cfg.max_train_samples)
    # A cache of K augmented views serves epoch e with view e % K: the loader must agree.
    n_views = getattr(teacher_source, "n_views", None) if candidate.data.augment else None
    train_loader = TensorLoader(
        train_split,
        splits.info,
        batch_size=cfg.batch_size,
        shuffle=True,
        augment=candidate.data.augment,
        seed=cfg.seed,
        n_views=n_views,
        device=runtime.device,
        drop_last=len(train_split) >= cfg.batch_size,
    )
    val_loader = eval_loader(splits.val, splits.info, runtime.device)
    distiller.prepare(teacher_source, train_loader, runtime)

    stages = distiller.stages()
    epochs = split_epochs(cfg.epochs, len(stages)) if len(stages) > 1 else [cfg.epochs]
    history: list[EpochStats] = []
    try:
        for stage, stage_epochs in zip(stages, epochs, strict=True):
            distiller.set_stage(stage if len(stages) > 1 else None)
            offset = len(history)

            def renumber(stats: EpochStats, offset: int = offset) -> None:
                stats = dataclasses.replace(stats, epoch=stats.epoch + offset)
                history.append(stats)
                if on_epoch_end is not None:
                    on_epoch_end(stats)

            fit(
                distiller,
                train_loader,
                val_loader,
                stage_config(cfg, stage_epochs),
                runtime,
                teacher=teacher_source,
                on_epoch_end=renumber,
                progress=progress,
                desc=f"{candidate.structure.name} {stage.name}",
            )
    finally:
        distiller.set_stage(None)
        distiller.train(False)

    student = distiller.student
    choice = _set_exit(student, flops, val_loader, runtime)
    val_acc = choice.accuracy if choice is not None else evaluate(student, val_loader, runtime)
    seconds = time.perf_counter() - started
    log.info("candidate trained in %.0fs: val %.2f%%", seconds, val_acc)
    return CandidateResult(
        student=student,
        val_acc=val_acc,
        history=history,
        flops=flops,
        expected_flops=choice.expected_flops if choice is not None else float(flops.worst_case),
        params=deployed_parameters(student),
        seconds=seconds,
        stages=[(s.name, e) for s, e in zip(stages, epochs, strict=True)],
        exit=choice,
    )


def _set_exit(
    student: Student,
    flops: StudentFlops,
    val_loader: TensorLoader,
    runtime: Runtime,
) -> ExitChoice | None:
    """A structure with an exit gate: measure (a pinned threshold) or calibrate (None) the gate
    on validation."""
    if not student.exit_gate:
        return None
    from autosplit.distill.exit import calibrate_threshold, exit_profile, measure_exit

    profile = exit_profile(student, val_loader, runtime)
    pinned = student.params.exit_threshold
    choice = (
        measure_exit(profile, flops, pinned)
        if pinned is not None
        else calibrate_threshold(profile, flops)
    )
    student.exit_threshold = choice.threshold
    log.info(
        "exit gate %s: reach rates %s, expected FLOPs %.0f, val %.2f%%",
        choice.threshold,
        [round(q, 3) for q in choice.reach_rates],
        choice.expected_flops,
        choice.accuracy,
    )
    return choice


def _limit(split: Split, max_samples: int | None) -> Split:
    """The first ``max_samples`` rows: a prefix keeps row numbers, so cached teacher rows match."""
    if max_samples is None or max_samples >= len(split):
        return split
    return Split(split.images[:max_samples], split.labels[:max_samples])


def _check_taps(teacher_source: TeacherSource, taps: set[str]) -> None:
    tensors = getattr(teacher_source, "tensors", None)  # a CachedTeacher says what it holds
    if tensors:
        missing = taps - set(tensors[0])
        if missing:
            raise ValueError(
                f"the teacher cache lacks taps {sorted(missing)}; build it with taps={sorted(taps)}"
            )
