"""Experiment tracking, with ``tracking_store.py`` and ``tracking_models.py``: the modules that
write to MLflow, all importing it lazily.

The search talks to a ``Tracker``: ``MlflowTracker`` writes one experiment per study, a parent
run per ``autosplit search`` invocation (the Pareto front plots, hypervolume, the search's own
cost) and a nested child run per trial; ``NullTracker`` does nothing, for tests and
``--no-tracking``. ``autosplit export`` logs the exported students as MLflow models in an
``export-…`` run of the same experiment (``MlflowTracker.log_students``, the models logged by
``tracking_models``). What a failure of the store is, and how it is told, is
``tracking_store``'s; what it does (stop the command, or warn once and go on) is decided here.

A leaf: the search computes what the parent run shows (``search.report``) and hands it over;
nothing here knows what a front is. It uses ``MlflowClient`` with explicit run ids rather than
``mlflow.start_run`` so that no global active-run state is shared: several workers (processes
or threads) may each hold a tracker on the same store. optuna-integration's MLflow callback is
deprecated and not used.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from autosplit.errors import UserError, redact_url
from autosplit.search.attrs import (
    ROLE_TAG,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    WORKER_TAG,
    RunRole,
    State,
)
from autosplit.tracking_store import (
    experiment_id,
    failure_cause,
    is_http,
    probe_server,
    quiet_store,
    search_all,
    sqlite_init_lock,
    store_error,
    store_failures,
)

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from autosplit.tracking_models import StudentModel

log = logging.getLogger(__name__)

_RUN_STATUS = {
    State.COMPLETE: "FINISHED",
    State.PRUNED: "KILLED",
    State.INFEASIBLE: "KILLED",
    State.FAILED: "FAILED",
    State.KILLED: "KILLED",
}
CHECK_SECONDS = 5.0  # how long check_tracking waits for an http(s) store
# Parent run ids whose tracking failed in this process: every tracker logging under such a
# parent stays silent, so one search warns once however many trackers its phases open.
_FAILED_PARENTS: set[str] = set()


def default_tracking_uri(runs_dir: str | Path = "runs") -> str:
    """``sqlite:///<abs>/runs/mlflow.db``: an embedded store that needs no server."""
    return f"sqlite:///{(Path(runs_dir).resolve() / 'mlflow.db').as_posix()}"


@dataclass(frozen=True)
class LoggedStudents:
    """The ``export-…`` run and the registered model."""

    run_id: str
    registered: str | None  # models:/<name>/<version> of the registered one


@runtime_checkable
class Tracker(Protocol):
    """What the search reports; one tracker serves one search invocation (one parent run).

    ``run_search`` takes one, as Optuna takes a sampler. A tracker given to worker processes
    is pickled; it must reopen itself there under the same parent run. The bodies here record
    nothing: ``NullTracker`` is this protocol and no more.
    """

    @property
    def enabled(self) -> bool:
        """Whether anything is recorded: callers skip preparing what only the tracker uses."""
        return False

    def start_search(
        self, *, study_name: str, settings: dict[str, str | int | float], note: str = ""
    ) -> str:
        """The parent run's id; ``note`` describes it (markdown)."""
        return "null-search"

    def close_dead_runs(self, study_name: str) -> int:
        """Close the runs of dead local workers; how many."""
        return 0

    def attach(self, *, study_name: str, parent_run_id: str) -> None:
        """Log under a parent run another process started."""

    def start_trial(
        self, *, trial_number: int, params: dict[str, object], tags: dict[str, str]
    ) -> str:
        """The trial's run id."""
        return f"null-trial-{trial_number}"

    def log_epoch(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics on the trial's run."""

    def end_trial(self, run_id: str, *, state: str, metrics: dict[str, float]) -> None:
        """The trial's final metrics and state (a ``State``: complete, pruned, ...)."""

    def log_parent(
        self,
        what: str,
        *,
        metrics: Mapping[str, float],
        step: int = 0,
        artifacts: Sequence[Path] = (),
        note: str | None = None,
    ) -> None:
        """Files, metrics at ``step`` and the description (``note``) on the parent run;
        ``what`` names the work in the warning a failing store gives."""

    def log_search_cost(self, metrics: dict[str, float]) -> None:
        """The search's own cost (``cost/…`` metrics) on the parent run."""

    def publish_file(self, path: Path, *, folder: str, run_id: str | None = None) -> str | None:
        """Log ``path`` into ``folder`` of a run's artifacts (the parent run's by default) for
        other hosts to download; its URI (``runs:/…``), or None when nothing is recorded."""
        return None

    def end_search(self, status: str = "FINISHED") -> None:
        """End the parent run (and its children still running)."""


class NullTracker(Tracker):
    """Records nothing (``--no-tracking``); returns stable fake run ids so callers need no
    special case."""


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


def check_tracking(
    uri: str, *, timeout: float = CHECK_SECONDS, warn: Callable[[str], None] | None = None
) -> MlflowTracker:
    """The store, opened; ``UserError`` within about ``timeout`` seconds when it cannot be
    reached.

    An http(s) server first gets one request with no retry (MLflow's client would retry for
    minutes); any other store (SQLite) is opened, which creates its schema on first use.
    ``warn``: as for ``MlflowTracker``.
    """
    if is_http(uri):
        probe_server(uri, timeout)
    return MlflowTracker(uri, warn=warn)


def _print_warning(message: str) -> None:
    print(f"autosplit: warning: {message}", file=sys.stderr, flush=True)


class MlflowTracker:
    """Tracker writing to an MLflow store (``sqlite:///…`` file or an ``http(s)://`` server).

    For a SQLite store the artifacts go beside the database (``<runs>/mlartifacts/<study>``),
    not MLflow's default ``./mlruns`` in whatever directory the user happened to be in.

    Opening the store fails loudly (``UserError``). Once open, a failure of the store does not
    stop the search: the tracker warns once (through ``warn``) and records nothing more;
    ``autosplit sync`` logs the missing trials later. A full disk is not a store failure: an
    ``OSError`` with errno ENOSPC, EDQUOT or EROFS propagates unchanged.
    """

    def __init__(
        self, tracking_uri: str, *, warn: Callable[[str], None] | None = None, connect: bool = True
    ) -> None:
        self.tracking_uri = tracking_uri
        self._warn = warn or _print_warning
        self._lock = threading.Lock()
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        self._study_name = ""
        self._failed: str | None = None  # the cause, once the store failed mid-search
        quiet_store(tracking_uri)
        if connect:
            self._connect()

    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        with self._talking("connect", strict=True), sqlite_init_lock(self.tracking_uri):
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            self.client.search_experiments(max_results=1)  # fail now, not after a trial

    @classmethod
    def for_worker(
        cls,
        tracking_uri: str,
        *,
        study_name: str,
        parent_run_id: str,
        warn: Callable[[str], None] | None = None,
    ) -> MlflowTracker:
        """A tracker logging under ``parent_run_id``; silent when that search's tracking has
        already failed, and failing soft (one warning) when the store is gone."""
        tracker = cls(tracking_uri, warn=warn, connect=False)
        tracker._study_name, tracker._parent_run_id = study_name, parent_run_id
        if tracker.off:
            return tracker
        try:
            tracker._connect()
        except UserError as exc:
            tracker._fail(exc)
            return tracker
        tracker.attach(study_name=study_name, parent_run_id=parent_run_id)
        return tracker

    def __reduce__(self) -> tuple[Any, ...]:
        """Sent to a worker process (spawn pickles it), the tracker reopens the store there and
        logs under the same parent run (``for_worker``); client and lock stay behind."""
        return _reopened, (self.tracking_uri, self._study_name, self._parent_run_id)

    @property
    def off(self) -> bool:
        """Whether tracking has failed for this search: every call is then a no-op."""
        parent = self._parent_run_id or ""
        return self._failed is not None or parent in _FAILED_PARENTS or parent.startswith(_UNLOGGED)

    @property
    def enabled(self) -> bool:
        return not self.off

    def _talking(
        self, what: str, *, strict: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """Turn the store's failures into one line that names the URI (no traceback).

        ``strict``: raise it as ``UserError`` (opening the store); otherwise warn once and
        turn the tracker off (mid-search). Disk-full errors propagate unchanged either way.
        """
        return store_failures(lambda exc: self._store_failed(what, exc, strict))

    def _store_failed(self, what: str, exc: BaseException, strict: bool) -> None:
        error = store_error(self.tracking_uri, what, exc)
        if strict:
            raise error from exc
        log.debug("MLflow tracking failed", exc_info=exc)
        self._fail(error)

    def _fail(self, error: UserError) -> None:
        """Turn tracking off for this search, warning once (the first tracker to fail)."""
        if self.off:
            return
        cause = failure_cause(error)
        self._failed = cause
        if self._parent_run_id is not None:
            _FAILED_PARENTS.add(self._parent_run_id)
        shown = redact_url(self.tracking_uri)
        study = self._study_name or "S"
        self._warn(
            f"MLflow tracking at {shown} failed ({cause}); the search goes on; run "
            f"autosplit sync --study-name {study} when the store is back"
        )

    @property
    def parent_run_id(self) -> str:
        if self._parent_run_id is None:
            raise RuntimeError("start_search() must be called first")
        return self._parent_run_id

    @property
    def client(self) -> MlflowClient:
        assert self._client is not None, "the store is not open"
        return self._client

    def start_search(
        self, *, study_name: str, settings: dict[str, str | int | float], note: str = ""
    ) -> str:
        """The parent run, described by ``note`` (markdown, shown in ``mlflow ui``); when the
        store fails here, an ``unlogged-…`` id that every tracker given it treats as off."""
        from mlflow.entities import Param

        self._study_name = study_name
        if not self.off:
            with self._talking(f"start the search run of study {study_name!r}"):
                self._experiment_id = experiment_id(self.client, self.tracking_uri, study_name)
                stamp = time.strftime("%Y%m%d-%H%M%S")
                run = self.client.create_run(
                    self._experiment_id,
                    run_name=f"search-{stamp}",
                    tags={
                        ROLE_TAG: RunRole.SEARCH.value,
                        STUDY_TAG: study_name,
                        WORKER_TAG: _worker_id(),
                        **({"mlflow.note.content": note} if note else {}),
                    },
                )
                self._parent_run_id = run.info.run_id
                params = [Param(k, _clip(str(v))) for k, v in sorted(settings.items())]
                self._log_batch(self._parent_run_id, params=params)
        if self._parent_run_id is None:  # the store failed before the parent run existed
            self._parent_run_id = f"{_UNLOGGED}{_worker_id()}-{time.time_ns()}"
            _FAILED_PARENTS.add(self._parent_run_id)
        return self._parent_run_id

    def close_dead_runs(self, study_name: str) -> int:
        """Set KILLED the runs of the study's experiment still RUNNING whose worker was on
        this host and is dead (kill -9, power loss, a store that failed before the end).
        Returns how many; 0 when tracking is off."""
        from autosplit.search.study import dead_here

        if self.off:
            return 0
        closed = 0
        with self._talking(f"close the runs left RUNNING in study {study_name!r}"):
            experiment = self.client.get_experiment_by_name(study_name)
            if experiment is None:
                return 0
            for run in search_all(
                self.client, [experiment.experiment_id], "attributes.status = 'RUNNING'"
            ):
                if dead_here(run.data.tags.get(WORKER_TAG, "")):
                    self.client.set_terminated(run.info.run_id, status="KILLED")
                    closed += 1
        if closed:
            log.warning("closed %d MLflow run(s) left RUNNING by dead workers", closed)
        return closed

    def study_runs(self, study_name: str) -> tuple[dict[int, tuple[str, bool]], list[Any]]:
        """What the store holds of a study: trial number -> (run id, finished logging) for the
        trial runs, and the parent runs oldest first (``autosplit sync`` reads both)."""
        with self._talking(f"read the runs of study {study_name!r}", strict=True):
            self._study_name = study_name
            self._experiment_id = experiment_id(self.client, self.tracking_uri, study_name)
            runs = search_all(self.client, [self._experiment_id], "")
        trials: dict[int, tuple[str, bool]] = {}
        for run in runs:
            number = run.data.tags.get(TRIAL_TAG, "")
            if run.data.tags.get(ROLE_TAG) == RunRole.TRIAL and number.isdigit():
                finished = STATE_TAG in run.data.tags and run.info.status != "RUNNING"
                if not trials.get(int(number), ("", False))[1]:  # a finished run wins
                    trials[int(number)] = (run.info.run_id, finished)
        parents = sorted(
            (r for r in runs if r.data.tags.get(ROLE_TAG) == RunRole.SEARCH),
            key=lambda r: r.info.start_time,
        )
        return trials, parents

    def log_trial(
        self,
        *,
        trial_number: int,
        params: dict[str, object],
        tags: dict[str, str],
        state: str,
        metrics: dict[str, float],
        run_id: str = "",
    ) -> str:
        """A trial logged after the fact (``autosplit sync``): a new child run of the current
        parent, or ``run_id``'s run completed (one its search began and never ended)."""
        from mlflow.entities import Param, RunTag

        if not run_id:
            run_id = self.start_trial(trial_number=trial_number, params=params, tags=tags)
        elif not self.off:
            with self._talking(f"complete run {run_id}"):
                have = self.client.get_run(run_id).data.params
                missing = {k: v for k, v in flatten_params(params).items() if k not in have}
                self._log_batch(
                    run_id,
                    params=[Param(k, _clip(v)) for k, v in missing.items()],
                    tags=[RunTag(k, v) for k, v in sorted(tags.items())],
                )
        self.end_trial(run_id, state=state, metrics=metrics)
        return run_id

    def attach(self, *, study_name: str, parent_run_id: str, revive: bool = False) -> None:
        """Log under a parent run another process started (``--workers N``: one parent run
        per invocation, child runs from every worker process). ``revive``: even when that
        search's tracking failed in this process (``autosplit sync``, the store being back)."""
        if revive:
            _FAILED_PARENTS.discard(parent_run_id)
        self._study_name, self._parent_run_id = study_name, parent_run_id
        if self.off:
            return
        with self._talking(f"attach to parent run {parent_run_id}"):
            self._experiment_id = self.client.get_run(parent_run_id).info.experiment_id

    def start_trial(
        self, *, trial_number: int, params: dict[str, object], tags: dict[str, str]
    ) -> str:
        """The trial's run id; "" when tracking is off (every call on "" is a no-op)."""
        from mlflow.entities import Param

        run_id = ""
        if self.off:
            return run_id
        with self._talking(f"start the run of trial {trial_number}"):
            run = self.client.create_run(
                self._experiment_id or "",
                run_name=f"trial-{trial_number}",
                tags={
                    **tags,
                    "mlflow.parentRunId": self.parent_run_id,
                    ROLE_TAG: RunRole.TRIAL.value,
                    TRIAL_TAG: str(trial_number),
                    WORKER_TAG: _worker_id(),
                },
            )
            run_id = run.info.run_id
            flat = flatten_params(params)
            self._log_batch(run_id, params=[Param(k, _clip(v)) for k, v in sorted(flat.items())])
        return run_id

    def log_epoch(self, run_id: str, step: int, metrics: dict[str, float]) -> None:
        if self.off or not run_id:
            return
        with self._talking(f"log epoch {step} of run {run_id}"):
            self._log_batch(run_id, metrics=_metrics(metrics, step))

    def end_trial(self, run_id: str, *, state: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import RunTag

        if state not in _RUN_STATUS:
            raise ValueError(f"state must be one of {sorted(map(str, _RUN_STATUS))}, not {state!r}")
        if self.off or not run_id:
            return
        with self._talking(f"end run {run_id}"):
            self._log_batch(
                run_id, metrics=_metrics(metrics, 0), tags=[RunTag(STATE_TAG, str(state))]
            )
            self.client.set_terminated(run_id, status=_RUN_STATUS[state])

    def log_parent(
        self,
        what: str,
        *,
        metrics: Mapping[str, float],
        step: int = 0,
        artifacts: Sequence[Path] = (),
        note: str | None = None,
    ) -> None:
        if self.off:
            return
        with self._lock, self._talking(what):
            for path in artifacts:
                self.client.log_artifact(self.parent_run_id, str(path))
            self._log_batch(self.parent_run_id, metrics=_metrics(metrics, step))
            if note is not None:
                self.client.set_tag(
                    self.parent_run_id, "mlflow.note.content", note, synchronous=True
                )

    def publish_file(self, path: Path, *, folder: str, run_id: str | None = None) -> str | None:
        if self.off:
            return None
        run_id = run_id or self.parent_run_id
        with self._lock, self._talking(f"publish {path.name}"):
            self.client.log_artifact(run_id, str(path), artifact_path=folder)
            return f"runs:/{run_id}/{folder}/{path.name}"
        return None  # the store failed (warned once): nothing published

    def log_search_cost(self, metrics: dict[str, float]) -> None:
        if self.off:
            return
        with self._talking("log the search cost"):
            self._log_batch(
                self.parent_run_id,
                metrics=_metrics({f"cost/{k}": v for k, v in metrics.items()}, 0),
            )

    def end_search(self, status: str = "FINISHED") -> None:
        """End the parent run, and first its child runs still RUNNING (a trial interrupted by
        Ctrl-C or a worker process that died): KILLED, or FAILED when the search failed."""
        if self.off:
            return
        with self._talking("end the search run"):
            orphans = search_all(
                self.client,
                [self._experiment_id or self.client.get_run(self.parent_run_id).info.experiment_id],
                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' "
                "and attributes.status = 'RUNNING'",
            )
            for run in orphans:
                self.client.set_terminated(
                    run.info.run_id, status="FAILED" if status == "FAILED" else "KILLED"
                )
            self.client.set_terminated(self.parent_run_id, status=status)

    def log_students(self, study_name: str, students: Sequence[StudentModel]) -> LoggedStudents:
        """Log each student as an MLflow model (``tracking_models.log_models``) in a new
        ``export-…`` run of the study's experiment, registering the one marked ``register`` as
        a new version of the model named ``study_name``. A failing store raises ``UserError``
        (one line)."""
        from autosplit.tracking_models import log_models

        def logged(student: StudentModel) -> None:
            metrics = {f"{student.name}/{k}": v for k, v in student.metrics.items()}
            self._log_batch(run_id, metrics=_metrics(metrics, 0))

        with self._talking(f"log the exported models of study {study_name!r}", strict=True):
            experiment = experiment_id(self.client, self.tracking_uri, study_name)
            run = self.client.create_run(
                experiment,
                run_name=f"export-{time.strftime('%Y%m%d-%H%M%S')}",
                tags={
                    ROLE_TAG: RunRole.EXPORT.value,
                    STUDY_TAG: study_name,
                    WORKER_TAG: _worker_id(),
                },
            )
            run_id, status = run.info.run_id, "FAILED"
            try:
                registered = log_models(
                    self.tracking_uri, run_id, study_name, students, logged=logged
                )
                status = "FINISHED"
            finally:
                self.client.set_terminated(run_id, status=status)
        return LoggedStudents(run_id, registered)

    def _log_batch(
        self,
        run_id: str,
        *,
        metrics: list[Any] | None = None,
        params: list[Any] | None = None,
        tags: list[Any] | None = None,
    ) -> None:
        """Waits until logged; MLflow's ``log_batch`` itself splits what its store accepts."""
        self.client.log_batch(
            run_id, metrics=metrics or [], params=params or [], tags=tags or [], synchronous=True
        )


def _metrics(values: Mapping[str, float | int | None], step: int) -> list[Any]:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, step)
        for key, value in sorted(values.items())
        if value is not None
    ]


def _clip(text: str) -> str:
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's param value limit


_UNLOGGED = "unlogged-"  # the prefix of a parent run id the store never received


def _reopened(uri: str, study_name: str, parent_run_id: str | None) -> MlflowTracker:
    if parent_run_id is None:  # sent before its search started: nothing to attach to
        return MlflowTracker(uri)
    return MlflowTracker.for_worker(uri, study_name=study_name, parent_run_id=parent_run_id)


def _worker_id() -> str:
    from autosplit.search.study import worker_id

    return worker_id()
