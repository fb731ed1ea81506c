"""What a final-stage job costs here, planned from what its member measured at its rungs.

The planner's throughput model (``plan.CostModel``) knows one student at the budget; a member
may be a chain of K+1 networks trained stage by stage, with an IE-KD auto-encoder and a teacher
cache over every training row to build first. So a final job is estimated from the member's own
rungs: the seconds each rung's training took against the images it worked through (training
images of every stage, plus the validation passes), fitted as fixed seconds + seconds per image
and read at the final fidelity's images. To that are added what the job builds first: the
teacher cache over its rows (per seed where augmentation makes the cache depend on it) unless
it is on disk, and the distiller's ``prepare`` work (IE-KD's auto-encoder: ``prepare_passes``
over the rows, at the seconds per image measured where it was trained).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autosplit.search.attrs import Stage, TrialAttrs
from autosplit.search.plan import EVAL_WEIGHT

if TYPE_CHECKING:
    from autosplit.distill.candidate import Candidate
    from autosplit.search.context import SearchContext


@dataclass(frozen=True)
class JobEstimate:
    """Predicted seconds of one job by part, before the correction learned from finished jobs.
    ``cache`` is paid only while the teacher cache file ``cache_file`` is not on disk."""

    train: float  # training (every stage) and validation
    prepare: float = 0.0  # the distiller's work before training (IE-KD's auto-encoder)
    cache: float = 0.0  # building the teacher cache the job reads
    cache_file: str = ""  # where that cache lives once built ("" when none is needed)
    source: str = "rungs"  # "rungs": from the member's measurements; "model": throughput model
    # What a job costs around its training (build, FLOPs count, MLflow run, checkpoint, the
    # study's ask and tell): the median measured over finished jobs (``job_overhead``).
    overhead: float = 0.0

    def total(self, *, cache_ready: bool = False) -> float:
        return self.train + self.prepare + self.overhead + (0.0 if cache_ready else self.cache)

    def as_dict(self) -> dict[str, Any]:
        return {
            "train": round(self.train, 2),
            "prepare": round(self.prepare, 2),
            "cache": round(self.cache, 2),
            "overhead": round(self.overhead, 2),
            "total": round(self.total(), 2),
            "cache_file": self.cache_file,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, stored: Mapping[str, Any]) -> JobEstimate:
        return cls(
            train=float(stored["train"]),
            prepare=float(stored.get("prepare", 0.0)),
            cache=float(stored.get("cache", 0.0)),
            cache_file=str(stored.get("cache_file", "")),
            source=str(stored.get("source", "rungs")),
            overhead=float(stored.get("overhead", 0.0)),
        )


def work_images(epochs: Sequence[int], rows: int, val_rows: int) -> float:
    """Images a training of ``epochs`` per stage works through over ``rows``: every epoch of
    every stage trains its rows and validates (forward only, ``EVAL_WEIGHT`` of a step)."""
    return sum(epochs) * (rows + EVAL_WEIGHT * val_rows)


def extrapolate(points: Iterable[tuple[float, float]], images: float) -> float | None:
    """Seconds at ``images`` from measured (images, seconds) points: the line through the two
    largest (fixed seconds + seconds per image: a rung of a few hundred rows is mostly fixed
    cost), or the largest's seconds per image when there is one point or the line does not
    rise. None without a measurement."""
    measured = sorted((w, s) for w, s in points if w > 0 and s > 0)
    if not measured:
        return None
    (w1, s1) = measured[-1]
    if len(measured) >= 2:
        w0, s0 = measured[-2]
        if w1 > w0 and s1 > s0:
            per_image = (s1 - s0) / (w1 - w0)
            return max(0.0, s1 - per_image * w1) + per_image * images
    return s1 / w1 * images


def seconds_per_image(pairs: Iterable[tuple[float, float]]) -> float | None:
    """Median seconds per image over measured (seconds, images) pairs with images > 0."""
    rates = [s / n for s, n in pairs if n > 0 and s > 0]
    return statistics.median(rates) if rates else None


def prepare_rates(
    rungs_by_trial: Iterable[Sequence[Mapping[str, Any]]],
) -> list[tuple[float, float]]:
    """(seconds, images) of every rung whose distiller trained its ``prepare`` work."""
    return [
        (float(r.get("prepare_seconds", 0.0)), float(r.get("prepare_images", 0)))
        for rungs in rungs_by_trial
        for r in rungs
        if r.get("prepare_images")
    ]


def estimate_job(
    ctx: SearchContext,
    candidate: Candidate,
    *,
    taps: set[str],
    n_stages: int,
    passes: int,
    rungs: Sequence[tuple[Candidate, Mapping[str, Any]]],
    flops: float,
    study_prepare: Sequence[tuple[float, float]] = (),
    overhead: float = 0.0,
) -> JobEstimate:
    """The cost of training ``candidate`` (a member at the final fidelity) here, from the
    member's measured ``rungs``: each as (the candidate it trained, its record in
    ``TrialAttrs.rungs``).
    ``study_prepare``: (seconds, images) of the prepare work other trials measured, used when
    the member reused an auto-encoder trained earlier instead of training its own."""
    from autosplit.cache import train_rows
    from autosplit.distill.run import images_per_epoch, stage_epochs

    val_rows = len(ctx.splits.val)
    points = []
    for at, rung in rungs:
        images = work_images(stage_epochs(at.train, n_stages), train_rows(at, ctx.splits), val_rows)
        points.append((images, float(rung["seconds"]) - float(rung.get("prepare_seconds", 0.0))))
    rows = train_rows(candidate, ctx.splits)
    final_images = work_images(stage_epochs(candidate.train, n_stages), rows, val_rows)
    train = extrapolate(points, final_images)
    source = "rungs"
    if train is None:  # never trained (a member from an older study): the throughput model
        train = ctx.estimate(candidate, flops, kind="final", n_stages=n_stages)
        train /= ctx.cost_model.correction("final")
        source = "model"
    prepare = 0.0
    if passes:
        own = prepare_rates([[rung for _, rung in rungs]])
        rate = seconds_per_image(own) or seconds_per_image(study_prepare)
        if rate is None:  # no auto-encoder measured anywhere: a training step's time per image
            rate = train / final_images
        prepare = rate * passes * images_per_epoch(rows, candidate.train.batch_size)
    cache, path = cache_estimate(ctx, candidate, taps, passes=passes)
    return JobEstimate(train, prepare, cache, path, source, overhead)


def study_prepare_rate(study: Any) -> float | None:
    """Seconds per image of the ``prepare`` work (IE-KD's auto-encoder) the study's rungs
    measured; None before any rung has trained one."""
    return seconds_per_image(
        prepare_rates(TrialAttrs.read(t).rungs or [] for t in study.get_trials(deepcopy=False))
    )


def first_prepare(rate: float, candidate: Candidate, splits: Any, passes: int) -> float:
    """Seconds of a trial's ``prepare`` work (IE-KD's auto-encoder: ``passes`` over its rows)
    at its first rung, at ``rate`` seconds per image: what the study's rungs measured
    (``study_prepare_rate``), else a few of its steps timed here
    (``Distiller.prepare_seconds_per_image``). An auto-encoder trained earlier in the process
    is reused and costs nothing: this errs on the long side then."""
    from autosplit.cache import train_rows
    from autosplit.distill.run import images_per_epoch

    rows = train_rows(candidate, splits)
    return rate * passes * images_per_epoch(rows, candidate.train.batch_size)


def job_overhead(overheads: Mapping[str, Sequence[float]], default: float) -> float:
    """Seconds a final job costs beyond training and its cache: the median measured over the
    final jobs finished so far, else over the search's trials (whose cycle also holds the
    front's refresh: an upper bound), else ``default``."""
    seen = overheads.get(Stage.FINAL) or overheads.get(Stage.SEARCH)
    return statistics.median(seen) if seen else default


def cache_estimate(
    ctx: SearchContext, candidate: Candidate, taps: set[str], *, passes: int = 0
) -> tuple[float, str]:
    """Seconds to get the teacher cache ``candidate`` trains from, and its file; it holds the
    views the job reads (``cache.cache_views``; ``passes``: the distiller's prepare passes).
    Held in memory it costs nothing. On disk, reading it back costs its size at the rate this
    process measured loading cache files (0 before any load). Else it is built: the seconds
    per image and view are what this process measured building caches of the same outputs,
    else of any (``HeldTeacherCache.seconds_per_image``), else the throughput model's teacher
    forward pass (``EVAL_WEIGHT`` of a training step)."""
    from autosplit.cache import train_rows, usable_cache_views

    views, path, on_disk = usable_cache_views(
        candidate,
        ctx.teacher.key,
        ctx.splits,
        ctx.runs_dir,
        views=ctx.space.settings.teacher_views,
        passes=passes,
        taps=taps,
    )
    held = ctx.teacher_cache
    if held.holds(taps, candidate, passes=passes):
        return 0.0, str(path)
    if on_disk:
        per_byte = held.seconds_per_byte_read()
        return (path.stat().st_size * per_byte if per_byte else 0.0), str(path)
    images = train_rows(candidate, ctx.splits) * views
    per_image = held.seconds_per_image(taps)
    if per_image is None:
        per_image = EVAL_WEIGHT / ctx.cost_model.images_per_second(ctx.teacher_flops)
    return images * per_image, str(path)
