"""The final stage: the search's best member and the baselines, then the other finalists,
retrained at the final fidelity over seeds, each (member, seed) an enqueued Optuna trial
(``stage: final``) so that several workers share the jobs. ``final_plan`` orders them so that
a short limit leaves out extra members and later seeds, never the comparison; ``round_needs``
is the check each job makes before it starts (the first seed's comparison may use the slack
kept at the end of the limit, and once one of its jobs has trained, the rest may run a little
past the limit: ``comparison_slack``). ``proxy_fidelity`` says how well each rung's accuracy
ranked the members the final stage trained (Kendall tau).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from autosplit.distill.candidate import Candidate
from autosplit.distill.run import build_and_count
from autosplit.search import study as studies
from autosplit.search.attrs import Role, Stage, State, StudyAttrs, TrialAttrs
from autosplit.search.front import MIN_TAU_N, final_members
from autosplit.search.job_cost import JobEstimate, estimate_job, job_overhead, prepare_rates
from autosplit.search.promotion import select
from autosplit.search.rungs import finished_at_rung
from autosplit.search.space import Rung
from autosplit.search.trial import (
    at_fidelity,
    claim,
    end_without_result,
    record_result,
    save_trial,
    set_over_budget,
    start_run,
    train_job,
)

if TYPE_CHECKING:
    from autosplit.search.context import SearchContext

log = logging.getLogger(__name__)

COMPARISON = (Role.BEST, Role.BASELINE)  # trained at equal seeds, before any extra member


def final_job(ctx: SearchContext, trial: optuna.Trial) -> tuple[float, float]:
    """The final stage: one member of the front (or a baseline) trained at the final fidelity
    with one seed, if it fits in the time left together with the comparison jobs it must not
    crowd out (``round_needs``)."""
    started = time.perf_counter()
    claim(ctx, trial)
    job = TrialAttrs.read(trial)
    member_number, seed_index = int(job.member), int(job.seed)
    others = trial.study.get_trials(deepcopy=False)
    # Two workers that end their search phase together may both enqueue a job; the earliest
    # live copy trains and the others stop here, before any work.
    if any(
        t.number < trial.number
        and t.state != TrialState.FAIL
        and (other := TrialAttrs.read(t)).stage == Stage.FINAL
        and other.state != State.DUPLICATE
        and (other.member, other.seed) == (member_number, seed_index)
        for t in others
    ):
        TrialAttrs(state=State.DUPLICATE).write(trial)
        raise optuna.TrialPruned(f"final job {member_number}/{seed_index} is already taken")
    member = next(t for t in others if t.number == member_number)
    of_member = TrialAttrs.read(member)
    # The job was enqueued with the member's parameters: drawing them records them on this
    # trial, so the sampler sees a final result at the member's point of the space.
    baseline = of_member.baseline
    ctx.space.suggest(
        trial,
        ctx.max_flops,
        overrides=ctx.space.overrides(baseline=baseline, portfolio=of_member.portfolio),
    )
    candidate = final_candidate(ctx, of_member, seed_index)
    label = of_member.label or ""
    flops = of_member.flops
    TrialAttrs(label=label, flops=flops, baseline=baseline, params=of_member.params).write(trial)
    set_over_budget(trial, flops, ctx.max_flops)
    # The run's seed tag is the training seed; the trial's ``seed`` is the seed index.
    tags = TrialAttrs(
        label=label,
        baseline=baseline,
        stage=Stage.FINAL,
        member=member_number,
        seed=candidate.train.seed,
    )
    run_id = start_run(ctx, trial, candidate, tags)
    distiller, counted = build_and_count(candidate, ctx.teacher.model, ctx.splits)
    taps = set(distiller.teacher_taps)
    ctx.shapes[member_number] = (taps, len(distiller.stages()), distiller.prepare_passes)
    del distiller
    # Afresh: a cache an earlier job built costs nothing now, and overheads were measured.
    estimate = job_estimate(ctx, {t.number: t for t in others}, member_number, seed_index)
    # No correction factor: the parts are measured here, the overhead by finished final jobs.
    planned = estimate.as_dict()
    TrialAttrs(estimate_s=planned).write(trial)
    skipped_round, needs = round_needs(others, trial.number, job.role, seed_index, estimate)
    slack = comparison_slack(ctx, others, trial.number, job.role, seed_index)
    if skipped_round or not ctx.schedule.deadline.fits(needs - slack):
        end_without_result(ctx, trial, run_id, state=State.SKIPPED, run_state=State.PRUNED)
        why = (
            f"a job of its seed-{seed_index} comparison was skipped (equal seeds or none)"
            if skipped_round
            else f"needs ~{needs:.0f} s with the comparison jobs still waiting, "
            f"{max(0.0, ctx.schedule.deadline.remaining()):.0f} s left"
        )
        log.info("final job %d/%d (%s) skipped: %s", member_number, seed_index, label, why)
        raise optuna.TrialPruned(f"no time left for final job {member_number}/{seed_index}")
    past = needs - ctx.schedule.deadline.remaining() - ctx.schedule.end_slack
    if past > 0:
        log.warning(
            "final job %d/%d (%s) may end ~%.0f s past the time limit: a job of its comparison "
            "has trained, and skipping the rest would leave it nothing to compare against",
            member_number,
            seed_index,
            label,
            past,
        )
    result, cache_took = train_job(
        ctx,
        trial,
        candidate,
        counted,
        run_id,
        taps,
        step_offset=0,
        rung=None,
        passes=ctx.shapes[member_number][2],
    )
    if result.exit is not None:
        candidate = candidate.with_values({"structure.exit_threshold": result.exit.threshold})
    weights = save_trial(ctx, trial, candidate, result, run_id)
    # What the deadline pays for this job: from the previous job's end to this one's.
    cycle = ctx.record_overhead(Stage.FINAL, started, result.seconds + cache_took)
    took = {
        "train": round(result.seconds - result.prepare_seconds, 2),
        "prepare": round(result.prepare_seconds, 2),
        "cache": round(cache_took, 2),
        "overhead": round(cycle - result.seconds - cache_took, 2),
        "total": round(cycle, 2),
    }
    return record_result(
        ctx,
        trial,
        run_id,
        candidate,
        result,
        weights=weights,
        state=State.COMPLETE,
        run_state=State.COMPLETE,
        started=started,
        train_seconds=result.seconds,
        attrs={"actual_s": took},
        metrics={
            "estimate_seconds": planned["total"],
            "actual_seconds": took["total"],
            "estimate_cache_seconds": planned["cache"],
            "estimate_prepare_seconds": planned["prepare"],
            "estimate_overhead_seconds": planned["overhead"],
            "actual_cache_seconds": took["cache"],
            "actual_prepare_seconds": took["prepare"],
            "actual_overhead_seconds": took["overhead"],
        },
    )


def choose_finalists(study: optuna.Study, ctx: SearchContext, k: int) -> list[int]:
    """The ``k`` best search trials: highest rung reached first, then the promotion ranking
    (non-dominated sorting and crowding) among the trials of that rung. Baselines are not
    counted here: they join the final stage anyway."""
    chosen: list[int] = []
    trials = study.get_trials(deepcopy=False)
    # Not baselines, and not trials still running in another worker (they have not recorded
    # their candidate yet; that worker adds them when its own search phase ends).
    skip = {
        t.number
        for t in trials
        if TrialAttrs.read(t).baseline
        or t.state not in (TrialState.COMPLETE, TrialState.PRUNED)
        or TrialAttrs.read(t).candidate is None
    }
    top = max(
        (len(TrialAttrs.read(t).rungs or []) for t in trials if studies.is_search_trial(t)),
        default=0,
    )
    for rung in range(top - 1, -1, -1):
        pool = [
            r
            for r in finished_at_rung(study, rung, ctx)
            if r.number not in chosen and r.number not in skip
        ]
        chosen += [r.number for r in select(pool, k - len(chosen))]
        if len(chosen) >= k:
            break
    return chosen


def best_finalist(study: optuna.Study, finalists: list[int]) -> int | None:
    """The search's best member among ``finalists``: the highest rung reached, then the most
    accurate there (then the earlier trial)."""
    rungs = {
        t.number: TrialAttrs.read(t).rungs or []
        for t in study.get_trials(deepcopy=False)
        if t.number in finalists
    }
    if not rungs:
        return None
    return max(
        rungs, key=lambda n: (len(rungs[n]), rungs[n][-1]["val_acc"] if rungs[n] else 0.0, -n)
    )


def final_plan(study: optuna.Study, ctx: SearchContext) -> list[tuple[int, int, str]]:
    """The final stage's jobs in the order they run: (member, seed index, role).

    The comparison a user comes for first: for each seed, the search's best member and every
    finished baseline (``Role.BEST``, ``Role.BASELINE``); then the other finalists (``Role.EXTRA``), seeds in the
    outer loop. Under a short limit the extras and then the later seeds are what is left out
    (``round_needs``), never the best member or a baseline at the first seed.
    """
    final = ctx.final
    if final is None:
        return []
    finalists = choose_finalists(study, ctx, ctx.schedule.finalists or final.top_k)
    best = best_finalist(study, finalists)
    # Only baselines that have finished (and so recorded their candidate): another worker's
    # may still be running; that worker enqueues it when its own search phase ends.
    baselines = [
        t.number
        for t in study.get_trials(deepcopy=False)
        if studies.is_search_trial(t)
        and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and (a := TrialAttrs.read(t)).baseline
        and a.rungs
        and a.candidate is not None
    ]
    comparison = ([best] if best is not None else []) + baselines
    extras = [m for m in finalists if m != best and m not in baselines]
    seeds = range(ctx.schedule.final_seeds or final.seeds)
    jobs = [(m, s, Role.BEST if m == best else Role.BASELINE) for s in seeds for m in comparison]
    return jobs + [(m, s, Role.EXTRA) for s in seeds for m in extras]


def enqueue_final_stage(study: optuna.Study, ctx: SearchContext) -> list[int]:
    """Enqueue the (member, seed) jobs of ``final_plan`` not yet done or waiting, in its
    order, each with its planned cost. Returns the members."""
    jobs = final_plan(study, ctx)
    if ctx.final is None:
        return []
    trials = study.get_trials(deepcopy=False)
    attrs_of = {t.number: TrialAttrs.read(t) for t in trials}
    have = {
        (attrs_of[t.number].member, attrs_of[t.number].seed)
        for t in trials
        if attrs_of[t.number].stage == Stage.FINAL and t.state != TrialState.FAIL
    }
    by_number = {t.number: t for t in trials}
    for member, seed, role in jobs:
        if (member, seed) not in have:
            estimate = job_estimate(ctx, by_number, member, seed)
            job = TrialAttrs(
                stage=Stage.FINAL,
                member=member,
                seed=seed,
                role=role,
                baseline=attrs_of[member].baseline or None,
                estimate_s=estimate.as_dict(),
            )
            study.enqueue_trial(by_number[member].params, user_attrs=job.user_attrs())
    members = list(dict.fromkeys(m for m, _s, _r in jobs))
    # A union: a worker that ends its search later may add a finalist the first one missed.
    known = list(StudyAttrs.read(study).final_members or [])
    members = known + [m for m in members if m not in known]
    StudyAttrs(final_members=members).write(study)
    return members


def final_candidate(
    ctx: SearchContext, of_member: TrialAttrs, seed_index: int, epochs: int | None = None
) -> Candidate:
    """The member's candidate at the final fidelity (at ``epochs`` if given), trained at its
    seed + ``seed_index``."""
    final = ctx.final
    assert final is not None
    candidate = Candidate.from_dict(of_member.candidate)
    if candidate.structure.get("exit_threshold") is not None:  # recalibrated after training
        candidate = candidate.with_values({"structure.exit_threshold": None})
    return at_fidelity(
        candidate, Rung(epochs or ctx.schedule.final_epochs or final.epochs, final.rows)
    ).with_values({"train.seed": candidate.train.seed + seed_index})


def job_estimate(
    ctx: SearchContext,
    trials: dict[int, Any],
    member: int,
    seed_index: int,
    epochs: int | None = None,
) -> JobEstimate:
    """The planned cost of final job (``member``, ``seed_index``) from the member's rungs
    (``job_cost.estimate_job``), at ``epochs`` if given; ``trials``: the study's, by number."""
    of_member = TrialAttrs.read(trials[member])
    candidate = final_candidate(ctx, of_member, seed_index, epochs)
    if member not in ctx.shapes:
        distiller, _ = build_and_count(candidate, ctx.teacher.model, ctx.splits)
        shape = (set(distiller.teacher_taps), len(distiller.stages()), distiller.prepare_passes)
        ctx.shapes[member] = shape
        del distiller
    taps, n_stages, passes = ctx.shapes[member]
    trained = Candidate.from_dict(of_member.candidate)
    return estimate_job(
        ctx,
        candidate,
        taps=taps,
        n_stages=n_stages,
        passes=passes,
        # Each rung as the member trained it.
        rungs=[
            (at_fidelity(trained, Rung(int(r["epochs"]), r.get("rows"))), r)
            for r in of_member.rungs or []
        ],
        flops=float(of_member.flops or ctx.max_flops),
        study_prepare=prepare_rates(TrialAttrs.read(t).rungs or [] for t in trials.values()),
        overhead=job_overhead(ctx.overheads, ctx.cost_model.fixed_seconds),
    )


def comparison_slack(
    ctx: SearchContext, trials: list[Any], number: int, role: str | None, seed: int
) -> float:
    """Seconds past its deadline final job ``number`` may plan to end in. The first seed's
    comparison may run into the slack kept at the end of the limit: dropping its baselines for
    a few seconds' overrun would leave the best member with nothing to compare against. Once a
    job of that round has trained, the rest may also run ``Schedule.overrun`` past the limit:
    that job's time is spent, and skipping the rest gains nothing (on Fashion-MNIST 0.125x a
    20-minute run's best member took 519 s against 462 planned, and its three baselines were
    skipped 9 s short, the run ending with 493 s of its limit unused). Later seeds and extra
    members get no slack."""
    if role not in COMPARISON or seed != 0:
        return 0.0
    started = any(
        t.number != number
        and t.state == TrialState.COMPLETE
        and (other := TrialAttrs.read(t)).stage == Stage.FINAL
        and other.role in COMPARISON
        and other.seed == seed
        for t in trials
    )
    return ctx.schedule.end_slack + (ctx.schedule.overrun if started else 0.0)


def round_needs(
    trials: list[Any], number: int, role: str | None, seed: int, estimate: JobEstimate
) -> tuple[bool, float]:
    """Whether final job ``number`` (``role``, ``seed``) belongs to a comparison round that
    lost a job already, and the seconds (uncorrected) it needs to start: its own estimate plus
    the waiting jobs it must not crowd out — for a comparison job, the rest of its seed's
    comparison (the best member and the baselines train at equal seeds or that seed not at
    all); for an extra member, every waiting comparison job. A teacher cache is counted once
    and only while its file is not on disk."""
    comparison = role in COMPARISON
    skipped = False
    needs = estimate.train + estimate.prepare + estimate.overhead
    caches = {estimate.cache_file: estimate.cache} if estimate.cache_file else {}
    for t in trials:
        other = TrialAttrs.read(t)
        if t.number == number or other.stage != Stage.FINAL or other.role not in COMPARISON:
            continue
        if comparison and other.seed != seed:
            continue
        if other.state == State.SKIPPED:
            skipped = skipped or comparison
            continue
        if t.state != TrialState.WAITING or other.estimate_s is None:
            continue
        waiting = JobEstimate.from_dict(other.estimate_s)
        needs += waiting.train + waiting.prepare + waiting.overhead
        if waiting.cache_file and not Path(waiting.cache_file).is_file():
            caches.setdefault(waiting.cache_file, waiting.cache)
    return skipped, needs + sum(caches.values())


@dataclass(frozen=True)
class FinalReserve:
    """Seconds the search phase leaves the final stage, at the ``epochs`` the final stage
    will train: ``whole``, every planned job; and ``comparison``, the first seed's comparison
    (the best member and the baselines), which is all a baseline's or a portfolio recipe's
    cheapest rung must leave (they are never given up for extra finalists or later seeds)."""

    whole: float
    comparison: float
    epochs: int
    # The first seed's comparison at 1 epoch, while no searched member has finished a rung
    # (None once one has): a comparison of baselines alone says nothing, so until the study has
    # a member the warm start may take the final stage's epochs down to 1 (on Fashion-MNIST a
    # 15-minute run with IE-KD forced as the only recipe skipped it for its auto-encoder's 60 s
    # and ended at 11.5 minutes with only the baselines in its front).
    without_member: float | None = None


def final_reserve_measured(study: optuna.Study, ctx: SearchContext) -> FinalReserve | None:
    """The final stage's seconds as the search's measurements put them now: every job of
    ``final_plan`` from its member's rungs (a cache counted once), and the plan's share for
    the members not measured yet (the baselines still to run, the finalists not found yet).

    At the plan's final epochs, or, when the first seed's comparison no longer fits in the
    time left at those, at the most epochs at which it does: the switch to the final stage
    will lower them at least that far (``fit_final_epochs``; further when fewer epochs let
    more seeds' rounds fit), so the search then keeps the time that would not have bought
    them back, and never lowers them further itself.
    None before any member has measured a rung."""
    final = ctx.final
    if final is None or ctx.schedule.final_reserve <= 0:
        return None
    jobs = final_plan(study, ctx)
    if not jobs:
        return None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    seeds = ctx.schedule.final_seeds or final.seeds
    n_baselines = len(ctx.space.settings.baselines)
    wanted = (ctx.schedule.finalists or final.top_k) + n_baselines
    planned = ctx.schedule.final_epochs or final.epochs
    per_job = ctx.schedule.final_reserve / max(1, wanted * seeds)
    # Switching to the final stage (planning and enqueueing its jobs) costs about one job's
    # overhead more.
    switch = job_overhead(ctx.overheads, ctx.cost_model.fixed_seconds)
    left = ctx.schedule.deadline.remaining()

    def reserve(
        chosen: list[tuple[int, int, str]], members_wanted: int, n_seeds: int, epochs: int
    ) -> float:
        members = {m for m, _s, _r in chosen}
        unmeasured = max(0, members_wanted - len(members)) * n_seeds * per_job * epochs / planned
        return jobs_seconds(ctx, trials, chosen, epochs) + unmeasured + switch

    first = first_comparison(jobs)
    epochs, comparison = most_epochs_within(
        planned, left, lambda e: reserve(first, 1 + n_baselines, 1, e)
    )
    has_member = any(role == Role.BEST for _m, _s, role in jobs)
    return FinalReserve(
        whole=reserve(jobs, wanted, seeds, epochs),
        comparison=comparison[epochs],
        epochs=epochs,
        without_member=None if has_member else reserve(first, 1 + n_baselines, 1, 1),
    )


def most_epochs_within(
    planned: int, left: float, seconds_at: Callable[[int], float]
) -> tuple[int, dict[int, float]]:
    """The most final epochs, from ``planned`` down to 1, whose ``seconds_at`` fit in
    ``left`` (1 when none does), and the seconds found at each epochs tried."""
    seen: dict[int, float] = {}
    epochs = planned
    for epochs in range(planned, 0, -1):
        seen[epochs] = seconds_at(epochs)
        if seen[epochs] <= left:
            break
    return epochs, seen


def first_comparison(jobs: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The first seed's comparison among ``final_plan``'s jobs: the best member, the baselines."""
    return [(m, s, r) for m, s, r in jobs if r in COMPARISON and s == 0]


def jobs_seconds(
    ctx: SearchContext,
    trials: dict[int, Any],
    jobs: list[tuple[int, int, str]],
    epochs: int | None = None,
) -> float:
    """What ``jobs`` (member, seed, role) cost together (at ``epochs`` if given), each from
    its member's rungs: a teacher cache two of them read is built once."""
    total, caches = 0.0, {}
    for member, seed, _role in jobs:
        estimate = job_estimate(ctx, trials, member, seed, epochs)
        total += estimate.train + estimate.prepare + estimate.overhead
        caches.setdefault(estimate.cache_file, estimate.cache)
    return total + sum(caches.values())


def fit_final_epochs(study: optuna.Study, ctx: SearchContext) -> str | None:
    """At the switch to the final stage, from what the search measured: the final epochs.

    The plan chose them from throughput measured before any trial; the members' own rungs
    now say what each comparison round (a seed's best member and baselines, trained whole or
    not at all) costs. Of the (seeds, epochs) whose rounds fit in the time left, the one that
    trains the most (seeds x epochs; a tie goes to more seeds) sets the epochs: when the
    plan's epochs leave the second seed's round short by a little, it trains both seeds at
    fewer epochs rather than one seed and then nothing (on Fashion-MNIST 0.25x a 30-minute
    run ended at 18 minutes, its second seed skipped). The first seed's comparison is never
    dropped: with no fit it trains at 1 epoch. Seeds stay as planned (a round that turns out
    not to fit is skipped as before). Sets ``ctx.schedule.final_epochs``; returns a warning
    line when they shrank. A study that holds final jobs already keeps their epochs."""
    final = ctx.final
    left = ctx.schedule.deadline.remaining()
    if final is None or math.isinf(left):
        return None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if any(TrialAttrs.read(t).stage == Stage.FINAL for t in trials.values()):
        return None
    planned = ctx.schedule.final_epochs or final.epochs
    switch = job_overhead(ctx.overheads, ctx.cost_model.fixed_seconds)
    rounds = [j for j in final_plan(study, ctx) if j[2] in COMPARISON]
    if not rounds:
        return None
    n_seeds = 1 + max(seed for _m, seed, _r in rounds)
    needs: dict[int, dict[int, float]] = {}  # seeds -> epochs -> seconds
    fits: list[tuple[int, int]] = []
    for seeds in range(1, n_seeds + 1):
        jobs = [j for j in rounds if j[1] < seeds]
        epochs, needs[seeds] = most_epochs_within(
            planned, left, lambda e, jobs=jobs: jobs_seconds(ctx, trials, jobs, e) + switch
        )
        if needs[seeds][epochs] > left:  # not even at 1 epoch: more seeds fit no better
            break
        fits.append((seeds, epochs))
    seeds, epochs = max(fits, key=lambda f: (f[0] * f[1], f[0]), default=(1, 1))
    if epochs == planned:
        return None
    ctx.schedule = dataclasses.replace(ctx.schedule, final_epochs=epochs)
    short = "" if needs[seeds][epochs] <= left else ", so it may not run"
    over = f"{seeds} of {n_seeds} seeds" if seeds < n_seeds else f"all {n_seeds} seeds"
    return (
        f"the final stage trains {epochs} of the {planned} epochs planned: the search's "
        f"measurements put the comparison over {over} at ~{needs[seeds][planned]:.0f} s at "
        f"{planned} epochs and ~{needs[seeds][epochs]:.0f} s at {epochs}, with {left:.0f} s "
        f"left{short}"
    )


def waiting_final(study: optuna.Study) -> list[Any]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if TrialAttrs.read(t).stage == Stage.FINAL
    ]


def proxy_fidelity(study: optuna.Study) -> dict[int, dict[str, float | None]]:
    """Kendall tau between each rung's accuracy and the final stage's mean accuracy, over the
    final members that reached the rung: ``n`` of them, ``tau`` and its two-sided ``p``
    (None below ``front.MIN_TAU_N`` members, or when the accuracies are all tied)."""
    from scipy.stats import kendalltau  # here: scipy is slow to import, and only tau needs it

    members = final_members(studies.records(study), StudyAttrs.read(study).final_members)
    rungs_of = {t.number: TrialAttrs.read(t).rungs or [] for t in study.get_trials(deepcopy=False)}
    out: dict[int, dict[str, float | None]] = {}
    top = max((len(rungs_of.get(m.number, [])) for m in members), default=0)
    for rung in range(top):
        pairs = [
            (rungs_of[m.number][rung]["val_acc"], m.val_mean)
            for m in members
            if len(rungs_of.get(m.number, [])) > rung
        ]
        tau = p = None
        if len(pairs) >= MIN_TAU_N:
            found = kendalltau([a for a, _ in pairs], [b for _, b in pairs])
            if not math.isnan(found.statistic):
                tau, p = float(found.statistic), float(found.pvalue)
        out[rung] = {"tau": tau, "p": p, "n": float(len(pairs))}
    return out
