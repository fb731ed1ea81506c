"""Pareto front and hypervolume on hand-made trials whose answers are worked out by hand."""

from __future__ import annotations

import random

import pytest

from autosplit.search.attrs import State
from autosplit.search.front import (
    TrialRecord,
    hypervolume,
    hypervolume_history,
    pareto_front,
)
from autosplit.search.front_text import front_table

BUDGET = 100


def rec(
    number: int,
    acc: float | None,
    flops: int | None,
    state: str = State.COMPLETE,
    *,
    expected: float | None = None,
    baseline: str | None = None,
) -> TrialRecord:
    return TrialRecord(
        number=number,
        state=state,
        val_acc=acc,
        flops=flops,
        expected_flops=expected,
        params=1000 + number,
        label=f"recipe-{number}",
        baseline=baseline,
    )


# Budget 100. On the front: #0 (20 FLOPs, 80 %), its exact duplicate #7, and #1 (50, 90).
RECORDS = [
    rec(0, 80.0, 20),
    rec(1, 90.0, 50, expected=15.0, baseline="kd-single"),
    rec(2, 85.0, 60),  # dominated by #1: less accurate and dearer
    rec(3, 95.0, 120),  # best accuracy but over budget
    rec(4, None, 150, State.INFEASIBLE),
    rec(5, 99.0, 10, State.PRUNED),  # pruned: never on the front whatever its accuracy
    rec(6, 90.0, 70, baseline="best-published"),  # ties #1 on accuracy at more FLOPs
    rec(7, 80.0, 20),  # exact duplicate of #0: kept
    rec(8, 70.0, 20),  # ties #0 on FLOPs, less accurate
    rec(9, None, None, State.RUNNING),
]


def test_front_excludes_dominated_infeasible_and_unfinished() -> None:
    assert [r.number for r in pareto_front(RECORDS, BUDGET)] == [0, 7, 1]


def test_budget_is_inclusive() -> None:
    assert [r.number for r in pareto_front([rec(0, 50.0, 100)], 100)] == [0]
    assert pareto_front([rec(0, 50.0, 101)], 100) == []


def test_hypervolume_by_hand() -> None:
    # x = FLOPs/100: [0.2, 0.5) at height 0.80 + [0.5, 1] at height 0.90 = 0.24 + 0.45
    assert hypervolume(RECORDS, BUDGET) == pytest.approx(0.69)
    assert hypervolume([], BUDGET) == 0.0
    assert hypervolume([rec(0, 100.0, 0)], BUDGET) == pytest.approx(1.0)
    assert hypervolume([rec(0, 50.0, 100)], BUDGET) == pytest.approx(0.0)


def test_expected_flops_front() -> None:
    # Against expected FLOPs #1 costs 15 and dominates #0 and #7 (20 FLOPs, 80 %);
    # feasibility still uses worst-case FLOPs, so #3 stays out.
    front = pareto_front(RECORDS, BUDGET, cost="expected_flops")
    assert [r.number for r in front] == [1]
    assert hypervolume(RECORDS, BUDGET, cost="expected_flops") == pytest.approx(0.85 * 0.9)
    with pytest.raises(ValueError):
        pareto_front(RECORDS, BUDGET, cost="macs")  # type: ignore[arg-type]


def test_history_by_hand() -> None:
    history = hypervolume_history(reversed(RECORDS), BUDGET)
    assert [n for n, _ in history] == list(range(10))
    assert history[0][1] == pytest.approx(0.8 * 0.8)
    assert all(v == pytest.approx(0.69) for _, v in history[1:])


def test_history_monotone_and_ends_at_hypervolume() -> None:
    rng = random.Random(0)
    records = [
        rec(
            i,
            rng.uniform(10, 100),
            rng.randint(1, 150),
            rng.choice([State.COMPLETE, State.COMPLETE, State.PRUNED, State.FAILED]),
        )
        for i in range(300)
    ]
    history = hypervolume_history(records, BUDGET)
    values = [v for _, v in history]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(hypervolume(records, BUDGET))
    assert 0.0 < values[-1] <= 1.0


def test_front_table_marks_budget_best_baselines_and_counts() -> None:
    table = front_table(RECORDS, BUDGET, teacher_flops=400)
    lines = table.splitlines()
    assert "fvcore: one multiply-add = one FLOP" in lines[0]
    assert "budget 100" in lines[0] and "teacher 400" in lines[0]
    rows = lines[2:5]
    assert [row.split()[:2] for row in rows] == [["1", "0"], ["2", "7"], ["3", "1"]]
    assert "best" in rows[2] and "baseline:kd-single" in rows[2]
    assert "50%" in rows[2] and "12%" in rows[2]  # % of budget, % of teacher
    assert lines[5].startswith("---- budget 100")
    assert "baseline:best-published" in table  # listed though not on the front
    assert "7 complete, 1 pruned, 1 infeasible, 0 failed, 1 running" in lines[-1]
    assert "(1 complete but over budget)" in lines[-1]


def test_front_table_without_feasible_trials() -> None:
    table = front_table([rec(0, None, 500, State.INFEASIBLE)], BUDGET)
    assert "no feasible complete trial" in table
    assert "1 infeasible" in table
