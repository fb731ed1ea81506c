"""``autosplit sync``: log to MLflow the trials a search could not log (its tracking store was
down, or its process died before a trial's run ended), from the Optuna study, which is the
source of truth. Matching is on the trial-number tag, so running it twice logs nothing twice.

What cannot be recovered: per-epoch curves (the study keeps each rung's result, not every
epoch). A synced run carries the tag ``SYNCED_TAG`` (``autosplit.synced``).
"""

from __future__ import annotations

import bisect
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autosplit.search import study as studies
from autosplit.search.attrs import (
    PRECISION_PARAM,
    SYNCED_TAG,
    State,
    StudyAttrs,
    TrialAttrs,
    TrialMetrics,
)
from autosplit.search.front import final_members, rung_records, search_records
from autosplit.search.report import SearchReport, search_note

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def run_state(trial: FrozenTrial) -> str:
    """The tracker's end state for a finished trial, as the driver would have given it."""
    state = TrialAttrs.read(trial).state
    if trial.state == TrialState.FAIL:
        return State.FAILED
    if state in (State.COMPLETE, State.INFEASIBLE):
        return state
    return State.COMPLETE if trial.state == TrialState.COMPLETE and state is None else State.PRUNED


def trial_metrics(trial: FrozenTrial) -> dict[str, float]:
    attrs = TrialAttrs.read(trial)
    rungs = attrs.rungs or []
    return TrialMetrics(
        val_acc=attrs.val_acc,
        flops=attrs.flops,
        expected_flops=attrs.expected_flops,
        params=attrs.params,
        train_seconds=attrs.train_seconds,
        train_images=attrs.train_images,
        train_flops=attrs.train_flops,
        train_cost=attrs.train_cost,
        rung=len(rungs) - 1 if rungs else None,
        trial_number=trial.number,
    ).logged()


def trial_tags(trial: FrozenTrial) -> dict[str, str]:
    return {**TrialAttrs.read(trial).run_tags(), SYNCED_TAG: "true"}


def should_have_run(trial: FrozenTrial) -> bool:
    """Finished, and far enough that the driver starts a run for it (it has a label; a
    duplicate final job stops before that)."""
    return (
        trial.state in FINISHED
        and TrialAttrs.read(trial).label is not None
        and TrialAttrs.read(trial).state != State.DUPLICATE
    )


def sync_study(study: optuna.Study, tracker: Any) -> tuple[int, int]:
    """Log every finished trial with no finished run yet; refresh the latest parent's front
    when anything was logged. Returns (logged, already there)."""
    name = study.study_name
    tracker.close_dead_runs(name)
    runs, parents = tracker.study_runs(name)
    todo = [
        t
        for t in study.get_trials(deepcopy=False)
        if should_have_run(t) and not runs.get(t.number, ("", False))[1]
    ]
    already = sum(should_have_run(t) for t in study.get_trials(deepcopy=False)) - len(todo)
    started = ""
    if todo and not parents:  # the store never saw a search of this study
        settings: dict[str, str | int | float] = {"synced": "true"}
        note = search_note(name, settings, None, [])
        started = tracker.start_search(study_name=name, settings=settings, note=note)
        runs, parents = tracker.study_runs(name)
    starts = [p.info.start_time for p in parents]
    run_ids = {number: run_id for number, (run_id, _) in runs.items()}
    attached = ""
    for trial in todo:
        parent = _parent_for(trial, parents, starts)
        if parent != attached:
            tracker.attach(study_name=name, parent_run_id=parent, revive=True)
            attached = parent
        run_ids[trial.number] = tracker.log_trial(
            trial_number=trial.number,
            params=_params(trial),
            tags=trial_tags(trial),
            state=run_state(trial),
            metrics=trial_metrics(trial),
            run_id=runs.get(trial.number, ("", False))[0],
        )
    if todo:
        _refresh_front(study, tracker, parents[-1].info.run_id, run_ids)
    if started:
        tracker.attach(study_name=name, parent_run_id=started)
        tracker.end_search("FINISHED")
    return len(todo), already


def _parent_for(trial: FrozenTrial, parents: list[Any], starts: list[int]) -> str:
    """The latest parent run started before the trial (the search it belonged to), else the
    latest parent."""
    when = trial.datetime_start.timestamp() * 1000 if trial.datetime_start else float("inf")
    return parents[bisect.bisect_right(starts, when) - 1].info.run_id


def _refresh_front(study: optuna.Study, tracker: Any, parent: str, run_ids: dict[int, str]) -> None:
    import dataclasses

    from autosplit.search.final_stage import proxy_fidelity

    info = studies.study_info(study)
    budget = int(info.budget_flops)
    records = [
        dataclasses.replace(r, run_id=run_ids.get(r.number, r.run_id))
        for r in studies.records(study)
    ]
    tracker.attach(study_name=study.study_name, parent_run_id=parent, revive=True)
    report = SearchReport(tracker, study.study_name, budget, info.cost)
    report.front(search_records(records))
    members = final_members(records, StudyAttrs.read(study).final_members)
    if members:
        top = max((len(r.rung_accs) for r in records), default=0)
        report.final_stage(
            members,
            {k: rung_records(records, k) for k in range(top)},
            proxy_fidelity(study),
        )


def _params(trial: FrozenTrial) -> dict[str, object]:
    """The run's params as the search logs them: the candidate, and the precision it trained in."""
    attrs = TrialAttrs.read(trial)
    params: dict[str, object] = dict(attrs.candidate or trial.params)
    if attrs.precision is not None:
        params[PRECISION_PARAM] = attrs.precision
    return params
