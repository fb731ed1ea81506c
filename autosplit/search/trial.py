"""What every job of a search does, a search trial at a rung (``rungs.search_trial``) and a
final-stage job (``final_stage.final_job``) alike: claim the trial, start its MLflow run, train
through the one code path ``autosplit train`` uses, and record the result on the trial and its
run (``record_result``). A candidate too large for its device is failed here, as out of memory.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch

from autosplit.cache import train_rows
from autosplit.checkpoint import save_checkpoint
from autosplit.config import atomic_write_text
from autosplit.distill.run import build_and_count, stage_epochs, train_candidate
from autosplit.flops import BudgetTooSmall
from autosplit.search import study as studies
from autosplit.search.attrs import PRECISION_PARAM, State, TrialAttrs, TrialMetrics
from autosplit.search.job_cost import work_images
from autosplit.search.space import Rung
from autosplit.train import EpochStats

if TYPE_CHECKING:
    from autosplit.distill.candidate import Candidate
    from autosplit.search.context import SearchContext

log = logging.getLogger(__name__)

OVER_BUDGET = "flops_over_budget"  # the trial's one constraint


class TrialOutOfMemory(RuntimeError):
    """A trial ran out of GPU memory; Optuna fails it and the worker goes on."""


def claim(ctx: SearchContext, trial: optuna.Trial, **fields: Any) -> None:
    """Record who runs ``trial``, where, and distilled from which teacher (and ``fields``)."""
    TrialAttrs(
        worker=studies.worker_id(),
        device=ctx.runtime.where,
        teacher_sha256=ctx.teacher_sha256,
        precision=ctx.runtime.precision,
        **fields,
    ).write(trial)


def start_run(
    ctx: SearchContext, trial: optuna.Trial, candidate: Candidate, tags: TrialAttrs
) -> str:
    """The trial's MLflow run, with the candidate's parameters and ``tags.run_tags()``; its id
    is recorded on the trial ("" when tracking is off)."""
    run_id = ctx.tracker.start_trial(
        trial_number=trial.number,
        params={**candidate.flat(), PRECISION_PARAM: ctx.runtime.precision},
        tags=tags.run_tags(),
    )
    TrialAttrs(run_id=run_id).write(trial)
    return run_id


def end_without_result(
    ctx: SearchContext,
    trial: optuna.Trial,
    run_id: str,
    *,
    state: str,
    run_state: str,
    flops: float | None = None,
    **fields: Any,
) -> None:
    """A job that ends without a result (over budget, out of time, failed): ``state`` and
    ``fields`` on the trial, its run ended as ``run_state`` (with the student's ``flops``)."""
    TrialAttrs(state=state, **fields).write(trial)
    ctx.tracker.end_trial(
        run_id,
        state=run_state,
        metrics=TrialMetrics(flops=flops, trial_number=trial.number).logged(),
    )


def set_over_budget(trial: optuna.Trial, flops: float, max_flops: int) -> float:
    """Record by how much the trial's student exceeds the budget, as a share of it (<= 0 when
    it fits), and return it. Optuna 5's samplers read the constraint. optuna-dashboard 0.21
    reads only the older ``constraints`` list, which only the samplers' ``constraints_func``
    writes (deprecated in Optuna 5), so the value is also a user attr: the dashboard shows,
    sorts and filters by those."""
    over = (flops - max_flops) / max_flops
    trial.set_constraint(OVER_BUDGET, over)
    TrialAttrs(flops_over_budget=over).write(trial)
    return over


def build_or_smallest(candidate: Candidate, ctx: SearchContext) -> tuple[Any, Any]:
    """Build and count; when no width fits the share, count the narrowest build instead, so
    the trial is recorded as infeasible with its real cost rather than failing."""
    try:
        return build_and_count(candidate, ctx.teacher.model, ctx.splits)
    except BudgetTooSmall as exc:
        log.info("no width fits (%s); counting the narrowest build", exc)
        return build_and_count(candidate.narrowest(), ctx.teacher.model, ctx.splits)


def at_fidelity(candidate: Candidate, rung: Rung) -> Candidate:
    """The candidate trained at ``rung``: its epochs over its first rows, from scratch.

    Restart, not resume: a rung's accuracy is then exactly what ``autosplit train`` reproduces
    at that fidelity, and every schedule (cosine lr, DKD/AEKT warm-up over the run) keeps its
    meaning; a finished 1-epoch cosine run resumed for 3 would be a warm restart instead.
    A warm-up (DKD, AEKT) keeps its share of the run: scaled from the candidate's epochs to the
    rung's, at least one epoch and at most the rung (3 of 30 epochs becomes 24 of 240).
    """
    values: dict[str, Any] = {"train.epochs": rung.epochs, "train.max_train_samples": rung.rows}
    warmup = candidate.logit_loss.get("warmup_epochs")
    if warmup is not None and warmup > 0:
        scaled = min(max(1, round(warmup * rung.epochs / candidate.train.epochs)), rung.epochs)
        if scaled != warmup:
            values["logit_loss.warmup_epochs"] = scaled
    return candidate.with_values(values)


def work(ctx: SearchContext, candidate: Candidate, n_stages: int) -> float:
    """Images ``candidate``'s training works through (``job_cost.work_images``)."""
    return work_images(
        stage_epochs(candidate.train, n_stages),
        train_rows(candidate, ctx.splits),
        len(ctx.splits.val),
    )


def train_job(
    ctx: SearchContext,
    trial: optuna.Trial,
    candidate: Candidate,
    flops: Any,
    run_id: str,
    taps: set[str],
    *,
    step_offset: int,
    rung: int | None,
    passes: int = 0,
) -> Any:
    """Train ``candidate`` through the one code path retrain uses; log each epoch. Returns
    the result and the seconds spent getting the teacher cache (built, loaded or held)."""

    def on_epoch_end(stats: EpochStats) -> None:
        ctx.tracker.log_epoch(
            run_id,
            step_offset + stats.epoch,
            {
                "train/loss": stats.train_loss,
                "train/acc": stats.train_acc,
                "val/acc": stats.val_acc,
                "train/lr": stats.lr,
                "train/images_per_s": stats.images_per_second,
                **({"search/rung": rung} if rung is not None else {}),
                **{f"train/{k}": v for k, v in stats.loss_terms.items()},
            },
        )

    cache_started = time.perf_counter()
    try:
        source = ctx.teacher_cache.get(taps, candidate, passes=passes)
        cache_seconds = time.perf_counter() - cache_started
        result = train_candidate(
            candidate,
            ctx.splits,
            ctx.teacher.model,
            ctx.runtime,
            teacher_source=source,
            progress=False,
            on_epoch_end=on_epoch_end,
            flops=flops,
        )
    except OSError:
        raise  # the environment's fault, not the candidate's: see ``workers.objective``
    except torch.OutOfMemoryError:
        # Too large for this device at these settings: failed, recorded as such (not re-run:
        # it would run out again), and the search goes on with the next trial.
        ctx.runtime.free_memory()
        line = (
            f"out of GPU memory: {candidate.label} at batch {candidate.train.batch_size} "
            f"on {ctx.runtime.where}"
        )
        end_without_result(
            ctx, trial, run_id, state=State.OUT_OF_MEMORY, run_state=State.FAILED, error=line
        )
        print(f"autosplit: trial {trial.number}: {line}; the search goes on", file=sys.stderr)
        raise TrialOutOfMemory(line) from None
    except Exception as exc:
        end_without_result(
            ctx, trial, run_id, state=State.FAILED, run_state=State.FAILED, error=str(exc)[:500]
        )
        raise
    return result, cache_seconds


def save_trial(
    ctx: SearchContext, trial: optuna.Trial, candidate: Candidate, result: Any, run_id: str
) -> Path:
    """The trained student's weights and its (pinned) candidate, for export; on a study that
    hosts share, the weights also go to the trial's MLflow run, so export works on any host."""
    folder = ctx.runs_dir / "studies" / ctx.study_name / f"trial-{trial.number:04d}"
    path = folder / "student.pt"
    save_checkpoint(
        path,
        kind="student",
        config=candidate.to_dict(),
        state_dict={k: v.detach().cpu() for k, v in result.student.state_dict().items()},
        extra={"val_acc": result.val_acc, "trial": trial.number},
    )
    atomic_write_text(folder / "candidate.yaml", candidate.to_yaml())
    if ctx.share_weights and run_id:
        uri = ctx.tracker.publish_file(path, folder="student", run_id=run_id)
        if uri is not None:
            TrialAttrs(weights_uri=uri).write(trial)
    return path


def record_result(
    ctx: SearchContext,
    trial: optuna.Trial,
    run_id: str,
    candidate: Candidate,
    result: Any,
    *,
    weights: Path,
    state: str,
    run_state: str,
    started: float,
    train_seconds: float,
    attrs: dict[str, Any],
    metrics: dict[str, Any],
    overhead: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The one record of a trained job: its result on the trial (``state``, the pinned
    ``candidate``, accuracy, FLOPs, weights, training cost, and ``attrs``), then its MLflow run
    ended as ``run_state`` with the same figures and ``metrics``: its wall time from
    ``started`` (``time.perf_counter``) to this record. ``overhead``: (seconds before training,
    when recording started), for a trial that logs its time around training.
    Returns the objective: (val_acc, the FLOPs figure the search optimises)."""
    cost = train_cost_attrs(result)
    TrialAttrs(
        state=state,
        candidate=candidate.to_dict(),
        val_acc=result.val_acc,
        expected_flops=result.expected_flops,
        weights=str(weights),
        train_seconds=train_seconds,
        **cost,
        **attrs,
    ).write(trial)
    if overhead is not None:
        before, record_started = overhead
        metrics = {**metrics, "overhead_seconds": before + time.perf_counter() - record_started}
    ctx.tracker.end_trial(
        run_id,
        state=run_state,
        metrics=TrialMetrics(
            val_acc=result.val_acc,
            flops=result.worst_case_flops,
            expected_flops=result.expected_flops,
            params=result.params,
            wall_seconds=time.perf_counter() - started,
            train_seconds=train_seconds,
            trial_number=trial.number,
            **cost,
            **metrics,
        ).logged(),
    )
    return result.val_acc, objective_cost(ctx, result)


def train_cost_attrs(result: Any) -> dict[str, Any]:
    """The training cost of a trained result, as ``TrialAttrs`` fields."""
    return {
        "train_images": int(result.train_images),
        "train_flops": float(result.train_flops),
        "train_cost": float(result.train_cost),
    }


def objective_cost(ctx: SearchContext, result: Any) -> float:
    """The FLOPs figure of a trained result that the search optimises (``front_cost``)."""
    return float(
        result.expected_flops if ctx.front_cost == "expected_flops" else result.worst_case_flops
    )
