"""The search: an Optuna study over candidates, maximising validation accuracy and minimising
FLOPs under ``FLOPs <= budget`` (a constraint, so over-budget candidates are recorded, never
trained). Kept thin: the space draws candidates, ``distill.run`` trains them, ``promotion``
decides who climbs a rung, ``plan`` decides what fits in the time limit, the tracker logs.

A search has three phases, all under one time limit: the teacher (unless cached), the search
(every trial starts at the cheapest rung; successive halving promotes the best 1/eta), and the
final stage (the front's top members and the baselines at the final fidelity, over seeds).
Final-stage jobs are Optuna trials too (enqueued, marked ``stage: final``), so several workers
share them, and a killed job is failed and re-run like any trial.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import optuna
import torch
from optuna.trial import TrialState

from autosplit import interrupts
from autosplit.cache import train_rows
from autosplit.config import atomic_write_text
from autosplit.errors import UserError, redact_url
from autosplit.search import study as studies
from autosplit.search.attrs import PRECISION_PARAM, StudyAttrs, TrialAttrs, TrialMetrics
from autosplit.search.budget import Budget
from autosplit.search.front import Cost, search_records
from autosplit.search.job_cost import (
    JobEstimate,
    cache_estimate,
    estimate_job,
    extrapolate,
    job_overhead,
    prepare_rates,
    work_images,
)
from autosplit.search.plan import CostModel, Deadline
from autosplit.search.promotion import RungResult, promotable
from autosplit.search.report import SearchReport, search_note
from autosplit.search.space import FinalStage, Rung, SearchSpace
from autosplit.tracking import NullTracker, Tracker
from autosplit.train import EpochStats

if TYPE_CHECKING:
    from autosplit.cache import CachedTeacher
    from autosplit.data import Splits
    from autosplit.device import Runtime
    from autosplit.distill.candidate import Candidate
    from autosplit.search.shared_teacher import StudyTeacher
    from autosplit.teacher import Teacher

log = logging.getLogger(__name__)
SMALLEST_WIDTH = 0.05  # the width solver's lower end


@dataclass
class SearchContext:
    """Everything a trial needs that is the same for every trial of a search."""

    space: SearchSpace
    splits: Splits
    teacher: Teacher
    runtime: Runtime
    max_flops: int
    teacher_flops: int
    runs_dir: Path
    study_name: str
    tracker: Tracker = field(default_factory=NullTracker)
    progress: bool = False
    halving: bool = True  # False: every trial trains at the top rung only
    deadline: Deadline = field(default_factory=lambda: Deadline(None))  # the whole job
    search_deadline: Deadline = field(default_factory=lambda: Deadline(None))  # search phase
    final_reserve: float = 0.0  # the plan's seconds for the final stage, before corrections
    cost_model: CostModel = field(default_factory=lambda: CostModel({1.0: 1e9}))
    final_seeds: int | None = None  # the plan's seeds (None: the space's)
    finalists: int | None = None  # the plan's finalists (None: the space's top_k)
    final_epochs: int | None = None  # the plan's final-stage epochs (None: the space's)
    caches: dict[tuple[object, ...], CachedTeacher] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=lambda: {"cache_hits": 0, "cache_builds": 0})
    share_weights: bool = False  # publish trained weights to MLflow: hosts share the study

    @functools.cached_property
    def teacher_sha256(self) -> str:
        """The teacher checkpoint's SHA-256, recorded on every trial distilled from it."""
        from autosplit.checkpoint import sha256_file

        return sha256_file(self.teacher.path)

    # The final stage's cost as the search's measurements put it (``final_reserve_measured``),
    # once a search trial has finished; until then the plan's ``final_reserve``.
    measured_reserve: float | None = None
    # Per final member: (teacher taps, stages, prepare passes) of its distiller.
    shapes: dict[int, tuple[set[str], int, int]] = field(default_factory=dict)
    # Seconds each finished job cost beyond training and its cache, by "search" / "final"
    # (``record_overhead``), and when the last one ended (``time.perf_counter``).
    overheads: dict[str, list[float]] = field(default_factory=dict)
    last_job_end: float | None = None

    def record_overhead(self, kind: str, started: float, busy: float) -> float:
        """A job that started at ``started`` has ended, ``busy`` of it training and building
        its cache: note the rest, for a final job from the previous job's end (the study's
        ask, tell and gc between them are paid too), for a search trial from its own start
        (between trials the search also redraws its front, which the final stage does not).
        Returns the job's whole cycle."""
        now = time.perf_counter()
        since = self.last_job_end if self.last_job_end is not None and kind == "final" else started
        cycle = now - min(since, started)
        self.overheads.setdefault(kind, []).append(max(0.0, cycle - busy))
        self.last_job_end = now
        return cycle

    @property
    def eta(self) -> int:
        return self.space.settings.fidelity.eta

    @property
    def front_cost(self) -> Cost:
        """The FLOPs figure the search optimises: the study records ``objective_flops`` and
        ``StudyAttrs.cost`` is the one mapping from it."""
        return StudyAttrs(objective_flops=self.space.settings.objective_flops).cost  # type: ignore[return-value]

    @property
    def final(self) -> FinalStage | None:
        return self.space.settings.fidelity.final

    def search_fits(self, seconds: float) -> bool:
        """Whether a search job of ``seconds`` can start: it must end before the search phase
        does, and leave the final stage its share as corrected by the jobs finished so far (on
        a machine slower than measured, the search phase ends earlier)."""
        final = self.final_reserve * self.cost_model.correction("final")
        if self.measured_reserve is not None:  # measured here: no correction factor
            final = self.measured_reserve
        # The trial's work around its training (recording, MLflow, the front's refresh), as
        # measured on the trials so far: on a loaded machine seconds per trial that the
        # final stage would otherwise lose.
        around = statistics.median(self.overheads["search"]) if self.overheads.get("search") else 0
        return self.search_deadline.fits(seconds + around) and self.deadline.fits(
            seconds + around + final
        )

    def rungs(self, candidate: Candidate) -> list[Rung]:
        """The rungs a trial climbs: the space's, or the candidate's own training as one."""
        rungs = list(self.space.settings.fidelity.rungs) or [
            Rung(candidate.train.epochs, candidate.train.max_train_samples)
        ]
        return rungs if self.halving else rungs[-1:]

    def estimate(
        self, candidate: Candidate, flops: float, *, kind: str, n_stages: int = 1
    ) -> float:
        """Predicted seconds to train ``candidate`` here (see ``plan.CostModel``), over every
        one of its ``n_stages`` training stages."""
        from autosplit.distill.run import stage_epochs

        return self.cost_model.training_seconds(
            flops=float(flops),
            epochs=sum(stage_epochs(candidate.train, n_stages)),
            rows=train_rows(candidate, self.splits),
            val_rows=len(self.splits.val),
            kind=kind,
        )

    def teacher_source(self, taps: set[str], candidate: Candidate) -> CachedTeacher:
        """The cached teacher outputs holding ``taps`` over the rows trials train on."""
        from autosplit.cache import teacher_cache_for

        taps = taps | {"logits"}
        # What the outputs depend on besides the teacher and data (a space may search these).
        augment = candidate.data.augment
        key = (
            tuple(sorted(taps)),
            train_rows(candidate, self.splits),
            augment,
            candidate.train.seed if augment else 0,
        )
        if key in self.caches:
            self.cost["cache_hits"] += 1
        else:
            # One cache in memory at a time: a final stage's full-data cache is large.
            self.caches.clear()
            started = time.perf_counter()
            cache = teacher_cache_for(
                candidate,
                self.teacher,
                self.splits,
                self.runtime,
                self.runs_dir,
                views=self.space.settings.teacher_views,
                taps=taps,
            )
            self.cost["cache_hits" if cache.hit else "cache_builds"] += 1
            if not cache.hit:  # the teacher's forward time here, for later jobs' estimates
                views = self.space.settings.teacher_views if augment else 1
                self.cost["cache_seconds"] = self.cost.get("cache_seconds", 0.0) + (
                    time.perf_counter() - started
                )
                self.cost["cache_images"] = self.cost.get("cache_images", 0.0) + key[1] * views
            self.caches[key] = cache
        return self.caches[key]


def label_of(candidate: Any) -> str:
    from autosplit.distill import STRUCTURES

    text = STRUCTURES.get(candidate.structure.name).label(candidate.structure)
    text += f" + {candidate.logit_loss.name}"
    if candidate.feature_loss.name != "none":
        text += f" + {candidate.feature_loss.name}"
    if candidate.twi:
        text += " + twi"
    return text


OVER_BUDGET = "flops_over_budget"  # the trial's one constraint


def set_over_budget(trial: optuna.Trial, flops: float, max_flops: int) -> float:
    """Record by how much the trial's student exceeds the budget, as a share of it (<= 0 when
    it fits), and return it. Optuna 5's samplers read the constraint. optuna-dashboard 0.21
    reads only the older ``constraints`` list, which only the samplers' ``constraints_func``
    writes (deprecated in Optuna 5), so the value is also a user attr: the dashboard shows,
    sorts and filters by those."""
    over = (flops - max_flops) / max_flops
    trial.set_constraint(OVER_BUDGET, over)
    TrialAttrs(flops_over_budget=over).write(trial)
    return over


def objective(
    ctx: SearchContext, trial: optuna.Trial, phase: str = "search"
) -> tuple[float, float]:
    """One trial: a search trial climbs the rungs, a final-stage job trains one member once.

    A trial stopped by its environment rather than by its candidate (Ctrl-C, SIGTERM, a full
    disk, any OSError) is marked interrupted and its MLflow run closed as KILLED; Optuna fails
    it and the exception stops the search. The next start re-runs it with its parameters
    (``studies.requeue_interrupted``).
    """
    try:
        return _objective(ctx, trial, phase)
    except (KeyboardInterrupt, OSError) as exc:
        _mark_interrupted(ctx, trial, exc)
        raise


def _mark_interrupted(ctx: SearchContext, trial: optuna.Trial, exc: BaseException) -> None:
    try:
        TrialAttrs(
            state=studies.INTERRUPTED,
            error=(repr(exc) if isinstance(exc, KeyboardInterrupt) else str(exc))[:500],
        ).write(trial)
        run_id = TrialAttrs.read(trial).run_id
        if run_id:
            ctx.tracker.end_trial(
                run_id, state="killed", metrics=TrialMetrics(trial_number=trial.number).logged()
            )
    except Exception as inner:  # noqa: BLE001 - a full disk may refuse these writes too; the
        # next start still finds the trial FAIL without a verdict and re-runs it.
        log.debug("could not record the interruption of trial %d: %s", trial.number, inner)


class QuietInterrupts(logging.Filter):
    """Drop Optuna's traceback for a trial failed by an interruption or an OSError: the
    command line reports those in one line. Other failures keep Optuna's full report."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (
            record.exc_info
            and record.exc_info[0] is not None
            and issubclass(record.exc_info[0], KeyboardInterrupt | OSError | TrialOutOfMemory)
        ):
            self.quiet.add(message.split(" failed", 1)[0])  # "Trial 7"
            return False
        head = message.split(" failed with value", 1)
        return not (len(head) == 2 and head[0] in self.quiet)


def _objective(ctx: SearchContext, trial: optuna.Trial, phase: str) -> tuple[float, float]:
    interrupts.check()  # a stop dropped since the last training step (gc after a trial)
    if TrialAttrs.read(trial).stage == "final":
        return final_job(ctx, trial)
    if phase == "final":
        # Optuna samples a fresh trial when another worker took the last waiting job between
        # our check and the pop; the final phase runs no search trial, so it ends here.
        TrialAttrs(stage="search", state="skipped").write(trial)
        trial.study.stop()
        raise optuna.TrialPruned("no final-stage job left for this worker")
    return search_trial(ctx, trial)


def search_trial(ctx: SearchContext, trial: optuna.Trial) -> tuple[float, float]:
    """Draw, count, then train rung by rung while successive halving promotes the trial.

    Each rung trains from scratch at its fidelity (see ``at_fidelity``). Returns (val_acc, FLOPs)
    at the top rung; a trial stopped below it is PRUNED, its rung results kept as user attrs.
    """
    from autosplit.distill.run import deployed_parameters

    started = time.perf_counter()
    # A retried trial starts its rungs again.
    TrialAttrs(
        worker=studies.worker_id(),
        device=ctx.runtime.where,
        teacher_sha256=ctx.teacher_sha256,
        stage="search",
        rungs=[],
        precision=ctx.runtime.precision,
    ).write(trial)
    if isinstance(trial.study.sampler, studies.TrialSeededSampler):
        TrialAttrs(sampler_seed=trial.study.sampler.seed_for(trial.number)).write(trial)
    what = TrialAttrs.read(trial)
    baseline = what.baseline
    overrides = ctx.space.overrides(baseline=baseline, portfolio=what.portfolio)
    candidate = ctx.space.suggest(trial, ctx.max_flops, overrides=overrides)
    distiller, flops = _build_or_smallest(candidate, ctx)
    student = distiller.student
    # Pin the solved widths: the recorded candidate rebuilds exactly this student, fast.
    candidate = candidate.with_values(
        {"split.base_width": student.base_width, "split.part_width": student.part_width}
    )
    over = set_over_budget(trial, flops.worst_case, ctx.max_flops)
    TrialAttrs(
        label=label_of(candidate),
        flops=int(flops.worst_case),
        params=deployed_parameters(student),
    ).write(trial)
    taps = set(distiller.teacher_taps)
    n_stages = len(distiller.stages())
    del distiller, student  # train_candidate builds its own, from the pinned candidate
    run_id = ctx.tracker.start_trial(
        trial_number=trial.number,
        params={**candidate.flat(), PRECISION_PARAM: ctx.runtime.precision},
        tags=TrialAttrs(label=label_of(candidate), baseline=baseline, stage="search").run_tags(),
    )
    TrialAttrs(run_id=run_id).write(trial)
    overhead = time.perf_counter() - started
    if over > 0:
        TrialAttrs(state="infeasible", candidate=candidate.to_dict()).write(trial)
        ctx.tracker.end_trial(
            run_id,
            state="infeasible",
            metrics=TrialMetrics(flops=flops.worst_case, trial_number=trial.number).logged(),
        )
        log.info(
            "trial %d over budget: %d > %d FLOPs, not trained",
            trial.number,
            flops.worst_case,
            ctx.max_flops,
        )
        return 0.0, float(flops.worst_case)

    rungs = ctx.rungs(candidate)
    reached: list[dict[str, Any]] = []
    result = trained = None
    stop_reason = ""
    for index, rung in enumerate(rungs):
        at = at_fidelity(candidate, rung)
        estimate = ctx.estimate(at, flops.worst_case, kind="trial", n_stages=n_stages)
        if reached:  # above the first rung: from this trial's own rungs, as a final job is
            estimate = (
                extrapolate(
                    [(r["work"], r["seconds"] - r["prepare_seconds"]) for r in reached],
                    _work(ctx, at, n_stages),
                )
                or estimate
            )
        cache_seconds = cache_estimate(ctx, at, taps)[0]  # built before the rung trains
        if not ctx.search_fits(estimate + cache_seconds):
            log.info(
                "trial %d stops before rung %d: ~%.1f s would leave the final stage less than "
                "its %.0f s (%.0f s left)",
                trial.number,
                index,
                estimate + cache_seconds,
                ctx.measured_reserve if ctx.measured_reserve is not None else ctx.final_reserve,
                ctx.deadline.remaining(),
            )
            stop_reason = "time"
            break
        outcome, cache_took = _train(
            ctx,
            trial,
            at,
            flops,
            run_id,
            taps,
            step_offset=sum(r["epochs"] for r in reached),
            rung=index,
        )
        ctx.cost_model.observe("trial", estimate, outcome.seconds)
        result, trained = outcome, at
        reached.append(
            {
                "epochs": rung.epochs,
                "rows": train_rows(at, ctx.splits),
                "val_acc": outcome.val_acc,
                "seconds": round(outcome.seconds, 2),
                "expected_flops": outcome.expected_flops,
                # What the final stage plans this member's jobs from (``job_cost``).
                "prepare_seconds": round(outcome.prepare_seconds, 2),
                "prepare_images": outcome.prepare_images,
                "cache_seconds": round(cache_took, 2),
                "estimate_s": round(estimate + cache_seconds, 2),
                "work": _work(ctx, at, n_stages),
            }
        )
        TrialAttrs(rungs=reached).write(trial)
        if index + 1 < len(rungs):
            me = RungResult(trial.number, outcome.val_acc, _cost(ctx, outcome))
            if not promotable(me, finished_at_rung(trial.study, index, ctx), ctx.eta):
                stop_reason = "halving"
                break

    if result is None:  # not even the cheapest rung fits in the time left
        TrialAttrs(state="skipped", candidate=candidate.to_dict()).write(trial)
        ctx.tracker.end_trial(
            run_id, state="pruned", metrics=TrialMetrics(trial_number=trial.number).logged()
        )
        trial.study.stop()
        raise optuna.TrialPruned("no time left for the cheapest rung")

    record_started = time.perf_counter()
    if result.exit is not None:
        trained = trained.with_values({"structure.exit_threshold": result.exit.threshold})
    weights = _save_trial(ctx, trial, trained, result, run_id)
    wall = time.perf_counter() - started
    train_seconds = sum(r["seconds"] for r in reached)
    ctx.cost["train_seconds"] = ctx.cost.get("train_seconds", 0.0) + train_seconds
    ctx.record_overhead("search", started, train_seconds + sum(r["cache_seconds"] for r in reached))
    top = len(reached) == len(rungs)
    state = "complete" if top else "stopped"
    TrialAttrs(
        state=state,
        candidate=trained.to_dict(),
        rung=len(reached) - 1,
        val_acc=result.val_acc,
        expected_flops=result.expected_flops,
        params=result.params,
        weights=str(weights),
        train_seconds=train_seconds,
        **train_cost_attrs(result),
    ).write(trial)
    ctx.tracker.end_trial(
        run_id,
        state="complete" if top else "pruned",
        metrics=TrialMetrics(
            val_acc=result.val_acc,
            flops=result.worst_case_flops,
            expected_flops=result.expected_flops,
            params=result.params,
            rung=len(reached) - 1,
            wall_seconds=wall,
            train_seconds=train_seconds,
            **train_cost_attrs(result),
            estimate_seconds=sum(r["estimate_s"] for r in reached),
            actual_seconds=sum(r["seconds"] + r["cache_seconds"] for r in reached),
            trial_number=trial.number,
            overhead_seconds=overhead + (time.perf_counter() - record_started),
        ).logged(),
    )
    if not top:
        why = (
            "out of time"
            if stop_reason == "time"
            else f"not in the top 1/{ctx.eta} at rung {len(reached) - 1}"
        )
        raise optuna.TrialPruned(f"stopped after rung {len(reached) - 1}: {why}")
    return result.val_acc, _cost(ctx, result)


def final_job(ctx: SearchContext, trial: optuna.Trial) -> tuple[float, float]:
    """The final stage: one member of the front (or a baseline) trained at the final fidelity
    with one seed, if it fits in the time left together with the comparison jobs it must not
    crowd out (``round_needs``)."""
    started = time.perf_counter()
    TrialAttrs(
        worker=studies.worker_id(),
        device=ctx.runtime.where,
        teacher_sha256=ctx.teacher_sha256,
        precision=ctx.runtime.precision,
    ).write(trial)
    job = TrialAttrs.read(trial)
    member_number, seed_index = int(job.member), int(job.seed)
    others = trial.study.get_trials(deepcopy=False)
    # Two workers that end their search phase together may both enqueue a job; the earliest
    # live copy trains and the others stop here, before any work.
    if any(
        t.number < trial.number
        and t.state != TrialState.FAIL
        and (other := TrialAttrs.read(t)).stage == "final"
        and other.state != "duplicate"
        and (other.member, other.seed) == (member_number, seed_index)
        for t in others
    ):
        TrialAttrs(state="duplicate").write(trial)
        raise optuna.TrialPruned(f"final job {member_number}/{seed_index} is already taken")
    member = next(t for t in others if t.number == member_number)
    of_member = TrialAttrs.read(member)
    # The job was enqueued with the member's parameters: drawing them records them on this
    # trial, so the sampler sees a final result at the member's point of the space.
    baseline = of_member.baseline
    ctx.space.suggest(
        trial,
        ctx.max_flops,
        overrides=ctx.space.overrides(baseline=baseline, portfolio=of_member.portfolio),
    )
    candidate = final_candidate(ctx, of_member, seed_index)
    label = of_member.label or ""
    flops = of_member.flops
    TrialAttrs(label=label, flops=flops, baseline=baseline, params=of_member.params).write(trial)
    set_over_budget(trial, flops, ctx.max_flops)
    run_id = ctx.tracker.start_trial(
        trial_number=trial.number,
        params={**candidate.flat(), PRECISION_PARAM: ctx.runtime.precision},
        # The run's seed tag is the training seed; the trial's ``seed`` is the seed index.
        tags=TrialAttrs(
            label=label,
            baseline=baseline,
            stage="final",
            member=member_number,
            seed=candidate.train.seed,
        ).run_tags(),
    )
    TrialAttrs(run_id=run_id).write(trial)
    from autosplit.distill.run import build_and_count

    distiller, counted = build_and_count(candidate, ctx.teacher.model, ctx.splits)
    taps = set(distiller.teacher_taps)
    ctx.shapes[member_number] = (taps, len(distiller.stages()), distiller.prepare_passes)
    del distiller
    # Afresh: a cache an earlier job built costs nothing now, and overheads were measured.
    estimate = job_estimate(ctx, {t.number: t for t in others}, member_number, seed_index)
    # No correction factor: the parts are measured here, the overhead by finished final jobs.
    planned = estimate.as_dict()
    TrialAttrs(estimate_s=planned).write(trial)
    skipped_round, needs = round_needs(others, trial.number, job.role, seed_index, estimate)
    if skipped_round or not ctx.deadline.fits(needs):
        TrialAttrs(state="skipped").write(trial)
        ctx.tracker.end_trial(
            run_id, state="pruned", metrics=TrialMetrics(trial_number=trial.number).logged()
        )
        why = (
            f"a job of its seed-{seed_index} comparison was skipped (equal seeds or none)"
            if skipped_round
            else f"needs ~{needs:.0f} s with the comparison jobs still waiting, "
            f"{max(0.0, ctx.deadline.remaining()):.0f} s left"
        )
        log.info("final job %d/%d (%s) skipped: %s", member_number, seed_index, label, why)
        raise optuna.TrialPruned(f"no time left for final job {member_number}/{seed_index}")
    result, cache_took = _train(
        ctx, trial, candidate, counted, run_id, taps, step_offset=0, rung=None
    )
    if result.exit is not None:
        candidate = candidate.with_values({"structure.exit_threshold": result.exit.threshold})
    weights = _save_trial(ctx, trial, candidate, result, run_id)
    # What the deadline pays for this job: from the previous job's end to this one's.
    cycle = ctx.record_overhead("final", started, result.seconds + cache_took)
    took = {
        "train": round(result.seconds - result.prepare_seconds, 2),
        "prepare": round(result.prepare_seconds, 2),
        "cache": round(cache_took, 2),
        "overhead": round(cycle - result.seconds - cache_took, 2),
        "total": round(cycle, 2),
    }
    TrialAttrs(
        state="complete",
        candidate=candidate.to_dict(),
        val_acc=result.val_acc,
        expected_flops=result.expected_flops,
        weights=str(weights),
        train_seconds=result.seconds,
        actual_s=took,
        **train_cost_attrs(result),
    ).write(trial)
    ctx.tracker.end_trial(
        run_id,
        state="complete",
        metrics=TrialMetrics(
            val_acc=result.val_acc,
            flops=result.worst_case_flops,
            expected_flops=result.expected_flops,
            params=result.params,
            wall_seconds=time.perf_counter() - started,
            train_seconds=result.seconds,
            **train_cost_attrs(result),
            estimate_seconds=planned["total"],
            actual_seconds=took["total"],
            estimate_cache_seconds=planned["cache"],
            estimate_prepare_seconds=planned["prepare"],
            estimate_overhead_seconds=planned["overhead"],
            actual_cache_seconds=took["cache"],
            actual_prepare_seconds=took["prepare"],
            actual_overhead_seconds=took["overhead"],
            trial_number=trial.number,
        ).logged(),
    )
    return result.val_acc, _cost(ctx, result)


def _train(
    ctx: SearchContext,
    trial: optuna.Trial,
    candidate: Candidate,
    flops: Any,
    run_id: str,
    taps: set[str],
    *,
    step_offset: int,
    rung: int | None,
) -> Any:
    """Train ``candidate`` through the one code path retrain uses; log each epoch. Returns
    the result and the seconds spent getting the teacher cache (built, loaded or held)."""
    from autosplit.distill.run import train_candidate

    def on_epoch_end(stats: EpochStats) -> None:
        ctx.tracker.log_epoch(
            run_id,
            step_offset + stats.epoch,
            {
                "train/loss": stats.train_loss,
                "train/acc": stats.train_acc,
                "val/acc": stats.val_acc,
                "train/lr": stats.lr,
                "train/images_per_s": stats.images_per_second,
                **({"search/rung": rung} if rung is not None else {}),
                **{f"train/{k}": v for k, v in stats.loss_terms.items()},
            },
        )

    cache_started = time.perf_counter()
    try:
        source = ctx.teacher_source(taps, candidate)
        cache_seconds = time.perf_counter() - cache_started
        result = train_candidate(
            candidate,
            ctx.splits,
            ctx.teacher.model,
            ctx.runtime,
            teacher_source=source,
            progress=False,
            on_epoch_end=on_epoch_end,
            flops=flops,
        )
    except OSError:
        raise  # the environment's fault, not the candidate's: see ``objective``
    except torch.OutOfMemoryError:
        # Too large for this device at these settings: failed, recorded as such (not re-run:
        # it would run out again), and the search goes on with the next trial.
        ctx.runtime.free_memory()
        line = (
            f"out of GPU memory: {label_of(candidate)} at batch {candidate.train.batch_size} "
            f"on {ctx.runtime.where}"
        )
        TrialAttrs(state=OUT_OF_MEMORY, error=line).write(trial)
        ctx.tracker.end_trial(
            run_id, state="failed", metrics=TrialMetrics(trial_number=trial.number).logged()
        )
        print(f"autosplit: trial {trial.number}: {line}; the search goes on", file=sys.stderr)
        raise TrialOutOfMemory(line) from None
    except Exception as exc:
        TrialAttrs(state="failed", error=str(exc)[:500]).write(trial)
        ctx.tracker.end_trial(
            run_id, state="failed", metrics=TrialMetrics(trial_number=trial.number).logged()
        )
        raise
    return result, cache_seconds


def _work(ctx: SearchContext, candidate: Candidate, n_stages: int) -> float:
    """Images ``candidate``'s training works through (``job_cost.work_images``)."""
    from autosplit.distill.run import stage_epochs

    return work_images(
        stage_epochs(candidate.train, n_stages),
        train_rows(candidate, ctx.splits),
        len(ctx.splits.val),
    )


OUT_OF_MEMORY = "out_of_memory"  # ``TrialAttrs.state`` of a trial its device could not hold


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of GPU memory; Optuna fails it and the worker goes on."""


def _build_or_smallest(candidate: Any, ctx: SearchContext) -> tuple[Any, Any]:
    """Build and count; when no width fits the share, count the narrowest build instead, so
    the trial is recorded as infeasible with its real cost rather than failing."""
    from autosplit.distill.run import build_and_count
    from autosplit.flops import BudgetTooSmall

    try:
        return build_and_count(candidate, ctx.teacher.model, ctx.splits)
    except BudgetTooSmall as exc:
        log.info("no width fits (%s); counting the narrowest build", exc)
        return build_and_count(narrowest(candidate), ctx.teacher.model, ctx.splits)


def narrowest(candidate: Any) -> Any:
    """``candidate`` with every width at the solver's lower end: its smallest build."""
    from autosplit.distill import STRUCTURES

    structure = STRUCTURES.get(candidate.structure.name)
    return candidate.with_values(structure.narrowest_widths(SMALLEST_WIDTH))


def finished_at_rung(study: optuna.Study, rung: int, ctx: SearchContext) -> list[RungResult]:
    """Feasible trials that finished ``rung`` so far (running ones included, failed ones not:
    a failed trial is re-run with its parameters and would otherwise count twice)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = TrialAttrs.read(t)
        reached = attrs.rungs or []
        if t.state == TrialState.FAIL or attrs.stage != "search" or len(reached) <= rung:
            continue
        flops = float(attrs.flops)
        if flops > ctx.max_flops:
            continue
        cost = (
            float(reached[rung].get("expected_flops") or flops)
            if ctx.front_cost == "expected_flops"
            else flops
        )
        out.append(RungResult(t.number, float(reached[rung]["val_acc"]), cost))
    return out


def train_cost_attrs(result: Any) -> dict[str, Any]:
    """The training cost of a trained result, as ``TrialAttrs`` fields."""
    return {
        "train_images": int(result.train_images),
        "train_flops": float(result.train_flops),
        "train_cost": float(result.train_cost),
    }


def _cost(ctx: SearchContext, result: Any) -> float:
    return float(
        result.expected_flops if ctx.front_cost == "expected_flops" else result.worst_case_flops
    )


def at_fidelity(candidate: Candidate, rung: Rung) -> Candidate:
    """The candidate trained at ``rung``: its epochs over its first rows, from scratch.

    Restart, not resume: a rung's accuracy is then exactly what ``autosplit train`` reproduces
    at that fidelity, and every schedule (cosine lr, DKD/AEKT warm-up over the run) keeps its
    meaning; a finished 1-epoch cosine run resumed for 3 would be a warm restart instead.
    A warm-up (DKD, AEKT) keeps its share of the run: scaled from the candidate's epochs to the
    rung's, at least one epoch and at most the rung (3 of 30 epochs becomes 24 of 240).
    """
    values: dict[str, Any] = {"train.epochs": rung.epochs, "train.max_train_samples": rung.rows}
    warmup = candidate.logit_loss.get("warmup_epochs")
    if warmup is not None and warmup > 0:
        scaled = min(max(1, round(warmup * rung.epochs / candidate.train.epochs)), rung.epochs)
        if scaled != warmup:
            values["logit_loss.warmup_epochs"] = scaled
    return candidate.with_values(values)


def _save_trial(
    ctx: SearchContext, trial: optuna.Trial, candidate: Any, result: Any, run_id: str
) -> Path:
    """The trained student's weights and its (pinned) candidate, for export; on a study that
    hosts share, the weights also go to the trial's MLflow run, so export works on any host."""
    from autosplit.checkpoint import save_checkpoint

    folder = ctx.runs_dir / "studies" / ctx.study_name / f"trial-{trial.number:04d}"
    path = folder / "student.pt"
    save_checkpoint(
        path,
        kind="student",
        config=candidate.to_dict(),
        state_dict={k: v.detach().cpu() for k, v in result.student.state_dict().items()},
        extra={"val_acc": result.val_acc, "trial": trial.number},
    )
    atomic_write_text(folder / "candidate.yaml", candidate.to_yaml())
    if ctx.share_weights and run_id:
        uri = ctx.tracker.publish_file(path, folder="student", run_id=run_id)
        if uri is not None:
            TrialAttrs(weights_uri=uri).write(trial)
    return path


# --- the driver -------------------------------------------------------------------------------


@dataclass
class SearchOptions:
    space: SearchSpace
    budget: Budget
    trials: int
    time_limit: float | None = None  # seconds for the whole job (teacher, search, final stage)
    study_name: str | None = None
    storage: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 1
    device: str = "auto"  # this process's device
    devices: tuple[str, ...] = ()  # worker i of ``workers`` runs on devices[i % len]; () = device
    tracking_uri: str | None = None  # the MLflow store logged to (None: not tracked)
    teacher_dir: Path | None = None  # where the study's teacher is published (None: MLflow)
    teacher_wait: float = 7200.0  # seconds a host waits for the teacher another host trains
    precision: str = "auto"  # ``device.resolve_runtime``: auto | fp32 | bf16
    runs_dir: Path = Path("runs")
    progress: bool = True
    halving: bool = True
    final_stage: bool = True
    retrain_teacher: bool = False  # train a fresh teacher even where one is cached or shipped
    clock: Callable[[], float] = time.monotonic
    started: float | None = None  # ``clock()`` when the process started (default: at prepare)


def default_study_name(space: SearchSpace, budget: Budget) -> str:
    return f"{space.name}-{budget.slug}"


def prepare(
    options: SearchOptions,
    *,
    log_teacher: Callable[[str], None] = print,
    shared: _SharedPlan | None = None,
    study_teacher: StudyTeacher | None = None,
) -> SearchContext:
    """Data, the time plan (from throughput measured here), the teacher (trained once, cached)
    and the budget in FLOPs. A worker process gets its parent's plan as ``shared``; the
    process that starts a search gets ``study_teacher``, the one teacher of the study's hosts
    (checked before any work, then fetched, or trained by the host that claims it)."""
    from autosplit.data import load_splits
    from autosplit.device import resolve_runtime
    from autosplit.flops import count_flops
    from autosplit.search.plan import usable_seconds
    from autosplit.search.shared_teacher import is_shared_storage
    from autosplit.teacher import (
        build_teacher_model,
        get_teacher,
        is_cached,
        load_teacher,
        teacher_key,
    )

    deadline = Deadline(options.time_limit, clock=options.clock)
    if options.started is not None:  # the limit counts from process start (imports included)
        deadline.started = options.started
        deadline.at = None if options.time_limit is None else options.started + options.time_limit
    runtime = resolve_runtime(options.device, precision=options.precision)
    space = options.space
    splits = load_splits(space.data)
    teacher_cfg = space.teacher
    own_key = teacher_key(teacher_cfg, splits.fingerprint)
    if study_teacher is not None:
        study_teacher.check(splits.fingerprint, own_key)
    teacher_model = build_teacher_model(teacher_cfg, splits)  # untrained: for counting only
    teacher_flops = count_flops(teacher_model, splits.info.input_shape)
    max_flops = options.budget.resolve(teacher_flops)
    ctx = SearchContext(
        space=space,
        splits=splits,
        teacher=cast("Teacher", None),  # trained or loaded below, once the plan is made
        runtime=runtime,
        max_flops=max_flops,
        teacher_flops=teacher_flops,
        runs_dir=Path(options.runs_dir),
        study_name="",
        progress=options.progress,
        halving=options.halving,
        deadline=deadline,
        share_weights=options.storage is not None and is_shared_storage(options.storage),
    )
    if shared is None:
        check_budget(ctx, options.budget, teacher_model, say=log_teacher)
    final_reserve = 0.0
    if shared is not None:
        shared.apply(ctx)
        if shared.device != runtime.where and options.time_limit is not None:
            # A worker on another device (another GPU model, or a GPU busy with other work)
            # estimates its jobs from its own throughput; the plan's deadlines stay shared.
            ctx.cost_model = _measure_cost_model(ctx)
        teacher_cfg = dataclasses.replace(
            teacher_cfg, train=dataclasses.replace(teacher_cfg.train, epochs=shared.teacher_epochs)
        )
    elif options.time_limit is not None:  # without a limit nothing is planned or estimated
        ctx.cost_model = _measure_cost_model(ctx)
    if shared is None and options.time_limit is not None:
        chosen = _plan(
            ctx,
            options,
            cached=is_cached(
                teacher_cfg, splits, options.runs_dir, retrain=options.retrain_teacher
            ),
        )
        log_teacher(f"{chosen.describe()}; trials in {runtime.describe()}")
        for warning in chosen.warnings:
            log_teacher(f"warning: {warning}")
        if chosen.teacher_epochs < teacher_cfg.train.epochs:
            teacher_cfg = dataclasses.replace(
                teacher_cfg,
                train=dataclasses.replace(teacher_cfg.train, epochs=chosen.teacher_epochs),
            )
        ctx.finalists, ctx.final_seeds = chosen.finalists, chosen.seeds
        ctx.final_epochs = chosen.final_epochs if ctx.final is not None else None
        final_reserve = chosen.final_seconds

    def train() -> Teacher:
        return get_teacher(
            teacher_cfg,
            space.data,
            splits,
            runtime,
            runs_dir=options.runs_dir,
            progress=options.progress,
            retrain=options.retrain_teacher,
        )

    def load(path: Path) -> Teacher:
        teacher = load_teacher(path, splits)
        teacher.model = runtime.prepare(teacher.model)
        return teacher

    ctx.teacher = (
        train()
        if study_teacher is None
        else study_teacher.obtain(train, load, data_fingerprint=splits.fingerprint, own_key=own_key)
    )
    if shared is None and options.time_limit is not None:
        # Work starts only while it can end inside the limit less a small reserve for the end
        # (fronts, MLflow); the search phase leaves the final stage its planned share.
        work_ends = deadline.started + usable_seconds(options.time_limit)
        ctx.deadline = Deadline.until(work_ends, clock=options.clock)
        ctx.search_deadline = Deadline.until(work_ends - final_reserve, clock=options.clock)
        ctx.final_reserve = final_reserve
    state = "cached" if ctx.teacher.from_cache else f"trained in {ctx.teacher.train_seconds:.0f}s"
    log_teacher(
        f"teacher {space.teacher.model} ({state}): test {ctx.teacher.test_acc:.2f}%, "
        f"{teacher_flops:,} FLOPs; budget {options.budget.text} = {max_flops:,} FLOPs"
        + ("" if options.time_limit is not None else f"; trials in {runtime.describe()}")
    )
    return ctx


def check_budget(
    ctx: SearchContext,
    budget: Budget,
    teacher_model: torch.nn.Module,
    *,
    say: Callable[[str], None],
) -> None:
    """Refuse a budget below the narrowest student the space builds (every trial would be
    infeasible), before the teacher trains; warn about one above the teacher's FLOPs.
    ``teacher_model``: the teacher's architecture (counting needs no trained weights)."""
    from autosplit.flops import format_flops
    from autosplit.search.budget import within_budget

    base = ctx.space.base_candidate(ctx.max_flops)

    def below(smallest: int) -> str:
        return (
            f"--budget {budget.text} = {format_flops(ctx.max_flops)} FLOPs: below the smallest "
            f"student this space builds ({format_flops(smallest)} FLOPs, "
            f"{base.student.family} at width "
            f"{SMALLEST_WIDTH}); raise --budget to at least {smallest / ctx.teacher_flops:.3g}x "
            f"or {format_flops(smallest)}"
        )

    narrowest_student = narrowest(base).with_values({"split.budget_share": 1.0})
    within_budget(narrowest_student, teacher_model, ctx.splits, max_flops=ctx.max_flops, over=below)
    if ctx.max_flops > ctx.teacher_flops:
        say(
            f"warning: --budget {budget.text} = {format_flops(ctx.max_flops)} FLOPs is above the "
            f"teacher's {format_flops(ctx.teacher_flops)}; students may be as large as the "
            "teacher"
        )


def _measure_cost_model(ctx: SearchContext) -> CostModel:
    """Training images/s of the teacher's architecture and of a single student at the budget."""
    from autosplit.search.throughput import training_images_per_second
    from autosplit.teacher import build_teacher_model

    info = ctx.splits.info
    batch = ctx.space.base_candidate(ctx.max_flops).train.batch_size
    teacher_ips = training_images_per_second(
        build_teacher_model(ctx.space.teacher, ctx.splits),
        info.input_shape,
        info.num_classes,
        ctx.runtime,
        batch_size=ctx.space.teacher.train.batch_size,
    )
    student, student_flops = _budget_student(ctx)
    student_ips = training_images_per_second(
        student, info.input_shape, info.num_classes, ctx.runtime, batch_size=batch
    )
    log.info(
        "throughput here (%s): teacher %.0f img/s at %d FLOPs, student %.0f img/s at %d FLOPs",
        ctx.runtime.where,
        teacher_ips,
        ctx.teacher_flops,
        student_ips,
        student_flops,
    )
    return CostModel({float(ctx.teacher_flops): teacher_ips, float(student_flops): student_ips})


def _budget_student(ctx: SearchContext) -> tuple[torch.nn.Module, int]:
    """A single student using the whole budget: the size the planner measures."""
    from autosplit.search.budget import within_budget
    from autosplit.teacher import build_teacher_model

    baselines = list(ctx.space.settings.baselines.values())
    candidate = ctx.space.base_candidate(ctx.max_flops)
    if baselines:
        candidate = candidate.with_values(baselines[0])
    distiller, flops = within_budget(
        candidate,
        build_teacher_model(ctx.space.teacher, ctx.splits),
        ctx.splits,
        max_flops=None,  # solved to fit it
        none_fits=lambda exc: (
            f"--budget {ctx.max_flops:,} FLOPs: no student of this space fits it "
            f"({exc}); raise --budget"
        ),
    )
    return distiller.student, flops.worst_case


def _plan(ctx: SearchContext, options: SearchOptions, *, cached: bool) -> Any:
    from autosplit.cache import teacher_cache_exists
    from autosplit.search.plan import EVAL_WEIGHT, PlanInput, TimeLimitTooShort, make_plan
    from autosplit.teacher import teacher_key

    space, splits, model = ctx.space, ctx.splits, ctx.cost_model
    teacher_cfg = space.teacher
    base = space.base_candidate(ctx.max_flops)
    rung0 = at_fidelity(base, ctx.rungs(base)[0])
    final = ctx.final
    teacher_epoch = (
        model.training_seconds(
            flops=ctx.teacher_flops,
            epochs=1,
            rows=len(splits.train),
            val_rows=len(splits.val),
            kind="teacher",
        )
        - model.fixed_seconds
    )
    final_job = final_cache = 0.0
    if final is not None and options.final_stage:
        at_final = at_fidelity(base, Rung(final.epochs, final.rows))
        final_job = ctx.estimate(at_final, ctx.max_flops, kind="final")
        # Building the teacher cache over the final rows (forward passes of the teacher),
        # unless an earlier run left it on disk.
        views = space.settings.teacher_views if space.data.augment else 1
        if not teacher_cache_exists(
            at_final,
            teacher_key(teacher_cfg, splits.fingerprint),
            splits,
            options.runs_dir,
            views=views,
        ):
            final_cache = (
                train_rows(at_final, splits)
                * views
                * EVAL_WEIGHT
                / model.images_per_second(ctx.teacher_flops)
            )
    try:
        return make_plan(
            PlanInput(
                time_limit=float(options.time_limit),
                teacher_cached=cached,
                teacher_epochs=space.teacher.train.epochs,
                teacher_epoch_seconds=teacher_epoch,
                final_seconds=final_job,
                final_fixed_seconds=final_cache,
                final_members=final.top_k if final else 0,
                final_seeds=final.seeds if final else 0,
                final_epochs=final.epochs if final else 1,
                baselines=len(space.settings.baselines) if final else 0,
                rung0_seconds=ctx.estimate(rung0, ctx.max_flops, kind="trial"),
            )
        )
    except TimeLimitTooShort as exc:
        raise UserError(str(exc)) from None


def run_worker(
    options: SearchOptions,
    ctx: SearchContext,
    study_name: str,
    storage_url: str,
    *,
    tracker: Tracker,
    worker_index: int,
    phase: str = "search",
) -> None:
    """One worker's loop. ``search``: trials until the study holds ``options.trials`` or the
    search phase's time is up; ``final``: the waiting final-stage jobs. ``tracker``: the
    search's, logging under its parent run."""
    storage = studies.open_storage(storage_url)
    # One seed for every worker and invocation: the sampler derives each trial's own seed
    # from it and the trial's number, unique in the study (``studies.TrialSeededSampler``).
    sampler = studies.make_sampler(options.sampler, options.seed)
    study = studies.open_study(study_name, storage, sampler=sampler, create=False)
    ctx.study_name = study_name
    ctx.tracker = tracker
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet = QuietInterrupts()
    optimize_log = logging.getLogger("optuna.study._optimize")
    optimize_log.addFilter(quiet)
    if phase == "final":
        n = len(_waiting_final(study))
        callbacks: list[Any] = [_StopWhenNoFinalJobWaits()]
    else:
        n = studies.remaining_trials(study, options.trials)
        callbacks = [_StopAtTotal(options.trials), _front_callback(ctx)]
        if options.progress and worker_index == 0:
            callbacks.append(_ProgressCallback(options.trials, study))
    if n == 0:
        return
    # A candidate whose training diverges is a failed trial, not a failed search.
    try:
        study.optimize(
            lambda trial: objective(ctx, trial, phase),
            n_trials=n,
            callbacks=callbacks,
            gc_after_trial=True,
            catch=(FloatingPointError, TrialOutOfMemory),
        )
    finally:
        optimize_log.removeFilter(quiet)


class _StopAtTotal:
    """Stop when the study holds ``total`` search trials (final-stage jobs are not counted)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, study: optuna.Study, _trial: Any) -> None:
        if studies.remaining_trials(study, self.total) == 0:
            study.stop()


class _StopWhenNoFinalJobWaits:
    """The final phase ends when no final-stage job waits (other workers took the rest)."""

    def __call__(self, study: optuna.Study, _trial: Any) -> None:
        if not _waiting_final(study):
            study.stop()


def _front_callback(ctx: SearchContext) -> Callable[[optuna.Study, Any], None]:
    report = SearchReport(ctx.tracker, ctx.study_name, ctx.max_flops, ctx.front_cost)

    def refresh(study: optuna.Study, _trial: Any) -> None:
        # The final stage's cost from what the search measured: the search phase leaves it
        # that much (``SearchContext.search_fits``), not the plan's guess.
        ctx.measured_reserve = final_reserve_measured(study, ctx)
        stats = studies.records(study)
        report.front(search_records(stats))
        ctx.tracker.log_search_cost(
            {
                "cpu_seconds": time.process_time(),
                # Wall time this worker held its GPU for training (0 on CPU-only runs).
                "gpu_seconds": ctx.cost.get("train_seconds", 0.0) if ctx.runtime.is_cuda else 0.0,
                "stopped": sum(r.state == "stopped" for r in stats),
                "infeasible": sum(r.state == "infeasible" for r in stats),
                "cache_hits": ctx.cost["cache_hits"],
                "cache_builds": ctx.cost["cache_builds"],
                # What the search phase leaves the final stage, as measured so far.
                **(
                    {"final_reserve_s": ctx.measured_reserve}
                    if ctx.measured_reserve is not None
                    else {}
                ),
            }
        )

    return refresh


class _ProgressCallback:
    """A live line: trials done / stopped / infeasible and the best feasible accuracy so far."""

    def __init__(self, total: int, study: optuna.Study) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            desc="search",
            dynamic_ncols=True,
            disable=os.environ.get("AUTOSPLIT_NO_PROGRESS") == "1",
        )
        self.bar.update(
            len([r for r in studies.records(study) if r.stage == "search" and r.state != "running"])
        )

    def __call__(self, study: optuna.Study, _trial: Any) -> None:
        from autosplit.search.front import pareto_front

        recs = [r for r in studies.records(study) if r.stage == "search"]
        budget = StudyAttrs.read(study).budget_flops
        front = pareto_front(search_records(recs), budget)
        best = max((r.val_acc for r in front), default=float("nan"))
        self.bar.n = len([r for r in recs if r.state not in ("running", "waiting", "skipped")])
        self.bar.set_postfix(
            top_rung=sum(r.state == "complete" for r in recs),
            stopped=sum(r.state == "stopped" for r in recs),
            infeasible=sum(r.state == "infeasible" for r in recs),
            front=len(front),
            best=f"{best:.2f}%",
        )
        self.bar.refresh()


# --- the final stage --------------------------------------------------------------------------


def choose_finalists(study: optuna.Study, ctx: SearchContext, k: int) -> list[int]:
    """The ``k`` best search trials: highest rung reached first, then the promotion ranking
    (non-dominated sorting and crowding) among the trials of that rung. Baselines are not
    counted here: they join the final stage anyway."""
    from autosplit.search.promotion import select

    chosen: list[int] = []
    trials = study.get_trials(deepcopy=False)
    # Not baselines, and not trials still running in another worker (they have not recorded
    # their candidate yet; that worker adds them when its own search phase ends).
    skip = {
        t.number
        for t in trials
        if TrialAttrs.read(t).baseline
        or t.state not in (TrialState.COMPLETE, TrialState.PRUNED)
        or TrialAttrs.read(t).candidate is None
    }
    top = max(
        (len(TrialAttrs.read(t).rungs or []) for t in trials if studies.is_search_trial(t)),
        default=0,
    )
    for rung in range(top - 1, -1, -1):
        pool = [
            r
            for r in finished_at_rung(study, rung, ctx)
            if r.number not in chosen and r.number not in skip
        ]
        chosen += [r.number for r in select(pool, k - len(chosen))]
        if len(chosen) >= k:
            break
    return chosen


def best_finalist(study: optuna.Study, finalists: list[int]) -> int | None:
    """The search's best member among ``finalists``: the highest rung reached, then the most
    accurate there (then the earlier trial)."""
    rungs = {
        t.number: TrialAttrs.read(t).rungs or []
        for t in study.get_trials(deepcopy=False)
        if t.number in finalists
    }
    if not rungs:
        return None
    return max(
        rungs, key=lambda n: (len(rungs[n]), rungs[n][-1]["val_acc"] if rungs[n] else 0.0, -n)
    )


def final_plan(study: optuna.Study, ctx: SearchContext) -> list[tuple[int, int, str]]:
    """The final stage's jobs in the order they run: (member, seed index, role).

    The comparison a user comes for first: for each seed, the search's best member and every
    finished baseline ("best", "baseline"); then the other finalists ("extra"), seeds in the
    outer loop. Under a short limit the extras and then the later seeds are what is left out
    (``round_needs``), never the best member or a baseline at the first seed.
    """
    final = ctx.final
    if final is None:
        return []
    finalists = choose_finalists(study, ctx, ctx.finalists or final.top_k)
    best = best_finalist(study, finalists)
    # Only baselines that have finished (and so recorded their candidate): another worker's
    # may still be running; that worker enqueues it when its own search phase ends.
    baselines = [
        t.number
        for t in study.get_trials(deepcopy=False)
        if studies.is_search_trial(t)
        and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and (a := TrialAttrs.read(t)).baseline
        and a.rungs
        and a.candidate is not None
    ]
    comparison = ([best] if best is not None else []) + baselines
    extras = [m for m in finalists if m != best and m not in baselines]
    seeds = range(ctx.final_seeds or final.seeds)
    jobs = [(m, s, "best" if m == best else "baseline") for s in seeds for m in comparison]
    return jobs + [(m, s, "extra") for s in seeds for m in extras]


def enqueue_final_stage(study: optuna.Study, ctx: SearchContext) -> list[int]:
    """Enqueue the (member, seed) jobs of ``final_plan`` not yet done or waiting, in its
    order, each with its planned cost. Returns the members."""
    jobs = final_plan(study, ctx)
    if ctx.final is None:
        return []
    trials = study.get_trials(deepcopy=False)
    attrs_of = {t.number: TrialAttrs.read(t) for t in trials}
    have = {
        (attrs_of[t.number].member, attrs_of[t.number].seed)
        for t in trials
        if attrs_of[t.number].stage == "final" and t.state != TrialState.FAIL
    }
    by_number = {t.number: t for t in trials}
    for member, seed, role in jobs:
        if (member, seed) not in have:
            estimate = job_estimate(ctx, by_number, member, seed)
            job = TrialAttrs(
                stage="final",
                member=member,
                seed=seed,
                role=role,
                baseline=attrs_of[member].baseline or None,
                estimate_s=estimate.as_dict(),
            )
            study.enqueue_trial(by_number[member].params, user_attrs=job.user_attrs())
    members = list(dict.fromkeys(m for m, _s, _r in jobs))
    # A union: a worker that ends its search later may add a finalist the first one missed.
    known = list(StudyAttrs.read(study).final_members or [])
    members = known + [m for m in members if m not in known]
    StudyAttrs(final_members=members).write(study)
    return members


def final_candidate(ctx: SearchContext, of_member: TrialAttrs, seed_index: int) -> Candidate:
    """The member's candidate at the final fidelity, trained at its seed + ``seed_index``."""
    from autosplit.distill.candidate import Candidate

    final = ctx.final
    assert final is not None
    candidate = Candidate.from_dict(of_member.candidate)
    if candidate.structure.get("exit_threshold") is not None:  # recalibrated after training
        candidate = candidate.with_values({"structure.exit_threshold": None})
    return at_fidelity(candidate, Rung(ctx.final_epochs or final.epochs, final.rows)).with_values(
        {"train.seed": candidate.train.seed + seed_index}
    )


def job_estimate(
    ctx: SearchContext, trials: dict[int, Any], member: int, seed_index: int
) -> JobEstimate:
    """The planned cost of final job (``member``, ``seed_index``) from the member's rungs
    (``job_cost.estimate_job``); ``trials``: the study's, by number."""
    from autosplit.distill.candidate import Candidate
    from autosplit.distill.run import build_and_count

    of_member = TrialAttrs.read(trials[member])
    candidate = final_candidate(ctx, of_member, seed_index)
    if member not in ctx.shapes:
        distiller, _ = build_and_count(candidate, ctx.teacher.model, ctx.splits)
        shape = (set(distiller.teacher_taps), len(distiller.stages()), distiller.prepare_passes)
        ctx.shapes[member] = shape
        del distiller
    taps, n_stages, passes = ctx.shapes[member]
    trained = Candidate.from_dict(of_member.candidate)
    return estimate_job(
        ctx,
        candidate,
        taps=taps,
        n_stages=n_stages,
        passes=passes,
        # Each rung as the member trained it.
        rungs=[
            (at_fidelity(trained, Rung(int(r["epochs"]), r.get("rows"))), r)
            for r in of_member.rungs or []
        ],
        flops=float(of_member.flops or ctx.max_flops),
        study_prepare=prepare_rates(TrialAttrs.read(t).rungs or [] for t in trials.values()),
        overhead=job_overhead(ctx.overheads, ctx.cost_model.fixed_seconds),
    )


def round_needs(
    trials: list[Any], number: int, role: str | None, seed: int, estimate: JobEstimate
) -> tuple[bool, float]:
    """Whether final job ``number`` (``role``, ``seed``) belongs to a comparison round that
    lost a job already, and the seconds (uncorrected) it needs to start: its own estimate plus
    the waiting jobs it must not crowd out — for a comparison job, the rest of its seed's
    comparison (the best member and the baselines train at equal seeds or that seed not at
    all); for an extra member, every waiting comparison job. A teacher cache is counted once
    and only while its file is not on disk."""
    comparison = role in ("best", "baseline")
    skipped = False
    needs = estimate.train + estimate.prepare + estimate.overhead
    caches = {estimate.cache_file: estimate.cache} if estimate.cache_file else {}
    for t in trials:
        other = TrialAttrs.read(t)
        if t.number == number or other.stage != "final" or other.role not in ("best", "baseline"):
            continue
        if comparison and other.seed != seed:
            continue
        if other.state == "skipped":
            skipped = skipped or comparison
            continue
        if t.state != TrialState.WAITING or other.estimate_s is None:
            continue
        waiting = JobEstimate.from_dict(other.estimate_s)
        needs += waiting.train + waiting.prepare + waiting.overhead
        if waiting.cache_file and not Path(waiting.cache_file).is_file():
            caches.setdefault(waiting.cache_file, waiting.cache)
    return skipped, needs + sum(caches.values())


def final_reserve_measured(study: optuna.Study, ctx: SearchContext) -> float | None:
    """The final stage's seconds as the search's measurements put them now: every job of
    ``final_plan`` from its member's rungs (a cache counted once), and the plan's share for
    the finalists not found yet. None before any member has measured a rung."""
    final = ctx.final
    if final is None or ctx.final_reserve <= 0:
        return None
    jobs = final_plan(study, ctx)
    if not jobs:
        return None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    seeds = ctx.final_seeds or final.seeds
    wanted = (ctx.finalists or final.top_k) + len(ctx.space.settings.baselines)
    members = {m for m, _s, _r in jobs}
    total, caches = 0.0, {}
    for member, seed, _role in jobs:
        estimate = job_estimate(ctx, trials, member, seed)
        total += estimate.train + estimate.prepare + estimate.overhead
        caches.setdefault(estimate.cache_file, estimate.cache)
    per_job = ctx.final_reserve / max(1, wanted * seeds)
    # Switching to the final stage (planning and enqueueing its jobs) costs about one job's
    # overhead more.
    switch = job_overhead(ctx.overheads, ctx.cost_model.fixed_seconds)
    return total + sum(caches.values()) + max(0, wanted - len(members)) * seeds * per_job + switch


def _waiting_final(study: optuna.Study) -> list[Any]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if TrialAttrs.read(t).stage == "final"
    ]


def proxy_fidelity(study: optuna.Study) -> dict[int, dict[str, float | None]]:
    """Kendall tau between each rung's accuracy and the final stage's mean accuracy, over the
    final members that reached the rung: ``n`` of them, ``tau`` and its two-sided ``p``
    (None below ``front.MIN_TAU_N`` members, or when the accuracies are all tied)."""
    import math

    from scipy.stats import kendalltau

    from autosplit.search.front import MIN_TAU_N, final_members

    members = final_members(studies.records(study), StudyAttrs.read(study).final_members)
    rungs_of = {t.number: TrialAttrs.read(t).rungs or [] for t in study.get_trials(deepcopy=False)}
    out: dict[int, dict[str, float | None]] = {}
    top = max((len(rungs_of.get(m.number, [])) for m in members), default=0)
    for rung in range(top):
        pairs = [
            (rungs_of[m.number][rung]["val_acc"], m.val_mean)
            for m in members
            if len(rungs_of.get(m.number, [])) > rung
        ]
        tau = p = None
        if len(pairs) >= MIN_TAU_N:
            found = kendalltau([a for a, _ in pairs], [b for _, b in pairs])
            if not math.isnan(found.statistic):
                tau, p = float(found.statistic), float(found.pvalue)
        out[rung] = {"tau": tau, "p": p, "n": float(len(pairs))}
    return out


def run_search(
    options: SearchOptions,
    *,
    tracker: Tracker | None = None,
    say: Callable[[str], None] = print,
) -> tuple[optuna.Study, SearchContext]:
    """Plan and prepare once, run the search phase with ``options.workers`` worker processes
    (or this one), then the final stage, all on one study, logged by ``tracker`` (default:
    nothing logged). Open the tracker first: a store that cannot be reached then fails before
    the teacher trains and the study is touched (``tracking.check_tracking``)."""
    tracker = NullTracker() if tracker is None else tracker
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    from autosplit.search.shared_teacher import StudyTeacher, is_shared_storage

    study_name = options.study_name or default_study_name(options.space, options.budget)
    storage_url = options.storage or studies.default_storage(options.runs_dir, options.workers)
    storage = studies.open_storage(storage_url)
    opened: list[tuple[optuna.Study, bool]] = []

    def open_study() -> optuna.Study:
        # Made once this host has passed its checks (budget, data, teacher) and is about to
        # obtain the teacher: the study's claim lives in it.
        opened.append(studies.create_or_load(study_name, storage))
        return opened[-1][0]

    study_teacher = StudyTeacher(
        study_name,
        storage,
        open_study,
        runs_dir=Path(options.runs_dir),
        shared=is_shared_storage(storage_url),
        teacher_dir=options.teacher_dir,
        wait_seconds=options.teacher_wait,
        say=say,
    )
    ctx = prepare(options, log_teacher=say, study_teacher=study_teacher)
    study, created = opened[-1]
    studies.describe_study(study, ctx, options)
    # A worker of this host that died (kill -9, power loss) left its trial RUNNING: fail it
    # now rather than count it as done; it and any interrupted trial are re-queued with their
    # parameters. RDB storages also have Optuna's heartbeat, which covers workers on other
    # machines after its grace period.
    studies.fail_dead_local_trials(study)
    if created:  # only the worker that made the study: never twice when started together
        studies.enqueue_baselines(study, options.space)
    todo = studies.remaining_trials(study, options.trials)
    say(
        f"study {study_name} on {redact_url(storage_url)}: "
        f"{options.trials - todo} of {options.trials} trials already done"
    )
    # Runs of this study left RUNNING by a dead process of this host (kill -9, a store or
    # disk that failed before their end): KILLED now, as their Optuna trials were failed.
    tracker.close_dead_runs(study_name)
    settings: dict[str, str | int | float] = {
        "budget": options.budget.text,
        "budget_flops": ctx.max_flops,
        "sampler": options.sampler,
        "seed": options.seed,
        "trials": options.trials,
        "workers": options.workers,
        "devices": ",".join(options.devices) or options.device,
        "space": str(options.space.path),
        "time_limit_s": options.time_limit or 0,
        PRECISION_PARAM: ctx.runtime.precision,
    }
    tracker.start_search(
        study_name=study_name,
        settings=settings,
        note=search_note(study_name, settings, None, []),
    )
    # Now that the parent run exists: the teacher this host trained, for the study's others.
    study_teacher.publish(ctx.teacher, tracker.publish_file)
    status = "FINISHED"
    try:
        if todo:
            _run_phase(options, ctx, study_name, storage_url, tracker, "search")
        if options.final_stage and ctx.final is not None:
            enqueue_final_stage(study, ctx)
            ctx.last_job_end = None  # the final stage's first job counts from its own start
            if _waiting_final(study):
                _run_phase(options, ctx, study_name, storage_url, tracker, "final")
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        _end_parent(tracker, study, ctx, status)
    return study, ctx


def _end_parent(tracker: Tracker, study: optuna.Study, ctx: SearchContext, status: str) -> None:
    """The parent run's front and final stage, then its end, which runs whatever the front
    update raises. When the search itself failed or was stopped (``status`` KILLED or FAILED:
    its exception is in flight), an error of the front update is logged, not raised over it."""
    in_flight = status != "FINISHED"
    if not tracker.enabled:  # records nothing (or its store failed): nothing to draw or end
        return
    try:
        try:
            records = studies.records(study)
            report = SearchReport(tracker, study.study_name, ctx.max_flops, ctx.front_cost)
            report.front(search_records(records))
            if ctx.final is not None:
                from autosplit.search.front import final_members, rung_records

                members = final_members(records, StudyAttrs.read(study).final_members)
                rungs = {
                    k: rung_records(records, k)
                    for k in range(len(ctx.space.settings.fidelity.rungs))
                }
                report.final_stage(members, rungs, proxy_fidelity(study))
        finally:
            tracker.end_search(status)
    except Exception as exc:
        if not in_flight:
            raise
        log.warning("could not finish the MLflow parent run (%s: %s)", type(exc).__name__, exc)


def _run_phase(
    options: SearchOptions,
    ctx: SearchContext,
    study_name: str,
    storage_url: str,
    tracker: Tracker,
    phase: str,
) -> None:
    if options.workers > 1:
        _run_processes(options, ctx, study_name, storage_url, tracker, phase)
    else:
        run_worker(
            options, ctx, study_name, storage_url, tracker=tracker, worker_index=0, phase=phase
        )


def _run_processes(
    options: SearchOptions,
    ctx: SearchContext,
    study_name: str,
    storage_url: str,
    tracker: Tracker,
    phase: str,
) -> None:
    """N local worker processes on one journal/RDB storage (spawned: no shared torch state).

    Each worker gets the deadlines as wall-clock times (monotonic clocks are per process) and
    the cost model measured here, so workers neither re-plan nor re-measure. The tracker
    crosses pickled and reopens itself in each worker under the same parent run.
    """
    import multiprocessing as mp

    context = mp.get_context("spawn")
    worker_options = dataclasses.replace(options, workers=1, clock=time.monotonic, started=None)
    threads = max(1, (os.cpu_count() or 1) // options.workers)
    shared = _SharedPlan.of(ctx)
    devices = options.devices or (options.device,)
    procs = [
        context.Process(
            target=_worker_main,
            name=f"autosplit-worker-{i}",
            args=(
                dataclasses.replace(worker_options, device=devices[i % len(devices)]),
                study_name,
                storage_url,
                tracker,
                i,
                threads,
                shared,
                phase,
                logging.getLogger().getEffectiveLevel(),
            ),
        )
        for i in range(options.workers)
    ]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        # The workers ignore SIGINT and answer only to us, so that one Ctrl-C (which the
        # terminal sends to the whole process group) interrupts each of them exactly once.
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=WORKER_STOP_SECONDS)
            if proc.is_alive():
                proc.kill()  # its trial is failed and re-queued at the next start
        raise
    bad = [p.name for p in procs if p.exitcode != 0]
    if bad:
        raise UserError(
            f"worker(s) {', '.join(bad)} failed; see the log above. Re-run the same "
            "command to finish the study"
        )


@dataclass(frozen=True)
class _SharedPlan:
    """What the parent decided, in a form that crosses a process boundary: deadlines as
    wall-clock times (each process has its own monotonic clock), the measured cost model."""

    deadline_wall: float | None
    search_wall: float | None
    final_reserve: float
    cost_ref: dict[float, float]
    finalists: int | None
    seeds: int | None
    final_epochs: int | None
    teacher_epochs: int
    device: str  # where the cost model was measured

    @classmethod
    def of(cls, ctx: SearchContext) -> _SharedPlan:
        def wall(d: Deadline) -> float | None:
            return None if d.at is None else time.time() + d.remaining()

        return cls(
            wall(ctx.deadline),
            wall(ctx.search_deadline),
            ctx.final_reserve,
            dict(ctx.cost_model.ref),
            ctx.finalists,
            ctx.final_seeds,
            ctx.final_epochs,
            ctx.teacher.config.train.epochs,
            ctx.runtime.where,
        )

    def apply(self, ctx: SearchContext) -> None:
        def local(at: float | None) -> Deadline:
            return Deadline(None if at is None else at - time.time())

        ctx.deadline, ctx.search_deadline = local(self.deadline_wall), local(self.search_wall)
        ctx.final_reserve = self.final_reserve
        ctx.cost_model = CostModel(dict(self.cost_ref))
        ctx.finalists, ctx.final_seeds = self.finalists, self.seeds
        ctx.final_epochs = self.final_epochs


def _worker_main(
    options: SearchOptions,
    study_name: str,
    storage_url: str,
    tracker: Tracker,
    index: int,
    threads: int,
    shared: _SharedPlan,
    phase: str,
    log_level: int = logging.WARNING,
) -> None:
    import signal

    # A spawned process starts with logging unconfigured: it logs as its parent does (-v).
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s worker {index} %(name)s: %(message)s"
    )

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards a Ctrl-C as SIGTERM
    interrupts.install(signal.SIGTERM)
    torch.set_num_threads(threads)
    try:
        ctx = prepare(options, log_teacher=lambda _msg: None, shared=shared)
        run_worker(
            options,
            ctx,
            study_name,
            storage_url,
            tracker=tracker,
            worker_index=index,
            phase=phase,
        )
    except KeyboardInterrupt:
        sys.exit(130)
    except (UserError, OSError) as exc:
        print(f"autosplit: worker {index}: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, UserError) else 1)


WORKER_STOP_SECONDS = 60  # a worker answers SIGTERM by closing its trial: seconds, not minutes
