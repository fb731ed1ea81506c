from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autosplit.errors import UserError
from autosplit.search.budget import parse_budget
from autosplit.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def test_the_default_space_is_found_from_any_directory(tmp_path, monkeypatch):
    """`autosplit search` with no --space: ./search_spaces first, else the shipped one; every
    space the README names is shipped."""
    import re

    from autosplit.search.space import DEFAULT_SPACE, find_space

    monkeypatch.chdir(tmp_path)
    assert find_space(None) == ROOT / "search_spaces" / DEFAULT_SPACE
    assert SearchSpace.from_yaml(find_space(None)).data.name == "fashion-mnist"
    local = tmp_path / "search_spaces" / DEFAULT_SPACE
    local.parent.mkdir()
    local.write_text((ROOT / "search_spaces" / "digits_tiny.yaml").read_text())
    assert find_space(None) == local and SearchSpace.from_yaml(local).data.name == "digits"
    named = set(re.findall(r"search_spaces/(\w+\.yaml)", (ROOT / "README.md").read_text()))
    assert named and named <= {p.name for p in SPACES}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_space_loads_and_its_baselines_are_valid(path):
    space = SearchSpace.from_yaml(path)
    assert space.params, "a space with nothing to search"
    base = space.base_candidate(10**7)
    assert base.data == space.data and base.teacher == space.teacher
    for overrides in space.settings.baselines.values():
        assert base.with_values(overrides).structure.name == "single"


def test_fixed_trial_drives_suggest_with_conditional_parameters():
    space = SearchSpace.from_yaml(ROOT / "search_spaces" / "fashion_mnist.yaml")
    chain = optuna.trial.FixedTrial(
        {
            "structure.name": "res_chain",
            "structure.n_parts": 2,
            "split.budget_share": 0.9,
            "split.base_share": 0.6,
            "twi": False,
            "logit_loss.name": "dkd",
            "logit_loss.temperature": 2.0,
            "logit_loss.beta": 4.0,
            "logit_loss.warmup_epochs": 1,
            "feature_loss.name": "none",
            "train.lr": 0.05,
        }
    )
    candidate = space.suggest(chain, 7_000_000)
    assert candidate.structure.name == "res_chain" and candidate.structure.get("n_parts") == 2
    assert candidate.logit_loss.name == "dkd" and candidate.logit_loss.get("beta") == 4.0
    assert candidate.split.base_share == 0.6 and candidate.max_flops == 7_000_000
    assert candidate.train.epochs == 3  # fixed part of the space kept

    # A single student never draws n_parts or base_share: FixedTrial would raise if asked for
    # a parameter it was not given.
    single = optuna.trial.FixedTrial(
        {
            "structure.name": "single",
            "split.budget_share": 1.0,
            "twi": False,
            "logit_loss.name": "kd",
            "logit_loss.temperature": 4.0,
            "logit_loss.kd_weight": 0.9,
            "feature_loss.name": "hint",
            "feature_loss.weight": 100.0,
            "train.lr": 0.1,
        }
    )
    candidate = space.suggest(single, 7_000_000)
    assert candidate.structure.name == "single" and candidate.feature_loss.name == "hint"


def test_baseline_overrides_win_over_the_draw():
    space = SearchSpace.from_yaml(ROOT / "search_spaces" / "digits_tiny.yaml")
    trial = optuna.trial.FixedTrial(
        {
            "structure.name": "res_chain",
            "structure.n_parts": 1,
            "split.budget_share": 0.7,
            "split.base_share": 0.7,
            "logit_loss.name": "kd",
            "logit_loss.temperature": 4.0,
            "feature_loss.name": "none",
        }
    )
    candidate = space.suggest(trial, 10**6, overrides=space.settings.baselines["kd-single"])
    assert candidate.structure.name == "single" and candidate.split.budget_share == 1.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("  structure.name:", "  structure.nam:"),
            r"params\.structure\.nam = .*structure\.nam: unknown key",
        ),
        (lambda t: t.replace("search:", "serch:"), r"serch: unknown key"),
        (
            lambda t: t.replace("low: 1.0, high: 8.0", "low: 8.0, high: 1.0"),
            r"params\.logit_loss\.temperature: needs low < high",
        ),
        (
            lambda t: t.replace("choices: [kd, dkd]", "choices: [kd, dkdd]"),
            r"params\.logit_loss\.name = 'dkdd'.*unknown logit loss 'dkdd'",
        ),
        (lambda t: t.replace("budget: 0.5x", "budget: lots"), r"--budget 'lots'"),
        (
            lambda t: t.replace("    epochs: 2\n", "    epochs: two\n"),
            r"train\.epochs: expected an integer",
        ),
        (
            lambda t: t.replace("{epochs: 2, rows: null}]", "{epochs: 0, rows: null}]"),
            r"search\.fidelity\.rungs\[1\]\.epochs: must be >= 1",
        ),
        (
            lambda t: t.replace(
                "rungs: [{epochs: 1, rows: 600}, {epochs: 2, rows: null}]",
                "rungs: [{epochs: 2, rows: null}, {epochs: 1, rows: 600}]",
            ),
            r"search\.fidelity\.rungs: list them from cheap to dear",
        ),
        (lambda t: t.replace("eta: 2", "eta: 1"), r"search\.fidelity\.eta: must be >= 2"),
        (
            lambda t: t.replace("portfolio: []", "portfolio: [fitnetz, rkd]"),
            r"search\.portfolio: 'fitnetz' is not a method recipe; known: aekt, ce, dkd",
        ),
        (
            lambda t: t.replace("portfolio: []", "portfolio: [aekt, rkd, aekt]"),
            r"search\.portfolio: a recipe is listed twice",
        ),
    ],
)
def test_validation_names_the_file_and_the_key(tmp_path, edit, message):
    text = (ROOT / "search_spaces" / "digits_tiny.yaml").read_text()
    path = tmp_path / "broken.yaml"
    path.write_text(edit(text))
    with pytest.raises(UserError, match=message) as info:
        SearchSpace.from_yaml(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("text", "relative", "absolute"),
    [
        ("0.25x", 0.25, None),
        ("1X", 1.0, None),
        ("5M", None, 5_000_000),
        ("1.2G", None, 1_200_000_000),
        ("350k", None, 350_000),
    ],
)
def test_budgets(text, relative, absolute):
    budget = parse_budget(text)
    assert (budget.relative, budget.absolute) == (relative, absolute)
    assert budget.resolve(40_000_000) == (int(relative * 40_000_000) if relative else absolute)


@pytest.mark.parametrize("text", ["", "x", "-1x", "lots", "0"])
def test_bad_budgets_are_one_clear_error(text):
    with pytest.raises(UserError, match="--budget"):
        parse_budget(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("2h", 7200.0)]
)
def test_durations(text, seconds):
    from autosplit.search.budget import parse_duration

    assert parse_duration(text) == seconds


def test_a_bad_space_time_limit_names_its_key(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        (ROOT / "search_spaces" / "digits_tiny.yaml")
        .read_text()
        .replace("  sampler: tpe\n", "  sampler: tpe\n  time_limit: soon\n")
    )
    with pytest.raises(UserError, match=r"t\.yaml: search\.time_limit: 'soon' is not a duration"):
        SearchSpace.from_yaml(path)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_dkd_and_aekt_warm_up_by_one_rule_in_every_shipped_space(path):
    """Every draw and baseline of a shipped space that trains DKD or AEKT warms it up over
    DKD's 20/240 of the trial's epochs (at least one), never the part's 20-epoch default."""
    from autosplit.distill._base import warmup_epochs_for
    from autosplit.search.space import _draw_values

    space = SearchSpace.from_yaml(path)
    base = space.base_candidate(10**9)
    rule = warmup_epochs_for(base.train.epochs)
    names = next(p.choices for p in space.params if p.name == "logit_loss.name")
    drawn = [
        base.with_values(_draw_values(space.params, base.flat(), {"logit_loss.name": name}))
        for name in set(names) & {"dkd", "aekt"}
    ]
    drawn += [
        base.with_values(overrides)
        for overrides in space.settings.baselines.values()
        if overrides.get("logit_loss.name") in ("dkd", "aekt")
    ]
    assert all(c.logit_loss.get("warmup_epochs") == rule for c in drawn)
    assert {c.logit_loss.name for c in drawn} == set(names) & {"dkd", "aekt"}


def test_a_rung_keeps_the_warm_ups_share_of_the_run():
    from autosplit.search.space import Rung
    from autosplit.search.trial import at_fidelity

    space = SearchSpace.from_yaml(ROOT / "search_spaces" / "cifar100_resnet.yaml")
    dkd = space.base_candidate(10**9).with_values(
        {"logit_loss.name": "dkd", "logit_loss.warmup_epochs": 3}
    )
    assert dkd.train.epochs == 30
    assert at_fidelity(dkd, Rung(240, None)).logit_loss.get("warmup_epochs") == 24
    assert at_fidelity(dkd, Rung(15, None)).logit_loss.get("warmup_epochs") == 2
    assert at_fidelity(dkd, Rung(5, 20000)).logit_loss.get("warmup_epochs") == 1
    assert at_fidelity(dkd, Rung(30, None)).logit_loss.get("warmup_epochs") == 3
    # A warm-up longer than the rung is cut to it.
    long = dkd.with_values({"logit_loss.warmup_epochs": 60})
    assert at_fidelity(long, Rung(5, None)).logit_loss.get("warmup_epochs") == 5


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_warm_starts_from_the_five_recipes(path):
    """Every space for real data; the seconds-fast digits space of the tests and smoke runs
    runs none (its tests count trials)."""
    space = SearchSpace.from_yaml(path)
    expected = () if path.name == "digits_tiny.yaml" else ("rkd", "reskd", "era", "iekd", "aekt")
    assert space.settings.portfolio == expected


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_a_portfolio_trial_trains_its_recipe_and_gives_the_sampler_in_range_params(path):
    """suggest with the enqueued params and the pinned rest builds the recipe's candidate (its
    warm-up scaled to the run); every enqueued value lies in its parameter's distribution."""
    from autosplit.distill.recipes import scaled_recipe

    space = SearchSpace.from_yaml(path)
    by_name = {p.name: p for p in space.params}
    for name in space.settings.portfolio:
        params, pinned = space.portfolio_trial(name)
        assert params, name  # at least the budget share: TPE sees every recipe
        assert all(by_name[key].contains(value) for key, value in params.items()), name
        assert not set(params) & set(pinned)
        trial = optuna.trial.FixedTrial(params)  # raises if suggest drew a value not given
        candidate = space.suggest(trial, 10**7, overrides=space.overrides(portfolio=name))
        assert candidate == scaled_recipe(name, space.base_candidate(10**7)), name
        assert trial.params == params  # exactly the enqueued values were drawn


def test_recipe_values_outside_the_space_are_pinned_not_drawn():
    space = SearchSpace.from_yaml(ROOT / "search_spaces" / "fashion_mnist.yaml")
    params, pinned = space.portfolio_trial("era")
    # ERA's 4 branches where the space draws 1-3: pinned; its KD weight 1.0 is in range.
    assert pinned["structure.n_parts"] == 4 and "structure.n_parts" not in params
    assert params["logit_loss.kd_weight"] == 1.0 and params["twi"] is True
    params, pinned = space.portfolio_trial("rkd")
    # RKD's CE logit loss is not a choice: pinned, and the loss's other settings with it.
    assert pinned["logit_loss.name"] == "ce" and pinned["schedule"] == "staged"
    assert not any(key.startswith("logit_loss.") for key in params)
    assert params["structure.name"] == "assistant" and params["split.base_share"] == 0.64
    params, _ = space.portfolio_trial("aekt")
    assert params["logit_loss.warmup_epochs"] == 1  # 20/240 of 3 epochs, at least 1
