"""Setting a search up, before any trial: the data, the budget in FLOPs (refused when no
student of the space fits it), the throughput measured here, the time plan, and the teacher
(trained once and cached, loaded, or shipped). ``prepare`` returns the ``SearchContext`` every
job of this process reads, complete.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autosplit.cache import train_rows, usable_cache_views
from autosplit.data import load_splits
from autosplit.device import resolve_runtime
from autosplit.distill.run import build_and_count
from autosplit.errors import UserError
from autosplit.flops import SMALLEST_WIDTH, count_flops, format_flops
from autosplit.search.budget import Budget, within_budget
from autosplit.search.context import (
    Schedule,
    SearchContext,
    SharedPlan,
    rungs_of,
    training_estimate,
)
from autosplit.search.plan import (
    EVAL_WEIGHT,
    OVERRUN,
    CostModel,
    Deadline,
    PlanInput,
    TimeLimitTooShort,
    end_reserve,
    make_plan,
    usable_seconds,
)
from autosplit.search.shared_teacher import is_shared_storage
from autosplit.search.space import Rung, SearchSpace
from autosplit.search.throughput import training_images_per_second
from autosplit.search.trial import at_fidelity
from autosplit.teacher import (
    build_teacher_model,
    get_teacher,
    is_cached,
    load_teacher,
    teacher_key,
)
from autosplit.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from autosplit.data import Splits
    from autosplit.device import Runtime
    from autosplit.distill.candidate import Candidate
    from autosplit.search.shared_teacher import StudyTeacher
    from autosplit.teacher import Teacher

log = logging.getLogger(__name__)


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
    study_name: str = "",
    tracker: Tracker | None = None,
    log_teacher: Callable[[str], None] = print,
    shared: SharedPlan | None = None,
    study_teacher: StudyTeacher | None = None,
) -> SearchContext:
    """Data, the time plan (from throughput measured here), the teacher (trained once, cached)
    and the budget in FLOPs. A worker process gets its parent's plan as ``shared``; the
    process that starts a search gets ``study_teacher``, the one teacher of the study's hosts
    (checked before any work, then fetched, or trained by the host that claims it).
    ``tracker`` logs the jobs of ``study_name`` (default: nothing logged)."""
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
    problem = Problem(space, splits, runtime, options.budget.resolve(teacher_flops), teacher_flops)
    schedule = Schedule(deadline=deadline, search_deadline=Deadline(None, clock=options.clock))
    cost_model = CostModel({1.0: 1e9})  # without a limit nothing is planned or estimated
    if shared is not None:
        schedule, cost_model = shared.schedule(), shared.cost_model()
        if shared.device != runtime.where and options.time_limit is not None:
            # A worker on another device (another GPU model, or a GPU busy with other work)
            # estimates its jobs from its own throughput; the plan's deadlines stay shared.
            cost_model = measure_cost_model(problem)
        teacher_cfg = dataclasses.replace(
            teacher_cfg, train=dataclasses.replace(teacher_cfg.train, epochs=shared.teacher_epochs)
        )
    else:
        check_budget(problem, options.budget, teacher_model, say=log_teacher)
        if options.time_limit is not None:
            cost_model = measure_cost_model(problem)
            cached = is_cached(
                teacher_cfg, splits, options.runs_dir, retrain=options.retrain_teacher
            )
            chosen = _plan(problem, cost_model, options, cached=cached)
            log_teacher(f"{chosen.describe()}; trials in {runtime.describe()}")
            for warning in chosen.warnings:
                log_teacher(f"warning: {warning}")
            if chosen.teacher_epochs < teacher_cfg.train.epochs:
                teacher_cfg = dataclasses.replace(
                    teacher_cfg,
                    train=dataclasses.replace(teacher_cfg.train, epochs=chosen.teacher_epochs),
                )
            schedule = _schedule(deadline, options, chosen)
    teacher = _obtain_teacher(options, teacher_cfg, splits, runtime, study_teacher, own_key)
    state = "cached" if teacher.from_cache else f"trained in {teacher.train_seconds:.0f}s"
    log_teacher(
        f"teacher {space.teacher.model} ({state}): test {teacher.test_acc:.2f}%, "
        f"{teacher_flops:,} FLOPs; budget {options.budget.text} = {problem.max_flops:,} FLOPs"
        + ("" if options.time_limit is not None else f"; trials in {runtime.describe()}")
    )
    return SearchContext(
        space=space,
        splits=splits,
        teacher=teacher,
        runtime=runtime,
        max_flops=problem.max_flops,
        teacher_flops=teacher_flops,
        runs_dir=Path(options.runs_dir),
        study_name=study_name,
        tracker=NullTracker() if tracker is None else tracker,
        schedule=schedule,
        progress=options.progress,
        halving=options.halving,
        share_weights=options.storage is not None and is_shared_storage(options.storage),
        cost_model=cost_model,
    )


@dataclass(frozen=True)
class Problem:
    """What is searched, on what data and device, under what budget: all the planning before
    the teacher exists needs."""

    space: SearchSpace
    splits: Splits
    runtime: Runtime
    max_flops: int
    teacher_flops: int


def _schedule(deadline: Deadline, options: SearchOptions, chosen: Any) -> Schedule:
    """The plan ``chosen`` in clock times. Work starts only while it can end inside the limit
    less a small reserve for the end (fronts, MLflow); the search phase leaves the final stage
    its planned share."""
    work_ends = deadline.started + usable_seconds(float(options.time_limit))
    return Schedule(
        deadline=Deadline.until(work_ends, clock=options.clock),
        search_deadline=Deadline.until(work_ends - chosen.final_seconds, clock=options.clock),
        final_reserve=chosen.final_seconds,
        finalists=chosen.finalists,
        final_seeds=chosen.seeds,
        final_epochs=chosen.final_epochs
        if options.space.settings.fidelity.final is not None
        else None,
        end_slack=end_reserve(float(options.time_limit)),
        overrun=OVERRUN * float(options.time_limit),
    )


def _obtain_teacher(
    options: SearchOptions,
    teacher_cfg: Any,
    splits: Splits,
    runtime: Runtime,
    study_teacher: StudyTeacher | None,
    own_key: str,
) -> Teacher:
    """The teacher: this host's (cached, shipped, or trained now), or the study's one."""

    def train() -> Teacher:
        return get_teacher(
            teacher_cfg,
            options.space.data,
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

    if study_teacher is None:
        return train()
    return study_teacher.obtain(train, load, data_fingerprint=splits.fingerprint, own_key=own_key)


def check_budget(
    problem: Problem,
    budget: Budget,
    teacher_model: torch.nn.Module,
    *,
    say: Callable[[str], None],
) -> None:
    """Refuse a budget below the narrowest student the space builds (every trial would be
    infeasible), before the teacher trains; warn about one above the teacher's FLOPs.
    ``teacher_model``: the teacher's architecture (counting needs no trained weights)."""
    base = problem.space.base_candidate(problem.max_flops)

    def below(smallest: int) -> str:
        return (
            f"--budget {budget.text} = {format_flops(problem.max_flops)} FLOPs: below the smallest "
            f"student this space builds ({format_flops(smallest)} FLOPs, "
            f"{base.student.family} at width "
            f"{SMALLEST_WIDTH}); raise --budget to at least {smallest / problem.teacher_flops:.3g}x "
            f"or {format_flops(smallest)}"
        )

    narrowest_student = base.narrowest().with_values({"split.budget_share": 1.0})
    within_budget(
        narrowest_student, teacher_model, problem.splits, max_flops=problem.max_flops, over=below
    )
    if problem.max_flops > problem.teacher_flops:
        say(
            f"warning: --budget {budget.text} = {format_flops(problem.max_flops)} FLOPs is above the "
            f"teacher's {format_flops(problem.teacher_flops)}; students may be as large as the "
            "teacher"
        )


def measure_cost_model(problem: Problem) -> CostModel:
    """Training images/s of the teacher's architecture and of a single student at the budget."""
    info = problem.splits.info
    batch = problem.space.base_candidate(problem.max_flops).train.batch_size
    teacher_ips = training_images_per_second(
        build_teacher_model(problem.space.teacher, problem.splits),
        info.input_shape,
        info.num_classes,
        problem.runtime,
        batch_size=problem.space.teacher.train.batch_size,
    )
    student, student_flops = _budget_student(problem)
    student_ips = training_images_per_second(
        student, info.input_shape, info.num_classes, problem.runtime, batch_size=batch
    )
    log.info(
        "throughput here (%s): teacher %.0f img/s at %d FLOPs, student %.0f img/s at %d FLOPs",
        problem.runtime.where,
        teacher_ips,
        problem.teacher_flops,
        student_ips,
        student_flops,
    )
    return CostModel({float(problem.teacher_flops): teacher_ips, float(student_flops): student_ips})


def _budget_student(problem: Problem) -> tuple[torch.nn.Module, int]:
    """A single student using the whole budget: the size the planner measures."""
    baselines = list(problem.space.settings.baselines.values())
    candidate = problem.space.base_candidate(problem.max_flops)
    if baselines:
        candidate = candidate.with_values(baselines[0])
    distiller, flops = within_budget(
        candidate,
        build_teacher_model(problem.space.teacher, problem.splits),
        problem.splits,
        max_flops=None,  # solved to fit it
        none_fits=lambda exc: (
            f"--budget {problem.max_flops:,} FLOPs: no student of this space fits it "
            f"({exc}); raise --budget"
        ),
    )
    return distiller.student, flops.worst_case


def _plan(problem: Problem, model: CostModel, options: SearchOptions, *, cached: bool) -> Any:
    """The time limit's split between teacher, search and final stage (``plan.make_plan``),
    from the throughput ``model`` measured here."""
    space, splits = problem.space, problem.splits
    teacher_cfg = space.teacher
    base = space.base_candidate(problem.max_flops)
    rung0 = at_fidelity(base, rungs_of(space, base, halving=options.halving)[0])
    final = space.settings.fidelity.final
    teacher_epoch = (
        model.training_seconds(
            flops=problem.teacher_flops,
            epochs=1,
            rows=len(splits.train),
            val_rows=len(splits.val),
            kind="teacher",
        )
        - model.fixed_seconds
    )
    # One teacher cache per set of teacher outputs the baselines read (FitNets' hint reads a
    # feature map besides the logits), over the rows of the cheapest rung and of the final
    # stage, unless an earlier run left it on disk: teacher forward passes, paid once each.
    teacher_model = build_teacher_model(teacher_cfg, splits)
    tap_sets = {
        frozenset(build_and_count(base.with_values(values), teacher_model, splits)[0].teacher_taps)
        for values in space.settings.baselines.values()
    } or {frozenset()}
    key = teacher_key(teacher_cfg, splits.fingerprint)
    forward = EVAL_WEIGHT / model.images_per_second(problem.teacher_flops)

    def caches(at: Candidate) -> tuple[float, int]:
        """Teacher seconds to build the caches ``at``'s rows need that are not on disk, and
        the views each holds."""
        views = space.settings.teacher_views
        seconds, built = 0.0, 0
        for taps in tap_sets:
            n, _path, on_disk = usable_cache_views(
                at, key, splits, options.runs_dir, views=views, taps=set(taps)
            )
            seconds += 0.0 if on_disk else train_rows(at, splits) * n * forward
            built = n
        return seconds, built

    final_job = final_cache = 0.0
    final_views = 0
    if final is not None and options.final_stage:
        at_final = at_fidelity(base, Rung(final.epochs, final.rows))
        final_job = training_estimate(model, splits, at_final, problem.max_flops, kind="final")
        final_cache, final_views = caches(at_final)
    try:
        return make_plan(
            PlanInput(
                time_limit=float(options.time_limit),
                teacher_cached=cached,
                teacher_epochs=space.teacher.train.epochs,
                teacher_epoch_seconds=teacher_epoch,
                final_seconds=final_job,
                final_fixed_seconds=final_cache,
                final_cache_views=final_views if space.data.augment else 0,
                final_members=final.top_k if final else 0,
                final_seeds=final.seeds if final else 0,
                final_epochs=final.epochs if final else 1,
                baselines=len(space.settings.baselines) if final else 0,
                portfolio=len(space.settings.portfolio),
                rung0_fixed_seconds=caches(rung0)[0],
                rung0_seconds=training_estimate(
                    model, splits, rung0, problem.max_flops, kind="trial"
                ),
            )
        )
    except TimeLimitTooShort as exc:
        raise UserError(str(exc)) from None
