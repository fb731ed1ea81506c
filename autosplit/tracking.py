"""Experiment tracking — the only module of autosplit that imports MLflow, and only lazily.

The search talks to a ``Tracker``: ``MlflowTracker`` writes one experiment per study, a parent
run per ``autosplit search`` invocation (the Pareto front plots, hypervolume, the search's own
cost) and a nested child run per trial; ``NullTracker`` does nothing, for tests and
``--no-tracking``. It uses ``MlflowClient`` with explicit run ids rather than ``mlflow.start_run``
so that no global active-run state is shared: several workers (processes or threads) may each
hold a tracker on the same store. optuna-integration's MLflow callback is deprecated and not used.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from autosplit.errors import UserError
from autosplit.search.front import (
    FLOPS_CONVENTION,
    FinalMember,
    TrialRecord,
    final_front,
    hypervolume_history,
    pareto_front,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

_RUN_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "infeasible": "KILLED", "killed": "KILLED",
               "failed": "FAILED"}


def default_tracking_uri(runs_dir: str | Path = "runs") -> str:
    """``sqlite:///<abs>/runs/mlflow.db``: an embedded store that needs no server."""
    return f"sqlite:///{(Path(runs_dir).resolve() / 'mlflow.db').as_posix()}"


@runtime_checkable
class Tracker(Protocol):
    """What the search reports; one tracker serves one search invocation (one parent run)."""

    def start_search(self, *, study_name: str, settings: dict[str, str | int | float]) -> str: ...
    def attach(self, *, study_name: str, parent_run_id: str) -> None: ...
    def start_trial(self, *, trial_number: int, params: dict[str, object],
                    tags: dict[str, str]) -> str: ...
    def log_epoch(self, run_id: str, step: int, metrics: dict[str, float]) -> None: ...
    def end_trial(self, run_id: str, *, state: str, metrics: dict[str, float]) -> None: ...
    def update_front(self, records: list[TrialRecord], budget_flops: int) -> None: ...
    def log_search_cost(self, metrics: dict[str, float]) -> None: ...
    def log_final_stage(self, members: list[FinalMember],
                        rungs: dict[int, list[TrialRecord]], proxy: dict[int, dict[str, float]],
                        budget_flops: int) -> None: ...
    def end_search(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records nothing; returns stable fake run ids so callers need no special case."""

    def start_search(self, *, study_name: str, settings: dict[str, str | int | float]) -> str:
        return "null-search"

    def attach(self, *, study_name: str, parent_run_id: str) -> None:
        pass

    def start_trial(self, *, trial_number: int, params: dict[str, object],
                    tags: dict[str, str]) -> str:
        return f"null-trial-{trial_number}"

    def log_epoch(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        pass

    def end_trial(self, run_id: str, *, state: str, metrics: dict[str, float]) -> None:
        pass

    def update_front(self, records: list[TrialRecord], budget_flops: int) -> None:
        pass

    def log_search_cost(self, metrics: dict[str, float]) -> None:
        pass

    def log_final_stage(self, members: list[FinalMember],
                        rungs: dict[int, list[TrialRecord]], proxy: dict[int, dict[str, float]],
                        budget_flops: int) -> None:
        pass

    def end_search(self, status: str = "FINISHED") -> None:
        pass


def flatten_params(params: Mapping[str, object], prefix: str = "") -> dict[str, str]:
    """Nested mappings to dotted keys and every value to a string (MLflow params are strings).

    Tuples and lists become "(a, b)"-style text and None becomes "None", so the candidate's
    YAML and the params in ``mlflow ui`` read the same.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = "(" + ", ".join(str(v) for v in value) + ")"
        else:
            flat[name] = str(value)
    return flat


@contextlib.contextmanager
def _sqlite_init_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store across local processes.

    MLflow creates and migrates the schema on first open; two workers doing that at once on a
    fresh file break each other's migrations (seen here with --workers 2). A file lock beside
    the database makes the second wait for the first. Servers need no lock.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db_path = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with open(db_path.with_name(db_path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MlflowTracker:
    """Tracker writing to an MLflow store (``sqlite:///…`` file or an ``http(s)://`` server).

    For a SQLite store the artifacts go beside the database (``<runs>/mlartifacts/<study>``),
    not MLflow's default ``./mlruns`` in whatever directory the user happened to be in.
    """

    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        with self._talking("connect"), _sqlite_init_lock(tracking_uri):
            self._client: MlflowClient = MlflowClient(tracking_uri=tracking_uri)
            self._client.search_experiments(max_results=1)  # fail now, not after a trial trained
        self._lock = threading.Lock()
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._study_name = ""
        self._hypervolume_step = -1  # finished-trial count of the last hypervolume point

    @contextlib.contextmanager
    def _talking(self, what: str) -> Iterator[None]:
        """Turn the store's failures into one line that names the URI (no traceback)."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError) as exc:
            raise _store_error(self.tracking_uri, what, exc) from exc
        except Exception as exc:  # SQLAlchemy / requests errors not wrapped by MLflow
            if type(exc).__module__.split(".")[0] in ("sqlalchemy", "requests", "urllib3"):
                raise _store_error(self.tracking_uri, what, exc) from exc
            raise

    @property
    def parent_run_id(self) -> str:
        if self._parent_run_id is None:
            raise RuntimeError("start_search() must be called first")
        return self._parent_run_id

    def _artifact_location(self, study_name: str) -> str | None:
        if not self.tracking_uri.startswith("sqlite:///"):
            return None  # a server decides where its artifacts live
        db_path = Path(self.tracking_uri.removeprefix("sqlite:///"))
        if not db_path.is_absolute():  # "sqlite:///rel.db" is relative; four slashes are absolute
            db_path = db_path.resolve()
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", study_name)
        return (db_path.parent / "mlartifacts" / safe).as_uri()

    def _experiment(self, study_name: str) -> str:
        """Get or create the study's experiment; another worker may be creating it right now."""
        client = self._client
        experiment = client.get_experiment_by_name(study_name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":  # runs cannot be created in it otherwise
                log.warning("restoring deleted MLflow experiment %r", study_name)
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        try:
            return client.create_experiment(
                study_name, artifact_location=self._artifact_location(study_name),
                tags={"mlflow.note.content": f"autosplit study `{study_name}`: one parent run per "
                      "`autosplit search` invocation, one child run per trial."})
        except Exception:
            experiment = client.get_experiment_by_name(study_name)  # lost the race: fine
            if experiment is None:
                raise
            return experiment.experiment_id

    def start_search(self, *, study_name: str, settings: dict[str, str | int | float]) -> str:
        from mlflow.entities import Param

        with self._talking(f"start the search run of study {study_name!r}"):
            self._study_name = study_name
            self._experiment_id = self._experiment(study_name)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run = self._client.create_run(
                self._experiment_id, run_name=f"search-{stamp}",
                tags={"autosplit.role": "search", "autosplit.study": study_name,
                      "mlflow.note.content": _search_note(study_name, settings, None, [])})
            self._parent_run_id = run.info.run_id
            params = [Param(k, _clip(str(v))) for k, v in sorted(settings.items())]
            self._log_batch(self._parent_run_id, params=params)
        return self._parent_run_id

    def attach(self, *, study_name: str, parent_run_id: str) -> None:
        """Log under a parent run another process started (``--workers N``: one parent run
        per invocation, child runs from every worker process)."""
        with self._talking(f"attach to parent run {parent_run_id}"):
            run = self._client.get_run(parent_run_id)
        self._study_name = study_name
        self._experiment_id = run.info.experiment_id
        self._parent_run_id = parent_run_id

    def start_trial(self, *, trial_number: int, params: dict[str, object],
                    tags: dict[str, str]) -> str:
        from mlflow.entities import Param

        with self._talking(f"start the run of trial {trial_number}"):
            run = self._client.create_run(
                self._experiment_id or "", run_name=f"trial-{trial_number}",
                tags={**tags, "mlflow.parentRunId": self.parent_run_id,
                      "autosplit.role": "trial", "optuna.trial_number": str(trial_number)})
            flat = flatten_params(params)
            self._log_batch(run.info.run_id,
                            params=[Param(k, _clip(v)) for k, v in sorted(flat.items())])
        return run.info.run_id

    def log_epoch(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        with self._talking(f"log epoch {step} of run {run_id}"):
            self._log_batch(run_id, metrics=_metrics(metrics, step))

    def end_trial(self, run_id: str, *, state: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import RunTag

        if state not in _RUN_STATUS:
            raise ValueError(f"state must be one of {sorted(_RUN_STATUS)}, not {state!r}")
        with self._talking(f"end run {run_id}"):
            self._log_batch(run_id, metrics=_metrics(metrics, 0),
                            tags=[RunTag("autosplit.state", state)])
            self._client.set_terminated(run_id, status=_RUN_STATUS[state])

    def update_front(self, records: list[TrialRecord], budget_flops: int) -> None:
        """Rewrite front.csv/.png/.html and hypervolume.csv on the parent run; log the metric.

        ``search/hypervolume`` gets one point per call, stepped by the number of finished
        trials seen; hypervolume.csv holds the exact per-trial history (trials may finish out of
        order across workers, which a metric history could not rewrite).
        """
        from autosplit.search import front_plots

        front = pareto_front(records, budget_flops)
        history = hypervolume_history(records, budget_flops)
        finished = sum(1 for r in records if r.state not in ("running", "waiting"))
        with tempfile.TemporaryDirectory(prefix="autosplit-front-") as tmp:
            folder = Path(tmp)
            front_plots.write_csv(folder / "front.csv", front)
            front_plots.write_history_csv(folder / "hypervolume.csv", history)
            title = f"{self._study_name} — budget {budget_flops:,} FLOPs"
            front_plots.write_png(folder / "front.png", records, front, budget_flops, title)
            front_plots.write_html(folder / "front.html", records, front, budget_flops, title)
            with self._lock, self._talking("update the front artifacts"):
                for name in ("front.csv", "front.png", "front.html", "hypervolume.csv"):
                    self._client.log_artifact(self.parent_run_id, str(folder / name))
                metrics = {"search/front_size": float(len(front))}
                if front:
                    metrics["search/best_val_acc"] = max(float(r.val_acc or 0.0) for r in front)
                if finished > self._hypervolume_step:
                    self._hypervolume_step = finished
                    metrics["search/hypervolume"] = history[-1][1] if history else 0.0
                self._log_batch(self.parent_run_id, metrics=_metrics(metrics, finished))
                self._client.set_tag(self.parent_run_id, "mlflow.note.content",
                                     _search_note(self._study_name, {}, budget_flops, front),
                                     synchronous=True)

    def log_final_stage(self, members: list[FinalMember],
                        rungs: dict[int, list[TrialRecord]], proxy: dict[int, dict[str, float]],
                        budget_flops: int) -> None:
        """The final front (with ±1 sd error bars), each rung's front, and the proxy's Kendall
        tau against the final stage, on the parent run."""
        from autosplit.search import front_plots

        front = final_front(members, budget_flops)
        with tempfile.TemporaryDirectory(prefix="autosplit-final-") as tmp:
            folder = Path(tmp)
            names = ["final_front.csv", "final_front.png"]
            front_plots.write_final_csv(folder / names[0], members, front)
            front_plots.write_final_png(folder / names[1], members, front, budget_flops,
                                        f"{self._study_name} — final stage")
            for rung, records in sorted(rungs.items()):
                rung_front = pareto_front(records, budget_flops)
                name = f"rung{rung}_front.png"
                front_plots.write_png(folder / name, records, rung_front, budget_flops,
                                      f"{self._study_name} — rung {rung}")
                names.append(name)
            metrics: dict[str, float] = {f"final/kendall_tau_rung{k}": v["tau"]
                                         for k, v in proxy.items()}
            if front:
                best = max(front, key=lambda m: m.val_mean)
                metrics.update({"final/best_val_acc_mean": best.val_mean,
                                "final/best_val_acc_sd": best.val_sd,
                                "final/front_size": float(len(front))})
            with self._lock, self._talking("log the final stage"):
                for name in names:
                    self._client.log_artifact(self.parent_run_id, str(folder / name))
                self._log_batch(self.parent_run_id, metrics=_metrics(metrics, 0))

    def log_search_cost(self, metrics: dict[str, float]) -> None:
        with self._talking("log the search cost"):
            self._log_batch(self.parent_run_id,
                            metrics=_metrics({f"cost/{k}": v for k, v in metrics.items()}, 0))

    def end_search(self, status: str = "FINISHED") -> None:
        with self._talking("end the search run"):
            self._client.set_terminated(self.parent_run_id, status=status)

    def _log_batch(self, run_id: str, *, metrics: list[Any] | None = None,
                   params: list[Any] | None = None, tags: list[Any] | None = None) -> None:
        """log_batch in chunks MLflow accepts (100 params/tags, 1000 metrics per call)."""
        metrics, params, tags = metrics or [], params or [], tags or []
        for i in range(0, max(len(params), len(tags), 1), 100):
            self._client.log_batch(run_id, params=params[i:i + 100], tags=tags[i:i + 100],
                                   synchronous=True)
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)


def _metrics(values: Mapping[str, float | int | None], step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in sorted(values.items())
            if value is not None]


def _clip(text: str) -> str:
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's param value limit


def _store_error(uri: str, what: str, exc: BaseException) -> UserError:
    shown = re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", uri)  # never print a password
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(uri, shown)
    return UserError(f"MLflow tracking at {shown}: could not {what}: {first[:300]} "
                     "(check --tracking-uri, or pass --no-tracking)")


def _search_note(study_name: str, settings: Mapping[str, object], budget_flops: int | None,
                 front: list[TrialRecord]) -> str:
    """The parent run's description in ``mlflow ui``: what is searched and how to read it."""
    lines = [f"## autosplit search — study `{study_name}`", ""]
    if budget_flops is not None:
        lines.append(f"**Budget: {budget_flops:,} FLOPs** ({FLOPS_CONVENTION}).")
    elif "budget" in settings or "budget_flops" in settings:
        lines.append(f"**Budget: {settings.get('budget', settings.get('budget_flops'))} FLOPs** "
                     f"({FLOPS_CONVENTION}).")
    if front:
        best = max(front, key=lambda r: r.val_acc or 0.0)
        lines.append(f"Front: {len(front)} trial(s); most accurate: trial {best.number} "
                     f"({best.label}) {best.val_acc:.2f}% at {best.flops:,} FLOPs.")
    lines += [
        "",
        "Objectives: maximise validation accuracy (split carved from train; test untouched), "
        "minimise worst-case FLOPs; constraint FLOPs <= budget (over-budget candidates are "
        "never trained).",
        "",
        "How to read: open the **Artifacts** tab — `front.html` (interactive, hover for trial "
        "and recipe) or `front.png`: grey = every trial, coloured line = the Pareto front (no "
        "feasible trial is both more accurate and cheaper), dashed line = budget, stars = "
        "baselines (equal-budget KD student, best published recipe). `front.csv` lists the "
        "front with run ids. Metric `search/hypervolume` (0-1, higher is better) tracks the "
        "front's progress; the child runs hold one trial each (params = the candidate).",
    ]
    return "\n".join(lines)
