"""MlflowTracker when things go wrong, on real stores: an unreachable store is found in seconds,
runs of a process killed with -9 are closed at the next start, a store that goes away
mid-search costs one warning, and a full disk is reported as a full disk."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from autosplit.errors import UserError
from autosplit.search.attrs import (
    ROLE_TAG,
    STATE_TAG,
    WORKER_TAG,
    RunRole,
    Stage,
    State,
    TrialAttrs,
)
from autosplit.search.front import TrialRecord
from autosplit.search.report import SearchReport
from autosplit.tracking import MlflowTracker, check_tracking
from autosplit.tracking_store import HTTP_DEFAULTS

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A live server's answer is not what these tests time: a loaded machine gets a minute.
LIVE_SECONDS = 60.0


class MlflowServer:
    """A real ``mlflow server`` on a free loopback port; ``stop`` kills it like a crash."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.uri = ""

    def start(self, deadline_s: float = 180.0) -> str:
        import urllib.request

        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'server.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        deadline = time.monotonic() + deadline_s
        # Poll until the tracking API itself answers (not only /health: its first request
        # opens the store, which can take seconds on a loaded machine), within a generous
        # deadline.
        search = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/experiments/search",
            data=b'{"max_results": 1}',
            headers={"Content-Type": "application/json"},
        )
        while True:
            try:
                with urllib.request.urlopen(search, timeout=10) as response:
                    if response.status == 200:
                        return self.uri
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn workers
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def bounded_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracker sets MLflow's HTTP retry variables when unset; restore them after."""
    for name in HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server(tmp_path: Path, bounded_http_env: None) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_closed_port_fails_in_seconds(bounded_http_env: None) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # bound then released: nothing listens
    started = time.monotonic()
    with pytest.raises(UserError, match="could not reach the server: connection refused") as info:
        check_tracking(uri)
    assert time.monotonic() - started < 20
    assert uri in str(info.value) and "\n" not in str(info.value)


def test_unusable_sqlite_path_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="a-file") as info:
        check_tracking(f"sqlite:///{blocker / 'mlflow.db'}")
    assert "\n" not in str(info.value)


_DIES = """
import os, sys, time
from autosplit.tracking import MlflowTracker
tracker = MlflowTracker(sys.argv[1])
tracker.start_search(study_name="study-dead", settings={})
tracker.start_trial(trial_number=0, params={"lr": 0.1}, tags={})
print("ready", flush=True)
time.sleep(600)
"""


def test_runs_of_a_killed_process_are_closed_at_the_next_start(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _DIES, store],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    finally:
        proc.kill()  # kill -9: no finally, no atexit in the victim
        proc.wait(timeout=30)
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("study-dead")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in runs) == ["RUNNING", "RUNNING"]
    assert {r.data.tags[WORKER_TAG].rpartition(":")[2] for r in runs} == {str(proc.pid)}

    alive = MlflowTracker(store)  # a live search of this host must not be touched
    mine = alive.start_search(study_name="study-dead", settings={})
    assert alive.close_dead_runs("study-dead") == 2
    statuses = {
        r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id])
    }
    assert statuses.pop(mine) == "RUNNING"
    assert set(statuses.values()) == {"KILLED"}
    assert alive.close_dead_runs("study-dead") == 0
    assert alive.close_dead_runs("no-such-study") == 0


def test_killed_state_and_orphans_closed_by_end_search(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(store)
    parent = tracker.start_search(study_name="study-int", settings={})
    interrupted = tracker.start_trial(trial_number=0, params={}, tags={})
    tracker.end_trial(interrupted, state=State.KILLED, metrics={})
    orphan = tracker.start_trial(trial_number=1, params={}, tags={})  # never ended
    tracker.end_search("KILLED")
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(interrupted).info.status == "KILLED"
    assert client.get_run(interrupted).data.tags[STATE_TAG] == State.KILLED
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(parent).info.status == "KILLED"


def test_store_gone_mid_search_warns_once_and_goes_on(server: MlflowServer) -> None:
    warnings: list[str] = []
    tracker = check_tracking(server.uri, timeout=LIVE_SECONDS, warn=warnings.append)
    parent = tracker.start_search(study_name="study-gone", settings={"budget": "0.5x"})
    run_id = tracker.start_trial(trial_number=0, params={"lr": 0.1}, tags={})
    tracker.log_epoch(run_id, 0, {"val/acc": 50.0})
    server.stop()
    started = time.monotonic()
    tracker.log_epoch(run_id, 1, {"val/acc": 60.0})
    tracker.end_trial(run_id, state=State.COMPLETE, metrics={"val/acc": 60.0})
    assert tracker.start_trial(trial_number=1, params={}, tags={}) == ""
    SearchReport(tracker, "study-gone", 2000).front(
        [TrialRecord(0, State.COMPLETE, 60.0, 1000, None, 10, "single + kd")]
    )
    tracker.log_search_cost({"cpu_seconds": 1.0})
    tracker.end_search()
    # Another tracker of the same search (a later phase's worker) stays silent and offline.
    worker = MlflowTracker.for_worker(
        server.uri, study_name="study-gone", parent_run_id=parent, warn=warnings.append
    )
    assert worker.off and worker.start_trial(trial_number=2, params={}, tags={}) == ""
    assert time.monotonic() - started < 60  # bounded retries, not MLflow's minutes
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"MLflow tracking at {server.uri} failed (")
    assert warnings[0].endswith(
        "the search goes on; run autosplit sync --study-name study-gone when the store is back"
    )
    assert "\n" not in warnings[0]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MB tmpfs, to be filled up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_not_a_store_failure(small_disk: Path) -> None:
    warnings: list[str] = []
    tracker = MlflowTracker(f"sqlite:///{small_disk / 'mlflow.db'}", warn=warnings.append)
    tracker.start_search(study_name="study-full", settings={})
    run_id = tracker.start_trial(trial_number=0, params={"lr": 0.1}, tags={})
    with open(small_disk / "filler", "wb") as filler:  # fill the disk to the last block
        try:
            while True:
                filler.write(b"\0" * (1 << 20))
                filler.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    record = TrialRecord(0, State.COMPLETE, 60.0, 1000, None, 10, "single + kd", run_id)
    with pytest.raises(OSError) as info:
        for step in range(200):  # artifacts first fail; the metrics' pages fill up next
            SearchReport(tracker, "study-full", 2000).front([record])
            tracker.log_epoch(run_id, step, {"val/acc": 60.0})
    assert info.value.errno == errno.ENOSPC
    assert not isinstance(info.value, UserError) and warnings == []


# --- whole searches on digits (real training, Optuna on SQLite) -------------------------------

SPACE = ROOT / "search_spaces" / "digits_tiny.yaml"


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs dir whose digits teacher is trained once for this module."""
    from autosplit.cli import main

    runs = tmp_path_factory.mktemp("runs")
    assert (
        main(
            [
                "teacher",
                "--space",
                str(SPACE),
                "--runs-dir",
                str(runs),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    return runs


def search_options(tmp: Path, runs: Path, **kw: object):
    import dataclasses

    from autosplit.search.budget import parse_budget
    from autosplit.search.setup import SearchOptions
    from autosplit.search.space import SearchSpace

    base = SearchOptions(
        space=SearchSpace.from_yaml(SPACE),
        budget=parse_budget("0.5x"),
        trials=3,
        study_name="digits-faults",
        storage=f"sqlite:///{tmp}/optuna.db",
        sampler="tpe",
        seed=0,
        device="cpu",
        runs_dir=runs,
        progress=False,
    )
    return dataclasses.replace(base, **kw)


def experiment_runs(uri: str, name: str) -> list[object]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_unreachable_store_stops_the_search_before_the_study(
    tmp_path: Path, bounded_http_env: None
) -> None:
    from autosplit.search.driver import run_search

    runs = tmp_path / "runs"
    options = search_options(tmp_path, runs)
    started = time.monotonic()
    with pytest.raises(UserError, match="MLflow tracking at http://127.0.0.1"):
        # What `autosplit search` does: the store is opened before the search starts.
        run_search(
            options, tracker=check_tracking(f"http://127.0.0.1:{free_port()}"), say=lambda _m: None
        )
    assert time.monotonic() - started < 20
    assert not (tmp_path / "optuna.db").exists()  # the study was not touched
    assert not runs.exists()  # nor was the teacher trained


def test_ctrl_c_leaves_no_run_running(
    tmp_path: Path, digits_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while trial 1 trains: its run, and the parent, end KILLED."""
    from autosplit.search import driver, rungs

    real_train = rungs.train_job

    def interrupted(ctx, trial, *args, **kw):  # type: ignore[no-untyped-def]
        if trial.number == 1:
            raise KeyboardInterrupt
        return real_train(ctx, trial, *args, **kw)

    monkeypatch.setattr(rungs, "train_job", interrupted)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        driver.run_search(
            search_options(tmp_path, digits_runs, study_name="digits-int"),
            tracker=check_tracking(store),
            say=lambda _m: None,
        )
    runs = experiment_runs(store, "digits-int")
    statuses = {
        r.data.tags.get("optuna.trial_number", "parent"): r.info.status  # type: ignore
        for r in runs
    }
    assert statuses["parent"] == "KILLED" and statuses["1"] == "KILLED"
    assert "RUNNING" not in statuses.values()


def test_store_gone_mid_search_then_sync(
    tmp_path: Path,
    digits_runs: Path,
    server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server dies after trial 0: the search ends as it would have, with one warning;
    once the server is back, sync logs exactly the trials it missed, and only once."""
    from optuna.trial import TrialState

    from autosplit.cli import main
    from autosplit.search import driver, workers
    from autosplit.search.sync import should_have_run

    real_trial = workers.search_trial

    def outage_after_first(ctx, trial):  # type: ignore[no-untyped-def]
        try:
            return real_trial(ctx, trial)
        finally:
            if trial.number == 0:
                server.stop()

    monkeypatch.setattr(workers, "search_trial", outage_after_first)
    study, _ctx = driver.run_search(
        search_options(tmp_path, digits_runs),
        tracker=check_tracking(server.uri, timeout=LIVE_SECONDS),
        say=lambda _m: None,
    )
    err = capsys.readouterr().err
    assert err.count("autosplit: warning: MLflow tracking at") == 1, err
    assert "autosplit sync --study-name digits-faults" in err and "Traceback" not in err
    trials = study.get_trials()
    searched = [t for t in trials if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.SEARCH]
    assert len(searched) == 3 and all(t.state != TrialState.FAIL for t in trials)
    assert any(t.user_attrs.get(TrialAttrs.key("stage")) == Stage.FINAL for t in trials)
    expected = sorted(t.number for t in trials if should_have_run(t))

    uri = server.start()  # the same backend database, on a new port
    before = {
        r.data.tags["optuna.trial_number"]
        for r in experiment_runs(uri, "digits-faults")  # type: ignore
        if "optuna.trial_number" in r.data.tags
    }  # type: ignore
    assert before == {"0"}  # only trial 0 was logged before the outage
    args = [
        "sync",
        "--study-name",
        "digits-faults",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--tracking-uri",
        uri,
        "--runs-dir",
        str(digits_runs),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"logged {len(expected) - 1} trial(s) to MLflow, 1 already there" in out
    assert main(args) == 0
    assert f"logged 0 trial(s) to MLflow, {len(expected)} already there" in capsys.readouterr().out

    runs = experiment_runs(uri, "digits-faults")
    trial_runs = [r for r in runs if "optuna.trial_number" in r.data.tags]  # type: ignore
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs) == expected  # type: ignore
    assert all(r.info.status != "RUNNING" for r in trial_runs)  # type: ignore
    # The parent stays RUNNING only because its process (this test) is alive; the next
    # search or sync from a new process closes it (test_runs_of_a_killed_process_...).
    running = [r for r in runs if r.info.status == "RUNNING"]  # type: ignore
    assert [r.data.tags[ROLE_TAG] for r in running] == [RunRole.SEARCH]  # type: ignore
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trial_runs}  # type: ignore
    for trial in trials:
        if (
            trial.number in by_number
            and trial.state == TrialState.COMPLETE
            and trial.user_attrs.get(TrialAttrs.key("val_acc")) is not None
        ):
            assert by_number[trial.number].data.metrics["val/acc"] == pytest.approx(  # type: ignore
                trial.user_attrs[TrialAttrs.key("val_acc")]
            )
    parent = running[0].info.run_id  # type: ignore
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent)}
    assert {"front.csv", "final_front.csv"} <= artifacts  # refreshed by sync
