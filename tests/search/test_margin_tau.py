"""What the final stage tells a user: the best member's margin over the best baseline at equal
seeds, one seed said as such (never "± 0.00"), and each rung's Kendall τ against the final
stage with n and p, or one line saying why there is no figure."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from scipy.stats import kendalltau

from autosplit.search.attrs import Stage, State, StudyAttrs, TrialAttrs
from autosplit.search.final_stage import proxy_fidelity
from autosplit.search.front import FinalMember, margin
from autosplit.search.front_text import final_table, margin_line, tau_lines
from autosplit.search.report import final_metrics


def member(number: int, accs: dict[int, float], baseline: str | None = None) -> FinalMember:
    return FinalMember(
        number=number,
        label=f"recipe-{number}",
        baseline=baseline,
        flops=50,
        expected_flops=50.0,
        params=100,
        val_accs=tuple(accs.values()),
        seeds=tuple(sorted(accs)),
        trials=tuple(range(100 + number, 100 + number + len(accs))),
        by_seed=tuple(sorted(accs.items())),
    )


def test_margin_at_equal_seeds_with_the_pooled_sd():
    best = member(5, {0: 91.0, 1: 93.0, 2: 80.0})  # seed 2 has no baseline twin: left out
    kd = member(1, {0: 88.0, 1: 90.0}, baseline="kd-single")
    fitnets = member(2, {0: 89.0, 1: 91.0}, baseline="fitnets")
    found = margin([kd, fitnets, best])
    assert found is not None
    assert (found.member.number, found.baseline.baseline, found.seeds) == (5, "fitnets", (0, 1))
    assert found.delta == pytest.approx(92.0 - 90.0)
    # Both sds are sqrt(2) over two seeds: pooled sqrt(2) = 1.41 < 2.0.
    assert found.pooled_sd == pytest.approx(2**0.5)
    line = found.line()
    assert "Δ +2.00 pt over 2 seeds; pooled sd 1.41: the difference exceeds it" in line
    close = member(6, {0: 89.5, 1: 92.5})
    assert "does not exceed" in margin_line([fitnets, close])


def test_one_seed_is_said_and_never_shown_as_plus_minus_zero():
    best = member(5, {0: 91.17})
    dkd = member(1, {0: 90.0}, baseline="best-published")
    line = margin_line([best, dkd])
    assert "Δ +1.17 pt over 1 seed" in line and "pooled sd" not in line
    table = final_table([best, dkd], 100)
    assert "± 0.00" not in table
    assert "91.17 (1 seed)" in table and "90.00 (1 seed)" in table


def test_the_parent_run_logs_no_sd_for_one_seed():
    dkd = member(1, {0: 90.0}, baseline="best-published")
    one = final_metrics([member(5, {0: 91.17}), dkd], [member(5, {0: 91.17})], {})
    assert one["final/best_val_acc_mean"] == pytest.approx(91.17)
    assert one["final/best_val_acc_seeds"] == 1.0
    assert "final/best_val_acc_sd" not in one and "final/margin_pooled_sd" not in one
    best = member(5, {0: 91.0, 1: 93.0})
    two = final_metrics([best, member(1, {0: 90.0, 1: 90.0}, baseline="kd-single")], [best], {})
    assert two["final/best_val_acc_seeds"] == 2.0
    assert two["final/best_val_acc_sd"] == pytest.approx(2**0.5)
    assert two["final/margin_delta"] == pytest.approx(2.0)


def test_margin_says_why_there_is_none():
    assert "no baseline" in margin_line([member(5, {0: 91.0})])
    assert "only baselines" in margin_line([member(1, {0: 90.0}, baseline="kd-single")])
    assert "share no seed" in margin_line(
        [member(5, {1: 91.0}), member(1, {0: 90.0}, baseline="kd-single")]
    )


def _study_with_final_members(rung_accs: list[list[float]], final_accs: list[float]):
    """Search trials with their rung accuracies, each retrained once in the final stage."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    members = []
    for accs in rung_accs:
        search = optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            values=[accs[-1], 50.0],
            user_attrs=TrialAttrs(
                stage=Stage.SEARCH,
                label="single + kd",
                flops=50,
                rungs=[{"epochs": 1, "rows": 100, "val_acc": a, "seconds": 1.0} for a in accs],
                val_acc=accs[-1],
            ).user_attrs(),
        )
        study.add_trial(search)
        members.append(study.get_trials()[-1].number)
    for number, acc in zip(members, final_accs, strict=True):
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=[acc, 50.0],
                user_attrs=TrialAttrs(
                    stage=Stage.FINAL,
                    member=number,
                    seed=0,
                    label="single + kd",
                    flops=50,
                    val_acc=acc,
                    state=State.COMPLETE,
                ).user_attrs(),
            )
        )
    StudyAttrs(final_members=members).write(study)
    return study


def test_tau_below_five_members_is_one_line_saying_why():
    study = _study_with_final_members([[50.0, 60.0], [55.0, 70.0], [40.0]], [80.0, 85.0, 70.0])
    proxy = proxy_fidelity(study)
    assert proxy[0] == {"tau": None, "p": None, "n": 3.0}
    assert proxy[1]["n"] == 2.0
    assert tau_lines(proxy) == [
        "τ rung 0 vs final: no figure, 3 members trained at both (need ≥ 5)",
        "τ rung 1 vs final: no figure, 2 members trained at both (need ≥ 5)",
    ]


def test_tau_from_five_members_has_its_n_and_p():
    rung0 = [50.0, 55.0, 40.0, 62.0, 58.0, 45.0]
    final = [80.0, 79.0, 70.0, 90.0, 88.0, 71.0]
    study = _study_with_final_members([[a] for a in rung0], final)
    proxy = proxy_fidelity(study)
    expected = kendalltau(rung0, final)
    assert proxy[0]["n"] == 6.0
    assert proxy[0]["tau"] == pytest.approx(expected.statistic)
    assert proxy[0]["p"] == pytest.approx(expected.pvalue)
    assert 0 < proxy[0]["p"] < 1
    (line,) = tau_lines(proxy)
    assert line == (
        f"τ rung 0 vs final: {expected.statistic:+.2f} (n = 6, p = {expected.pvalue:.2g})"
    )
