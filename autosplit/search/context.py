"""What a search's jobs share. ``SearchContext`` is built once, by ``setup.prepare``, complete:
the facts of the search (space, data, teacher, budget) and its ``Schedule`` (the deadlines
and the final stage's size) never change after that. What does change as jobs finish is grouped at the
end of the class: the cost model's corrections, the teacher cache held in memory, and what
finished jobs measured (overheads, the final stage's measured cost).

A worker process gets its parent's plan as a ``SharedPlan`` (deadlines as wall-clock times:
each process has its own monotonic clock) and builds its own context from it.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from autosplit.cache import HeldTeacherCache, train_rows
from autosplit.checkpoint import sha256_file
from autosplit.distill.run import stage_epochs
from autosplit.search.attrs import Stage, StudyAttrs
from autosplit.search.plan import CostModel, Deadline
from autosplit.search.space import FinalStage, Rung, SearchSpace
from autosplit.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from autosplit.data import Splits
    from autosplit.device import Runtime
    from autosplit.distill.candidate import Candidate
    from autosplit.search.final_stage import FinalReserve
    from autosplit.search.front import Cost
    from autosplit.teacher import Teacher


@dataclass(frozen=True)
class Schedule:
    """The time plan (``plan.make_plan``) in clock times: when work must end, and the final
    stage's size where the plan shrank the space's. Without a time limit: no ends and the
    space's own sizes."""

    deadline: Deadline = field(default_factory=lambda: Deadline(None))  # the whole job's work
    search_deadline: Deadline = field(default_factory=lambda: Deadline(None))  # search phase
    final_reserve: float = 0.0  # the plan's seconds for the final stage, before corrections
    finalists: int | None = None  # None: the space's top_k
    final_seeds: int | None = None  # None: the space's seeds
    final_epochs: int | None = None  # None: the space's final epochs
    # Seconds between ``deadline`` and the limit itself (kept for the fronts and MLflow at the
    # end): a job of the first seed's comparison may start into them rather than leave the
    # best member without its baselines (estimates err by some percent, and one job's overrun
    # would otherwise drop the whole round).
    end_slack: float = 0.0
    # Seconds past the limit itself (``plan.OVERRUN`` of it) the rest of a first-seed
    # comparison may run into once one of its jobs has trained: its time is spent, and
    # skipping the rest would leave that job nothing to compare against.
    overrun: float = 0.0


@dataclass
class SearchContext:
    """Everything a trial needs that is the same for every trial of a search, and the few
    figures its jobs update (after ``cost_model``)."""

    space: SearchSpace
    splits: Splits
    teacher: Teacher
    runtime: Runtime
    max_flops: int
    teacher_flops: int
    runs_dir: Path
    study_name: str = ""
    tracker: Tracker = field(default_factory=NullTracker)
    schedule: Schedule = field(default_factory=Schedule)
    progress: bool = False
    halving: bool = True  # False: every trial trains at the top rung only
    share_weights: bool = False  # publish trained weights to MLflow: hosts share the study

    # --- what changes as jobs finish -----------------------------------------------------------
    # Throughput measured at the start, corrected by each finished job (``CostModel.observe``).
    cost_model: CostModel = field(default_factory=lambda: CostModel({1.0: 1e9}))
    # The final stage's cost as the search's measurements put it (``final_reserve_measured``:
    # the whole stage and the first seed's comparison), once a search trial has finished;
    # until then the plan's ``final_reserve``.
    measured_reserve: FinalReserve | None = None
    # Per final member: (teacher taps, stages, prepare passes) of its distiller.
    shapes: dict[int, tuple[set[str], int, int]] = field(default_factory=dict)
    # Seconds each finished job cost beyond training and its cache, by ``Stage``
    # (``record_overhead``), and when the last one ended (``time.perf_counter``).
    overheads: dict[str, list[float]] = field(default_factory=dict)
    last_job_end: float | None = None
    train_seconds: float = 0.0  # this worker's training, summed over its jobs
    teacher_cache: HeldTeacherCache = field(init=False)

    def __post_init__(self) -> None:
        self.teacher_cache = HeldTeacherCache(
            self.teacher,
            self.splits,
            self.runtime,
            self.runs_dir,
            views=self.space.settings.teacher_views,
        )

    @functools.cached_property
    def teacher_sha256(self) -> str:
        """The teacher checkpoint's SHA-256, recorded on every trial distilled from it."""
        return sha256_file(self.teacher.path)

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

    def rungs(self, candidate: Candidate) -> list[Rung]:
        """The rungs a trial climbs: the space's, or the candidate's own training as one."""
        return rungs_of(self.space, candidate, halving=self.halving)

    def estimate(
        self, candidate: Candidate, flops: float, *, kind: str, n_stages: int = 1
    ) -> float:
        """Predicted seconds to train ``candidate`` here (see ``plan.CostModel``)."""
        return training_estimate(
            self.cost_model, self.splits, candidate, flops, kind=kind, n_stages=n_stages
        )

    def search_fits(self, seconds: float, *, warm_start: bool = False) -> bool:
        """Whether a search job of ``seconds`` can start: it must leave the final stage its
        share, as measured from the members' rungs once a trial has finished (on a machine
        slower than measured, the search phase ends earlier), and until then end before the
        plan's end of the search phase.

        ``warm_start``: the cheapest rung of a baseline or a portfolio recipe. The plan made
        room for those in the search phase; when the search phase's end is nevertheless
        near, they may still run into the final stage's share as far as the first seed's
        comparison allows, taking time from extra finalists and later seeds (which the final
        stage gives up first), never from the comparison."""
        plan_share = self.schedule.final_reserve * self.cost_model.correction("final")
        final = self.reserve_for(plan_share, warm_start=warm_start)
        # The trial's work around its training (recording, MLflow, the front's refresh), as
        # measured on the trials so far: on a loaded machine seconds per trial that the
        # final stage would otherwise lose.
        around = (
            statistics.median(self.overheads[Stage.SEARCH])
            if self.overheads.get(Stage.SEARCH)
            else 0
        )
        # The plan's end of the search phase holds until the final stage's cost is measured;
        # from then on the measured reserve decides (the plan's share was a guess).
        in_search = (
            warm_start
            or self.measured_reserve is not None
            or self.schedule.search_deadline.fits(seconds + around)
        )
        return in_search and self.schedule.deadline.fits(seconds + around + final)

    def reserve_for(self, plan_share: float, *, warm_start: bool = False) -> float:
        """Seconds a search job must leave the final stage: measured (no correction factor)
        once a member has measured a rung, else ``plan_share``; for a ``warm_start`` job, only
        the first seed's comparison, at 1 epoch while no searched member has finished a rung."""
        if self.measured_reserve is not None:
            m = self.measured_reserve
            if warm_start and m.without_member is not None:
                return m.without_member  # the comparison's member is still to come
            return m.comparison if warm_start else m.whole
        if not warm_start:
            return plan_share
        final = self.final
        if final is None:
            return 0.0
        n_baselines = len(self.space.settings.baselines)
        jobs = ((self.schedule.finalists or final.top_k) + n_baselines) * (
            self.schedule.final_seeds or final.seeds
        )
        return plan_share * (1 + n_baselines) / max(1, jobs)

    def record_overhead(self, kind: str, started: float, busy: float) -> float:
        """A job that started at ``started`` has ended, ``busy`` of it training and building
        its cache: note the rest, for a final job from the previous job's end (the study's
        ask, tell and gc between them are paid too), for a search trial from its own start
        (between trials the search also redraws its front, which the final stage does not).
        Returns the job's whole cycle."""
        now = time.perf_counter()
        since = (
            self.last_job_end if self.last_job_end is not None and kind == Stage.FINAL else started
        )
        cycle = now - min(since, started)
        self.overheads.setdefault(kind, []).append(max(0.0, cycle - busy))
        self.last_job_end = now
        return cycle


def rungs_of(space: SearchSpace, candidate: Candidate, *, halving: bool = True) -> list[Rung]:
    """The rungs a trial of ``space`` climbs (only the top one without ``halving``)."""
    rungs = list(space.settings.fidelity.rungs) or [
        Rung(candidate.train.epochs, candidate.train.max_train_samples)
    ]
    return rungs if halving else rungs[-1:]


def training_estimate(
    model: CostModel,
    splits: Splits,
    candidate: Candidate,
    flops: float,
    *,
    kind: str,
    n_stages: int = 1,
) -> float:
    """Predicted seconds to train ``candidate`` over every one of its ``n_stages`` training
    stages, from the throughput ``model`` measured here."""
    return model.training_seconds(
        flops=float(flops),
        epochs=sum(stage_epochs(candidate.train, n_stages)),
        rows=train_rows(candidate, splits),
        val_rows=len(splits.val),
        kind=kind,
    )


@dataclass(frozen=True)
class SharedPlan:
    """A parent's plan in a form that crosses a process boundary: deadlines as wall-clock
    times, and the cost model it measured (a worker neither re-plans nor re-measures)."""

    deadline_wall: float | None
    search_wall: float | None
    final_reserve: float
    cost_ref: dict[float, float]
    finalists: int | None
    seeds: int | None
    final_epochs: int | None
    teacher_epochs: int
    device: str  # where the cost model was measured
    end_slack: float = 0.0
    overrun: float = 0.0

    @classmethod
    def of(cls, ctx: SearchContext) -> SharedPlan:
        def wall(d: Deadline) -> float | None:
            return None if d.at is None else time.time() + d.remaining()

        plan = ctx.schedule
        return cls(
            wall(plan.deadline),
            wall(plan.search_deadline),
            plan.final_reserve,
            dict(ctx.cost_model.ref),
            plan.finalists,
            plan.final_seeds,
            plan.final_epochs,
            ctx.teacher.config.train.epochs,
            ctx.runtime.where,
            plan.end_slack,
            plan.overrun,
        )

    def schedule(self) -> Schedule:
        """The schedule in this process's clock."""

        def local(at: float | None) -> Deadline:
            return Deadline(None if at is None else at - time.time())

        return Schedule(
            deadline=local(self.deadline_wall),
            search_deadline=local(self.search_wall),
            final_reserve=self.final_reserve,
            finalists=self.finalists,
            final_seeds=self.seeds,
            final_epochs=self.final_epochs,
            end_slack=self.end_slack,
            overrun=self.overrun,
        )

    def cost_model(self) -> CostModel:
        return CostModel(dict(self.cost_ref))
