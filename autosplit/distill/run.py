"""Train one candidate end to end: build, count, prepare, fit (joint or staged), calibrate.

``train_candidate`` is what a search trial and ``autosplit train --config`` both call:

1. build the Distiller (the Student and its loss parts) and count the Student's FLOPs with
   fvcore *before* any training, so the cost is known even if training fails;
2. ``prepare`` (e.g. IE-KD's teacher auto-encoder);
3. ``joint``: one ``fit`` with every term; ``staged``: one ``fit`` per stage (the base, then each
   residual part with the earlier ones frozen). With ``train.stage_epochs: full`` (the default,
   the papers' procedure) every stage trains for ``train.epochs`` with the whole schedule; with
   ``shared`` the epochs are split evenly over the stages, so the candidate sees as many images
   as a joint one. The result records the training cost either way (``train_images``,
   ``train_flops``);
4. a structure with an exit gate (``res_chain``): a threshold in the candidate is used as is;
   ``None`` is calibrated on a *calibration split*, the first ``structure.calibration_share`` of
   the candidate's training rows, held out from training. The rule (ResKD's stopping rule is
   not public: a reading) is the cheapest threshold whose accuracy is within
   ``structure.exit_max_drop`` points of running the whole chain, or, with
   ``structure.exit_flops_share`` set, the most accurate threshold whose expected FLOPs are
   within that share of the worst case. The gate's accuracy, reach rates and expected FLOPs
   are then measured on validation, which calibration never saw.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from autosplit.data import Split, Splits, warn_if_prefix_misses_classes
from autosplit.errors import UserError
from autosplit.loader import TensorLoader, eval_loader
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
    history: list[EpochStats]  # every epoch of every stage, numbered 1.. across stages
    flops: StudentFlops  # worst case (every part runs) and per deployed part
    expected_flops: float  # with the res_chain gate's measured reach rates; else worst case
    params: int  # parameters of the deployed modules
    seconds: float
    stages: list[tuple[str, int]]  # (stage name, epochs) as trained
    train_images: int  # images seen by training, over every stage
    train_cost: float  # train_images over the images one joint run of train.epochs sees
    exit: ExitChoice | None = None  # res_chain only
    calibration: ExitChoice | None = None  # the gate on the calibration split (None: pinned)
    # The distiller's work before training (IE-KD's teacher auto-encoder), part of ``seconds``:
    # a search plans later jobs from it apart from the training's time per image.
    prepare_seconds: float = 0.0
    prepare_images: int = 0  # images that work trained over (0: none, or reused)

    @property
    def train_flops(self) -> float:
        """Training cost: images seen x the student's forward FLOPs per image (every stage's
        step runs the whole student forward). Backward passes and the teacher are not counted."""
        return float(self.train_images) * float(self.flops.worst_case)

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


def stage_epochs(cfg: TrainConfig, n_stages: int) -> list[int]:
    """Epochs of each stage: ``train.epochs`` for each (``full``), or split over them
    (``shared``); a single stage trains ``train.epochs``."""
    if n_stages <= 1:
        return [cfg.epochs]
    if cfg.stage_epochs == "full":
        return [cfg.epochs] * n_stages
    return split_epochs(cfg.epochs, n_stages)


def images_per_epoch(rows: int, batch_size: int) -> int:
    """Images one training epoch sees over ``rows`` rows (the loader drops a last short batch
    when there is at least one full batch)."""
    return rows - rows % batch_size if rows >= batch_size else rows


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
    warn_if_prefix_misses_classes(
        len(train_split), splits.info.num_classes, "train.max_train_samples"
    )
    held, calibration_split = _calibration_split(
        distiller.student, train_split, splits.info.num_classes
    )
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
        drop_last=len(train_split) - held >= cfg.batch_size,
        first_row=held,
    )
    val_loader = eval_loader(splits.val, splits.info, runtime.device)
    prepare_started = time.perf_counter()
    prepare_images = distiller.prepare(teacher_source, train_loader, runtime)
    prepare_seconds = time.perf_counter() - prepare_started

    stages = distiller.stages()
    epochs = stage_epochs(cfg, len(stages))
    history: list[EpochStats] = []
    try:
        for stage, n_epochs in zip(stages, epochs, strict=True):
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
                stage_config(cfg, n_epochs),
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
    calibration = None
    if calibration_split is not None:
        calibration = _calibrate_exit(student, flops, calibration_split, splits, runtime)
    choice = _measure_exit(student, flops, val_loader, runtime)
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
        train_images=sum(epochs) * images_per_epoch(train_loader.num_samples, cfg.batch_size),
        train_cost=sum(epochs) / cfg.epochs,
        exit=choice,
        calibration=calibration,
        prepare_seconds=prepare_seconds,
        prepare_images=int(prepare_images),
    )


def _calibration_split(student: Student, train: Split, n_classes: int) -> tuple[int, Split | None]:
    """How many rows to hold out for calibration, and those rows: the first
    ``calibration_share`` of the candidate's training rows, for a gate whose threshold is to be
    calibrated. The training rows are class-interleaved, so that prefix holds every class in
    proportion; training takes the rest (its row numbers stay those of ``train``, so cached
    teacher rows still match)."""
    if not student.exit_gate or student.params.exit_threshold is not None:
        return 0, None
    share = float(student.params.calibration_share)
    held = max(1, round(share * len(train)))
    if held >= len(train):
        raise UserError(
            f"structure.calibration_share: {share} of {len(train)} training rows leaves none "
            "to train on; lower it or train on more rows"
        )
    warn_if_prefix_misses_classes(held, n_classes, "structure.calibration_share's rows")
    return held, Split(train.images[:held], train.labels[:held])


def _calibrate_exit(
    student: Student, flops: StudentFlops, calibration: Split, splits: Splits, runtime: Runtime
) -> ExitChoice:
    """Choose the gate threshold on the calibration split (never on validation) by the
    structure's rule, and set it on ``student``."""
    from autosplit.distill.exit import calibrate_threshold, exit_profile, measure_exit

    params = student.params
    loader = eval_loader(calibration, splits.info, runtime.device)
    profile = exit_profile(student, loader, runtime)
    if params.exit_flops_share is not None:
        choice = calibrate_threshold(
            profile, flops, target_expected_flops=params.exit_flops_share * flops.worst_case
        )
    else:
        whole_chain = measure_exit(profile, flops, None).accuracy
        choice = calibrate_threshold(
            profile, flops, target_accuracy=whole_chain - params.exit_max_drop
        )
    student.exit_threshold = choice.threshold
    log.info(
        "exit gate calibrated on %d held-out training rows: threshold %s, expected FLOPs %.0f, "
        "accuracy %.2f%% there",
        len(calibration),
        choice.threshold,
        choice.expected_flops,
        choice.accuracy,
    )
    return choice


def _measure_exit(
    student: Student,
    flops: StudentFlops,
    val_loader: TensorLoader,
    runtime: Runtime,
) -> ExitChoice | None:
    """A structure with an exit gate: its reach rates, expected FLOPs and accuracy on
    validation at the threshold it has (pinned, or calibrated on held-out training rows)."""
    if not student.exit_gate:
        return None
    from autosplit.distill.exit import exit_profile, measure_exit

    profile = exit_profile(student, val_loader, runtime)
    choice = measure_exit(profile, flops, student.exit_threshold)
    log.info(
        "exit gate %s on validation: reach rates %s, expected FLOPs %.0f, val %.2f%%",
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
