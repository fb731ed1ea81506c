"""Several `autosplit search` workers on one study: PostgreSQL, journal files, killed workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState
from searchproc import SPACE, _mlflow_runs, _slow_top_rung_space, finish, trials_now, worker  # noqa: F401 - shared helpers

from autosplit.search.attrs import (
    ROLE_TAG,
    WORKER_TAG,
    RunRole,
    Stage,
    State,
    StudyAttrs,
    TrialAttrs,
)


def test_two_workers_on_postgres_share_one_study(postgres_url, digits_runs, tmp_path):
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = (
        "--study-name",
        "pg-two",
        "--storage",
        postgres_url,
        "--tracking-uri",
        tracking,
        "--trials",
        "6",
    )
    procs = [worker(digits_runs, *args, "--seed", str(i)) for i in range(2)]
    for proc in procs:
        finish(proc)
    study = optuna.load_study(study_name="pg-two", storage=postgres_url)
    trials = study.get_trials()
    search = [t for t in trials if t.user_attrs.get(TrialAttrs.key("stage")) != Stage.FINAL]
    finished = [t for t in search if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 6 and len(finished) <= 7  # the last trial may overlap by one
    assert len({t.number for t in trials}) == len(trials)
    # The final stage: each (member, seed) trained exactly once, though both workers planned it.
    trained = [
        (t.user_attrs[TrialAttrs.key("member")], t.user_attrs[TrialAttrs.key("seed")])
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.FINAL
        and t.user_attrs.get(TrialAttrs.key("state")) == State.COMPLETE
    ]
    assert trained and len(trained) == len(set(trained))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    baselines = [t.user_attrs.get(TrialAttrs.key("baseline")) for t in search]
    assert sorted(b for b in baselines if b) == [
        "best-published",
        "fitnets",
        "kd-single",
    ]  # enqueued once
    workers = {t.user_attrs[TrialAttrs.key("worker")] for t in trials}
    assert len(workers) == 2  # both processes ran trials

    runs = _mlflow_runs(tracking, "pg-two")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2  # one per search invocation, both in the one experiment
    # A final job the other worker took first is pruned as a duplicate before it starts a run
    # (how often depends on timing); every other trial has its run among the children.
    ran = [t for t in trials if t.user_attrs.get(TrialAttrs.key("state")) != State.DUPLICATE]
    assert all(TrialAttrs.key("run_id") not in t.user_attrs for t in trials if t not in ran)
    assert {t.user_attrs[TrialAttrs.key("run_id")] for t in ran} <= {
        c.info.run_id for c in children
    }


def test_a_killed_workers_trial_is_failed_and_retried(postgres_url, digits_runs, tmp_path):
    env = {"AUTOSPLIT_HEARTBEAT_SECONDS": "1", "AUTOSPLIT_GRACE_SECONDS": "3"}
    args = ("--study-name", "pg-kill", "--storage", postgres_url, "--no-tracking", "--trials", "3")
    victim = worker(digits_runs, *args, env=env)
    deadline = time.time() + 120
    running = []
    while time.time() < deadline and not running:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="pg-kill", storage=postgres_url)
        except KeyError:
            continue
        # Kill only once the trial has drawn all its parameters (its label is set after the
        # space's suggest): a kill inside suggest leaves a partial draw that the retry completes
        # with values the killed trial never held.
        running = [
            t
            for t in study.get_trials(states=(TrialState.RUNNING,))
            if TrialAttrs.key("label") in t.user_attrs
        ]
    assert running, "the worker never started a trial"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = running[0].number
    # Wait until the storage itself takes the killed trial's heartbeat for stale (Optuna's own
    # test, on the database's clock: older than the 3 s grace period), not for a fixed time.
    storage = optuna.storages.RDBStorage(postgres_url, heartbeat_interval=1, grace_period=3)
    study_id = storage.get_study_id_from_name("pg-kill")
    killed_id = storage.get_trial_id_from_study_id_trial_number(study_id, killed)
    stale_by = time.monotonic() + 120
    while killed_id not in storage._get_stale_trial_ids(study_id):
        assert time.monotonic() < stale_by, "the killed trial's heartbeat never went stale"
        time.sleep(0.2)
    storage.engine.dispose()
    finish(worker(digits_runs, *args, env=env))
    trials = optuna.load_study(study_name="pg-kill", storage=postgres_url).get_trials()
    assert trials[killed].state == TrialState.FAIL
    # Same host: found dead by its pid at the next start; elsewhere Optuna's heartbeat would.
    retried = [
        t
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("retry_of")) == killed
        or t.system_attrs.get("failed_trial") == killed
        or t.system_attrs.get("stale_trial") == killed
    ]
    assert retried and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].params == trials[killed].params


def test_four_local_workers_on_a_journal_file_lose_and_repeat_nothing(digits_runs, tmp_path):
    proc = worker(
        digits_runs,
        "--study-name",
        "journal-four",
        "--workers",
        "4",
        "--trials",
        "8",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    )
    _out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert "locked" not in err and "Traceback" not in err
    journal = digits_runs / "optuna-journal.log"
    assert journal.is_file()
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(
        study_name="journal-four", storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    done = [
        t
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and t.user_attrs.get(TrialAttrs.key("stage")) != Stage.FINAL
    ]
    # Each worker checks the total before it asks for a trial: they may overshoot by one each.
    assert 8 <= len(done) <= 8 + 3
    assert len({t.user_attrs[TrialAttrs.key("worker")] for t in done}) >= 2
    # No candidate drawn twice (each trial has its own sampler seed), no final job trained twice.
    drawn = [
        tuple(sorted(t.params.items()))
        for t in done
        if not t.user_attrs.get(TrialAttrs.key("baseline"))
    ]
    assert len(set(drawn)) == len(drawn)
    assert len({t.user_attrs[TrialAttrs.key("sampler_seed")] for t in done}) == len(done)
    finals = [
        (t.user_attrs[TrialAttrs.key("member")], t.user_attrs[TrialAttrs.key("seed")])
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.FINAL
        and t.user_attrs.get(TrialAttrs.key("state")) == State.COMPLETE
    ]
    assert finals and len(set(finals)) == len(finals)
    # One parent run for the invocation; each worker process (handed the tracker) logged its
    # trials under it, and every run is closed.
    runs = _mlflow_runs(f"sqlite:///{tmp_path}/mlflow.db", "journal-four")
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == RunRole.SEARCH]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == RunRole.TRIAL]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    logged = {
        t.user_attrs[TrialAttrs.key("run_id")]
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("run_id"))
    }
    assert logged == {r.info.run_id for r in children}
    assert len({r.data.tags[WORKER_TAG] for r in children}) >= 2
    assert "RUNNING" not in {r.info.status for r in children}


def test_dead_local_workers_trials_are_failed_and_requeued(tmp_path):
    from autosplit.search.study import WORKER_ATTR, fail_dead_local_trials, open_storage, open_study

    storage = open_storage(f"journal:{tmp_path}/j.log")
    study = open_study("s", storage, create=True)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{dead.pid}")
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    alive.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
    assert fail_dead_local_trials(study) == 1
    states = {t.number: t.state for t in study.get_trials()}
    assert states[trial.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].system_attrs["fixed_params"] == {"x": trial.params["x"]}  # same draw again


# A search killed with SIGKILL in the middle of a rung, then run again with the same command:
# the killed trial is failed and re-run from the cheapest rung with its parameters, the study
# reaches its total, and the final stage runs; nothing is left RUNNING or WAITING.


def _running_at_top_rung(storage: str) -> list[optuna.trial.FrozenTrial]:
    trials = [t for t in trials_now(storage, "resume") if t.state == TrialState.RUNNING]
    # Rung 0 recorded and still running: the trial was promoted and trains rung 1 now (the
    # first trial always is: no finished trial dominates it).
    return [
        t
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.SEARCH
        and len(t.user_attrs.get(TrialAttrs.key("rungs")) or []) == 1
    ]


def test_a_search_killed_mid_rung_resumes_to_its_total(digits_runs, tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = (
        "--space",
        _slow_top_rung_space(tmp_path),
        "--study-name",
        "resume",
        "--storage",
        storage,
        "--no-tracking",
        "--trials",
        "4",
    )
    victim = worker(digits_runs, *args)
    deadline = time.monotonic() + 300
    running: list = []
    while not running and victim.poll() is None and time.monotonic() < deadline:
        running = _running_at_top_rung(storage)
        time.sleep(0.05)
    assert running, "the search never reached its top rung"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = running[0]

    finish(worker(digits_runs, *args))  # the same command, at once

    trials = optuna.load_study(study_name="resume", storage=storage).get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert trials[killed.number].state == TrialState.FAIL
    search = [
        t
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.SEARCH
        and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    assert len(search) == 4  # the total: the killed trial did not use up a slot
    retry = [t for t in trials if t.user_attrs.get(TrialAttrs.key("retry_of")) == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params
    assert retry[0].user_attrs[TrialAttrs.key("rungs")][0]["epochs"] == 1  # from the cheapest rung
    finals = [
        t
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.FINAL
        and t.user_attrs.get(TrialAttrs.key("state")) == State.COMPLETE
    ]
    members = optuna.load_study(study_name="resume", storage=storage).user_attrs[
        StudyAttrs.key("final_members")
    ]
    assert sorted(
        (t.user_attrs[TrialAttrs.key("member")], t.user_attrs[TrialAttrs.key("seed")])
        for t in finals
    ) == sorted((m, s) for m in members for s in range(2))
