"""The Pareto front of a search — accuracy against FLOPs under a budget — as pure logic.

No MLflow, Optuna, plotting or printing here: the driver, ``autosplit front``
(``front_text.py``) and the tracker (``front_plots.py``) all read the same few functions, so the
table a user prints and the plot in ``mlflow ui`` cannot disagree.

Conventions used throughout:
- feasible = a *complete* trial whose worst-case FLOPs are within the budget. Feasibility always
  uses worst-case FLOPs (every part runs), because a deployment must fit its worst input.
- the front may be drawn against worst-case (``cost="flops"``, the default) or expected FLOPs
  (``cost="expected_flops"``, early-exit chains), falling back to worst-case where a trial has
  no expected figure.
- FLOPs are fvcore's: one multiply-add counts as one FLOP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from autosplit.search.attrs import Stage, State

FLOPS_CONVENTION = "fvcore: one multiply-add = one FLOP"
Cost = Literal["flops", "expected_flops"]


@dataclass(frozen=True)
class TrialRecord:
    """What the driver knows about one trial, finished or not.

    ``state`` is a ``State``: complete, pruned, infeasible, failed, running (or waiting), or
    another a trial stored; only complete trials carry a final ``val_acc`` (percent, 0-100).
    """

    number: int
    state: str
    val_acc: float | None
    flops: int | None
    expected_flops: float | None
    params: int | None
    label: str  # short description, e.g. "res_chain K=2 + dkd"
    run_id: str | None = None
    baseline: str | None = None  # "kd-single" / "best-published" for the baseline trials
    stage: str = Stage.SEARCH  # or FINAL (a final-stage job: ``member`` x ``seed``)
    rung_accs: tuple[float, ...] = ()  # search: val accuracy at each rung reached
    member: int | None = None  # final: the search trial this job retrains
    seed: int | None = None  # final: the training seed
    train_cost: float | None = None  # images seen over one joint run's (``TrialAttrs``)


def search_records(records: Iterable[TrialRecord]) -> list[TrialRecord]:
    """The search phase's trials (complete = reached the top rung; stopped below it)."""
    return [r for r in records if r.stage == Stage.SEARCH]


def rung_records(records: Iterable[TrialRecord], rung: int) -> list[TrialRecord]:
    """Every search trial that finished ``rung``, with its accuracy *at that rung*, as a
    complete record: the rung's front is drawn from these."""
    import dataclasses

    return [
        dataclasses.replace(r, state=State.COMPLETE, val_acc=r.rung_accs[rung])
        for r in records
        if r.stage == Stage.SEARCH and len(r.rung_accs) > rung and r.state != State.FAILED
    ]


@dataclass(frozen=True)
class FinalMember:
    """One member of the final stage: a search trial retrained at the final fidelity with
    several seeds. Accuracy is the mean over seeds; ``sd`` the sample standard deviation."""

    number: int  # the search trial
    label: str
    baseline: str | None
    flops: int
    expected_flops: float
    params: int | None
    val_accs: tuple[float, ...]
    seeds: tuple[int, ...]
    trials: tuple[int, ...]  # the final-stage trials, one per seed
    train_cost: float | None = None  # of one seed's training (``TrialRecord.train_cost``)
    by_seed: tuple[tuple[int, float], ...] = ()  # (seed index, val acc), for equal-seed margins

    @property
    def val_mean(self) -> float:
        return sum(self.val_accs) / len(self.val_accs)

    @property
    def val_sd(self) -> float:
        n = len(self.val_accs)
        if n < 2:
            return 0.0
        mean = self.val_mean
        return (sum((a - mean) ** 2 for a in self.val_accs) / (n - 1)) ** 0.5

    def record(self) -> TrialRecord:
        """As a record (mean accuracy), for the front and hypervolume functions."""
        return TrialRecord(
            number=self.number,
            state=State.COMPLETE,
            val_acc=self.val_mean,
            flops=self.flops,
            expected_flops=self.expected_flops,
            params=self.params,
            label=self.label,
            baseline=self.baseline,
            train_cost=self.train_cost,
        )


def final_members(
    records: Iterable[TrialRecord], members: Sequence[int] | None = None
) -> list[FinalMember]:
    """The final stage's completed jobs grouped by member (one job per seed counted once),
    limited to ``members`` (the latest final stage's) when given; by member number."""
    records = list(records)
    by_number = {r.number: r for r in records}
    jobs: dict[int, dict[int, TrialRecord]] = {}
    for r in sorted(records, key=lambda r: r.number):
        if (
            r.stage == Stage.FINAL
            and r.state == State.COMPLETE
            and r.val_acc is not None
            and r.member is not None
            and (members is None or r.member in members)
        ):
            jobs.setdefault(r.member, {}).setdefault(r.seed if r.seed is not None else -1, r)
    out = []
    for number, by_seed in sorted(jobs.items()):
        runs = list(by_seed.values())
        source = by_number.get(number, runs[0])
        expected = [r.expected_flops for r in runs if r.expected_flops is not None]
        out.append(
            FinalMember(
                number=number,
                label=source.label or runs[0].label,
                baseline=source.baseline or runs[0].baseline,
                flops=int(runs[0].flops if runs[0].flops is not None else source.flops or 0),
                expected_flops=(
                    sum(expected) / len(expected) if expected else float(runs[0].flops or 0)
                ),
                params=source.params,
                val_accs=tuple(float(r.val_acc) for r in runs),
                seeds=tuple(sorted(by_seed)),
                trials=tuple(r.number for r in runs),
                train_cost=runs[0].train_cost,
                by_seed=tuple(sorted((s, float(r.val_acc)) for s, r in by_seed.items())),
            )
        )
    return out


def final_front(
    members: Sequence[FinalMember], budget_flops: int, *, cost: Cost = "flops"
) -> list[FinalMember]:
    """The non-dominated members on (mean accuracy, cost), cheapest first."""
    by_number = {m.number: m for m in members}
    return [
        by_number[r.number]
        for r in pareto_front([m.record() for m in members], budget_flops, cost=cost)
    ]


def is_feasible(record: TrialRecord, budget_flops: int) -> bool:
    """Complete, measured and within budget on worst-case FLOPs."""
    return (
        record.state == State.COMPLETE
        and record.val_acc is not None
        and record.flops is not None
        and record.flops <= budget_flops
    )


def cost_of(record: TrialRecord, cost: Cost = "flops") -> float:
    """The FLOPs figure the front is drawn against (expected falls back to worst-case)."""
    if cost == "expected_flops" and record.expected_flops is not None:
        return float(record.expected_flops)
    if cost not in ("flops", "expected_flops"):
        raise ValueError(f"cost must be 'flops' or 'expected_flops', not {cost!r}")
    assert record.flops is not None
    return float(record.flops)


def pareto_front(
    records: Iterable[TrialRecord], budget_flops: int, *, cost: Cost = "flops"
) -> list[TrialRecord]:
    """Feasible trials no other feasible trial beats on both accuracy and cost, cheapest first.

    Exact duplicates (same accuracy, same cost) are all kept — neither dominates the other and
    the user may want to see every recipe that reached the point; they are ordered by number.
    """
    feasible = [r for r in records if is_feasible(r, budget_flops)]
    # Cheapest first; at equal cost the most accurate first, so a sweep keeping the best
    # accuracy so far admits exactly the non-dominated points.
    feasible.sort(key=lambda r: (cost_of(r, cost), -(r.val_acc or 0.0), r.number))
    front: list[TrialRecord] = []
    for record in feasible:
        assert record.val_acc is not None
        if not front or record.val_acc > front[-1].val_acc:  # type: ignore[operator]
            front.append(record)
        elif record.val_acc == front[-1].val_acc and cost_of(record, cost) == cost_of(
            front[-1], cost
        ):
            front.append(record)  # an exact duplicate of the last front point
    return front


def _hypervolume_of_front(front: Sequence[TrialRecord], budget_flops: int, cost: Cost) -> float:
    """Area dominated by a front (cheapest first, accuracy rising) up to the point (1, 1).

    In normalised space x = cost/budget and y = 1 - acc/100 (both minimised), for x between two
    consecutive front points the best y reached is the left point's, so the area is a sum of
    rectangles of width (x_next - x) and height (1 - y) = acc/100.
    """
    area = 0.0
    for i, record in enumerate(front):
        x = min(max(cost_of(record, cost) / budget_flops, 0.0), 1.0)
        x_next = (
            min(max(cost_of(front[i + 1], cost) / budget_flops, 0.0), 1.0)
            if i + 1 < len(front)
            else 1.0
        )
        height = min(max((record.val_acc or 0.0) / 100.0, 0.0), 1.0)
        area += (x_next - x) * height
    return area


def hypervolume(
    records: Iterable[TrialRecord], budget_flops: int, *, cost: Cost = "flops"
) -> float:
    """Exact 2-D hypervolume of the feasible front, normalised to [0, 1], reference (1, 1).

    0 means no feasible trial; 1 would be 100 % accuracy at zero FLOPs. One number that rises
    only when the front improves, so it can be compared across samplers at equal trials.
    """
    if budget_flops <= 0:
        raise ValueError(f"budget_flops must be positive, got {budget_flops}")
    return _hypervolume_of_front(pareto_front(records, budget_flops, cost=cost), budget_flops, cost)


def hypervolume_history(
    records: Iterable[TrialRecord], budget_flops: int, *, cost: Cost = "flops"
) -> list[tuple[int, float]]:
    """(trial number, hypervolume of trials 0..number) for every trial, in order of number.

    Non-decreasing by construction. Keeps only the running front, so it costs
    O(trials x front size) rather than recomputing from scratch at every trial.
    """
    if budget_flops <= 0:
        raise ValueError(f"budget_flops must be positive, got {budget_flops}")
    history: list[tuple[int, float]] = []
    front: list[TrialRecord] = []
    volume = 0.0
    for record in sorted(records, key=lambda r: r.number):
        if is_feasible(record, budget_flops):
            front = pareto_front([*front, record], budget_flops, cost=cost)
            volume = _hypervolume_of_front(front, budget_flops, cost)
        history.append((record.number, volume))
    return history


@dataclass(frozen=True)
class Margin:
    """The search's best member against the best baseline over the seeds both trained."""

    member: FinalMember
    baseline: FinalMember
    seeds: tuple[int, ...]
    member_accs: tuple[float, ...]
    baseline_accs: tuple[float, ...]

    @property
    def delta(self) -> float:
        """Difference of the means (points of val accuracy), member minus baseline."""
        return _mean(self.member_accs) - _mean(self.baseline_accs)

    @property
    def pooled_sd(self) -> float | None:
        """Pooled sample sd of the two (None with one seed: no spread measured)."""
        n = len(self.seeds)
        if n < 2:
            return None
        var = (_var(self.member_accs) + _var(self.baseline_accs)) / 2  # equal n: plain mean
        return var**0.5

    def line(self) -> str:
        n = len(self.seeds)
        head = (
            f"margin of the search's best (trial {self.member.number}, {self.member.label}) "
            f"over the best baseline ({self.baseline.baseline}, trial {self.baseline.number}) "
            f"at equal seeds: {_mean(self.member_accs):.2f} vs {_mean(self.baseline_accs):.2f}, "
            f"Δ {self.delta:+.2f} pt"
        )
        sd = self.pooled_sd
        if sd is None:
            return f"{head} over 1 seed (no sd: one seed cannot say whether it exceeds noise)"
        verdict = "exceeds" if abs(self.delta) > sd else "does not exceed"
        return f"{head} over {n} seeds; pooled sd {sd:.2f}: the difference {verdict} it"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _var(values: Sequence[float]) -> float:
    mean = _mean(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def margin(members: Sequence[FinalMember]) -> Margin | None:
    """The most accurate non-baseline member against the most accurate baseline, both over the
    seeds they share (None when either is missing or they share no seed)."""
    searched = [m for m in members if not m.baseline and m.by_seed]
    baselines = [m for m in members if m.baseline and m.by_seed]
    if not searched or not baselines:
        return None
    best = max(searched, key=lambda m: (m.val_mean, -m.number))
    mine = dict(best.by_seed)

    def shared(other: FinalMember) -> list[int]:
        return sorted(set(mine) & {s for s, _ in other.by_seed})

    rivals = [b for b in baselines if shared(b)]
    if not rivals:
        return None
    top = max(rivals, key=lambda b: (_mean([dict(b.by_seed)[s] for s in shared(b)]), -b.number))
    seeds = shared(top)
    theirs = dict(top.by_seed)
    return Margin(
        best,
        top,
        tuple(seeds),
        tuple(mine[s] for s in seeds),
        tuple(theirs[s] for s in seeds),
    )


MIN_TAU_N = 5  # below this Kendall's τ says little (n = 4: p >= 0.08 even for a perfect order)
