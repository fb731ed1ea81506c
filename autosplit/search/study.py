"""Optuna plumbing: storages, samplers, the study and the records the rest of autosplit reads.

Storage URLs: ``sqlite:///…`` (default, under ``runs/``), ``postgresql://…`` (many workers on
many machines), or a journal file (``journal:PATH`` or a path ending in ``.log``; what
``--workers N`` uses on one machine). RDB storages run Optuna's heartbeat, so a trial left
RUNNING by a killed worker is failed and retried; journal files have no heartbeat, so trials
there carry their worker's host and pid and dead local workers' trials are failed at start-up.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autosplit.errors import UserError, redact_url
from autosplit.search.attrs import Stage, State, StudyAttrs, TrialAttrs
from autosplit.search.front import TrialRecord

if TYPE_CHECKING:
    from autosplit.search.context import SearchContext
    from autosplit.search.setup import SearchOptions
    from autosplit.search.space import SearchSpace

log = logging.getLogger(__name__)

# A worker that misses heartbeats for GRACE seconds is taken for dead; its trial is failed and
# re-queued. Environment overrides exist for tests that kill workers on purpose.
HEARTBEAT_SECONDS = int(os.environ.get("AUTOSPLIT_HEARTBEAT_SECONDS", "20"))
GRACE_SECONDS = int(os.environ.get("AUTOSPLIT_GRACE_SECONDS", "60"))
MAX_RETRY = 2
WORKER_ATTR = TrialAttrs.key("worker")  # the stored key, for code that writes the storage
# What a re-run of a dead worker's trial keeps: what the trial *is* (a baseline, a final-stage
# job for a member and seed), not what it had measured.
RETRY_FIELDS = ("baseline", "portfolio", "stage", "member", "seed", "role")
# The objectives, in order, and the names optuna-dashboard and ``trials_dataframe`` show them
# under: validation accuracy (percent) and FLOPs (worst case or expected, as the study's
# ``objective_flops`` attr says).
DIRECTIONS = ("maximize", "minimize")
METRIC_NAMES = ("val_acc", "flops")


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
                    url,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY
                    ),
                    engine_kwargs=None if url.startswith("sqlite") else {"pool_pre_ping": True},
                )
        except Exception as exc:  # noqa: BLE001 - drivers raise many types; one line for the user
            text = str(exc)
            # Workers started together on an empty database race to create Optuna's tables;
            # the loser sees a duplicate and simply opens what the winner made.
            if attempt < 5 and ("duplicate key" in text or "already exists" in text):
                time.sleep(0.5 + random.random())
                continue
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise UserError(
                f"--storage {redact_url(url)}: cannot open ({first[:200]}); check the "
                "URL, that the server runs and the driver is installed"
            ) from None
    raise AssertionError("unreachable")


SAMPLERS = ("tpe", "nsga2", "random")


def make_sampler(name: str, seed: int | None, *, n_startup: int = 8) -> optuna.samplers.BaseSampler:
    """Constraints come from ``Trial.set_constraint``; Optuna 5 samplers read them directly.

    With a seed, each trial draws from its own seed, derived from ``seed`` and the trial's
    number (see ``TrialSeededSampler``): workers and invocations sharing a study never repeat
    each other's draws, and a fresh study with the same seed repeats its own.
    """
    if name not in SAMPLERS:
        raise UserError(f"--sampler {name!r}: expected tpe, nsga2 or random")

    def build(trial_seed: int | None) -> optuna.samplers.BaseSampler:
        if name == "tpe":
            return optuna.samplers.TPESampler(
                seed=trial_seed, n_startup_trials=n_startup, multivariate=True, constant_liar=True
            )
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=trial_seed, population_size=max(4, n_startup))
        return optuna.samplers.RandomSampler(seed=trial_seed)

    return build(None) if seed is None else TrialSeededSampler(build, seed)


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number`` in a search run with ``--seed seed``."""
    return (seed * 1_000_003 + number) % 2**32


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler re-made for every trial with ``trial_seed(seed, trial.number)``.

    A sampler seeded once per process repeats its random draws in every process that uses the
    same seed: two invocations on one study (concurrent, or one resumed) trained identical
    candidates. Trial numbers are unique within a study, whichever worker gets them, so seeding
    by number gives each trial its own draw. The samplers keep nothing per instance that a
    fresh one cannot rebuild from the study's trials.
    """

    def __init__(self, build: Any, seed: int) -> None:
        self._build, self.seed = build, seed
        self._inner = build(seed)

    def seed_for(self, number: int) -> int:
        return trial_seed(self.seed, number)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._build(self.seed_for(trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def open_study(
    name: str,
    storage: optuna.storages.BaseStorage,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    create: bool,
) -> optuna.Study:
    if create:
        return create_or_load(name, storage, sampler=sampler)[0]
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise UserError(
            f"--study-name {name!r}: no such study in this storage; known: "
            f"{', '.join(known) or '(none)'}"
        ) from None


def create_or_load(
    name: str,
    storage: optuna.storages.BaseStorage,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> tuple[optuna.Study, bool]:
    """The study, and whether this call created it. The storage's unique study name makes
    exactly one of several workers started together the creator (who enqueues the baselines)."""
    from optuna.exceptions import DuplicatedStudyError

    try:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=sampler,
            directions=list(DIRECTIONS),
            load_if_exists=False,
        )
        created = True
    except DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
    name_objectives(study)
    return study, created


def name_objectives(study: optuna.Study) -> None:
    """Name the objectives (``METRIC_NAMES``), once: a study made before they were named gets
    them when a search resumes it; names already stored (ours, or a user's) are kept.

    Workers started together may all find none and write the same value: RDB storages ignore
    the duplicate insert of a study system attr, a journal replays the same value twice."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    if study.metric_names is not None or len(study.directions) != len(METRIC_NAMES):
        return  # named already, or not a study autosplit made: leave it as it is
    with warnings.catch_warnings():
        # Experimental since Optuna 3.2, still in 5; it is what the dashboard and
        # ``trials_dataframe`` read.
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names(list(METRIC_NAMES))


# Tests run several "hosts" on one machine: this names the host instead of its hostname.
HOST_ENV = "AUTOSPLIT_HOST"


def host_name() -> str:
    return os.environ.get(HOST_ENV) or socket.gethostname()


def worker_id() -> str:
    return f"{host_name()}:{os.getpid()}"


def fail_dead_local_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker process on this host is gone, and re-queue them (see
    ``requeue_interrupted``). Returns how many were failed."""
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if dead_here(TrialAttrs.read(trial).worker or ""):
            study.tell(trial.number, state=TrialState.FAIL)
            failed += 1
    if failed:
        log.warning("failed %d trial(s) left RUNNING by dead workers", failed)
    requeue_interrupted(study)
    return failed


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Re-queue every FAIL trial that was interrupted or whose worker died, once, with its
    parameters and what it *is* (``RETRY_FIELDS``); ``TrialAttrs.retry_of`` names the trial
    it repeats. A chain of retries stops after ``MAX_RETRY``. Returns the re-queued numbers.

    Interrupted: stopped by Ctrl-C, SIGTERM or its environment (a full disk), through no fault
    of its candidate; a FAIL trial without a state died with its worker. A ``State.FAILED``
    trial (its own training raised, e.g. diverged) is not re-run: it would fail again."""
    trials = study.get_trials(deepcopy=False)
    retried = {TrialAttrs.read(t).retry_of for t in trials}
    # RDB storages' heartbeat re-queues stale trials itself; its copies name their originals.
    retried |= {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    by_number = {t.number: t for t in trials}
    out = []
    for trial in trials:
        if (
            trial.state != TrialState.FAIL
            or trial.number in retried
            or TrialAttrs.read(trial).state not in (None, State.INTERRUPTED)
            or _retry_depth(trial, by_number) >= MAX_RETRY
        ):
            continue
        # An enqueued trial (a portfolio recipe) interrupted before it drew keeps its values.
        params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
        _enqueue_copy(study, trial, params, retry_of=trial.number)
        out.append(trial.number)
    if out:
        log.warning(
            "re-queued %d interrupted trial(s) with their parameters: %s",
            len(out),
            ", ".join(map(str, out)),
        )
    return out


def give_back(trial: optuna.Trial) -> bool:
    """Put an enqueued trial (a baseline, a portfolio recipe, a re-run) that will not run now
    back in the queue, behind what waits: a copy with its fixed parameters and what it *is*
    (``RETRY_FIELDS``), for this study's next search phase. Returns False for a trial the
    sampler drew (nothing was queued for it)."""
    study = trial.study
    frozen = next(
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.number == trial.number
    )
    fixed = frozen.system_attrs.get("fixed_params")
    if fixed is None:
        return False
    _enqueue_copy(study, frozen, dict(fixed), retry_of=TrialAttrs.read(frozen).retry_of)
    return True


def _enqueue_copy(
    study: optuna.Study, trial: FrozenTrial, params: dict[str, Any], *, retry_of: int | None
) -> None:
    """Queue ``trial`` again with ``params`` and what it *is* (``RETRY_FIELDS``)."""
    kept = TrialAttrs.read(trial)
    copy = TrialAttrs(**{k: getattr(kept, k) for k in RETRY_FIELDS}, retry_of=retry_of)
    study.enqueue_trial(params, user_attrs=copy.user_attrs())


def _retry_depth(trial: FrozenTrial, by_number: dict[int, FrozenTrial]) -> int:
    depth = 0
    while (parent := TrialAttrs.read(trial).retry_of) is not None and parent in by_number:
        depth, trial = depth + 1, by_number[parent]
    return depth


def dead_here(owner: str) -> bool:
    """Whether ``owner`` (a ``worker_id()``) is a process of this host that is gone."""
    host, _, pid = owner.rpartition(":")
    return host == host_name() and pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_of(trial: FrozenTrial) -> TrialRecord:
    attrs = TrialAttrs.read(trial)
    state = (
        attrs.state
        or {
            TrialState.COMPLETE: State.COMPLETE,
            TrialState.PRUNED: State.PRUNED,
            TrialState.FAIL: State.FAILED,
            TrialState.RUNNING: State.RUNNING,
            TrialState.WAITING: State.WAITING,
        }[trial.state]
    )
    if trial.state == TrialState.FAIL:
        state = State.FAILED
    return TrialRecord(
        number=trial.number,
        state=state,
        val_acc=attrs.val_acc,
        flops=attrs.flops,
        expected_flops=attrs.expected_flops,
        params=attrs.params,
        label=attrs.label if attrs.label is not None else "",
        run_id=attrs.run_id,
        baseline=attrs.baseline,
        stage=attrs.stage if attrs.stage is not None else Stage.SEARCH,
        rung_accs=tuple(float(r["val_acc"]) for r in attrs.rungs or []),
        member=attrs.member,
        seed=attrs.seed,
        train_cost=attrs.train_cost,
    )


def records(study: optuna.Study) -> list[TrialRecord]:
    return [record_of(t) for t in study.get_trials(deepcopy=False)]


def study_info(study: optuna.Study) -> StudyAttrs:
    """What the search stored about itself (budget, teacher, data) for front/export."""
    info = StudyAttrs.read(study)
    if info.budget_flops is None:
        raise UserError(f"study {study.study_name!r} was not made by autosplit search")
    return info


def open_existing(
    study_name: str, storage: str | None, runs_dir: str | Path
) -> tuple[optuna.Study, str]:
    """The study ``front``, ``export`` and ``sync`` read, and its storage URL: ``storage``, else
    the runs dir's SQLite file, else its journal file (a search with several local workers).
    Opened read-only: a study on a read-only disk is still shown and exported. Messages name
    the flag at fault (``--storage``, ``--runs-dir``)."""
    url = storage or default_storage(runs_dir, 1)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        journal = default_storage(runs_dir, 2)
        if storage is not None:
            raise UserError(
                f"--storage {url}: no such database file; check the path, or run "
                "`autosplit search` first"
            )
        if not Path(journal.removeprefix("journal:")).is_file():
            missing = "does not exist" if not Path(runs_dir).is_dir() else "holds no study"
            raise UserError(
                f"--runs-dir {runs_dir}: {missing} (no optuna.db there); run "
                "`autosplit search` first, or pass --runs-dir or --storage"
            )
        url = journal
    return open_study(study_name, open_storage(url, write=False), create=False), url


def recorded_tracking_uri(storage_url: str, study_name: str) -> str | None:
    """The tracking URI an earlier search of the study recorded; None for a new study (a
    storage file not made yet is not created here)."""
    path = storage_url.removeprefix("journal:").removeprefix("sqlite:///")
    if path != storage_url and not Path(path).is_file():
        return None
    if storage_url.endswith(".log") and not Path(storage_url).is_file():
        return None
    try:
        study = open_study(study_name, open_storage(storage_url, write=False), create=False)
    except UserError:
        return None  # no such study yet; an unreachable storage is reported by the search
    return StudyAttrs.read(study).tracking_uri


def final_fidelity(study: optuna.Study) -> str:
    """The final stage's fidelity as the front's heading says it ("4 epochs x all rows"), from
    its first final job; "" when the study has none."""
    for trial in study.get_trials(deepcopy=False):
        attrs = TrialAttrs.read(trial)
        if attrs.stage == Stage.FINAL and attrs.candidate is not None:
            train = attrs.candidate["train"]
            rows = train.get("max_train_samples") or "all"
            epochs = train["epochs"]
            return f"{epochs} epoch{'s' if epochs != 1 else ''} x {rows} rows"
    return ""


def open_for_search(
    study: optuna.Study, ctx: SearchContext, options: SearchOptions, *, created: bool
) -> int:
    """Ready ``study`` for this search: describe it (refused when it is another budget's,
    teacher's or data's), fail the trials this host's dead workers left RUNNING (they and any
    interrupted trial are re-queued with their parameters; RDB storages also have Optuna's
    heartbeat for other machines' workers), and, only where this process ``created`` it (never
    twice when workers start together), enqueue the baselines. Returns the search trials still
    to run."""
    describe_study(study, ctx, options)
    fail_dead_local_trials(study)
    if created:
        enqueue_baselines(study, options.space)
    return remaining_trials(study, options.trials)


def describe_study(study: optuna.Study, ctx: SearchContext, options: SearchOptions) -> None:
    """Store what front/export need on the study, refusing to mix budgets or teachers."""
    wanted = StudyAttrs(
        budget_flops=ctx.max_flops,
        teacher_key=ctx.teacher.key,
        data_fingerprint=ctx.splits.fingerprint,
    )
    stored = StudyAttrs.read(study)
    for name, value in wanted.as_dict().items():
        have = getattr(stored, name)
        if have is not None and have != value:
            raise UserError(
                f"--study-name {study.study_name}: this study was run with "
                f"{name}={have}, not {value}; use another --study-name"
            )
    dataclasses.replace(
        wanted,
        budget=options.budget.text,
        teacher_flops=ctx.teacher_flops,
        teacher_test_acc=ctx.teacher.test_acc,
        teacher_val_acc=ctx.teacher.val_acc,
        space=str(options.space.path.resolve()),
        space_yaml=options.space.path.read_text(),
        teacher_path=str(ctx.teacher.path),
        objective_flops=options.space.settings.objective_flops,
        # The first search's store stays the study's: a host logging elsewhere was warned.
        tracking_uri=stored.tracking_uri or options.tracking_uri,
    ).write(study)  # what differs from the stored values


def enqueue_baselines(study: optuna.Study, space: SearchSpace) -> None:
    """The baselines run first (once per study), so the front always shows what was beaten;
    then the portfolio, the methods' own recipes, so the sampler starts from them."""
    if StudyAttrs.read(study).baselines_enqueued:
        return
    for name in space.settings.baselines:
        # No parameters: a baseline's pinned values are not drawn (``SearchSpace.suggest``).
        study.enqueue_trial({}, user_attrs=TrialAttrs(baseline=name).user_attrs())
    for name in space.settings.portfolio:
        # The recipe's in-range values as the trial's parameters: TPE counts the finished
        # trial like a drawn one. The rest is pinned when it runs (``SearchSpace.overrides``).
        params, _pinned = space.portfolio_trial(name)
        study.enqueue_trial(params, user_attrs=TrialAttrs(portfolio=name).user_attrs())
    StudyAttrs(baselines_enqueued=True).write(study)


def is_search_trial(t: FrozenTrial) -> bool:
    return TrialAttrs.read(t).stage != Stage.FINAL


def remaining_trials(study: optuna.Study, total: int) -> int:
    """Search trials still to run: the total less those finished, stopped or running (a trial
    skipped for lack of time does not count)."""
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    done = 0
    for t in study.get_trials(deepcopy=False):
        attrs = TrialAttrs.read(t)
        done += attrs.stage != Stage.FINAL and attrs.state != State.SKIPPED and t.state in counted
    return max(0, total - done)
