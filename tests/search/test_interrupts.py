"""Ctrl-C and SIGTERM mid-trial, interrupted trials re-run with their parameters, per-trial
sampler seeds, and flags that mean what they say."""

from __future__ import annotations

import signal
import subprocess
import time

import optuna
import pytest
from optuna.trial import TrialState
from searchproc import SPACE, _mlflow_runs, _slow_top_rung_space, finish, worker
from searchproc import trials_now as _trials

from autosplit.cli import main
from autosplit.search import study as studies
from autosplit.search.attrs import Stage, State, TrialAttrs


def _wait_for_running(
    proc: subprocess.Popen, storage: str, name: str, count: int = 1
) -> list[optuna.trial.FrozenTrial]:
    """Poll until ``count`` trials run and have an MLflow run (their training has started)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        running = [
            t
            for t in _trials(storage, name)
            if t.state == TrialState.RUNNING and TrialAttrs.key("run_id") in t.user_attrs
        ]
        if len(running) >= count:
            return running
        time.sleep(0.05)
    raise AssertionError(
        f"no {count} running trial(s) before the search ended: {proc.communicate()[1][-2000:]}"
    )


def _stopped(proc: subprocess.Popen) -> tuple[int, list[str]]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, [line for line in err.splitlines() if line.strip()]


def test_sigterm_mid_baseline_stops_in_one_line_and_the_rerun_trains_it_again(
    digits_runs, tmp_path
):
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    args = (
        "--space",
        _slow_top_rung_space(tmp_path),
        "--study-name",
        "term",
        "--storage",
        storage,
        "--tracking-uri",
        tracking,
        "--trials",
        "3",
    )
    victim = worker(digits_runs, *args)
    running = _wait_for_running(victim, storage, "term")[0]
    assert running.user_attrs.get(TrialAttrs.key("baseline"))  # baselines run first
    victim.send_signal(signal.SIGTERM)
    code, lines = _stopped(victim)

    assert code == 130, lines
    stop = [line for line in lines if " INFO " not in line]  # start-up logs of a fresh store
    assert len(stop) == 1, lines  # no Optuna traceback before it
    lines = stop
    assert lines[0].startswith("autosplit: interrupted by SIGTERM")
    assert "to resume: autosplit search --space" in lines[0] and "--study-name term" in lines[0]
    interrupted = _trials(storage, "term")[running.number]
    assert interrupted.state == TrialState.FAIL
    assert interrupted.user_attrs[TrialAttrs.key("state")] == State.INTERRUPTED
    statuses = {r.info.run_id: r.info.status for r in _mlflow_runs(tracking, "term")}
    assert statuses[running.user_attrs[TrialAttrs.key("run_id")]] == "KILLED"
    assert "RUNNING" not in statuses.values()

    finish(worker(digits_runs, *args))  # the same command

    trials = _trials(storage, "term")
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    retry = [t for t in trials if t.user_attrs.get(TrialAttrs.key("retry_of")) == running.number]
    assert len(retry) == 1
    assert retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert (
        retry[0].user_attrs[TrialAttrs.key("baseline")]
        == running.user_attrs[TrialAttrs.key("baseline")]
    )
    assert retry[0].params == running.params
    search = [
        t
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.SEARCH
        and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    assert len(search) == 3
    assert "RUNNING" not in {r.info.status for r in _mlflow_runs(tracking, "term")}


def test_ctrl_c_stops_every_local_worker_and_leaves_nothing_running(digits_runs, tmp_path):
    storage = f"journal:{tmp_path}/journal.log"
    args = (
        "--space",
        _slow_top_rung_space(tmp_path),
        "--study-name",
        "int2",
        "--storage",
        storage,
        "--no-tracking",
        "--trials",
        "6",
        "--workers",
        "2",
    )
    victim = worker(digits_runs, *args)
    running = _wait_for_running(victim, storage, "int2", count=2)
    victim.send_signal(signal.SIGINT)  # the parent: it forwards the stop to its workers
    code, lines = _stopped(victim)

    assert code == 130, lines
    assert len(lines) == 1 and lines[0].startswith("autosplit: interrupted by SIGINT"), lines
    trials = _trials(storage, "int2")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for trial in running:
        assert trials[trial.number].state == TrialState.FAIL
        assert trials[trial.number].user_attrs[TrialAttrs.key("state")] == State.INTERRUPTED


def test_interrupted_and_dead_trials_are_requeued_once_and_failed_candidates_not(tmp_path):
    storage = studies.open_storage(f"journal:{tmp_path}/s.log")
    study = studies.open_study("s", storage, create=True)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    numbers = {}
    for verdict in (State.INTERRUPTED, State.FAILED, None):
        trial = study.ask(dist)
        TrialAttrs(state=verdict, baseline=f"b-{verdict}").write(trial)  # state None: unset
        study.tell(trial, state=TrialState.FAIL)
        numbers[verdict] = trial.number

    assert studies.requeue_interrupted(study) == [numbers[State.INTERRUPTED], numbers[None]]
    assert studies.requeue_interrupted(study) == []  # once
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs[TrialAttrs.key("retry_of")] for t in waiting] == [
        numbers[State.INTERRUPTED],
        numbers[None],
    ]
    assert waiting[0].user_attrs[TrialAttrs.key("baseline")] == f"b-{State.INTERRUPTED}"
    trials = {t.number: t for t in study.get_trials()}
    assert waiting[0].system_attrs["fixed_params"] == trials[numbers[State.INTERRUPTED]].params


def test_a_retry_chain_stops_after_max_retry(tmp_path):
    study = studies.open_study("s", studies.open_storage(f"journal:{tmp_path}/s.log"), create=True)
    for _ in range(studies.MAX_RETRY + 2):
        studies.requeue_interrupted(study)
        waiting = study.get_trials(states=(TrialState.WAITING,))
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        if not waiting:
            assert trial.user_attrs.get(TrialAttrs.key("retry_of")) is None
        study.tell(trial, state=TrialState.FAIL)  # dies again, with no verdict
    retries = [t for t in study.get_trials() if TrialAttrs.key("retry_of") in t.user_attrs]
    assert len(retries) == studies.MAX_RETRY


def _draws(
    sampler_of: list[optuna.samplers.BaseSampler], study_name: str, storage: str, n: int
) -> list[float]:
    """``n`` draws from studies that share one storage, the sampler of each taken in turn."""
    out = []
    loaded = [
        optuna.load_study(study_name=study_name, storage=storage, sampler=s) for s in sampler_of
    ]
    for i in range(n):
        study = loaded[i % len(loaded)]
        trial = study.ask()
        out.append(trial.suggest_float("x", 0.0, 1.0))
        study.tell(trial, [out[-1], 1.0])
    return out


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2"])
def test_two_invocations_with_one_seed_draw_different_candidates(tmp_path, name):
    storage = f"sqlite:///{tmp_path}/s.db"
    for study_name in ("shared", "fresh"):
        optuna.create_study(
            study_name=study_name, storage=storage, directions=["maximize", "minimize"]
        )
    # Two invocations of `autosplit search --seed 0` on one study, taking turns.
    shared = _draws(
        [studies.make_sampler(name, 0), studies.make_sampler(name, 0)], "shared", storage, 6
    )
    assert len(set(shared)) == 6  # seeded once per process, draws 0 and 1 were equal
    # One invocation on a fresh study repeats the same draws: the seed still reproduces.
    assert _draws([studies.make_sampler(name, 0)], "fresh", storage, 6) == shared


def test_a_baseline_trial_records_no_value_it_does_not_train_with(tmp_path):
    from autosplit.search.space import SearchSpace

    space = SearchSpace.from_yaml(SPACE)
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=studies.make_sampler("random", 0)
    )
    overrides = space.settings.baselines["best-published"]
    trial = study.ask()
    candidate = space.suggest(trial, 10**6, overrides=overrides)
    # Pinned values are not drawn, nor are parameters of the part the baseline renames (the
    # base candidate's temperature is what it trains with).
    assert not set(trial.params) & set(overrides)
    assert "logit_loss.temperature" not in trial.params
    assert candidate.logit_loss.name == "dkd" and candidate.structure.name == "single"
    flat = candidate.flat()
    assert (
        flat["logit_loss.temperature"]
        == space.base_candidate(10**6).flat()["logit_loss.temperature"]
    )
    for key, value in trial.params.items():  # every recorded value is trained with
        assert flat[key] == value


def test_trials_zero_runs_nothing_and_negative_is_refused(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["search", "--space", SPACE, "--runs-dir", str(runs), "--trials", "0"]) == 0
    assert "nothing to run" in capsys.readouterr().out
    assert not runs.exists()  # no teacher trained, no study made
    assert main(["search", "--space", SPACE, "--runs-dir", str(runs), "--trials", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["autosplit: --trials -1: must be >= 0 (the study's total number of trials)"]


def test_a_budget_below_the_smallest_student_is_refused_before_the_teacher_trains(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "search",
                "--space",
                SPACE,
                "--runs-dir",
                str(runs),
                "--budget",
                "100",
                "--no-tracking",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "below the smallest student this space builds" in err[0], err
    assert "raise --budget to at least" in err[0]
    assert not (runs / "teachers").exists()


def test_a_budget_above_the_teacher_is_warned_about_in_one_line(digits_runs, tmp_path, capsys):
    assert (
        main(
            [
                "search",
                "--space",
                SPACE,
                "--runs-dir",
                str(digits_runs),
                "--budget",
                "3x",
                "--storage",
                f"sqlite:///{tmp_path}/o.db",
                "--no-tracking",
                "--quiet",
                "--device",
                "cpu",
                "--trials",
                "1",
                "--no-halving",
            ]
        )
        == 0
    )
    warnings = [
        line for line in capsys.readouterr().out.splitlines() if "above the teacher" in line
    ]
    assert len(warnings) == 1 and warnings[0].startswith("warning: --budget 3x")


def test_a_stop_dropped_by_a_finaliser_is_raised_at_the_next_check(monkeypatch):
    import sys

    from autosplit import interrupts

    reported: list[type] = []  # what reaches the hook Python would print through
    monkeypatch.setattr(sys, "unraisablehook", lambda info: reported.append(info.exc_type))

    class Finalised:
        def __init__(self, error):
            self.error = error

        def __del__(self):  # Python drops an exception raised here
            if self.error is None:
                interrupts.handler(signal.SIGTERM, None)
            raise self.error

    previous = interrupts.install(signal.SIGTERM)
    try:
        obj = Finalised(ValueError("a real bug"))
        del obj  # another finaliser's error is still reported
        obj = Finalised(None)
        del obj  # the handler's KeyboardInterrupt is lost in __del__, silently ...
        assert reported == [ValueError]
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            interrupts.check()  # ... and raised here, where training checks every step
    finally:
        interrupts.restore(previous)
    interrupts.check()  # restored: no stop pending
