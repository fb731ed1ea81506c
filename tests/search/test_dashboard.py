"""The real optuna-dashboard, its WSGI app called in-process, on a SQLite study made and filled
by autosplit's own code: the objectives' names, the FLOPs constraint and the user attrs it shows.

No search runs (the teacher alone takes minutes here): the study is opened as ``search`` opens
it, candidates are drawn from a real space and each trial records its FLOPs through the
driver's ``set_over_budget``, as ``search_trial`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest

from autosplit.search import study as studies
from autosplit.search.attrs import Stage, State, StudyAttrs, TrialAttrs
from autosplit.search.space import SearchSpace
from autosplit.search.trial import OVER_BUDGET, set_over_budget

optuna_dashboard = pytest.importorskip(
    "optuna_dashboard", reason="optuna-dashboard is not installed: pip install -e '.[dashboard]'"
)

SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "digits_tiny.yaml"
BUDGET = 20_000
# (worst-case FLOPs, val_acc): two students that fit, one over budget (never trained).
TRIALS = ((12_000, 71.5), (18_000, 80.25), (30_000, None))


def make_study(url: str) -> optuna.Study:
    study, created = studies.create_or_load("dash", studies.open_storage(url))
    assert created
    StudyAttrs(budget_flops=BUDGET, budget="0.5x", objective_flops="worst_case").write(study)
    space = SearchSpace.from_yaml(SPACE)
    for flops, val_acc in TRIALS:
        trial = study.ask()
        candidate = space.suggest(trial, BUDGET)
        set_over_budget(trial, flops, BUDGET)
        state = State.INFEASIBLE if val_acc is None else State.COMPLETE
        TrialAttrs(stage=Stage.SEARCH, label=candidate.label, flops=flops, state=state).write(trial)
        if val_acc is not None:
            TrialAttrs(val_acc=val_acc).write(trial)
        study.tell(trial, [val_acc or 0.0, float(flops)])
    return study


def get(app, path: str) -> tuple[str, bytes]:
    """One GET through the WSGI interface, as a server would make it."""
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD="GET", PATH_INFO=path, QUERY_STRING="")
    statuses: list[str] = []
    body = b"".join(app(environ, lambda status, _headers, _exc=None: statuses.append(status)))
    return statuses[0], body


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell, not optimize
def test_the_dashboard_serves_the_study_with_named_objectives_and_the_constraint(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = make_study(url)
    app = optuna_dashboard.wsgi(url)  # as `optuna-dashboard sqlite:///…` opens it

    status, body = get(app, "/api/studies")
    assert status.startswith("200"), body[:300]
    (summary,) = json.loads(body)["study_summaries"]
    assert (summary["study_name"], summary["directions"]) == ("dash", ["maximize", "minimize"])
    assert {"key": StudyAttrs.key("budget"), "value": "0.5x"} in summary["user_attrs"]

    status, body = get(app, f"/api/studies/{summary['study_id']}")
    assert status.startswith("200"), body[:300]
    detail = json.loads(body)
    assert detail["objective_names"] == ["val_acc", "flops"]
    over_key = TrialAttrs.key("flops_over_budget")
    # A number column of the trials table, so it can be sorted and filtered by.
    assert {"key": over_key, "sortable": True} in detail["union_user_attrs"]
    served = {t["number"]: t for t in detail["trials"]}
    assert sorted(served) == [t.number for t in study.get_trials()]
    for stored, (flops, val_acc) in zip(study.get_trials(), TRIALS, strict=True):
        attrs = {a["key"]: a["value"] for a in served[stored.number]["user_attrs"]}
        over = stored.constraints[OVER_BUDGET]  # what the samplers read
        assert over == pytest.approx((flops - BUDGET) / BUDGET)
        assert float(attrs[over_key]) == over
        assert attrs[TrialAttrs.key("label")] == TrialAttrs.read(stored).label != ""
        assert attrs[TrialAttrs.key("flops")] == str(flops)
        assert attrs[TrialAttrs.key("state")] == (State.INFEASIBLE if over > 0 else State.COMPLETE)
        assert served[stored.number]["values"] == [val_acc or 0.0, flops]
        assert (val_acc is None) == (over > 0)

    status, body = get(app, f"/csv/{summary['study_id']}")  # the "Download CSV" button
    assert status.startswith("200")
    header = body.decode().splitlines()[0].split(",")
    assert header[2:4] == ["val_acc", "flops"]
    assert f"UserAttribute {over_key}" in header


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_resumed_study_is_named_once_and_others_names_are_kept(tmp_path):
    storage = studies.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    # Made before autosplit named its objectives: a search resuming it names them.
    optuna.create_study(study_name="old", storage=storage, directions=list(studies.DIRECTIONS))
    study, created = studies.create_or_load("old", storage)
    assert not created and study.metric_names == list(studies.METRIC_NAMES)
    study, _ = studies.create_or_load("old", storage)  # again: the same names, no error
    assert study.metric_names == list(studies.METRIC_NAMES)
    # Names given by someone else stay; a study of another shape is left alone.
    theirs = optuna.create_study(study_name="theirs", storage=storage, directions=["maximize"] * 2)
    theirs.set_metric_names(["acc", "cost"])
    assert studies.create_or_load("theirs", storage)[0].metric_names == ["acc", "cost"]
    optuna.create_study(study_name="single", storage=storage)
    assert studies.create_or_load("single", storage)[0].metric_names is None
