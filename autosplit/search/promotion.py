"""Multi-objective asynchronous successive halving: who goes up a rung.

Optuna prunes only single-objective studies, so the two-objective rule is ours. It follows
MO-ASHA (Schmucker et al., 2021, arXiv 2106.12639) in its *stopping* form, the form Optuna's
``SuccessiveHalvingPruner`` and Ray Tune's ASHA scheduler use: when a trial finishes rung ``k``
it is compared with every feasible trial that finished rung ``k`` so far (itself included) and
goes on to rung ``k + 1`` only if it is in their top ``1/eta``. Nobody waits for a rung to fill,
so workers never idle.

Ranking is NSGA-II's: non-dominated sorting on (validation accuracy up, FLOPs down), then, within
a layer, crowding distance (larger first: it keeps the front's spread, which is what a user
choosing a point on it wants). Remaining ties go to the more accurate trial, then the earlier one,
so the rule is deterministic.

With fewer than ``eta`` trials finished at a rung, ``floor(n / eta)`` is 0 and nothing could ever
start the next rung; as Optuna's pruner does for its first trials, a trial then goes on when no
finished trial dominates it (the multi-objective form of "best so far").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RungResult:
    """One trial's result at one rung: validation accuracy (%) and FLOPs (lower is better)."""

    number: int
    val_acc: float
    flops: float


def dominates(a: RungResult, b: RungResult) -> bool:
    """``a`` is at least as good as ``b`` in both objectives and better in one."""
    return (
        a.val_acc >= b.val_acc
        and a.flops <= b.flops
        and (a.val_acc > b.val_acc or a.flops < b.flops)
    )


def nondominated_layers(results: Sequence[RungResult]) -> list[list[RungResult]]:
    """Non-dominated sorting: layer 0 is the Pareto front, layer 1 the front of the rest, ..."""
    remaining = list(results)
    layers: list[list[RungResult]] = []
    while remaining:
        layer = [r for r in remaining if not any(dominates(o, r) for o in remaining)]
        layers.append(layer)
        chosen = {id(r) for r in layer}
        remaining = [r for r in remaining if id(r) not in chosen]
    return layers


def crowding_distances(layer: Sequence[RungResult]) -> dict[int, float]:
    """NSGA-II crowding distance of each trial (by number) within one layer.

    Per objective, the layer is sorted and each inner point gets the normalised gap between its
    two neighbours; the two ends of each objective get infinity. An objective with no spread
    adds nothing.
    """
    distance = {r.number: 0.0 for r in layer}
    if len(layer) <= 2:
        return {number: math.inf for number in distance}
    for key in (lambda r: r.val_acc, lambda r: r.flops):
        ordered = sorted(layer, key=lambda r: (key(r), r.number))
        low, high = key(ordered[0]), key(ordered[-1])
        distance[ordered[0].number] = distance[ordered[-1].number] = math.inf
        if high == low:
            continue
        for i in range(1, len(ordered) - 1):
            gap = (key(ordered[i + 1]) - key(ordered[i - 1])) / (high - low)
            distance[ordered[i].number] += gap
    return distance


def rank(results: Sequence[RungResult]) -> list[RungResult]:
    """Best first: by non-dominated layer, then crowding distance, accuracy, trial number."""
    ordered: list[RungResult] = []
    for layer in nondominated_layers(results):
        crowd = crowding_distances(layer)
        ordered += sorted(layer, key=lambda r: (-crowd[r.number], -r.val_acc, r.number))
    return ordered


def promotable(me: RungResult, finished: Sequence[RungResult], eta: int) -> bool:
    """Does ``me``, just finished at a rung, go on to the next one?

    ``finished`` holds the feasible trials finished at the same rung (``me`` may be among them;
    a trial is counted once by its number).
    """
    if eta < 2:
        raise ValueError(f"eta must be >= 2, got {eta}")
    pool = {r.number: r for r in finished}
    pool[me.number] = me
    results = list(pool.values())
    keep = len(results) // eta
    if keep == 0:
        return not any(dominates(other, me) for other in results)
    return me.number in {r.number for r in rank(results)[:keep]}


def select(results: Sequence[RungResult], k: int) -> list[RungResult]:
    """The ``k`` best by the same ranking (the final stage's finalists)."""
    return rank(results)[: max(0, k)]
