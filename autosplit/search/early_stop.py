"""Early stopping for a two-objective search (Optuna prunes only single-objective studies).

The rule asks whether a running trial can still reach the Pareto front: if a finished feasible
trial that cost no more FLOPs was already ``margin`` points more accurate *at the same epoch*,
the running one is dominated in both objectives so far and is stopped. Comparing at equal
epochs (not against final accuracies) keeps the test fair to slow starters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autosplit.search.space import EarlyStopping


@dataclass(frozen=True)
class Finished:
    """A finished feasible trial: its cost and its validation accuracy after each epoch."""

    flops: float
    curve: Sequence[float]


def should_stop(rule: EarlyStopping, *, epoch: int, val_acc: float, flops: float,
                finished: Sequence[Finished], total_epochs: int) -> bool:
    """True when the running trial (``val_acc`` after ``epoch``, cost ``flops``) is dominated."""
    if not rule.enabled or epoch < rule.after_epoch or epoch >= total_epochs:
        return False
    if len(finished) < rule.min_trials:
        return False
    for other in finished:
        if len(other.curve) < epoch:
            continue
        cheaper = other.flops <= flops * (1.0 + rule.flops_tolerance)
        if cheaper and other.curve[epoch - 1] >= val_acc + rule.margin:
            return True
    return False
