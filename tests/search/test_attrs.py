"""The one schema of what trials and studies store: round trips through a real SQLite study,
studies written by earlier versions, unknown keys, misspelt fields, and no key string elsewhere.

The dict literals here are the stored format on purpose: a change to it fails these tests.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autosplit.search import study as studies
from autosplit.search.attrs import (
    TRIAL_TAG,
    Role,
    RunRole,
    Stage,
    State,
    StudyAttrs,
    TrialAttrs,
    TrialMetrics,
)
from autosplit.search.front import TrialRecord

# A search trial at its top rung, keys and values as the driver has always stored them.
OLD_TRIAL = {
    "autosplit.worker": "host:4242",
    "autosplit.stage": "search",
    "autosplit.baseline": "kd-single",
    "autosplit.sampler_seed": 17,
    "autosplit.label": "single + kd",
    "autosplit.flops": 1000,
    "autosplit.params": 5000,
    "autosplit.run_id": "0123abcd",
    "autosplit.rungs": [{"epochs": 1, "rows": 512, "val_acc": 40.0, "seconds": 1.5}],
    "autosplit.state": "complete",
    "autosplit.candidate": {"train": {"seed": 0, "epochs": 1}},
    "autosplit.rung": 0,
    "autosplit.val_acc": 40.0,
    "autosplit.expected_flops": 900.0,
    "autosplit.weights": "runs/studies/s/trial-0000/student.pt",
    "autosplit.train_seconds": 1.5,
}
OLD_STUDY = {
    "autosplit.budget_flops": 2000,
    "autosplit.teacher_key": "resnet8-abc",
    "autosplit.data_fingerprint": "f00d",
    "autosplit.budget": "0.5x",
    "autosplit.teacher_flops": 4000,
    "autosplit.teacher_test_acc": 90.0,
    "autosplit.teacher_val_acc": 91.0,
    "autosplit.space": "/spaces/tiny.yaml",
    "autosplit.space_yaml": "name: tiny\n",
    "autosplit.teacher_path": "runs/teachers/t.pt",
    "autosplit.objective_flops": "worst_case",
    "autosplit.baselines_enqueued": True,
    "autosplit.final_members": [0, 3],
}


def _sqlite_study(path: Path, *, create: bool) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    if create:
        return optuna.create_study(study_name="s", storage=storage, directions=["maximize"] * 2)
    return optuna.load_study(study_name="s", storage=storage)


def test_trial_and_study_attrs_round_trip_through_a_sqlite_study(tmp_path):
    study = _sqlite_study(tmp_path / "o.db", create=True)
    trial = study.ask()
    written = TrialAttrs.read(OLD_TRIAL)
    dataclasses.replace(written, run_id=None).write(trial)
    TrialAttrs(run_id="0123abcd").write(trial)  # one field, later: the others stay
    study.tell(trial, [40.0, 1000.0])
    StudyAttrs.read(OLD_STUDY).write(study)
    job = TrialAttrs(stage="final", member=trial.number, seed=1, baseline="kd-single")
    study.enqueue_trial({}, user_attrs=job.user_attrs())

    reopened = _sqlite_study(tmp_path / "o.db", create=False)  # a fresh connection
    done, waiting = reopened.get_trials()
    assert TrialAttrs.read(done) == written
    assert done.user_attrs == OLD_TRIAL  # the stored keys and values
    assert TrialAttrs.read(waiting) == job and waiting.state == TrialState.WAITING
    assert StudyAttrs.read(reopened) == StudyAttrs.read(OLD_STUDY)
    assert reopened.user_attrs == OLD_STUDY


def test_each_state_stage_and_role_stores_the_string_earlier_versions_stored():
    """Renaming a value would leave every existing study (and MLflow store) reading otherwise."""
    assert {m.name: m.value for m in State} == {
        "COMPLETE": "complete",
        "STOPPED": "stopped",
        "INFEASIBLE": "infeasible",
        "SKIPPED": "skipped",
        "FAILED": "failed",
        "OUT_OF_MEMORY": "out_of_memory",
        "DUPLICATE": "duplicate",
        "INTERRUPTED": "interrupted",
        "PRUNED": "pruned",
        "KILLED": "killed",
        "RUNNING": "running",
        "WAITING": "waiting",
    }
    assert {m.name: m.value for m in Stage} == {"SEARCH": "search", "FINAL": "final"}
    assert {m.name: m.value for m in Role} == {
        "BEST": "best",
        "BASELINE": "baseline",
        "EXTRA": "extra",
    }
    assert {m.name: m.value for m in RunRole} == {
        "SEARCH": "search",
        "TRIAL": "trial",
        "EXPORT": "export",
    }


@pytest.mark.parametrize("storage", ["sqlite", "memory"])
def test_an_enum_is_stored_as_its_plain_string(tmp_path, storage):
    url = f"sqlite:///{tmp_path / 'o.db'}" if storage == "sqlite" else None
    study = optuna.create_study(storage=url, directions=["maximize"] * 2)
    trial = study.ask()
    TrialAttrs(stage=Stage.FINAL, role=Role.BEST, state=State.COMPLETE).write(trial)
    study.tell(trial, [40.0, 1000.0])
    job = TrialAttrs(stage=Stage.FINAL, role=Role.EXTRA)
    study.enqueue_trial({}, user_attrs=job.user_attrs())
    if url is not None:  # a fresh connection
        study = optuna.load_study(study_name=study.study_name, storage=url)
    done, waiting = study.get_trials()
    stored = {**done.user_attrs, **{k + "/waiting": v for k, v in waiting.user_attrs.items()}}
    assert stored == {
        "autosplit.stage": "final",
        "autosplit.role": "best",
        "autosplit.state": "complete",
        "autosplit.stage/waiting": "final",
        "autosplit.role/waiting": "extra",
    }
    assert all(type(v) is str for v in stored.values())
    assert TrialAttrs(stage=Stage.FINAL).run_tags()[TrialAttrs.key("stage")].__class__ is str


def test_an_earlier_versions_attrs_read_as_before():
    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE, values=[40.0, 1000.0], user_attrs=OLD_TRIAL
    )
    attrs = TrialAttrs.read(trial)
    assert (attrs.stage, attrs.baseline, attrs.flops, attrs.val_acc) == (
        "search",
        "kd-single",
        1000,
        40.0,
    )
    assert attrs.user_attrs() == OLD_TRIAL  # rewriting it stores the same
    assert studies.record_of(trial) == TrialRecord(
        number=trial.number,
        state="complete",
        val_acc=40.0,
        flops=1000,
        expected_flops=900.0,
        params=5000,
        label="single + kd",
        run_id="0123abcd",
        baseline="kd-single",
        stage="search",
        rung_accs=(40.0,),
    )
    info = StudyAttrs.read(OLD_STUDY)
    assert (info.budget_flops, info.objective_flops, info.final_members) == (
        2000,
        "worst_case",
        [0, 3],
    )
    assert info.user_attrs() == OLD_STUDY


def test_a_trial_that_stored_nothing_reads_as_the_driver_expects():
    trial = optuna.trial.create_trial(state=TrialState.WAITING, user_attrs={})
    assert TrialAttrs.read(trial) == TrialAttrs()
    record = studies.record_of(trial)
    assert (record.state, record.stage, record.label) == ("waiting", "search", "")


def test_unknown_keys_are_ignored():
    stored = {
        "autosplit.stage": "final",
        "autosplit.val_curve": [1.0, 2.0],  # a key no version reads
        "autosplit.from_a_newer_version": {"x": 1},
        "someone.else": "theirs",
    }
    assert TrialAttrs.read(stored) == TrialAttrs(stage="final")
    assert StudyAttrs.read({**OLD_STUDY, "autosplit.new_thing": 1}) == StudyAttrs.read(OLD_STUDY)


def test_a_misspelt_field_is_an_error_not_none():
    with pytest.raises(TypeError, match="stgae"):
        TrialAttrs(stgae="final")  # type: ignore[call-arg]
    with pytest.raises(AttributeError, match="stgae"):
        TrialAttrs.read(OLD_TRIAL).stgae  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(AttributeError, match="stgae"):
        TrialAttrs.key("stgae")
    with pytest.raises(AttributeError):
        TrialAttrs().stage = "final"  # type: ignore[misc]  # frozen: one write path
    with pytest.raises(TypeError, match="budget_flop"):
        StudyAttrs(budget_flop=1)  # type: ignore[call-arg]


def test_the_run_tags_use_the_trial_keys():
    final = TrialAttrs(label="single + kd", stage="final", member=3, seed=7).run_tags()
    assert final == {
        "autosplit.label": "single + kd",
        "autosplit.baseline": "",
        "autosplit.stage": "final",
        "autosplit.member": "3",
        "autosplit.seed": "7",
    }
    assert TrialAttrs(label="x").run_tags()[TrialAttrs.key("stage")] == "search"


class _Holder:
    def __init__(self, user_attrs: dict) -> None:
        self.user_attrs, self.writes = dict(user_attrs), []

    def set_user_attr(self, key: str, value: object) -> None:
        self.writes.append(key)
        self.user_attrs[key] = value


def test_a_trial_run_ends_with_the_metrics_earlier_versions_logged():
    """The names stores already hold: ``mlflow ui`` columns and ``autosplit sync`` keep reading
    them. Every field has its own name, and unset fields are not logged."""
    every = TrialMetrics(**{f.name: 1 for f in dataclasses.fields(TrialMetrics)}).logged()
    assert every == dict.fromkeys(
        [
            "val/acc",
            "flops/worst_case",
            "flops/expected",
            "params",
            "search/rung",
            "time/wall_s",
            "time/train_s",
            "train/images_seen",
            "train/flops",
            "train/cost_x",
            "optuna/trial_number",
            "time/overhead_s",
            "time/estimate_s",
            "time/actual_s",
            "time/estimate_cache_s",
            "time/estimate_prepare_s",
            "time/estimate_overhead_s",
            "time/actual_cache_s",
            "time/actual_prepare_s",
            "time/actual_overhead_s",
        ],
        1.0,
    )
    assert TrialMetrics(trial_number=3).logged() == {"optuna/trial_number": 3.0}
    assert TrialMetrics.name("val_acc") == "val/acc"
    # Every trial run of every version carries it (sync matches on it); exported models too.
    assert TRIAL_TAG == "optuna.trial_number"


def test_a_study_write_stores_only_what_changed():
    study = _Holder(OLD_STUDY)
    dataclasses.replace(StudyAttrs.read(OLD_STUDY), budget="0.50x").write(study)
    assert study.writes == ["autosplit.budget"]
    trial = _Holder(OLD_TRIAL)
    TrialAttrs(state="complete", val_acc=40.0).write(trial)  # a trial's write always stores
    assert trial.writes == ["autosplit.state", "autosplit.val_acc"]


def test_no_key_string_outside_the_attrs_module():
    """Every key is written and read through ``autosplit.search.attrs``, in the tests too; the
    strings left are module names (``"autosplit.flops"``), which are no keys. This file alone
    spells the stored keys out, since it pins the stored format."""
    repo = Path(__file__).parents[2]
    package = repo / "autosplit"
    modules = {p.stem for p in package.iterdir()}
    # A quoted "autosplit." (a prefix), "autosplit.<name>" or f"autosplit.{…}", not a dotted path.
    key = re.compile(r"""["']autosplit\.(\w*)(?![\w.])""")
    found = []
    sources = [package, repo / "benchmarks", repo / "tests"]
    for path in [p for source in sources for p in source.rglob("*.py")]:
        if path in (package / "search" / "attrs.py", Path(__file__)):
            continue
        for match in key.finditer(path.read_text()):
            if match.group(1) not in modules:
                found.append(f"{path.relative_to(repo)}: {match.group(0)}")
    assert not found


def spelt_out_value() -> re.Pattern[str]:
    """A state, stage or role compared with or passed as a quoted string."""
    values = "|".join(member.value for enum in (State, Stage, Role, RunRole) for member in enum)
    return re.compile(
        rf"""\b(state|stage|role|phase|run_state)\s*(==|!=|=|not in|in)\s*[(\[{{]?\s*"""
        rf"""["']({values})["']"""
    )


def test_no_state_stage_or_role_literal_outside_the_attrs_module():
    """Trial states, stages and roles are named through the enums of ``autosplit.search.attrs``
    (``State``, ``Stage``, ``Role``, ``RunRole``), in the tests too: a comparison or keyword
    that spells one out (``state == "complete"``, ``stage="final"``) is found here. This file
    alone spells them out, since it pins the stored format."""
    repo = Path(__file__).parents[2]
    literal = spelt_out_value()
    found = []
    sources = [repo / "autosplit", repo / "benchmarks", repo / "scripts", repo / "tests"]
    for path in [p for source in sources for p in source.rglob("*.py")]:
        if path in (repo / "autosplit" / "search" / "attrs.py", Path(__file__)):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line):
                found.append(f"{path.relative_to(repo)}:{number}: {line.strip()}")
    assert not found


def test_the_literal_check_finds_a_spelt_out_state():
    """The check above is no empty pattern: it finds the forms it forbids."""
    literal = spelt_out_value()
    assert literal.search('if attrs.state == "complete":')
    assert literal.search('TrialAttrs(stage="final", seed=0)')
    assert literal.search('if other.role not in ("best", "baseline"):')
    assert not literal.search("if attrs.state == State.COMPLETE:")


def test_sync_logs_an_earlier_versions_trial_as_the_driver_did():
    from autosplit.search.sync import run_state, should_have_run, trial_metrics, trial_tags

    trial = optuna.trial.create_trial(
        state=TrialState.COMPLETE, values=[40.0, 1000.0], user_attrs=OLD_TRIAL
    )
    assert should_have_run(trial) and run_state(trial) == "complete"
    assert trial_tags(trial) == {
        "autosplit.label": "single + kd",
        "autosplit.baseline": "kd-single",
        "autosplit.stage": "search",
        "autosplit.synced": "true",
    }
    assert trial_metrics(trial) == {
        "val/acc": 40.0,
        "flops/worst_case": 1000.0,
        "flops/expected": 900.0,
        "params": 5000.0,
        "time/train_s": 1.5,
        "search/rung": 0.0,
        "optuna/trial_number": float(trial.number),
    }
