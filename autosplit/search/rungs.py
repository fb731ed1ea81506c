"""A search trial: draw a candidate, count its FLOPs, then train it rung by rung while
successive halving promotes it (``promotion.promotable``) and the time left allows.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from autosplit.cache import train_rows
from autosplit.distill.run import deployed_parameters
from autosplit.search import study as studies
from autosplit.search.attrs import Stage, State, TrialAttrs
from autosplit.search.job_cost import (
    cache_estimate,
    extrapolate,
    first_prepare,
    study_prepare_rate,
)
from autosplit.search.promotion import RungResult, promotable
from autosplit.search.trial import (
    at_fidelity,
    build_or_smallest,
    claim,
    end_without_result,
    objective_cost,
    record_result,
    save_trial,
    set_over_budget,
    start_run,
    train_job,
    work,
)

if TYPE_CHECKING:
    from autosplit.search.context import SearchContext

log = logging.getLogger(__name__)


def search_trial(ctx: SearchContext, trial: optuna.Trial) -> tuple[float, float]:
    """Draw, count, then train rung by rung while successive halving promotes the trial.

    Each rung trains from scratch at its fidelity (see ``trial.at_fidelity``). Returns
    (val_acc, FLOPs) at the top rung; a trial stopped below it is PRUNED, its rung results kept
    as user attrs.
    """
    started = time.perf_counter()
    claim(ctx, trial, stage=Stage.SEARCH, rungs=[])  # a retried trial starts its rungs again
    if isinstance(trial.study.sampler, studies.TrialSeededSampler):
        TrialAttrs(sampler_seed=trial.study.sampler.seed_for(trial.number)).write(trial)
    what = TrialAttrs.read(trial)
    baseline = what.baseline
    overrides = ctx.space.overrides(baseline=baseline, portfolio=what.portfolio)
    candidate = ctx.space.suggest(trial, ctx.max_flops, overrides=overrides)
    distiller, flops = build_or_smallest(candidate, ctx)
    student = distiller.student
    # Pin the solved widths: the recorded candidate rebuilds exactly this student, fast.
    candidate = candidate.with_values(
        {"split.base_width": student.base_width, "split.part_width": student.part_width}
    )
    over = set_over_budget(trial, flops.worst_case, ctx.max_flops)
    TrialAttrs(
        label=candidate.label,
        flops=int(flops.worst_case),
        params=deployed_parameters(student),
    ).write(trial)
    taps = set(distiller.teacher_taps)
    n_stages = len(distiller.stages())
    passes = distiller.prepare_passes
    # Its first rung plans the auto-encoder at the rate the study measured, else at a few of
    # its steps timed now (the distiller is gone once the rungs train); not for a candidate
    # over budget, which never trains.
    prepare_rate = study_prepare_rate(trial.study) if passes and over <= 0 else 0.0
    if prepare_rate is None:
        prepare_rate = distiller.prepare_seconds_per_image(ctx.runtime, candidate.train.batch_size)
    del distiller, student  # train_candidate builds its own, from the pinned candidate
    tags = TrialAttrs(label=candidate.label, baseline=baseline, stage=Stage.SEARCH)
    run_id = start_run(ctx, trial, candidate, tags)
    overhead = time.perf_counter() - started
    if over > 0:
        end_without_result(
            ctx,
            trial,
            run_id,
            state=State.INFEASIBLE,
            run_state=State.INFEASIBLE,
            flops=flops.worst_case,
            candidate=candidate.to_dict(),
        )
        log.info(
            "trial %d over budget: %d > %d FLOPs, not trained",
            trial.number,
            flops.worst_case,
            ctx.max_flops,
        )
        return 0.0, float(flops.worst_case)

    rungs = ctx.rungs(candidate)
    reached: list[dict[str, Any]] = []
    result = trained = None
    stop_reason = ""
    # The cost model corrects its predictions per structure and feature loss, as measured by
    # the trials of the same ones: on Fashion-MNIST 0.25x branches and chains with a hint took
    # 1.7-2.8x their first rung's estimate, the same branches without a hint 0.8x and single
    # students 0.9-1.1x (one hint regressor per part, small networks slower per FLOP).
    kind = f"trial/{candidate.structure.name}/{candidate.feature_loss.name}"
    for index, rung in enumerate(rungs):
        at = at_fidelity(candidate, rung)
        images = work(ctx, at, n_stages)  # what this rung works through
        modelled = ctx.estimate(at, flops.worst_case, kind=kind, n_stages=n_stages)
        # Above the first rung: from this trial's own rungs, as a final job is.
        measured = (
            extrapolate([(r["work"], r["seconds"] - r["prepare_seconds"]) for r in reached], images)
            if reached
            else None
        )
        estimate = modelled if measured is None else measured
        if passes and not reached:  # IE-KD's auto-encoder
            estimate += first_prepare(prepare_rate, at, ctx.splits, passes)
        cache_seconds = cache_estimate(ctx, at, taps, passes=passes)[0]  # built before it trains
        # The warm start (baselines, then the portfolio) is never given up for extra
        # finalists or later seeds: its cheapest rung leaves only the comparison's time.
        warm_start = index == 0 and bool(baseline or what.portfolio)
        if not ctx.search_fits(estimate + cache_seconds, warm_start=warm_start):
            log.info(
                "trial %d stops before rung %d: ~%.1f s would leave the final stage less than "
                "its %.0f s (%.0f s left)",
                trial.number,
                index,
                estimate + cache_seconds,
                ctx.reserve_for(ctx.schedule.final_reserve, warm_start=warm_start),
                ctx.schedule.deadline.remaining(),
            )
            stop_reason = "time"
            break
        outcome, cache_took = train_job(
            ctx,
            trial,
            at,
            flops,
            run_id,
            taps,
            step_offset=sum(r["epochs"] for r in reached),
            rung=index,
            passes=passes,
        )
        if measured is None:  # only the cost model's own predictions teach it
            ctx.cost_model.observe(kind, modelled, outcome.seconds - outcome.prepare_seconds)
        result, trained = outcome, at
        reached.append(
            {
                "epochs": rung.epochs,
                "rows": train_rows(at, ctx.splits),
                "val_acc": outcome.val_acc,
                "seconds": round(outcome.seconds, 2),
                "expected_flops": outcome.expected_flops,
                # What the final stage plans this member's jobs from (``job_cost``).
                "prepare_seconds": round(outcome.prepare_seconds, 2),
                "prepare_images": outcome.prepare_images,
                "cache_seconds": round(cache_took, 2),
                "estimate_s": round(estimate + cache_seconds, 2),
                "work": images,
            }
        )
        TrialAttrs(rungs=reached).write(trial)
        if index + 1 < len(rungs):
            if baseline and ctx.schedule.final_reserve > 0:
                # The final stage retrains every baseline at its fidelity whatever its rungs
                # say; under a time limit its higher rungs would only take the search's time
                # (on Fashion-MNIST, two baselines' rung 1 took 140 s of a 7-minute search).
                stop_reason = "baseline"
                break
            me = RungResult(trial.number, outcome.val_acc, objective_cost(ctx, outcome))
            if not promotable(me, finished_at_rung(trial.study, index, ctx), ctx.eta):
                stop_reason = "halving"
                break

    if result is None:  # not even the cheapest rung fits in the time left
        end_without_result(
            ctx,
            trial,
            run_id,
            state=State.SKIPPED,
            run_state=State.PRUNED,
            candidate=candidate.to_dict(),
        )
        # A baseline or portfolio recipe stays queued for the study's next search.
        studies.give_back(trial)
        trial.study.stop()
        raise optuna.TrialPruned("no time left for the cheapest rung")

    record_started = time.perf_counter()
    if result.exit is not None:
        trained = trained.with_values({"structure.exit_threshold": result.exit.threshold})
    weights = save_trial(ctx, trial, trained, result, run_id)
    train_seconds = sum(r["seconds"] for r in reached)
    ctx.train_seconds += train_seconds
    ctx.record_overhead(
        Stage.SEARCH, started, train_seconds + sum(r["cache_seconds"] for r in reached)
    )
    top = len(reached) == len(rungs)
    objective = record_result(
        ctx,
        trial,
        run_id,
        trained,
        result,
        weights=weights,
        state=State.COMPLETE if top else State.STOPPED,
        run_state=State.COMPLETE if top else State.PRUNED,
        started=started,
        train_seconds=train_seconds,
        attrs={"rung": len(reached) - 1, "params": result.params},
        metrics={
            "rung": len(reached) - 1,
            "estimate_seconds": sum(r["estimate_s"] for r in reached),
            "actual_seconds": sum(r["seconds"] + r["cache_seconds"] for r in reached),
        },
        overhead=(overhead, record_started),
    )
    if not top:
        why = {
            "time": "out of time",
            "baseline": "a baseline; the final stage retrains it",
        }.get(stop_reason, f"not in the top 1/{ctx.eta} at rung {len(reached) - 1}")
        raise optuna.TrialPruned(f"stopped after rung {len(reached) - 1}: {why}")
    return objective


def finished_at_rung(study: optuna.Study, rung: int, ctx: SearchContext) -> list[RungResult]:
    """Feasible trials that finished ``rung`` so far (running ones included, failed ones not:
    a failed trial is re-run with its parameters and would otherwise count twice)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = TrialAttrs.read(t)
        reached = attrs.rungs or []
        if t.state == TrialState.FAIL or attrs.stage != Stage.SEARCH or len(reached) <= rung:
            continue
        flops = float(attrs.flops)
        if flops > ctx.max_flops:
            continue
        cost = (
            float(reached[rung].get("expected_flops") or flops)
            if ctx.front_cost == "expected_flops"
            else flops
        )
        out.append(RungResult(t.number, float(reached[rung]["val_acc"]), cost))
    return out
