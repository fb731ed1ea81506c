"""The MLflow store: which one (``chosen_tracking_uri``), opening it, the study's experiment in
it, and telling its failures apart.

``tracking.py``'s tracker decides what a failure does (stop the command, or warn once and go
on); this module says what a failure is: a store that cannot be reached or read, in one line
that names the URI (``store_error``), or a full disk, which is the machine's fault and is given
back as the ``OSError`` it is (``store_failures``). Like ``tracking.py`` it imports MLflow lazily.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosplit.errors import UserError, redact_url

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("autosplit.tracking")  # one logger for tracking, whichever module

# Errors of the machine, not of the store: a full disk must be reported as such.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# HTTP stores: MLflow's default (7 retries with backoff, 120 s timeout) spends minutes on a
# dead server. Bounded here unless the user set them; see MLflow's environment_variables.py.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_ADVICE = " (check --tracking-uri, or pass --no-tracking)"
# What requests/urllib3 bury in a long "Max retries exceeded ..." text, said in a few words.
_NETWORK_CAUSES = (
    ("Connection refused", "connection refused: is the server running?"),
    ("timed out", "no answer in time"),
    ("Name or service not known", "unknown host"),
    ("Failed to resolve", "unknown host"),
    ("Temporary failure in name resolution", "unknown host"),
)


def chosen_tracking_uri(given: str | None, recorded: str | None, default: str) -> str:
    """``given`` (``--tracking-uri``), else the store the study's search recorded (one MLflow
    store per study, whichever host asks), else ``default``. A given URI other than the
    recorded one is used, with one warning: its runs will not be beside the study's others."""
    if given is None:
        return recorded or default
    if recorded is not None and given != recorded:
        print(
            f"autosplit: warning: --tracking-uri {redact_url(given)} differs from the study's "
            f"MLflow store {redact_url(recorded)}; drop --tracking-uri to use the study's",
            file=sys.stderr,
            flush=True,
        )
    return given


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def quiet_store(uri: str) -> None:
    """Bound an http(s) store's retries (unless the user set them), and let a failing store be
    reported once, by the tracker: not by urllib3's line per retry nor by MLflow's traceback of
    each SQLAlchemy error."""
    if is_http(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def probe_server(uri: str, timeout: float) -> None:
    """One request to an http(s) server with no retry (MLflow's client would retry for
    minutes); ``UserError`` when it does not answer."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    endpoint = "/api/2.0/mlflow/experiments/search"
    try:
        response = http_request(
            get_default_host_creds(uri),
            endpoint,
            "POST",
            json={"max_results": 1},
            max_retries=0,
            timeout=timeout,
        )
        verify_rest_response(response, endpoint)
    except Exception as exc:  # noqa: BLE001 - requests and MLflow raise many types
        raise store_error(uri, "reach the server", exc) from None


@contextlib.contextmanager
def sqlite_init_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store across local processes.

    MLflow creates and migrates the schema on first open; two workers doing that at once on a
    fresh file break each other's migrations (seen here with --workers 2). A file lock beside
    the database makes the second wait for the first. Servers need no lock.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db_path = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(db_path.with_name(db_path.name + ".lock")):  # waits as long as it takes
        yield


def experiment_id(client: MlflowClient, tracking_uri: str, study_name: str) -> str:
    """Get or create the study's experiment; another worker may be creating it right now."""
    experiment = client.get_experiment_by_name(study_name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":  # runs cannot be created in it otherwise
            log.warning("restoring deleted MLflow experiment %r", study_name)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            study_name,
            artifact_location=_artifact_location(tracking_uri, study_name),
            tags={
                "mlflow.note.content": f"autosplit study `{study_name}`: one parent run per "
                "`autosplit search` invocation, one child run per trial."
            },
        )
    except Exception:
        experiment = client.get_experiment_by_name(study_name)  # lost the race: fine
        if experiment is None:
            raise
        return experiment.experiment_id


def _artifact_location(tracking_uri: str, study_name: str) -> str | None:
    """For a SQLite store, beside the database (``<runs>/mlartifacts/<study>``), not MLflow's
    default ``./mlruns`` in whatever directory the user happened to be in."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a server decides where its artifacts live
    db_path = Path(tracking_uri.removeprefix("sqlite:///"))
    if not db_path.is_absolute():  # "sqlite:///rel.db" is relative; four slashes are absolute
        db_path = db_path.resolve()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", study_name)
    return (db_path.parent / "mlartifacts" / safe).as_uri()


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Any]:
    """Every run matching ``filter_string``, page by page."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


@contextlib.contextmanager
def store_failures(failed: Callable[[BaseException], None]) -> Iterator[None]:
    """Hand a failure of the store to ``failed`` (which raises, or returns to swallow it).

    A full disk is not a store failure: an ``OSError`` with errno ENOSPC, EDQUOT or EROFS, or
    SQLite's own "database or disk is full", propagates as that ``OSError``. Errors of neither
    MLflow nor the libraries it talks through (SQLAlchemy, requests) are bugs and propagate.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise
        failed(exc)
    except MlflowException as exc:
        full = _disk_full(exc)
        if full is not None:
            raise full from exc
        failed(exc)
    except Exception as exc:  # SQLAlchemy / requests errors not wrapped by MLflow
        if type(exc).__module__.split(".")[0] not in ("sqlalchemy", "requests", "urllib3"):
            raise
        full = _disk_full(exc)
        if full is not None:
            raise full from exc
        failed(exc)


def store_error(uri: str, what: str, exc: BaseException) -> UserError:
    """One line: the store (its URI without credentials), what could not be done, the cause."""
    shown = redact_url(uri)
    text = str(exc)
    first = next((short for needle, short in _NETWORK_CAUSES if needle in text), None)
    if first is None:
        first = (text.strip().splitlines() or [type(exc).__name__])[0].replace(uri, shown)
    return UserError(f"MLflow tracking at {shown}: could not {what}: {first[:300]}{_ADVICE}")


def failure_cause(error: UserError) -> str:
    """The cause ``store_error`` put in ``error``, without the URI and the advice."""
    return str(error).split(": could not ", 1)[-1].removesuffix(_ADVICE)


def _disk_full(exc: BaseException) -> OSError | None:
    """SQLite reports a full disk as its own error ("database or disk is full"), which MLflow
    wraps; give it back as the OSError it is, so that it is not blamed on the store."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            return seen
        if "database or disk is full" in str(seen):
            return OSError(errno.ENOSPC, f"disk full while writing the MLflow store ({seen})")
        seen = seen.__cause__ or seen.__context__
    return None
