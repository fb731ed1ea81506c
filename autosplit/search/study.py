"""Optuna plumbing: storages, samplers, the study and the records the rest of autosplit reads.

Storage URLs: ``sqlite:///…`` (default, under ``runs/``), ``postgresql://…`` (many workers on
many machines), or a journal file (``journal:PATH`` or a path ending in ``.log``; what
``--workers N`` uses on one machine). RDB storages run Optuna's heartbeat, so a trial left
RUNNING by a killed worker is failed and retried; journal files have no heartbeat, so trials
there carry their worker's host and pid and dead local workers' trials are failed at start-up.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autosplit.errors import UserError
from autosplit.search.front import TrialRecord

log = logging.getLogger(__name__)

# A worker that misses heartbeats for GRACE seconds is taken for dead; its trial is failed and
# re-queued. Environment overrides exist for tests that kill workers on purpose.
HEARTBEAT_SECONDS = int(os.environ.get("AUTOSPLIT_HEARTBEAT_SECONDS", "20"))
GRACE_SECONDS = int(os.environ.get("AUTOSPLIT_GRACE_SECONDS", "60"))
MAX_RETRY = 2
WORKER_ATTR = "autosplit.worker"
# What a re-run of a dead worker's trial keeps: what the trial *is* (a baseline, a final-stage
# job for a member and seed), not what it had measured.
RETRY_ATTRS = ("autosplit.baseline", "autosplit.stage", "autosplit.member", "autosplit.seed")


def default_storage(runs_dir: str | Path, workers: int) -> str:
    runs = Path(runs_dir).resolve()
    if workers > 1:
        return f"journal:{runs / 'optuna-journal.log'}"
    return f"sqlite:///{runs / 'optuna.db'}"


def open_storage(url: str, *, write: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; one clear line when it cannot be reached, or (to
    ``write``) when its file is on a read-only, full or unwritable place: Optuna itself would
    only fail at the first write, blaming "invalid data ... exceeding max length"."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    from autosplit.paths import check_output_file, check_sqlite_url

    if url.startswith("journal:") or url.endswith(".log"):
        path = Path(url.removeprefix("journal:"))
        if write:
            check_output_file(path, "--storage")
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        check_sqlite_url(url, "--storage", write=write)
        if write:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                # The heartbeat is marked experimental in Optuna 5; it is the supported way to
                # fail and retry trials of killed workers on RDB storages.
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY),
                    engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True})
        except Exception as exc:  # noqa: BLE001 - drivers raise many types; one line for the user
            text = str(exc)
            # Workers started together on an empty database race to create Optuna's tables;
            # the loser sees a duplicate and simply opens what the winner made.
            if attempt < 5 and ("duplicate key" in text or "already exists" in text):
                time.sleep(0.5 + random.random())
                continue
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise UserError(f"--storage {_redact(url)}: cannot open ({first[:200]}); check the "
                            "URL, that the server runs and the driver is installed") from None
    raise AssertionError("unreachable")


def make_sampler(name: str, seed: int | None, *, n_startup: int = 8) -> optuna.samplers.BaseSampler:
    """Constraints come from ``Trial.set_constraint``; Optuna 5 samplers read them directly."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True,
                                          constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"--sampler {name!r}: expected tpe, nsga2 or random")


def open_study(name: str, storage: optuna.storages.BaseStorage, *,
               sampler: optuna.samplers.BaseSampler | None = None, create: bool) -> optuna.Study:
    if create:
        return create_or_load(name, storage, sampler=sampler)[0]
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserError(f"--study-name {name!r}: no such study in this storage; known: "
                        f"{', '.join(known) or '(none)'}") from None


def create_or_load(name: str, storage: optuna.storages.BaseStorage, *,
                   sampler: optuna.samplers.BaseSampler | None = None) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it. The storage's unique study name makes
    exactly one of several workers started together the creator (who enqueues the baselines)."""
    from optuna.exceptions import DuplicatedStudyError

    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                    directions=["maximize", "minimize"], load_if_exists=False)
        return study, True
    except DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_local_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker process on this host is gone, and re-queue each with
    its parameters (``autosplit.retry_of`` names the failed trial)."""
    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            # Re-run the same parameters, as Optuna's RetryFailedTrialCallback does for RDB.
            study.enqueue_trial(trial.params, user_attrs={
                **{k: v for k, v in trial.user_attrs.items() if k in RETRY_ATTRS},
                "autosplit.retry_of": trial.number})
            failed += 1
    if failed:
        log.warning("failed and re-queued %d trial(s) left RUNNING by dead workers", failed)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_of(trial: FrozenTrial) -> TrialRecord:
    attrs = trial.user_attrs
    state = attrs.get("autosplit.state") or {
        TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
        TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[trial.state]
    if trial.state == TrialState.FAIL:
        state = "failed"
    return TrialRecord(number=trial.number, state=state, val_acc=attrs.get("autosplit.val_acc"),
                       flops=attrs.get("autosplit.flops"),
                       expected_flops=attrs.get("autosplit.expected_flops"),
                       params=attrs.get("autosplit.params"), label=attrs.get("autosplit.label", ""),
                       run_id=attrs.get("autosplit.run_id"),
                       baseline=attrs.get("autosplit.baseline"),
                       stage=attrs.get("autosplit.stage", "search"),
                       rung_accs=tuple(float(r["val_acc"])
                                       for r in attrs.get("autosplit.rungs") or []),
                       member=attrs.get("autosplit.member"), seed=attrs.get("autosplit.seed"))


def records(study: optuna.Study) -> list[TrialRecord]:
    return [record_of(t) for t in study.get_trials(deepcopy=False)]


def study_info(study: optuna.Study) -> dict[str, Any]:
    """What the search stored about itself (budget, teacher, data) for front/export."""
    attrs = study.user_attrs
    if "autosplit.budget_flops" not in attrs:
        raise UserError(f"study {study.study_name!r} was not made by autosplit search")
    return attrs


def _redact(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
