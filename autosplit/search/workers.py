"""Workers: the loop that hands Optuna the objective (``run_worker``), for one phase of the
search (``Stage.SEARCH``: new trials; ``Stage.FINAL``: the waiting final-stage jobs), in this process or in
``workers`` spawned processes sharing the study (``run_processes``). Also the filter that keeps
an interrupted trial to one line, and the callbacks that stop a phase and redraw the front.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import optuna
import torch

from autosplit import interrupts
from autosplit.errors import UserError
from autosplit.search import study as studies
from autosplit.search.attrs import Stage, State, StudyAttrs, TrialAttrs, TrialMetrics
from autosplit.search.context import SearchContext, SharedPlan
from autosplit.search.final_stage import final_job, final_reserve_measured, waiting_final
from autosplit.search.front import pareto_front, search_records
from autosplit.search.report import SearchReport
from autosplit.search.rungs import search_trial
from autosplit.search.setup import SearchOptions, prepare
from autosplit.search.trial import TrialOutOfMemory
from autosplit.tracking import Tracker

log = logging.getLogger(__name__)


def objective(
    ctx: SearchContext, trial: optuna.Trial, phase: Stage = Stage.SEARCH
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
            state=State.INTERRUPTED,
            error=(repr(exc) if isinstance(exc, KeyboardInterrupt) else str(exc))[:500],
        ).write(trial)
        run_id = TrialAttrs.read(trial).run_id
        if run_id:
            ctx.tracker.end_trial(
                run_id, state=State.KILLED, metrics=TrialMetrics(trial_number=trial.number).logged()
            )
    except Exception as inner:  # noqa: BLE001 - a full disk may refuse these writes too; the
        # next start still finds the trial FAIL without a verdict and re-runs it.
        log.debug("could not record the interruption of trial %d: %s", trial.number, inner)


def _objective(ctx: SearchContext, trial: optuna.Trial, phase: Stage) -> tuple[float, float]:
    interrupts.check()  # a stop dropped since the last training step (gc after a trial)
    if TrialAttrs.read(trial).stage == Stage.FINAL:
        return final_job(ctx, trial)
    if phase == Stage.FINAL:
        # Optuna hands out the oldest waiting trial. That may be a search trial enqueued before
        # the final jobs (a baseline or portfolio recipe the search phase had no time for): it
        # goes back to the queue, behind the final jobs, for the study's next search, and this
        # phase goes on. A fresh draw means another worker took the last final job between our
        # check and the pop: the final phase runs no search trial, so it ends here.
        given_back = studies.give_back(trial)
        TrialAttrs(stage=Stage.SEARCH, state=State.SKIPPED).write(trial)
        if not given_back or not waiting_final(trial.study):
            trial.study.stop()
        if given_back:
            log.info("trial %d waits for a later search: the final stage runs now", trial.number)
            raise optuna.TrialPruned("a search trial given back to the queue")
        raise optuna.TrialPruned("no final-stage job left for this worker")
    return search_trial(ctx, trial)


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


def run_phase(options: SearchOptions, ctx: SearchContext, storage_url: str, phase: Stage) -> None:
    """One phase of the search on ``ctx``'s study: in ``options.workers`` processes, or here."""
    if options.workers > 1:
        run_processes(options, ctx, storage_url, phase)
    else:
        run_worker(options, ctx, storage_url, worker_index=0, phase=phase)


def run_worker(
    options: SearchOptions,
    ctx: SearchContext,
    storage_url: str,
    *,
    worker_index: int,
    phase: Stage = Stage.SEARCH,
) -> None:
    """One worker's loop on ``ctx``'s study. ``search``: trials until the study holds
    ``options.trials`` or the search phase's time is up; ``final``: the waiting final-stage
    jobs. Trials log through ``ctx.tracker``, under the search's parent run."""
    storage = studies.open_storage(storage_url)
    # One seed for every worker and invocation: the sampler derives each trial's own seed
    # from it and the trial's number, unique in the study (``studies.TrialSeededSampler``).
    sampler = studies.make_sampler(options.sampler, options.seed)
    study = studies.open_study(ctx.study_name, storage, sampler=sampler, create=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet = QuietInterrupts()
    optimize_log = logging.getLogger("optuna.study._optimize")
    optimize_log.addFilter(quiet)
    n: int | None
    if phase == Stage.FINAL:
        # No count: search trials still queued ahead of the final jobs are popped and given
        # back (``_objective``); the phase ends when no final job waits.
        n = None if waiting_final(study) else 0
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
        if not waiting_final(study):
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
                "gpu_seconds": ctx.train_seconds if ctx.runtime.is_cuda else 0.0,
                "stopped": sum(r.state == State.STOPPED for r in stats),
                "infeasible": sum(r.state == State.INFEASIBLE for r in stats),
                "cache_hits": ctx.teacher_cache.hits,
                "cache_builds": ctx.teacher_cache.builds,
                # What the search phase leaves the final stage, as measured so far.
                **(
                    {
                        "final_reserve_s": ctx.measured_reserve.whole,
                        "final_comparison_s": ctx.measured_reserve.comparison,
                        # The final epochs that reserve is for (fewer than planned once the
                        # comparison no longer fits at those).
                        "final_epochs": ctx.measured_reserve.epochs,
                    }
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
            len(
                [
                    r
                    for r in studies.records(study)
                    if r.stage == Stage.SEARCH and r.state != State.RUNNING
                ]
            )
        )

    def __call__(self, study: optuna.Study, _trial: Any) -> None:
        recs = [r for r in studies.records(study) if r.stage == Stage.SEARCH]
        budget = StudyAttrs.read(study).budget_flops
        front = pareto_front(search_records(recs), budget)
        best = max((r.val_acc for r in front), default=float("nan"))
        self.bar.n = len(
            [r for r in recs if r.state not in (State.RUNNING, State.WAITING, State.SKIPPED)]
        )
        self.bar.set_postfix(
            top_rung=sum(r.state == State.COMPLETE for r in recs),
            stopped=sum(r.state == State.STOPPED for r in recs),
            infeasible=sum(r.state == State.INFEASIBLE for r in recs),
            front=len(front),
            best=f"{best:.2f}%",
        )
        self.bar.refresh()


# --- the final stage --------------------------------------------------------------------------


def run_processes(
    options: SearchOptions, ctx: SearchContext, storage_url: str, phase: Stage
) -> None:
    """N local worker processes on one journal/RDB storage (spawned: no shared torch state).

    Each worker gets the deadlines as wall-clock times (monotonic clocks are per process) and
    the cost model measured here, so workers neither re-plan nor re-measure. The tracker
    crosses pickled and reopens itself in each worker under the same parent run.
    """
    context = mp.get_context("spawn")
    worker_options = dataclasses.replace(options, workers=1, clock=time.monotonic, started=None)
    threads = max(1, (os.cpu_count() or 1) // options.workers)
    shared = SharedPlan.of(ctx)
    devices = options.devices or (options.device,)
    procs = [
        context.Process(
            target=_worker_main,
            name=f"autosplit-worker-{i}",
            args=(
                dataclasses.replace(worker_options, device=devices[i % len(devices)]),
                ctx.study_name,
                storage_url,
                ctx.tracker,
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


def _worker_main(
    options: SearchOptions,
    study_name: str,
    storage_url: str,
    tracker: Tracker,
    index: int,
    threads: int,
    shared: SharedPlan,
    phase: Stage,
    log_level: int = logging.WARNING,
) -> None:
    # A spawned process starts with logging unconfigured: it logs as its parent does (-v).
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s worker {index} %(name)s: %(message)s"
    )

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards a Ctrl-C as SIGTERM
    interrupts.install(signal.SIGTERM)
    torch.set_num_threads(threads)
    try:
        ctx = prepare(
            options,
            study_name=study_name,
            tracker=tracker,
            log_teacher=lambda _msg: None,
            shared=shared,
        )
        run_worker(options, ctx, storage_url, worker_index=index, phase=phase)
    except KeyboardInterrupt:
        sys.exit(130)
    except (UserError, OSError) as exc:
        print(f"autosplit: worker {index}: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, UserError) else 1)


WORKER_STOP_SECONDS = 60  # a worker answers SIGTERM by closing its trial: seconds, not minutes
