"""The search: an Optuna study over candidates, maximising validation accuracy and minimising
FLOPs under ``FLOPs <= budget`` (a constraint, so over-budget candidates are recorded, never
trained). Kept thin: the space draws candidates, ``distill.run`` trains them, the tracker logs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from autosplit.config import atomic_write_text
from autosplit.errors import UserError
from autosplit.search import study as studies
from autosplit.search.budget import Budget
from autosplit.search.early_stop import Finished, should_stop
from autosplit.search.space import SearchSpace
from autosplit.train import EpochStats, StopTraining

log = logging.getLogger(__name__)
A = "autosplit."
SMALLEST_WIDTH = 0.05  # the width solver's lower end


@dataclass
class SearchContext:
    """Everything a trial needs that is the same for every trial of a search."""

    space: SearchSpace
    splits: Any
    teacher: Any  # autosplit.teacher.Teacher
    runtime: Any
    max_flops: int
    teacher_flops: int
    runs_dir: Path
    study_name: str
    tracker: Any
    progress: bool = False
    early_stopping: bool = True
    caches: dict[tuple[str, ...], Any] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=lambda: {"cache_hits": 0, "cache_builds": 0})

    def teacher_source(self, taps: set[str], candidate: Any) -> Any:
        """The cached teacher outputs holding ``taps`` over the rows trials train on."""
        taps = taps | {"logits"}
        # What the outputs depend on besides the teacher and data (a space may search these).
        augment = candidate.data.augment
        key = (tuple(sorted(taps)), _train_rows(candidate, self.splits), augment,
               candidate.train.seed if augment else 0)
        if key in self.caches:
            self.cost["cache_hits"] += 1
        else:
            cache = teacher_cache_for(candidate, self.teacher, self.splits, self.runtime,
                                      self.runs_dir, views=self.space.settings.teacher_views,
                                      taps=taps)
            self.cost["cache_hits" if cache.hit else "cache_builds"] += 1
            self.caches[key] = cache
        return self.caches[key]


def _train_rows(candidate: Any, splits: Any) -> int:
    return min(candidate.train.max_train_samples or len(splits.train), len(splits.train))


def teacher_cache_for(candidate: Any, teacher: Any, splits: Any, runtime: Any, runs_dir: Path, *,
                      views: int = 1, taps: set[str] | None = None) -> Any:
    """Teacher outputs over the training rows a candidate uses (the search's and retrain's path).

    Feature taps are stored in fp16, logits in fp32; ``views`` augmented views when the data
    augments, so epoch ``e`` trains on view ``e % views``.
    """
    from autosplit.cache import teacher_outputs
    from autosplit.data import Split
    from autosplit.distill.run import build_and_count

    if taps is None:
        distiller, _ = build_and_count(candidate, teacher.model, splits)
        taps = set(distiller.teacher_taps)
    rows = _train_rows(candidate, splits)
    split = Split(splits.train.images[:rows], splits.train.labels[:rows])
    return teacher_outputs(teacher.model, split, splits.info, runtime,
                           taps=sorted(taps | {"logits"}), teacher_key=teacher.key,
                           data_fingerprint=splits.fingerprint, split_name=f"train[:{rows}]",
                           cache_dir=Path(runs_dir) / "cache", augment=candidate.data.augment,
                           n_views=views, seed=candidate.train.seed, fp16=True)


def label_of(candidate: Any) -> str:
    structure = candidate.structure
    text = structure.name
    if structure.name in ("res_chain", "branches"):
        text += f" K={structure.get('n_parts')}"
    text += f" + {candidate.logit_loss.name}"
    if candidate.feature_loss.name != "none":
        text += f" + {candidate.feature_loss.name}"
    if candidate.twi:
        text += " + twi"
    return text


def objective(ctx: SearchContext, trial: optuna.Trial) -> tuple[float, float]:
    """One trial: draw, count, (maybe) train, record. Returns (val_acc, FLOPs)."""
    from autosplit.distill.run import deployed_parameters, train_candidate

    started = time.perf_counter()
    trial.set_user_attr(studies.WORKER_ATTR, studies.worker_id())
    baseline = trial.user_attrs.get(A + "baseline")
    overrides = ctx.space.settings.baselines.get(baseline, {}) if baseline else {}
    candidate = ctx.space.suggest(trial, ctx.max_flops, overrides=overrides)
    distiller, flops = _build_or_smallest(candidate, ctx)
    student = distiller.student
    # Pin the solved widths: the recorded candidate rebuilds exactly this student, fast.
    candidate = candidate.with_values({"split.base_width": student.base_width,
                                       "split.part_width": student.part_width})
    over = (flops.worst_case - ctx.max_flops) / ctx.max_flops
    trial.set_constraint("flops_over_budget", over)
    trial.set_user_attr(A + "label", label_of(candidate))
    trial.set_user_attr(A + "flops", int(flops.worst_case))
    trial.set_user_attr(A + "params", deployed_parameters(student))
    run_id = ctx.tracker.start_trial(trial_number=trial.number, params=candidate.flat(),
                                     tags={"autosplit.label": label_of(candidate),
                                           "autosplit.baseline": baseline or ""})
    trial.set_user_attr(A + "run_id", run_id)
    overhead = time.perf_counter() - started
    if over > 0:
        trial.set_user_attr(A + "state", "infeasible")
        trial.set_user_attr(A + "candidate", candidate.to_dict())
        ctx.tracker.end_trial(run_id, state="infeasible", metrics={
            "flops/worst_case": flops.worst_case, "optuna/trial_number": trial.number})
        log.info("trial %d over budget: %d > %d FLOPs, not trained", trial.number,
                 flops.worst_case, ctx.max_flops)
        return 0.0, float(flops.worst_case)

    finished = _finished_curves(trial.study) if ctx.early_stopping else []
    rule = ctx.space.settings.early_stopping
    curve: list[float] = []

    def on_epoch_end(stats: EpochStats) -> None:
        curve.append(stats.val_acc)
        trial.set_user_attr(A + "val_curve", curve)
        ctx.tracker.log_epoch(run_id, stats.epoch, {
            "train/loss": stats.train_loss, "train/acc": stats.train_acc, "val/acc": stats.val_acc,
            "train/lr": stats.lr, "train/images_per_s": stats.images_per_second,
            **{f"train/{k}": v for k, v in stats.loss_terms.items()}})
        if ctx.early_stopping and should_stop(rule, epoch=stats.epoch, val_acc=stats.val_acc,
                                              flops=float(flops.worst_case), finished=finished,
                                              total_epochs=candidate.train.epochs):
            raise StopTraining

    source = ctx.teacher_source(set(distiller.teacher_taps), candidate)
    del distiller  # train_candidate builds its own, from the pinned candidate
    try:
        result = train_candidate(candidate, ctx.splits, ctx.teacher.model, ctx.runtime,
                                 teacher_source=source, progress=False, on_epoch_end=on_epoch_end,
                                 flops=flops)
    except StopTraining:
        trial.set_user_attr(A + "state", "pruned")
        ctx.tracker.end_trial(run_id, state="pruned", metrics={
            "flops/worst_case": flops.worst_case, "optuna/trial_number": trial.number,
            "time/wall_s": time.perf_counter() - started})
        raise optuna.TrialPruned(f"dominated after epoch {len(curve)}") from None
    except Exception as exc:
        trial.set_user_attr(A + "state", "failed")
        trial.set_user_attr(A + "error", str(exc)[:500])
        ctx.tracker.end_trial(run_id, state="failed", metrics={"optuna/trial_number": trial.number})
        raise

    record_started = time.perf_counter()
    if result.exit is not None:
        candidate = candidate.with_values({"structure.exit_threshold": result.exit.threshold})
    weights = _save_trial(ctx, trial.number, candidate, result)
    wall = time.perf_counter() - started
    train_seconds = sum(h.seconds for h in result.history)
    ctx.cost["train_seconds"] = ctx.cost.get("train_seconds", 0.0) + train_seconds
    for key, value in {"state": "complete", "candidate": candidate.to_dict(),
                       "val_acc": result.val_acc, "expected_flops": result.expected_flops,
                       "params": result.params, "weights": str(weights),
                       "train_seconds": train_seconds}.items():
        trial.set_user_attr(A + key, value)
    ctx.tracker.end_trial(run_id, state="complete", metrics={
        "val/acc": result.val_acc, "flops/worst_case": result.worst_case_flops,
        "flops/expected": result.expected_flops, "params": result.params,
        "time/wall_s": wall, "time/train_s": train_seconds, "optuna/trial_number": trial.number,
        "time/overhead_s": overhead + (time.perf_counter() - record_started)})
    cost = (result.expected_flops if ctx.space.settings.objective_flops == "expected"
            else result.worst_case_flops)
    return result.val_acc, float(cost)


def _build_or_smallest(candidate: Any, ctx: SearchContext) -> tuple[Any, Any]:
    """Build and count; when no width fits the share, count the narrowest build instead, so
    the trial is recorded as infeasible with its real cost rather than failing."""
    from autosplit.distill.run import build_and_count
    from autosplit.flops import BudgetTooSmall

    try:
        return build_and_count(candidate, ctx.teacher.model, ctx.splits)
    except BudgetTooSmall as exc:
        log.info("no width fits (%s); counting the narrowest build", exc)
        has_parts = candidate.structure.name in ("assistant", "res_chain")
        narrow = candidate.with_values({"split.base_width": SMALLEST_WIDTH,
                                        "split.part_width": SMALLEST_WIDTH if has_parts else None})
        return build_and_count(narrow, ctx.teacher.model, ctx.splits)


def _finished_curves(study: optuna.Study) -> list[Finished]:
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        curve = t.user_attrs.get(A + "val_curve")
        if curve and t.user_attrs.get(A + "state") == "complete":
            out.append(Finished(float(t.user_attrs[A + "flops"]), curve))
    return out


def _save_trial(ctx: SearchContext, number: int, candidate: Any, result: Any) -> Path:
    """The trained student's weights and its (pinned) candidate, for export."""
    from autosplit.checkpoint import save_checkpoint

    folder = ctx.runs_dir / "studies" / ctx.study_name / f"trial-{number:04d}"
    path = folder / "student.pt"
    save_checkpoint(path, kind="student", config=candidate.to_dict(),
                    state_dict={k: v.detach().cpu() for k, v in result.student.state_dict().items()},
                    extra={"val_acc": result.val_acc, "trial": number})
    atomic_write_text(folder / "candidate.yaml", candidate.to_yaml())
    return path


# --- the driver -------------------------------------------------------------------------------


@dataclass
class SearchOptions:
    space: SearchSpace
    budget: Budget
    trials: int
    timeout: float | None = None
    study_name: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 1
    device: str = "auto"
    runs_dir: Path = Path("runs")
    progress: bool = True
    early_stopping: bool = True
    tracking: bool = True


def default_study_name(space: SearchSpace, budget: Budget) -> str:
    return f"{space.name}-{budget.slug}"


def prepare(options: SearchOptions, *, log_teacher: Callable[[str], None] = print) -> SearchContext:
    """Data, teacher (trained once, cached) and the budget in FLOPs."""
    from autosplit.data import load_splits
    from autosplit.device import resolve_runtime
    from autosplit.flops import count_flops
    from autosplit.teacher import get_teacher

    runtime = resolve_runtime(options.device)
    space = options.space
    splits = load_splits(space.data)
    teacher = get_teacher(space.teacher, space.data, splits, runtime, runs_dir=options.runs_dir,
                          progress=options.progress)
    teacher_flops = count_flops(teacher.model, splits.info.input_shape)
    max_flops = options.budget.resolve(teacher_flops)
    state = "cached" if teacher.from_cache else f"trained in {teacher.train_seconds:.0f}s"
    log_teacher(f"teacher {space.teacher.model} ({state}): test {teacher.test_acc:.2f}%, "
                f"{teacher_flops:,} FLOPs; budget {options.budget.text} = {max_flops:,} FLOPs")
    from autosplit.tracking import NullTracker

    return SearchContext(space=space, splits=splits, teacher=teacher, runtime=runtime,
                         max_flops=max_flops, teacher_flops=teacher_flops,
                         runs_dir=Path(options.runs_dir), study_name="", tracker=NullTracker(),
                         progress=options.progress, early_stopping=options.early_stopping)


def describe_study(study: optuna.Study, ctx: SearchContext, options: SearchOptions) -> None:
    """Store what front/export need on the study, refusing to mix budgets or teachers."""
    wanted = {A + "budget_flops": ctx.max_flops, A + "teacher_key": ctx.teacher.key,
              A + "data_fingerprint": ctx.splits.fingerprint}
    for key, value in wanted.items():
        have = study.user_attrs.get(key)
        if have is not None and have != value:
            raise UserError(f"--study-name {study.study_name}: this study was run with "
                            f"{key.removeprefix(A)}={have}, not {value}; use another --study-name")
    info = {**wanted, A + "budget": options.budget.text, A + "teacher_flops": ctx.teacher_flops,
            A + "teacher_test_acc": ctx.teacher.test_acc, A + "teacher_val_acc": ctx.teacher.val_acc,
            A + "space": str(options.space.path.resolve()),
            A + "space_yaml": options.space.path.read_text(), A + "teacher_path": str(ctx.teacher.path)}
    for key, value in info.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def enqueue_baselines(study: optuna.Study, space: SearchSpace) -> None:
    """The baselines run first (once per study), so the front always shows what was beaten."""
    if study.user_attrs.get(A + "baselines_enqueued"):
        return
    names = {p.name: p for p in space.params}
    for name, overrides in space.settings.baselines.items():
        params = {k: v for k, v in overrides.items() if k in names and names[k].contains(v)}
        study.enqueue_trial(params, user_attrs={A + "baseline": name})
    study.set_user_attr(A + "baselines_enqueued", True)


def remaining_trials(study: optuna.Study, total: int) -> int:
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
    return max(0, total - len(done))


def run_worker(options: SearchOptions, ctx: SearchContext, study_name: str, storage_url: str,
               *, parent_run_id: str | None, worker_index: int) -> None:
    """One worker's loop: trials until the study holds ``options.trials`` or time runs out."""
    from optuna.study import MaxTrialsCallback

    storage = studies.open_storage(storage_url)
    seed = None if options.seed is None else options.seed + worker_index
    study = studies.open_study(study_name, storage, sampler=studies.make_sampler(options.sampler, seed),
                               create=False)
    ctx.study_name = study_name
    ctx.tracker = _tracker(options, study_name, parent_run_id)
    n = remaining_trials(study, options.trials)
    if n == 0:
        return
    callbacks = [MaxTrialsCallback(options.trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                 _front_callback(ctx)]
    if options.progress and worker_index == 0:
        callbacks.append(_ProgressCallback(options.trials, study))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A candidate whose training diverges is a failed trial, not a failed search.
    study.optimize(lambda trial: objective(ctx, trial), n_trials=n, timeout=options.timeout,
                   callbacks=callbacks, gc_after_trial=True, catch=(FloatingPointError,))


def _tracker(options: SearchOptions, study_name: str, parent_run_id: str | None) -> Any:
    from autosplit.tracking import MlflowTracker, NullTracker, default_tracking_uri

    if not options.tracking:
        return NullTracker()
    tracker = MlflowTracker(options.tracking_uri or default_tracking_uri(options.runs_dir))
    if parent_run_id is None:
        tracker.start_search(study_name=study_name, settings={"budget": options.budget.text})
    else:
        tracker.attach(study_name=study_name, parent_run_id=parent_run_id)
    return tracker


def _front_callback(ctx: SearchContext) -> Callable[[optuna.Study, Any], None]:
    def refresh(study: optuna.Study, _trial: Any) -> None:
        stats = studies.records(study)
        ctx.tracker.update_front(stats, ctx.max_flops)
        ctx.tracker.log_search_cost({
            "cpu_seconds": time.process_time(),
            # Wall time this worker held its GPU for training (0 on CPU-only runs).
            "gpu_seconds": ctx.cost.get("train_seconds", 0.0) if ctx.runtime.is_cuda else 0.0,
            "pruned": sum(r.state == "pruned" for r in stats),
            "infeasible": sum(r.state == "infeasible" for r in stats),
            "cache_hits": ctx.cost["cache_hits"], "cache_builds": ctx.cost["cache_builds"]})

    return refresh


class _ProgressCallback:
    """A live line: trials done / pruned / infeasible and the best feasible accuracy so far."""

    def __init__(self, total: int, study: optuna.Study) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="search", dynamic_ncols=True,
                        disable=os.environ.get("AUTOSPLIT_NO_PROGRESS") == "1")
        self.bar.update(len([r for r in studies.records(study) if r.state != "running"]))

    def __call__(self, study: optuna.Study, _trial: Any) -> None:
        from autosplit.search.front import pareto_front

        recs = studies.records(study)
        budget = study.user_attrs[A + "budget_flops"]
        front = pareto_front(recs, budget)
        best = max((r.val_acc for r in front), default=float("nan"))
        self.bar.n = len([r for r in recs if r.state not in ("running", "waiting")])
        self.bar.set_postfix(done=sum(r.state == "complete" for r in recs),
                             pruned=sum(r.state == "pruned" for r in recs),
                             infeasible=sum(r.state == "infeasible" for r in recs),
                             front=len(front), best=f"{best:.2f}%")
        self.bar.refresh()


def run_search(options: SearchOptions, *, say: Callable[[str], None] = print) -> tuple[optuna.Study, SearchContext]:
    """Prepare once, then run ``options.workers`` worker processes (or this one) on one study."""
    ctx = prepare(options, log_teacher=say)
    study_name = options.study_name or default_study_name(options.space, options.budget)
    storage_url = options.storage or studies.default_storage(options.runs_dir, options.workers)
    storage = studies.open_storage(storage_url)
    study, created = studies.create_or_load(study_name, storage)
    describe_study(study, ctx, options)
    if not isinstance(storage, optuna.storages.RDBStorage):
        studies.fail_dead_local_trials(study)  # RDB storages have Optuna's heartbeat for this
    if created:  # only the worker that made the study: never twice when started together
        enqueue_baselines(study, options.space)
    todo = remaining_trials(study, options.trials)
    say(f"study {study_name} on {studies._redact(storage_url)}: "
        f"{options.trials - todo} of {options.trials} trials already done")
    parent = None
    if options.tracking and todo:
        from autosplit.tracking import MlflowTracker, default_tracking_uri

        parent_tracker = MlflowTracker(options.tracking_uri or default_tracking_uri(options.runs_dir))
        parent = parent_tracker.start_search(study_name=study_name, settings={
            "budget": options.budget.text, "budget_flops": ctx.max_flops,
            "sampler": options.sampler, "seed": options.seed, "trials": options.trials,
            "workers": options.workers, "space": str(options.space.path)})
    status = "FINISHED"
    try:
        if todo and options.workers > 1:
            _run_processes(options, ctx, study_name, storage_url, parent)
        elif todo:
            run_worker(options, ctx, study_name, storage_url, parent_run_id=parent, worker_index=0)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            parent_tracker.update_front(studies.records(study), ctx.max_flops)
            parent_tracker.end_search(status)
    return study, ctx


def _run_processes(options: SearchOptions, ctx: SearchContext, study_name: str, storage_url: str,
                   parent: str | None) -> None:
    """N local worker processes on one journal/RDB storage (spawned: no shared torch state)."""
    import multiprocessing as mp

    context = mp.get_context("spawn")
    worker_options = dataclasses.replace(options, workers=1)
    threads = max(1, (os.cpu_count() or 1) // options.workers)
    procs = [context.Process(target=_worker_main, name=f"autosplit-worker-{i}",
                             args=(worker_options, study_name, storage_url, parent, i, threads))
             for i in range(options.workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    bad = [p.name for p in procs if p.exitcode != 0]
    if bad:
        raise UserError(f"worker(s) {', '.join(bad)} failed; see the log above. Re-run the same "
                        "command to finish the study")


def _worker_main(options: SearchOptions, study_name: str, storage_url: str, parent: str | None,
                 index: int, threads: int) -> None:
    torch.set_num_threads(threads)
    ctx = prepare(options, log_teacher=lambda _msg: None)
    run_worker(options, ctx, study_name, storage_url, parent_run_id=parent, worker_index=index)
