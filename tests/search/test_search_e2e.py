"""Real searches on digits: Optuna on SQLite, MLflow on SQLite, real training, export, retrain."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from autosplit.search.attrs import (
    STATE_TAG,
    Role,
    Stage,
    State,
    StudyAttrs,
    TrialAttrs,
    TrialMetrics,
)
from autosplit.search.budget import parse_budget
from autosplit.search.driver import run_search
from autosplit.search.setup import SearchOptions
from autosplit.search.space import SearchSpace
from autosplit.tracking import MlflowTracker

ROOT = Path(__file__).resolve().parents[2]
SPACE = ROOT / "search_spaces" / "digits_tiny.yaml"


def options(tmp: Path, **kw) -> SearchOptions:
    base = SearchOptions(
        space=SearchSpace.from_yaml(SPACE),
        budget=parse_budget("0.5x"),
        trials=4,
        study_name="digits-test",
        storage=f"sqlite:///{tmp}/optuna.db",
        sampler="tpe",
        seed=0,
        device="cpu",
        runs_dir=tmp / "runs",
        progress=False,
    )
    return dataclasses.replace(base, **kw)


def tracker(tmp: Path) -> MlflowTracker:
    return MlflowTracker(f"sqlite:///{tmp}/mlflow.db")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    study, ctx = run_search(options(tmp), tracker=tracker(tmp), say=lambda _m: None)
    return tmp, study, ctx


def search_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t for t in study.get_trials() if t.user_attrs.get(TrialAttrs.key("stage")) != Stage.FINAL
    ]


def test_trials_run_under_the_budget_with_the_baselines_first(searched):
    _tmp, study, ctx = searched
    trials = search_trials(study)
    assert len(trials) == 4
    assert [t.user_attrs.get(TrialAttrs.key("baseline")) for t in trials[:3]] == [
        "kd-single",
        "best-published",
        "fitnets",
    ]
    assert trials[0].user_attrs[TrialAttrs.key("candidate")]["logit_loss"]["name"] == "kd"
    assert trials[1].user_attrs[TrialAttrs.key("candidate")]["logit_loss"]["name"] == "dkd"
    fitnets = trials[2].user_attrs[TrialAttrs.key("candidate")]  # KD-free: CE + hint
    assert (fitnets["logit_loss"]["name"], fitnets["feature_loss"]["name"]) == ("ce", "hint")
    assert fitnets["structure"]["name"] == "single"
    for trial in trials:
        assert trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        assert "flops_over_budget" in trial.constraints
        flops = trial.user_attrs[TrialAttrs.key("flops")]
        assert trial.constraints["flops_over_budget"] == pytest.approx(
            (flops - ctx.max_flops) / ctx.max_flops
        )
        if (
            trial.state == TrialState.COMPLETE
            and trial.user_attrs[TrialAttrs.key("state")] == State.COMPLETE
        ):
            assert flops <= ctx.max_flops
            assert (
                trial.values[0] == trial.user_attrs[TrialAttrs.key("val_acc")] > 30.0
            )  # chance is 10 %
            assert Path(trial.user_attrs[TrialAttrs.key("weights")]).is_file()
    assert study.user_attrs[StudyAttrs.key("budget_flops")] == ctx.max_flops
    assert ctx.max_flops == int(0.5 * ctx.teacher_flops)


def test_rerunning_runs_only_what_is_missing(searched):
    tmp, study, _ctx = searched
    finals = len(study.get_trials()) - 4
    run_search(options(tmp), tracker=tracker(tmp), say=lambda _m: None)
    assert len(search_trials(study)) == 4
    assert len(study.get_trials()) == 4 + finals  # the final stage is done: nothing re-runs
    run_search(options(tmp, trials=5), tracker=tracker(tmp), say=lambda _m: None)
    assert len(search_trials(study)) == 5


def test_every_trial_is_a_nested_mlflow_run(searched):
    tmp, study, _ctx = searched
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("digits-test")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parents and {c.data.tags["mlflow.parentRunId"] for c in children} <= {
        p.info.run_id for p in parents
    }
    run_ids = {t.user_attrs[TrialAttrs.key("run_id")] for t in study.get_trials()}
    assert run_ids <= {c.info.run_id for c in children}
    child = next(
        c
        for c in children
        if c.info.run_id == study.get_trials()[0].user_attrs[TrialAttrs.key("run_id")]
    )
    assert child.data.params["structure.name"] == "single"
    assert "val/acc" in child.data.metrics and "flops/worst_case" in child.data.metrics
    # One step per epoch, over every rung the trial climbed.
    rung_epochs = sum(
        r["epochs"] for r in study.get_trials()[0].user_attrs[TrialAttrs.key("rungs")]
    )
    assert rung_epochs >= 1
    assert len(client.get_metric_history(child.info.run_id, "train/loss")) == rung_epochs
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"front.csv", "front.png", "front.html"} <= artifacts
    # The final stage: its own child runs, and on the parent its front beside the rung fronts.
    assert {"final_front.csv", "final_front.png", "rung0_front.png", "rung1_front.png"} <= artifacts
    finals = [c for c in children if c.data.tags.get(TrialAttrs.key("stage")) == Stage.FINAL]
    final_trials = [
        t for t in study.get_trials() if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.FINAL
    ]
    assert len(finals) == len(final_trials) > 0
    assert {c.info.run_id for c in finals} == {
        t.user_attrs[TrialAttrs.key("run_id")] for t in final_trials
    }
    assert "final/best_val_acc_mean" in parents[0].data.metrics
    # The comparison (best member and the three baselines) over the final seeds, its margin on
    # the parent, and every final job's planned and measured seconds on its run.
    parent = client.get_run(parents[0].info.run_id)
    assert "final/margin_delta" in parent.data.metrics
    assert "margin of the search's best" in parent.data.tags["mlflow.note.content"]
    assert parent.data.metrics["final/kendall_n_rung0"] >= 1
    roles = sorted(t.user_attrs[TrialAttrs.key("role")] for t in final_trials)
    assert roles.count(Role.BASELINE) == 3 * len(
        {t.user_attrs[TrialAttrs.key("seed")] for t in final_trials}
    )
    for run in finals:
        assert run.data.metrics["time/estimate_s"] > 0 and run.data.metrics["time/actual_s"] > 0


def test_export_then_retrain_reproduces_the_trial(searched, capsys):
    tmp, study, ctx = searched
    from autosplit.cli import main

    out = tmp / "export"
    storage = f"sqlite:///{tmp}/optuna.db"
    assert main(["front", "--study-name", "digits-test", "--storage", storage]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("Final front at 2 epochs") and " ± " in shown
    assert main(["front", "--study-name", "digits-test", "--storage", storage, "--rung", "0"]) == 0
    assert capsys.readouterr().out.startswith("rung 0:")
    # No trial finished a rung that high: one line naming the flag, exit 2.
    assert main(["front", "--study-name", "digits-test", "--storage", storage, "--rung", "7"]) == 2
    assert capsys.readouterr().err.startswith("autosplit: --rung 7: no trial")
    assert (
        main(
            [
                "export",
                "--study-name",
                "digits-test",
                "--storage",
                storage,
                "--out",
                str(out),
                "--runs-dir",
                str(tmp / "runs"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert (out / "best.pt").is_file()
    assert list((out / "front").glob("trial-*.yaml"))
    prov = best["provenance"]
    assert prov["flops_convention"].startswith("fvcore")
    assert prov["study"] == "digits-test" and prov["mlflow_run_id"]
    assert prov["data_fingerprint"] == ctx.splits.fingerprint and len(prov["teacher_sha256"]) == 64
    assert best["result"]["flops_worst_case"] <= ctx.max_flops
    assert 0.0 < best["result"]["test_acc"] <= 100.0
    # best.yaml comes from the final stage: its fidelity, its seeds, val and test mean ± sd,
    # and the weights of the seed whose val accuracy is closest to the mean.
    result = best["result"]
    final = ctx.space.settings.fidelity.final
    assert result["stage"] == Stage.FINAL
    assert result["fidelity"] == {"epochs": final.epochs, "rows": final.rows}
    assert best["candidate"]["train"]["epochs"] == final.epochs
    assert (
        len(result["seeds"]) == final.seeds == len(result["val_accs"]) == len(result["test_accs"])
    )
    assert result["val_acc_mean"] == pytest.approx(sum(result["val_accs"]) / final.seeds)
    assert result["val_acc_sd"] >= 0 and result["test_acc_sd"] >= 0
    closest = min(result["val_accs"], key=lambda v: abs(v - result["val_acc_mean"]))
    assert result["val_acc"] == closest
    assert best["candidate"]["train"]["seed"] == result["seed_shipped"] in result["seeds"]

    from autosplit.evaluation import retrain
    from autosplit.export_document import read_config

    # --confirm-seeds retrains the top front members with more seeds: mean ± sd.
    confirmed = tmp / "confirmed"
    assert (
        main(
            [
                "export",
                "--study-name",
                "digits-test",
                "--storage",
                storage,
                "--out",
                str(confirmed),
                "--runs-dir",
                str(tmp / "runs"),
                "--device",
                "cpu",
                "--confirm-seeds",
                "2",
            ]
        )
        == 0
    )
    confirm = yaml.safe_load((confirmed / "best.yaml").read_text())["result"]["confirm"]
    assert confirm["seeds"] == 2 and 0 < confirm["val_acc_mean"] <= 100
    assert confirm["val_acc_sd"] >= 0 and 0 < confirm["test_acc_mean"] <= 100

    config = read_config(out / "best.yaml")
    outcome = retrain(
        config.candidate,
        ctx.splits,
        ctx.teacher,
        ctx.runtime,
        tmp / "runs",
        teacher_views=config.teacher_views,
    )
    assert abs(outcome["val_acc"] - best["result"]["val_acc"]) <= 0.5
    # ... and so lands within the final stage's val sd (or 0.5 pt) of its mean.
    tolerance = max(best["result"]["val_acc_sd"], 0.5)
    assert (
        abs(outcome["val_acc"] - best["result"]["val_acc_mean"])
        <= tolerance + best["result"]["val_acc_sd"]
    )

    weights = tmp / "student.pt"
    assert (
        main(
            [
                "train",
                "--config",
                str(out / "best.yaml"),
                "--runs-dir",
                str(tmp / "runs"),
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(weights),
            ]
        )
        == 0
    )
    from autosplit.checkpoint import load_checkpoint

    saved = load_checkpoint(weights, kind="student")
    assert saved["config"] == best["candidate"] and 0 < saved["extra"]["test_acc"] <= 100


def test_an_over_budget_candidate_is_recorded_and_never_trained(tmp_path):
    # A budget a single student fits (below that the search is refused) but a chain of three
    # parts does not, even at the narrowest widths.
    text = SPACE.read_text().replace(
        "choices: [single, res_chain, branches, assistant]", "choices: [res_chain]"
    )
    text = text.replace("{type: int, low: 1, high: 2, when", "{choices: [2], when")
    text = text[: text.index("  baselines:")]
    space_file = tmp_path / "chains.yaml"
    space_file.write_text(text)
    opts = options(
        tmp_path,
        trials=1,
        budget=parse_budget("3.5k"),
        study_name="tiny-budget",
        space=SearchSpace.from_yaml(space_file),
    )
    study, _ctx = run_search(opts, tracker=tracker(tmp_path), say=lambda _m: None)
    trial = study.get_trials()[0]
    attrs = TrialAttrs.read(trial)
    assert attrs.state == State.INFEASIBLE
    assert trial.constraints["flops_over_budget"] > 0
    # No rung trained and nothing was saved: a trained rung appends to ``rungs``, sets val_acc
    # and weights, and every epoch logs val/acc on the trial's MLflow run.
    assert attrs.rungs == [] and attrs.val_acc is None and attrs.weights is None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert attrs.run_id and client.get_run(attrs.run_id).data.tags[STATE_TAG] == State.INFEASIBLE
    assert client.get_metric_history(attrs.run_id, TrialMetrics.name("val_acc")) == []  # no epoch
    assert optuna.load_study(study_name="tiny-budget", storage=opts.storage).best_trials == []


def test_a_diverging_candidate_fails_its_trial_not_the_search(tmp_path):
    space_file = tmp_path / "diverge.yaml"
    space_file.write_text(
        SPACE.read_text().replace(
            "    lr: 0.1\n    seed: 0\nparams:", "    lr: 1.0e+6\n    seed: 0\nparams:"
        )
    )
    opts = options(
        tmp_path,
        trials=2,
        study_name="diverge",
        space=SearchSpace.from_yaml(space_file),
    )
    study, _ctx = run_search(opts, say=lambda _m: None)
    # The third baseline (fitnets) stays enqueued: the study's total is 2 trials.
    trials = [t for t in study.get_trials() if t.state != TrialState.WAITING]
    assert len(trials) == 2  # both attempts ran; the search itself returned normally
    assert all(t.state == TrialState.FAIL for t in trials)
    assert all(t.user_attrs[TrialAttrs.key("state")] == State.FAILED for t in trials)
    assert "lower the learning rate" in trials[0].user_attrs[TrialAttrs.key("error")]
