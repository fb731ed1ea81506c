"""The promotion rule of multi-objective successive halving, on fronts worked by hand."""

import math

import pytest

from autosplit.search.promotion import (
    RungResult,
    crowding_distances,
    dominates,
    nondominated_layers,
    promotable,
    rank,
    select,
)


def r(number, acc, flops):
    return RungResult(number, acc, flops)


def test_dominance_needs_one_strict_improvement():
    assert dominates(r(0, 80, 5), r(1, 79, 5))
    assert dominates(r(0, 80, 4), r(1, 80, 5))
    assert not dominates(r(0, 80, 5), r(1, 80, 5))  # equal points: neither
    assert not dominates(r(0, 81, 6), r(1, 80, 5))  # a trade-off: neither


def test_layers_peel_fronts_in_order():
    # Front 0: (90, 9), (85, 5), (70, 2). (84, 6) is dominated only by (85, 5); (60, 8) by many.
    points = [r(0, 90, 9), r(1, 85, 5), r(2, 70, 2), r(3, 84, 6), r(4, 60, 8)]
    layers = [[p.number for p in layer] for layer in nondominated_layers(points)]
    assert layers == [[0, 1, 2], [3], [4]]


def test_crowding_distance_by_hand():
    # Accuracy range 20 (70..90), FLOPs range 7 (2..9). The middle point (85, 5) has neighbours
    # (70, 2) and (90, 9) in both objectives: (90-70)/20 + (9-2)/7 = 2.
    layer = [r(0, 90, 9), r(1, 85, 5), r(2, 70, 2)]
    crowd = crowding_distances(layer)
    assert crowd[0] == math.inf and crowd[2] == math.inf
    assert crowd[1] == pytest.approx(2.0)


def test_rank_orders_layers_then_spread_then_accuracy():
    # Layer 0 with four points: the ends (0 and 3) first, then the less crowded inner point.
    layer0 = [r(0, 90, 10), r(1, 89, 9), r(2, 80, 5), r(3, 70, 1)]
    # Inner point 1: acc gap (90-80)/20 = 0.5, flops gap (10-5)/9 = 0.556 -> 1.056
    # Inner point 2: acc gap (89-70)/20 = 0.95, flops gap (9-1)/9 = 0.889 -> 1.839
    dominated = [r(4, 60, 9)]
    order = [p.number for p in rank(layer0 + dominated)]
    assert order == [0, 3, 2, 1, 4]


def test_the_eta_fraction_keeps_floor_n_over_eta():
    # Nine trials on one line of trade-offs would all be non-dominated; make them a chain
    # instead (each dominated by the one before), so the rank is plain: 0 best, 8 worst.
    chain = [r(i, 90 - i, 1 + i) for i in range(9)]
    eta = 3
    promoted = [p.number for p in chain if promotable(p, chain, eta)]
    assert promoted == [0, 1, 2]  # 9 // 3 = 3
    assert [p.number for p in chain[:7] if promotable(p, chain[:7], eta)] == [0, 1]  # 7 // 3


def test_with_fewer_than_eta_finished_only_non_dominated_go_on():
    first = r(0, 80, 5)
    assert promotable(first, [], 3)  # the first trial at a rung always goes on
    worse = r(1, 79, 6)
    assert not promotable(worse, [first], 3)
    trade_off = r(2, 75, 2)  # cheaper: not dominated by trial 0
    assert promotable(trade_off, [first], 3)


def test_ties_are_deterministic_and_counted_once():
    a, b, c = r(0, 80, 5), r(1, 80, 5), r(2, 70, 9)
    # Three finished, eta 3: one goes on. 0 and 1 are equal and both ends of their layer
    # (infinite crowding); the accuracy tie goes to the earlier trial.
    assert promotable(a, [a, b, c], 3)
    assert not promotable(b, [a, b, c], 3)
    # ``me`` listed in ``finished`` too is one trial, not two.
    assert promotable(a, [a, a, b], 2) == promotable(a, [a, b], 2)


def test_select_takes_the_top_k_by_the_same_rank():
    points = [r(0, 90, 9), r(1, 85, 5), r(2, 70, 2), r(3, 84, 6)]
    assert [p.number for p in select(points, 2)] == [0, 2]  # the two ends of the front
    assert select(points, 0) == []


def test_eta_below_two_is_refused():
    with pytest.raises(ValueError, match="eta"):
        promotable(r(0, 1, 1), [], 1)
