"""The search, top to bottom: prepare (data, budget, time plan, teacher), open the study, the
search phase, the final stage, the report. An Optuna study over candidates maximises validation
accuracy and minimises FLOPs under ``FLOPs <= budget`` (a constraint: an over-budget candidate
is recorded, never trained). All three phases share one time limit: the teacher (unless
cached or shipped), the search (every trial starts at the cheapest rung; successive halving
promotes the best 1/eta), and the final stage (the best member and the baselines at the final
fidelity over seeds, then other finalists). Final-stage jobs are Optuna trials too, so several
workers share them and a killed job is failed and re-run like any trial.

Where each step lives: ``setup`` (prepare), ``study`` (the study's bookkeeping), ``workers``
(the phases' loops), ``rungs`` (a search trial), ``final_stage``, ``trial`` (what every job
shares), ``report`` (the parent run's front).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import optuna

from autosplit.errors import redact_url
from autosplit.search import study as studies
from autosplit.search.attrs import PRECISION_PARAM, Stage, StudyAttrs
from autosplit.search.context import SearchContext
from autosplit.search.final_stage import (
    enqueue_final_stage,
    fit_final_epochs,
    proxy_fidelity,
    waiting_final,
)
from autosplit.search.front import final_members, rung_records, search_records
from autosplit.search.report import SearchReport, search_note
from autosplit.search.setup import SearchOptions, default_study_name, prepare
from autosplit.search.shared_teacher import StudyTeacher, is_shared_storage
from autosplit.search.workers import run_phase
from autosplit.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


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
    ctx = prepare(
        options,
        study_name=study_name,
        tracker=tracker,
        log_teacher=say,
        study_teacher=study_teacher,
    )
    study, created = opened[-1]
    todo = studies.open_for_search(study, ctx, options, created=created)
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
        study_name=study_name, settings=settings, note=search_note(study_name, settings, None, [])
    )
    # Now that the parent run exists: the teacher this host trained, for the study's others.
    study_teacher.publish(ctx.teacher, tracker.publish_file)
    status = "FINISHED"
    try:
        if todo:
            run_phase(options, ctx, storage_url, Stage.SEARCH)
        if options.final_stage and ctx.final is not None:
            shrunk = fit_final_epochs(study, ctx)
            if shrunk:
                say(f"warning: {shrunk}")
            enqueue_final_stage(study, ctx)
            ctx.last_job_end = None  # the final stage's first job counts from its own start
            if waiting_final(study):
                run_phase(options, ctx, storage_url, Stage.FINAL)
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
    if not tracker.enabled:  # records nothing (or its store failed): nothing to draw or end
        return
    try:
        try:
            records = studies.records(study)
            report = SearchReport(tracker, study.study_name, ctx.max_flops, ctx.front_cost)
            report.front(search_records(records))
            if ctx.final is not None:
                members = final_members(records, StudyAttrs.read(study).final_members)
                n_rungs = len(ctx.space.settings.fidelity.rungs)
                rungs = {k: rung_records(records, k) for k in range(n_rungs)}
                report.final_stage(members, rungs, proxy_fidelity(study))
        finally:
            tracker.end_search(status)
    except Exception as exc:
        if status == "FINISHED":
            raise
        log.warning("could not finish the MLflow parent run (%s: %s)", type(exc).__name__, exc)
