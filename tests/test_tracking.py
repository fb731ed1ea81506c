"""MlflowTracker on a real SQLite store: experiment per study, parent and child runs, front
artifacts, two workers sharing a store; and the import contract (no MLflow on import)."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from autosplit.errors import UserError
from autosplit.search.attrs import STATE_TAG, State, TrialAttrs
from autosplit.search.front import TrialRecord, hypervolume, pareto_front
from autosplit.search.front_plots import read_csv
from autosplit.search.report import SearchReport
from autosplit.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    default_tracking_uri,
    flatten_params,
)

BUDGET = 1_000_000
# MLflow 3.17's own SQLAlchemy mappings use a loader SQLAlchemy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store per module: creating MLflow's schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def trial_records() -> list[TrialRecord]:
    return [
        TrialRecord(
            0, State.COMPLETE, 81.5, 400_000, None, 5_000, "single + kd", None, "kd-single"
        ),
        TrialRecord(1, State.COMPLETE, 84.0, 900_000, 600_000.0, 9_000, "res_chain K=2 + dkd"),
        TrialRecord(2, State.COMPLETE, 80.0, 700_000, None, 7_000, "assistant + hint"),  # dominated
        TrialRecord(3, State.INFEASIBLE, None, 1_500_000, None, 20_000, "branches K=3 + aekt"),
        TrialRecord(4, State.PRUNED, 60.0, 300_000, None, 3_000, "single + iekd"),
    ]


def run_search(tracker: MlflowTracker, study: str, records: list[TrialRecord]) -> str:
    """What the driver does: parent run, one child per trial with epochs, front, cost."""
    parent = tracker.start_search(
        study_name=study,
        settings={"budget": "0.25x", "budget_flops": BUDGET, "sampler": "tpe", "seed": 0},
    )
    report = SearchReport(tracker, study, BUDGET)
    ended: list[TrialRecord] = []
    for record in records:
        run_id = tracker.start_trial(
            trial_number=record.number,
            params={
                "structure": "res_chain",
                "split": {"fractions": (0.6, 0.4)},
                "feature_loss": None,
                "lr": 0.05,
            },
            tags={TrialAttrs.key("label"): record.label},
        )
        for epoch in range(3):
            tracker.log_epoch(run_id, epoch, {"train/loss": 2.0 - epoch, "val/acc": 50.0 + epoch})
        tracker.end_trial(
            run_id,
            state=record.state,
            metrics={
                "val/acc": record.val_acc,
                "flops/worst_case": record.flops,  # type: ignore[dict-item]
                "flops/expected": record.expected_flops,
                "params": record.params,  # type: ignore
                "time/wall_s": 1.5,
                "optuna/trial_number": record.number,
            },
        )
        ended.append(TrialRecord(**{**record.__dict__, "run_id": run_id}))
        report.front(ended)
    tracker.log_search_cost(
        {"cpu_seconds": 12.0, "gpu_seconds": 0.0, "pruned": 1, "infeasible": 1, "cache_hits": 4}
    )
    tracker.end_search()
    return parent


def test_search_layout(store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    records = trial_records()
    parent = run_search(MlflowTracker(store), "study-a", records)
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("study-a")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + len(records)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [parent]
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.params["budget_flops"] == str(BUDGET)
    note = parents[0].data.tags["mlflow.note.content"]
    assert "1,000,000 FLOPs" in note and "one multiply-add = one FLOP" in note
    assert parents[0].data.metrics["cost/cache_hits"] == 4.0

    children = {r.info.run_name: r for r in runs if r.info.run_id != parent}
    assert set(children) == {f"trial-{r.number}" for r in records}
    statuses = {name: (r.info.status, r.data.tags[STATE_TAG]) for name, r in children.items()}
    assert statuses["trial-1"] == ("FINISHED", State.COMPLETE)
    assert statuses["trial-3"] == ("KILLED", State.INFEASIBLE)
    assert statuses["trial-4"] == ("KILLED", State.PRUNED)
    trial1 = children["trial-1"]
    assert trial1.data.tags["mlflow.parentRunId"] == parent
    assert trial1.data.tags[TrialAttrs.key("label")] == "res_chain K=2 + dkd"
    assert trial1.data.params == {
        "structure": "res_chain",
        "split.fractions": "(0.6, 0.4)",
        "feature_loss": "None",
        "lr": "0.05",
    }
    assert trial1.data.metrics["flops/expected"] == 600_000.0
    assert trial1.data.metrics["optuna/trial_number"] == 1.0
    assert "flops/expected" not in children["trial-3"].data.metrics  # None: skipped
    history = client.get_metric_history(trial1.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.0), (2, 0.0)]

    # Front artifacts on the parent, beside the database rather than in ./mlruns.
    assert {a.path for a in client.list_artifacts(parent)} == {
        "front.csv",
        "front.png",
        "front.html",
        "hypervolume.csv",
    }
    assert not (tmp_path / "mlruns").exists()
    assert "mlartifacts" in parents[0].info.artifact_uri
    local = Path(client.download_artifacts(parent, "", str(tmp_path / "dl")))
    front = read_csv(local / "front.csv")
    assert [(r.number, r.val_acc, r.flops, r.label, r.baseline) for r in front] == [
        (r.number, r.val_acc, r.flops, r.label, r.baseline) for r in pareto_front(records, BUDGET)
    ]
    assert all(r.run_id for r in front)
    assert (local / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (local / "front.html").read_text(encoding="utf-8")
    assert "single + kd" in html and "res_chain K=2 + dkd" in html
    assert 'src="https://cdn.plot.ly' not in html  # self-contained: opens offline

    volumes = [
        m.value
        for m in sorted(
            client.get_metric_history(parent, "search/hypervolume"), key=lambda m: m.step
        )
    ]
    assert len(volumes) == len(records)
    assert all(b >= a for a, b in zip(volumes, volumes[1:], strict=False))
    assert volumes[-1] == pytest.approx(hypervolume(records, BUDGET))


def _worker(store: str, offset: int, out: Any) -> None:
    """One search worker: two trials numbered so that the two workers never collide."""
    records = [
        TrialRecord(**{**r.__dict__, "number": r.number * 2 + offset}) for r in trial_records()[:2]
    ]
    out.put(run_search(MlflowTracker(store), "study-shared-" + out.kind, records))


class _Results(list):
    """Collects parent run ids from threads (list) or processes (a multiprocessing queue)."""

    def __init__(self, kind: str, queue: Any = None) -> None:
        super().__init__()
        self.kind, self.queue = kind, queue

    def put(self, item: str) -> None:
        (self.queue.put if self.queue is not None else self.append)(item)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_two_workers_share_one_experiment(store: str, kind: str) -> None:
    """Two trackers, as two workers hold them, racing to create the same experiment."""
    if kind == "thread":
        out = _Results(kind)
        workers: list[Any] = [
            threading.Thread(target=_worker, args=(store, i, out)) for i in range(2)
        ]
    else:
        context = multiprocessing.get_context("spawn")  # fresh interpreters, like real workers
        out = _Results(kind, context.Queue())
        workers = [context.Process(target=_worker, args=(store, i, out)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    parents = list(out) if kind == "thread" else [out.queue.get(timeout=5) for _ in range(2)]
    assert len(parents) == 2
    client = MlflowClient(tracking_uri=store)
    experiments = [e for e in client.search_experiments() if e.name == f"study-shared-{kind}"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags) == sorted(
        parents
    )
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1", "trial-2", "trial-3"]
    for parent in parents:
        assert sum(r.data.tags["mlflow.parentRunId"] == parent for r in children) == 2


def test_unreachable_store_is_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="foo://nowhere") as info:
        MlflowTracker("foo://nowhere")
    assert "\n" not in str(info.value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(UserError, match=r"http://127\.0\.0\.1:9") as info:
        MlflowTracker("http://127.0.0.1:9")  # port 9 (discard) is closed on loopback
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"http://me:\*\*\*@127\.0\.0\.1:9") as info:
        MlflowTracker("http://me:secret@127.0.0.1:9")
    assert "secret" not in str(info.value)


def test_end_trial_rejects_unknown_state(store: str) -> None:
    tracker = MlflowTracker(store)
    assert isinstance(tracker, Tracker)
    tracker.start_search(study_name="study-b", settings={})
    run_id = tracker.start_trial(trial_number=0, params={}, tags={})
    with pytest.raises(ValueError, match="state"):
        tracker.end_trial(run_id, state="done", metrics={})


def test_attached_worker_logs_under_the_parent(store: str) -> None:
    """--workers N: the main process owns the parent run, each worker process attaches."""
    main = MlflowTracker(store)
    parent = main.start_search(study_name="study-d", settings={"budget_flops": BUDGET})
    worker = MlflowTracker(store)
    worker.attach(study_name="study-d", parent_run_id=parent)
    run_id = worker.start_trial(
        trial_number=0, params={"lr": 0.1}, tags={TrialAttrs.key("baseline"): ""}
    )
    worker.end_trial(run_id, state=State.COMPLETE, metrics={"val/acc": 90.0})
    SearchReport(worker, "study-d", BUDGET).front(trial_records())
    main.end_search("KILLED")
    client = MlflowClient(tracking_uri=store)
    child = client.get_run(run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.experiment_id == client.get_run(parent).info.experiment_id
    assert client.get_run(parent).info.status == "KILLED"
    assert "front.html" in {a.path for a in client.list_artifacts(parent)}


def test_deleted_experiment_is_restored(store: str) -> None:
    tracker = MlflowTracker(store)
    tracker.start_search(study_name="study-c", settings={})
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("study-c")
    assert experiment is not None
    client.delete_experiment(experiment.experiment_id)
    again = MlflowTracker(store)
    again.start_search(study_name="study-c", settings={})
    assert client.get_experiment(experiment.experiment_id).lifecycle_stage == "active"
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_a_tracker_sent_to_a_worker_process_logs_under_the_same_parent(store: str) -> None:
    """--workers N: spawn pickles the tracker; it reopens the store and attaches to the parent."""
    main = MlflowTracker(store)
    parent = main.start_search(study_name="study-e", settings={})
    worker = pickle.loads(pickle.dumps(main))
    assert worker is not main and worker.parent_run_id == parent
    run_id = worker.start_trial(trial_number=0, params={}, tags={})
    worker.end_trial(run_id, state=State.COMPLETE, metrics={"val/acc": 1.0})
    main.end_search()
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(run_id).info.status == "FINISHED"


def test_null_tracker_records_nothing_and_draws_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-tracking: the driver's whole sequence runs, crossing to a worker (pickled) too, and
    no store, file or figure is made for it."""
    from autosplit.search import front_plots

    def no_drawing(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a figure was drawn for a tracker that records nothing")

    for name in ("write_csv", "write_png", "write_html", "write_final_csv", "write_final_png"):
        monkeypatch.setattr(front_plots, name, no_drawing)
    monkeypatch.chdir(tmp_path)
    tracker = pickle.loads(pickle.dumps(NullTracker()))
    assert isinstance(tracker, Tracker) and not tracker.enabled
    assert run_search(tracker, "s", trial_records()) == "null-search"  # type: ignore[arg-type]
    assert tracker.start_trial(trial_number=3, params={}, tags={}) == "null-trial-3"
    assert tracker.close_dead_runs("s") == 0
    SearchReport(tracker, "s", BUDGET).final_stage([], {0: trial_records()}, {})
    assert list(tmp_path.iterdir()) == []


def test_flatten_params_and_default_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert flatten_params({"a": {"b": (1, 2), "c": None}, "d": [0.5], "e": True}) == {
        "a.b": "(1, 2)",
        "a.c": "None",
        "d": "(0.5)",
        "e": "True",
    }
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"


def test_import_does_not_import_mlflow() -> None:
    code = (
        "import sys, autosplit.tracking, autosplit.tracking_store, autosplit.tracking_models,"
        " autosplit.search.front, autosplit.search.front_text, autosplit.search.front_plots;"
        "heavy = [m for m in ('mlflow', 'plotly', 'matplotlib') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_parent_runs_front_ranks_by_the_cost_the_search_optimises(store: str) -> None:
    """A search that optimises expected FLOPs gets its front, hypervolume and note in expected
    FLOPs (trial 1's gate brings it from 900k worst case to 600k expected)."""
    records = trial_records()
    tracker = MlflowTracker(store)
    parent = tracker.start_search(study_name="study-expected", settings={"budget": "0.25x"})
    SearchReport(tracker, "study-expected", BUDGET, cost="expected_flops").front(records)
    tracker.end_search()
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(parent)
    expected = hypervolume(records, BUDGET, cost="expected_flops")
    assert expected != pytest.approx(hypervolume(records, BUDGET))
    assert run.data.metrics["search/hypervolume"] == pytest.approx(expected)
    assert "minimise expected FLOPs" in run.data.tags["mlflow.note.content"]
