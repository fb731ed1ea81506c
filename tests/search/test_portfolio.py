"""The warm start: a real search on digits runs the baselines, then the portfolio's recipes in
order with their parameters, before any sampled trial; each trial records its precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autosplit import device
from autosplit.distill.recipes import scaled_recipe
from autosplit.search.attrs import State, TrialAttrs
from autosplit.search.budget import parse_budget
from autosplit.search.driver import run_search
from autosplit.search.setup import SearchOptions
from autosplit.search.space import SearchSpace
from autosplit.tracking import MlflowTracker

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["rkd", "reskd", "era", "iekd", "aekt"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, digits_runs):
    """digits_tiny at one cheap rung, no final stage; 9 trials: 3 baselines, the 5 recipes
    and one the sampler draws. The CPU is made to read as one with native bf16."""
    tmp = tmp_path_factory.mktemp("portfolio")
    raw = yaml.safe_load((ROOT / "search_spaces" / "digits_tiny.yaml").read_text())
    raw["search"]["fidelity"] = {"rungs": [{"epochs": 1, "rows": 300}]}
    raw["search"]["portfolio"] = list(RECIPES)  # off in the shipped digits space
    path = tmp / "digits_tiny.yaml"  # the same name: the cached teacher's space
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    space = SearchSpace.from_yaml(path)
    patch = pytest.MonkeyPatch()
    patch.setattr(device, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    patch.setattr(device, "_onednn_bf16", lambda: True)
    lines: list[str] = []
    try:
        study, ctx = run_search(
            SearchOptions(
                space=space,
                budget=parse_budget("0.5x"),
                trials=9,
                study_name="portfolio",
                storage=f"sqlite:///{tmp}/optuna.db",
                seed=0,
                device="cpu",
                runs_dir=digits_runs,
                progress=False,
                final_stage=False,
            ),
            tracker=MlflowTracker(f"sqlite:///{tmp}/mlflow.db"),
            say=lines.append,
        )
    finally:
        patch.undo()
    return tmp, study, ctx, space, lines


def test_baselines_then_the_portfolio_in_order_then_sampled(searched):
    _tmp, study, ctx, space, _lines = searched
    trials = study.get_trials()
    assert len(trials) == 9
    attrs = [
        (
            t.user_attrs.get(TrialAttrs.key("baseline")),
            t.user_attrs.get(TrialAttrs.key("portfolio")),
        )
        for t in trials
    ]
    assert attrs == [
        ("kd-single", None),
        ("best-published", None),
        ("fitnets", None),
        *[(None, name) for name in RECIPES],
        (None, None),  # drawn by TPE, which has the eight above as finished trials
    ]
    base = space.base_candidate(ctx.max_flops)
    for trial, name in zip(trials[3:8], RECIPES, strict=True):
        params, _pinned = space.portfolio_trial(name)
        assert trial.params == params  # in the space's distributions: TPE learns from them
        assert set(trial.distributions) == set(params)
        assert trial.user_attrs[TrialAttrs.key("state")] in (State.COMPLETE, State.STOPPED), name
        recipe = scaled_recipe(name, base)
        trained = trial.user_attrs[TrialAttrs.key("candidate")]
        assert trained["structure"]["name"] == recipe.structure.name, name
        assert trained["logit_loss"] == {
            "name": recipe.logit_loss.name,
            **dict(recipe.logit_loss.params),
        }, name
        assert trained["feature_loss"]["name"] == recipe.feature_loss.name, name
        assert trained["schedule"] == recipe.schedule and trained["twi"] == recipe.twi, name
    era = trials[5].user_attrs[TrialAttrs.key("candidate")]["structure"]
    assert era["n_parts"] == 4  # pinned: the space draws 1-2 branches


def test_every_trial_records_the_precision_it_ran_in(searched):
    tmp, study, _ctx, _space, lines = searched
    from mlflow.tracking import MlflowClient

    assert {t.user_attrs[TrialAttrs.key("precision")] for t in study.get_trials()} == {"bf16"}
    assert any("trials in cpu bf16 (auto: native bf16: avx512_bf16" in line for line in lines)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("portfolio")
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    assert runs and {r.data.params["runtime.precision"] for r in runs} == {"bf16"}
