"""What autosplit stores on Optuna trials and studies, and the MLflow tags and trial metrics
made from it: one typed schema, written and read through this module only.

Each field is an Optuna user attr named ``autosplit.<field>`` holding a JSON value. These are the
keys every earlier version stored, so an existing study reads the same. A field a trial has not
stored reads ``None``. A key this version does not know (another tool's, a newer autosplit's)
is ignored. A misspelt field is an error, never a silent ``None``: ``TrialAttrs(stgae="final")``
raises TypeError and ``attrs.stgae`` raises AttributeError.

Writing stores the fields that are set (not ``None``) and leaves the others as they are, so
``TrialAttrs(state=State.SKIPPED).write(trial)`` sets one field of a live trial.

The values a trial's state, stage and role take, and an MLflow run's role, are the enums
``State``, ``Stage``, ``Role`` and ``RunRole``: ``StrEnum`` members equal the strings stored,
and are stored as those plain strings, so the stored format is the one earlier versions wrote.

Pure: no Optuna import, so ``autosplit.tracking`` may take the tag names from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, Self

PREFIX = "autosplit."


class State(StrEnum):
    """How a trial ended: ``TrialAttrs.state``, the state tag (``STATE_TAG``) of its MLflow run
    and a ``TrialRecord``'s state. Named ``State``, not ``TrialState``, beside Optuna's."""

    # Stored on trials (``TrialAttrs.state``).
    COMPLETE = "complete"  # search: reached the top rung; final: trained
    STOPPED = "stopped"  # search: successive halving stopped it below the top rung
    INFEASIBLE = "infeasible"  # over the FLOPs budget: never trained
    SKIPPED = "skipped"  # not run: no time left for it (or no final job left for a worker)
    FAILED = "failed"  # its own training raised (e.g. diverged): not re-run
    OUT_OF_MEMORY = "out_of_memory"  # its device could not hold it: not re-run
    DUPLICATE = "duplicate"  # a final job another worker already ran
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM or its environment (a full disk): re-run
    # Never stored on a trial: end states of a trial's MLflow run (``Tracker.end_trial``: also
    # COMPLETE, INFEASIBLE, FAILED), and what a record says of a trial that stored no state,
    # from its Optuna state (also COMPLETE, FAILED).
    PRUNED = "pruned"  # run: stopped below the top rung, or skipped; record: Optuna's PRUNED
    KILLED = "killed"  # run: its process was stopped mid-trial
    RUNNING = "running"
    WAITING = "waiting"


class Stage(StrEnum):
    """What a trial is part of (``TrialAttrs.stage``; a trial that stored none is ``SEARCH``)."""

    SEARCH = "search"  # a search trial, climbing the rungs
    FINAL = "final"  # a final-stage job: one member retrained at the final fidelity, one seed


class Role(StrEnum):
    """What a final-stage job is for (``TrialAttrs.role``)."""

    BEST = "best"  # the search's best member
    BASELINE = "baseline"  # a baseline: with BEST, the comparison trained at every seed first
    EXTRA = "extra"  # another finalist


class RunRole(StrEnum):
    """What an MLflow run autosplit starts is (its ``ROLE_TAG``)."""

    SEARCH = "search"  # a search's parent run
    TRIAL = "trial"  # a trial's run, under the parent
    EXPORT = "export"  # an ``autosplit export``'s run (its students' models)


class _Holder(Protocol):
    """An Optuna trial (live or frozen) or study."""

    @property
    def user_attrs(self) -> dict[str, Any]: ...
    def set_user_attr(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True, slots=True, repr=False)
class _Attrs:
    """Field ``name`` is stored under the key ``PREFIX + name``."""

    @classmethod
    def key(cls, name: str) -> str:
        """The stored key of field ``name``."""
        if name not in _names(cls):
            raise AttributeError(f"{cls.__name__} has no field {name!r}")
        return PREFIX + name

    @classmethod
    def read(cls, source: _Holder | Mapping[str, Any]) -> Self:
        """The fields stored on a trial or study (or in its ``user_attrs``)."""
        stored = source if isinstance(source, Mapping) else source.user_attrs
        return cls(**{n: stored[PREFIX + n] for n in _names(cls) if PREFIX + n in stored})

    def as_dict(self) -> dict[str, Any]:
        """The set fields, by name."""
        return {n: v for n in _names(type(self)) if (v := getattr(self, n)) is not None}

    def user_attrs(self) -> dict[str, Any]:
        """The set fields as stored, by key (for ``study.enqueue_trial(user_attrs=…)``); an
        enum's value as its plain string, as every storage (in-memory too) then holds it."""
        return {PREFIX + n: _plain(v) for n, v in self.as_dict().items()}

    def write(self, target: _Holder) -> None:
        """Store the set fields on ``target``; the others keep what it holds."""
        for key, value in self.user_attrs().items():
            target.set_user_attr(key, value)

    def __repr__(self) -> str:  # the set fields only: most are None on most trials
        fields = ", ".join(f"{n}={v!r}" for n, v in self.as_dict().items())
        return f"{type(self).__name__}({fields})"


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, StrEnum) else value


@dataclass(frozen=True, slots=True, repr=False)
class TrialAttrs(_Attrs):
    """What one trial stores. Fields are written in this order by one ``write``."""

    worker: str | None = None  # host:pid of the worker process running it (``worker_id``)
    device: str | None = None  # the device it trained on: cpu, cuda:1
    teacher_sha256: str | None = None  # the checkpoint of the teacher it was distilled from
    # What the trial is; a re-run of an interrupted trial keeps these (``study.RETRY_FIELDS``).
    stage: str | None = None  # a ``Stage``: "search", or "final" for a final-stage job
    baseline: str | None = None  # the baseline's name ("kd-single", …) for a baseline trial
    member: int | None = None  # final: the search trial this job retrains
    seed: int | None = None  # final: the seed index (it trains at the member's seed + this)
    # final: a ``Role``: "best" (the search's best member) or "baseline" — the comparison,
    # trained for every seed before any "extra" member — or "extra" (another finalist).
    role: str | None = None
    retry_of: int | None = None  # the interrupted trial this one re-runs
    sampler_seed: int | None = None  # the sampler's seed for this trial (``--seed`` given)
    portfolio: str | None = None  # the method recipe ("rkd", …) a warm-start trial trains
    precision: str | None = None  # what it trained in: fp32, bf16 or fp16 (``Runtime``)
    # What it measured, and how it ended.
    # a ``State``: complete, stopped, infeasible, skipped, failed, out_of_memory, duplicate,
    # interrupted
    state: str | None = None
    error: str | None = None  # the first 500 characters of what stopped it
    label: str | None = None  # short description, e.g. "res_chain K=2 + dkd"
    flops: int | None = None  # worst case
    # (flops - budget) / budget, <= 0 when it fits: the trial's Optuna constraint, also stored
    # here because optuna-dashboard (0.21) shows user attrs but not Optuna 5's constraints.
    flops_over_budget: float | None = None
    params: int | None = None  # parameters of the deployed modules
    run_id: str | None = None  # its MLflow run ("" when tracking is off)
    candidate: dict[str, Any] | None = None  # the pinned candidate (``Candidate.to_dict``)
    rungs: list[dict[str, Any]] | None = None  # search: epochs, rows, val_acc, … per rung
    rung: int | None = None  # search: the last rung reached
    val_acc: float | None = None  # percent, 0-100
    expected_flops: float | None = None
    weights: str | None = None  # the trained student's checkpoint
    # The same, published for other hosts (MLflow artifact of its run) on a shared study.
    weights_uri: str | None = None
    train_seconds: float | None = None
    # Training cost of the trained result: images seen over every stage, x the student's
    # forward FLOPs; ``train_cost`` is that over what one joint run of ``train.epochs`` sees
    # (1.0 joint; K+1 for a chain whose K+1 stages each train the full schedule).
    train_images: int | None = None
    train_flops: float | None = None
    train_cost: float | None = None
    # final: the job's planned seconds by part (``job_cost.JobEstimate.as_dict``: train,
    # prepare, cache, total) and what it took (same parts; total = cache build + training).
    estimate_s: dict[str, Any] | None = None
    actual_s: dict[str, Any] | None = None

    def run_tags(self) -> dict[str, str]:
        """The tags of the trial's MLflow run: what the trial is, under the same keys."""
        tags = {
            self.key("label"): self.label or "",
            self.key("baseline"): self.baseline or "",
            self.key("stage"): str(self.stage or Stage.SEARCH),
        }
        for name in ("member", "seed"):
            if (value := getattr(self, name)) is not None:
                tags[self.key(name)] = str(value)
        return tags


@dataclass(frozen=True, slots=True, repr=False)
class StudyAttrs(_Attrs):
    """What a search stores about itself on its study, for front, export and sync."""

    # A study is for one budget, teacher and data: a search with others is refused.
    budget_flops: int | None = None
    teacher_key: str | None = None
    data_fingerprint: str | None = None
    budget: str | None = None  # as given: "0.25x", "2M"
    teacher_flops: int | None = None
    teacher_test_acc: float | None = None
    teacher_val_acc: float | None = None
    space: str | None = None  # the space's YAML file
    space_yaml: str | None = None  # and its text
    teacher_path: str | None = None  # the teacher's checkpoint
    objective_flops: str | None = None  # "worst_case" or "expected"
    baselines_enqueued: bool | None = None
    final_members: list[int] | None = None  # the search trials of the latest final stage
    # The MLflow store the search logged to: export, sync and front on any host default to it.
    tracking_uri: str | None = None
    # The one teacher every host of the study uses (see ``search/shared_teacher.py``): who
    # claimed its training (host:pid), the SHA-256 of its weights, and where it is published.
    teacher_claim: str | None = None
    teacher_sha256: str | None = None
    teacher_uri: str | None = None

    @property
    def cost(self) -> str:
        """The FLOPs figure the search optimises, hence the one its front, hypervolume and
        export rank by: "expected_flops" or "flops" (worst case)."""
        return "expected_flops" if self.objective_flops == "expected" else "flops"

    def write(self, target: _Holder) -> None:
        """Store the set fields that differ from what the study holds (every worker of a
        search describes the study at its start; most find it described)."""
        stored = target.user_attrs
        for key, value in self.user_attrs().items():
            if stored.get(key) != value:
                target.set_user_attr(key, value)


# The MLflow param of a trial's run (beside the candidate's) and of the search's parent run
# holding the precision trials train in (``Runtime.precision``).
PRECISION_PARAM = "runtime.precision"

# The tags of MLflow runs besides ``TrialAttrs.run_tags``.
ROLE_TAG = PREFIX + "role"  # a ``RunRole``: "search" (a parent run), "trial" or "export"
STUDY_TAG = PREFIX + "study"  # a parent run's study
SYNCED_TAG = PREFIX + "synced"  # "true" on a run ``autosplit sync`` logged
WORKER_TAG = TrialAttrs.key("worker")  # host:pid of the process that started the run
# A ``State``, set by end_trial: a run without it never finished logging.
STATE_TAG = TrialAttrs.key("state")
# The search trial's number, on the trial's run (what ``autosplit sync`` matches runs on) and on
# an exported student's MLflow model. Not under PREFIX: every trial run of every earlier version
# carries this key, and sync reads it back.
TRIAL_TAG = "optuna.trial_number"
# The tags of an exported student's MLflow model (besides TRIAL_TAG, STUDY_TAG and the label's).
BEST_TAG = PREFIX + "best"  # "true" for best.yaml's student
EXIT_THRESHOLD_TAG = PREFIX + "exit_threshold"  # its gate's threshold ("None": no gate)


@dataclass(frozen=True, slots=True, repr=False)
class TrialMetrics:
    """The metrics a trial's MLflow run ends with, named in ``METRIC_NAMES`` only: the driver
    logs them when a trial ends and ``autosplit sync`` logs the same names from the study."""

    val_acc: float | None = None  # percent, 0-100
    flops: float | None = None  # worst case
    expected_flops: float | None = None
    params: float | None = None
    rung: int | None = None  # search: the last rung reached
    wall_seconds: float | None = None
    train_seconds: float | None = None
    train_images: int | None = None
    train_flops: float | None = None
    train_cost: float | None = None
    trial_number: int | None = None
    overhead_seconds: float | None = None
    # Planned and measured seconds of the job (whole, and a final job's parts).
    estimate_seconds: float | None = None
    actual_seconds: float | None = None
    estimate_cache_seconds: float | None = None
    estimate_prepare_seconds: float | None = None
    estimate_overhead_seconds: float | None = None
    actual_cache_seconds: float | None = None
    actual_prepare_seconds: float | None = None
    actual_overhead_seconds: float | None = None

    @staticmethod
    def name(field: str) -> str:
        """The MLflow metric name of ``field``."""
        return METRIC_NAMES[field]

    def logged(self) -> dict[str, float]:
        """The set fields, as MLflow metrics: name -> float."""
        return {
            METRIC_NAMES[f.name]: float(value)
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) is not None
        }


METRIC_NAMES = {
    "val_acc": "val/acc",
    "flops": "flops/worst_case",
    "expected_flops": "flops/expected",
    "params": "params",
    "rung": "search/rung",
    "wall_seconds": "time/wall_s",
    "train_seconds": "time/train_s",
    "train_images": "train/images_seen",
    "train_flops": "train/flops",
    "train_cost": "train/cost_x",
    "trial_number": "optuna/trial_number",
    "overhead_seconds": "time/overhead_s",
    "estimate_seconds": "time/estimate_s",
    "actual_seconds": "time/actual_s",
    "estimate_cache_seconds": "time/estimate_cache_s",
    "estimate_prepare_seconds": "time/estimate_prepare_s",
    "estimate_overhead_seconds": "time/estimate_overhead_s",
    "actual_cache_seconds": "time/actual_cache_s",
    "actual_prepare_seconds": "time/actual_prepare_s",
    "actual_overhead_seconds": "time/actual_overhead_s",
}
