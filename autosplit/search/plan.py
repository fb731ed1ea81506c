"""One time limit for the whole job: plan the teacher, the search and the final stage from this
machine's measured throughput, and never start work that cannot finish in time.

Machines of one kind differ 3-4x in speed, so nothing here uses a time measured elsewhere. The
plan starts from two throughputs measured at run time (training images/s of the teacher's
architecture and of a student at the budget) and corrects itself as real trainings finish
(:class:`CostModel`). When the limit is too short, work shrinks in a fixed order: fewer search
trials, then fewer finalists, then fewer seeds, then fewer final-stage epochs, then fewer teacher
epochs (the last two warned about).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Share of the limit held back for what the plan does not model (start-up, MLflow, fronts,
# export of the front at the end); the run must end within the limit + 5 %.
RESERVE = 0.04
RESERVE_MIN_SECONDS = 10.0  # a short limit still keeps room for the fronts and MLflow at the end
# How far past the limit the rest of a first-seed comparison whose best member (or a baseline)
# has trained may run, rather than leave that member with nothing to compare against: the
# limit is kept to within this share.
OVERRUN = 0.05


def end_reserve(time_limit: float) -> float:
    """Seconds at the end of the limit kept for the fronts and MLflow (``RESERVE``, at least
    ``RESERVE_MIN_SECONDS``)."""
    return max(RESERVE * time_limit, RESERVE_MIN_SECONDS)


def usable_seconds(time_limit: float) -> float:
    """The part of the limit work may fill: the limit less the reserve for the end."""
    return time_limit - end_reserve(time_limit)


# Validation passes are forward-only: about a third of a training step's work per image.
EVAL_WEIGHT = 1.0 / 3.0
MIN_SEARCH_JOBS = 2  # the search keeps room for at least this many rung-0 trials beyond baselines


@dataclass
class CostModel:
    """Seconds a training job takes here, from measured throughput, corrected as jobs finish.

    Throughput is measured at two sizes (``ref`` points: FLOPs -> training images/s) and
    interpolated in log-log space for other sizes (small networks run less efficiently per
    FLOP, so time is not simply proportional to FLOPs). Each finished job adds the ratio of its
    real to its predicted time; predictions are scaled by the median ratio of their kind.
    """

    ref: dict[float, float]  # FLOPs per image -> training images per second
    fixed_seconds: float = 2.0  # per job: build, FLOPs count, set-up
    ratios: dict[str, list[float]] = field(default_factory=dict)

    def images_per_second(self, flops: float) -> float:
        flops = max(flops, 1.0)
        points = sorted(self.ref.items())
        if len(points) == 1:  # one measurement: time proportional to FLOPs
            ((f0, r0),) = points
            return r0 * f0 / flops
        # The segment around ``flops`` (or the nearest end one), interpolated in log-log space.
        segments = list(zip(points, points[1:], strict=False))
        (f0, r0), (f1, r1) = next(((a, b) for a, b in segments if flops <= b[0]), segments[-1])
        # Slope between 0 (fixed cost per image) and -1 (cost proportional to FLOPs).
        slope = min(0.0, max(-1.0, math.log(r1 / r0) / math.log(f1 / f0)))
        return r0 * (flops / f0) ** slope

    def training_seconds(
        self,
        *,
        flops: float,
        epochs: int,
        rows: int,
        val_rows: int,
        kind: str = "trial",
        extra_images: float = 0.0,
    ) -> float:
        """Predicted wall time of training ``epochs`` over ``rows`` (validating each epoch)."""
        images = epochs * (rows + EVAL_WEIGHT * val_rows) + extra_images
        raw = self.fixed_seconds + images / self.images_per_second(flops)
        return raw * self.correction(kind)

    def correction(self, kind: str) -> float:
        """The median ratio of real to predicted seconds over the finished jobs of ``kind``;
        a kind with no history of its own borrows the nearest enclosing kind's
        (``trial/branches/hint`` -> ``trial/branches`` -> ``trial``), then the trials'; 1
        before any job has finished."""
        for key in (*kind_and_parents(kind), "trial"):
            if seen := self.ratios.get(key):
                return statistics.median(seen)
        return 1.0

    def observe(self, kind: str, predicted: float, actual: float) -> None:
        """A finished job of ``kind``, predicted by ``training_seconds`` at ``kind``: remember
        how far off the uncorrected prediction was, for the kind and every enclosing kind."""
        base = predicted / self.correction(kind)
        if base > 0 and actual > 0:
            for key in kind_and_parents(kind):
                self.ratios.setdefault(key, []).append(actual / base)


def kind_and_parents(kind: str) -> list[str]:
    """``trial/branches/hint``, ``trial/branches``, ``trial``: the kind, then each enclosing one."""
    parts = kind.split("/")
    return ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]


@dataclass(frozen=True)
class PlanInput:
    """What the planner needs to know, all measured or read from the space."""

    time_limit: float  # seconds for the whole job
    teacher_cached: bool
    teacher_epochs: int
    teacher_epoch_seconds: float  # one teacher epoch here, validation included
    final_seconds: float  # one final-fidelity training of one member with one seed
    final_fixed_seconds: float  # once per final stage (the teacher cache over its rows)
    final_members: int  # finalists wanted (the space's top_k)
    final_seeds: int
    baselines: int  # trained in the final stage beside the finalists
    rung0_seconds: float  # one cheapest-rung trial
    final_epochs: int = 1  # the epochs ``final_seconds`` is for (the space's final fidelity)
    portfolio: int = 0  # the warm start's recipes, each at least at the cheapest rung
    # The augmented views ``final_fixed_seconds`` builds (0: it does not depend on epochs): a
    # cache holds one view per epoch up to that many (``cache.cache_views``).
    final_cache_views: int = 0
    rung0_fixed_seconds: float = 0.0  # once per search (the teacher caches over rung 0's rows)


@dataclass(frozen=True)
class Plan:
    teacher_epochs: int
    teacher_seconds: float
    search_seconds: float
    finalists: int
    seeds: int
    final_seconds: float
    final_epochs: int = 1
    warnings: tuple[str, ...] = ()

    def describe(self) -> str:
        def minutes(seconds: float) -> str:
            return f"~{seconds / 60:.0f} min" if seconds >= 90 else f"~{seconds:.0f} s"

        teacher = (
            f"teacher {minutes(self.teacher_seconds)} ({self.teacher_epochs} epochs)"
            if self.teacher_seconds
            else "teacher cached"
        )
        return (
            f"plan: {teacher}, search {minutes(self.search_seconds)}, final "
            f"{minutes(self.final_seconds)} for {self.finalists} finalist"
            f"{'s' if self.finalists != 1 else ''} + baselines x {self.seeds} seed"
            f"{'s' if self.seeds != 1 else ''} at {self.final_epochs} epoch"
            f"{'s' if self.final_epochs != 1 else ''}"
        )


class TimeLimitTooShort(ValueError):
    pass


def make_plan(inp: PlanInput) -> Plan:
    """Shares of the limit. What must shrink shrinks in this order: search trials (down to the
    baselines and the portfolio at the cheapest rung, ``search_minimum``), then finalists, then seeds, then
    the final stage's epochs (down to 1), and only then the teacher's epochs, with a warning
    for each of the last two. The teacher comes last because every later search reuses it."""
    usable = usable_seconds(inp.time_limit)
    search_min = search_minimum(inp)
    epochs = 0 if inp.teacher_cached else inp.teacher_epochs
    per_epoch = inp.final_seconds / max(1, inp.final_epochs)

    def final_fixed(final_epochs: int) -> float:
        views = inp.final_cache_views
        if views <= 0:
            return inp.final_fixed_seconds
        return inp.final_fixed_seconds * min(final_epochs, views) / views

    def final(members: int, seeds: int, final_epochs: int) -> float:
        if members == 0:
            return 0.0
        return (
            final_fixed(final_epochs) + (members + inp.baselines) * seeds * per_epoch * final_epochs
        )

    top = inp.final_epochs
    options = [(k, inp.final_seeds, top) for k in range(inp.final_members, 0, -1)]
    options += [(1, s, top) for s in range(inp.final_seeds - 1, 0, -1)]
    options += [(1, 1, e) for e in range(top - 1, 0, -1)]
    if inp.final_members == 0:  # no final stage
        options = [(0, 0, 0)]
    for members, seeds, final_epochs in options:
        left = usable - epochs * inp.teacher_epoch_seconds - final(members, seeds, final_epochs)
        if left >= search_min:
            return Plan(
                epochs or inp.teacher_epochs,
                epochs * inp.teacher_epoch_seconds,
                left,
                members,
                seeds,
                final(members, seeds, final_epochs),
                final_epochs,
                _final_warning(final_epochs, top),
            )
    members, seeds, final_epochs = options[-1]
    smallest = final(members, seeds, final_epochs)
    if inp.teacher_cached:
        raise TimeLimitTooShort(_too_short(inp, usable, search_min + smallest))
    # Last resort: a shorter teacher, with the smallest final stage and search.
    room = usable - smallest - search_min
    fit = int(room // inp.teacher_epoch_seconds) if inp.teacher_epoch_seconds > 0 else epochs
    if fit < 1:
        raise TimeLimitTooShort(
            _too_short(inp, usable, search_min + smallest + inp.teacher_epoch_seconds)
        )
    fit = min(fit, epochs)
    left = usable - fit * inp.teacher_epoch_seconds - smallest
    warning = (
        f"the time limit gives the teacher {fit} of the {epochs} epochs its space asks "
        f"for (about {inp.teacher_epoch_seconds:.0f} s an epoch here); raise --time-limit "
        "for the full teacher"
    )
    return Plan(
        fit,
        fit * inp.teacher_epoch_seconds,
        left,
        members,
        seeds,
        smallest,
        final_epochs,
        (*_final_warning(final_epochs, top), warning),
    )


def search_minimum(inp: PlanInput) -> float:
    """The shortest search: the baselines and the portfolio's recipes (or ``MIN_SEARCH_JOBS``
    trials, whichever is more) at the cheapest rung, and the teacher caches they read."""
    jobs = inp.baselines + max(inp.portfolio, MIN_SEARCH_JOBS)
    return jobs * inp.rung0_seconds + inp.rung0_fixed_seconds


def _final_warning(final_epochs: int, wanted: int) -> tuple[str, ...]:
    if final_epochs >= wanted:
        return ()
    return (
        f"the time limit gives the final stage {final_epochs} of the {wanted} epochs its "
        "space asks for; raise --time-limit for the full final fidelity",
    )


def _too_short(inp: PlanInput, usable: float, needed: float) -> str:
    need = max(needed / (1.0 - RESERVE), needed + RESERVE_MIN_SECONDS)
    trials = (
        f"the portfolio's {inp.portfolio} recipes"
        if inp.portfolio > MIN_SEARCH_JOBS
        else f"{MIN_SEARCH_JOBS} trials"
    )
    return (
        f"--time-limit {inp.time_limit / 60:.1f}m is too short on this machine: the smallest "
        f"plan (one teacher epoch if not cached, baselines and {trials} at the "
        f"cheapest rung, one finalist with one seed) needs about {math.ceil(need / 60)} min"
    )


class Deadline:
    """An end in the clock's seconds (``None``: no end); "can this still finish in time?"."""

    def __init__(
        self, seconds: float | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self.started = clock()
        self.at = None if seconds is None else self.started + seconds

    @classmethod
    def until(cls, at: float | None, *, clock: Callable[[], float] = time.monotonic) -> Deadline:
        deadline = cls(None, clock=clock)
        deadline.at = at
        return deadline

    def remaining(self) -> float:
        return math.inf if self.at is None else self.at - self.clock()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.remaining()

    def elapsed(self) -> float:
        return self.clock() - self.started
