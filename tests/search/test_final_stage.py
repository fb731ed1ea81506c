"""The final stage: the comparison (the search's best member and every baseline, at equal seeds)
runs before any other member and is never what a tight limit drops; each job is planned from
what its member measured at its rungs, plus the auto-encoder, cache and stages it builds first.

Search trials are written by hand (their rungs' measured seconds are the test's data); the final
jobs train for real on digits, under a fake clock the driver's deadline reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autosplit.cache import train_rows
from autosplit.distill.run import build_and_count, images_per_epoch
from autosplit.search.attrs import Role, Stage, State, TrialAttrs
from autosplit.search.budget import parse_budget
from autosplit.search.final_stage import (
    FinalReserve,
    enqueue_final_stage,
    final_plan,
    final_reserve_measured,
    first_comparison,
    fit_final_epochs,
    job_estimate,
    jobs_seconds,
)
from autosplit.search.job_cost import first_prepare, study_prepare_rate, work_images
from autosplit.search.plan import CostModel, Deadline
from autosplit.search.setup import SearchOptions, prepare
from autosplit.search.space import SearchSpace
from autosplit.search.workers import objective, run_worker

SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "digits_tiny.yaml"


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ctx(digits_runs):
    options = SearchOptions(
        space=SearchSpace.from_yaml(SPACE),
        budget=parse_budget("0.5x"),
        trials=1,
        device="cpu",
        runs_dir=digits_runs,
        progress=False,
    )
    ctx = prepare(options, study_name="final-order", log_teacher=lambda _m: None)
    # A teacher forward costs next to nothing here: the jobs' estimates are their rungs'.
    ctx.cost_model = CostModel({float(ctx.teacher_flops): 1e12})
    return ctx


def add_member(study, ctx, values: dict, seconds: list[float], accs: list[float], **attrs):
    """A search trial that measured ``seconds`` at the two rungs of the digits space."""
    base = ctx.space.base_candidate(ctx.max_flops)
    candidate = base.with_values(values)
    distiller, flops = build_and_count(candidate, ctx.teacher.model, ctx.splits)
    student = distiller.student
    candidate = candidate.with_values(
        {"split.base_width": student.base_width, "split.part_width": student.part_width}
    )
    rungs = [
        {
            "epochs": rung.epochs,
            "rows": train_rows(
                candidate.with_values({"train.max_train_samples": rung.rows}), ctx.splits
            ),
            "val_acc": acc,
            "seconds": s,
            **attrs.pop(f"rung{i}", {}),
        }
        for i, (rung, s, acc) in enumerate(
            zip(ctx.space.settings.fidelity.rungs, seconds, accs, strict=True)
        )
    ]
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            values=[accs[-1], float(flops.worst_case)],
            user_attrs=TrialAttrs(
                stage=Stage.SEARCH,
                state=State.COMPLETE,
                label=values.get("structure.name", "single"),
                flops=int(flops.worst_case),
                candidate=candidate.to_dict(),
                rungs=rungs,
                rung=len(rungs) - 1,
                val_acc=accs[-1],
                **attrs,
            ).user_attrs(),
        )
    )
    return study.get_trials(deepcopy=False)[-1].number


def run_final_jobs(
    study, ctx, clock: FakeClock, overran: dict[int, float] | None = None
) -> dict[tuple[int, int], str]:
    """Every waiting final job in turn, each taking what was planned on ``clock`` (plus
    ``overran[member]``); the state each (member, seed) ended in."""
    while any(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False)):
        trial = study.ask()
        try:
            study.tell(trial, list(objective(ctx, trial, Stage.FINAL)))
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        job = TrialAttrs.read(study.get_trials()[trial.number])
        clock.now += job.estimate_s["total"] + (overran or {}).get(job.member, 0.0)
        # Forget what this machine measured (it varies with load): corrections, overheads
        # and the teacher's forward time while building caches.
        ctx.cost_model.ratios.clear()
        ctx.overheads.clear()
        ctx.teacher_cache.build_seconds = 0.0
        ctx.teacher_cache.built.clear()
        ctx.teacher_cache.read_seconds = ctx.teacher_cache.read_bytes = 0.0
    return {
        (a.member, a.seed): a.state
        for a in (TrialAttrs.read(t) for t in study.get_trials())
        if a.stage == Stage.FINAL
    }


def add_comparison_and_extra(study, ctx) -> tuple[list[int], int]:
    """The space's baselines, a chain that is the search's best member and a hint student
    below it, each measured at both rungs: ([best, *baselines], the extra member)."""
    baselines = [
        add_member(study, ctx, overrides, [0.5, 1.0], [60.0, 80.0], baseline=name)
        for name, overrides in ctx.space.settings.baselines.items()
    ]
    chain = {
        "structure.name": "res_chain",
        "structure.n_parts": 1,
        "split.base_share": 0.7,
        "logit_loss.name": "dkd",
    }
    best = add_member(study, ctx, chain, [1.0, 2.0], [70.0, 90.0])
    hint = {"structure.name": "single", "logit_loss.name": "kd", "feature_loss.name": "hint"}
    return [best, *baselines], add_member(study, ctx, hint, [0.5, 1.0], [65.0, 85.0])


def enqueue_comparison_and_extra(study, ctx) -> tuple[list[int], int, dict[int, float]]:
    """``add_comparison_and_extra``'s members, their final jobs enqueued at one seed: ([best,
    *baselines], the extra member, each member's planned seconds)."""
    comparison, extra = add_comparison_and_extra(study, ctx)
    ctx.schedule = dataclasses.replace(ctx.schedule, finalists=2, final_seeds=1)
    enqueue_final_stage(study, ctx)
    planned = {
        a.member: a.estimate_s["total"]
        for a in (TrialAttrs.read(t) for t in study.get_trials())
        if a.stage == Stage.FINAL
    }
    return comparison, extra, planned


def test_the_comparison_runs_first_and_a_tight_clock_drops_extras_and_later_seeds(ctx):
    study = optuna.create_study(directions=["maximize", "minimize"])
    comparison, extra = add_comparison_and_extra(study, ctx)
    best = comparison[0]
    ctx.schedule = dataclasses.replace(ctx.schedule, finalists=2, final_seeds=2)
    enqueue_final_stage(study, ctx)

    jobs = [TrialAttrs.read(t) for t in study.get_trials() if t.state == TrialState.WAITING]
    order = [(j.member, j.seed, j.role) for j in jobs]
    assert order == [
        *[(m, 0, Role.BEST if m == best else Role.BASELINE) for m in comparison],
        *[(m, 1, Role.BEST if m == best else Role.BASELINE) for m in comparison],
        (extra, 0, Role.EXTRA),
        (extra, 1, Role.EXTRA),
    ]
    planned = {(j.member, j.seed): j.estimate_s["total"] for j in jobs}
    assert all(v > 0 for v in planned.values())
    # Time for the first seed's comparison and half of the cheapest job after it: extra members
    # and the second seed must give way, never a baseline or the best member.
    first_round = sum(planned[(m, 0)] for m in comparison)
    later = min(planned[(best, 1)], planned[(extra, 0)], planned[(extra, 1)])
    clock = FakeClock()
    ctx.schedule = dataclasses.replace(
        ctx.schedule, deadline=Deadline(first_round + 0.5 * later, clock=clock)
    )

    done = run_final_jobs(study, ctx, clock)
    assert {k for k, v in done.items() if v == State.COMPLETE} == {(m, 0) for m in comparison}
    assert {k for k, v in done.items() if v == State.SKIPPED} == {
        *((m, 1) for m in comparison),
        (extra, 0),
        (extra, 1),
    }
    for trial in study.get_trials():
        attrs = TrialAttrs.read(trial)
        if attrs.state == State.COMPLETE and attrs.stage == Stage.FINAL:
            assert attrs.actual_s["total"] > 0 and attrs.estimate_s["total"] > 0


def test_a_chain_with_ie_kd_is_planned_from_its_rungs_plus_its_stages_coder_and_cache(ctx):
    study = optuna.create_study(directions=["maximize", "minimize"])
    rows0 = 600
    coder0 = 30 * images_per_epoch(rows0, 64)
    values = {
        "structure.name": "res_chain",
        "structure.n_parts": 1,
        "split.base_share": 0.7,
        "schedule": "staged",
        "logit_loss.name": "kd",
        "feature_loss.name": "iekd",
    }
    # Rung 0 trained its auto-encoder (1.5 s of its 4 s); rung 1 reused one.
    number = add_member(
        study,
        ctx,
        values,
        [4.0, 8.0],
        [50.0, 70.0],
        rung0={"prepare_seconds": 1.5, "prepare_images": coder0},
        rung1={"prepare_seconds": 0.0, "prepare_images": 0},
    )
    ctx.schedule = dataclasses.replace(
        ctx.schedule, final_epochs=4
    )  # beyond the top rung's 2: the estimate extrapolates
    trials = {t.number: t for t in study.get_trials()}
    estimate = job_estimate(ctx, trials, number, 1)
    if Path(estimate.cache_file).is_file():  # left by another test of the session's runs dir
        Path(estimate.cache_file).unlink()
        estimate = job_estimate(ctx, trials, number, 1)

    taps, n_stages, passes = ctx.shapes[number]
    assert (n_stages, passes) == (2, 30)  # base then the res-student; 30 auto-encoder epochs
    val = len(ctx.splits.val)
    rows1 = len(ctx.splits.train)
    # Work images: every stage trains every epoch ("full"), each epoch validates at 1/3.
    w0 = work_images([1, 1], rows0, val)
    w1 = work_images([2, 2], rows1, val)
    w_final = work_images([4, 4], rows1, val)
    assert w_final == 8 * (rows1 + val / 3)
    per_image = (8.0 - (4.0 - 1.5)) / (w1 - w0)
    fixed = 8.0 - per_image * w1
    assert fixed > 0  # set-up, calibration: what a rung costs whatever its images
    assert estimate.train == pytest.approx(fixed + per_image * w_final)
    # The final job trains its own auto-encoder (its seed differs) over all rows.
    assert estimate.prepare == pytest.approx(1.5 / coder0 * 30 * images_per_epoch(rows1, 64))
    cache_file = Path(estimate.cache_file)
    assert estimate.cache > 0 and not cache_file.is_file()
    # Around the training, a job costs what finished jobs cost beyond theirs: none has yet.
    assert estimate.overhead == ctx.cost_model.fixed_seconds
    assert estimate.total() == pytest.approx(
        estimate.train + estimate.prepare + estimate.cache + estimate.overhead
    )
    ctx.overheads[Stage.SEARCH] = [0.5, 0.7, 3.0]
    assert job_estimate(ctx, trials, number, 1).overhead == 0.7  # their median

    # The same measurements without an auto-encoder to build: no prepare part.
    single = add_member(
        study,
        ctx,
        {"structure.name": "single", "logit_loss.name": "kd", "feature_loss.name": "none"},
        [4.0 - 1.5, 8.0],
        [50.0, 70.0],
    )
    plain = job_estimate(ctx, {t.number: t for t in study.get_trials()}, single, 1)
    assert plain.prepare == 0.0 and plain.total() < estimate.total()

    # Once the cache is on disk, the job no longer pays for it.
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_bytes(b"")
    try:
        again = job_estimate(ctx, trials, number, 1)
        assert again.cache == 0.0
        assert again.total() == pytest.approx(estimate.train + estimate.prepare + 0.7)
    finally:
        cache_file.unlink()
    assert dataclasses.asdict(again)["source"] == "rungs"


def pin_rung_seconds(ctx, monkeypatch, took) -> list[tuple[str, float]]:
    """Each search rung takes ``took(kind, modelled)`` seconds (plus its auto-encoder's) in
    place of its real seconds, which grow with the machine's load; ``modelled``: the cost
    model's plan for that rung. Returns the (kind, plan) of every rung planned, in order."""
    from autosplit.search import rungs

    modelled: list[tuple[str, float]] = []
    real_estimate, real_train = ctx.estimate, rungs.train_job

    def estimate(candidate, flops, *, kind, n_stages=1):
        value = real_estimate(candidate, flops, kind=kind, n_stages=n_stages)
        if kind.startswith("trial/"):
            modelled.append((kind, value))
        return value

    def train_job(ctx_, trial, candidate, *args, **kwargs):
        result, cache_took = real_train(ctx_, trial, candidate, *args, **kwargs)
        seconds = took(*modelled[-1]) + result.prepare_seconds
        return dataclasses.replace(result, seconds=seconds), cache_took

    monkeypatch.setattr(ctx, "estimate", estimate)
    monkeypatch.setattr(rungs, "train_job", train_job)
    return modelled


def sqlite_study(ctx, tmp_path) -> tuple[optuna.Study, str]:
    """The search's study on SQLite, where ``run_worker`` opens it by URL."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(
        study_name=ctx.study_name, storage=storage, directions=["maximize", "minimize"]
    )
    return study, storage


def worker_options(ctx, *, trials: int) -> SearchOptions:
    return SearchOptions(
        space=ctx.space,
        budget=parse_budget("0.5x"),
        trials=trials,
        device="cpu",
        runs_dir=ctx.runs_dir,
        progress=False,
    )


def test_search_trials_queued_ahead_of_the_final_jobs_are_given_back_and_the_jobs_run(
    ctx, tmp_path
):
    """A time-limited search phase can end with portfolio recipes still queued ahead of the
    final jobs. The final phase hands them back to the queue, behind the jobs, and runs every
    job (it used to stop at the first recipe it met, running none)."""
    study, storage = sqlite_study(ctx, tmp_path)
    baseline = next(iter(ctx.space.settings.baselines))
    kd = add_member(
        study,
        ctx,
        ctx.space.settings.baselines[baseline],
        [0.5, 1.0],
        [60.0, 80.0],
        baseline=baseline,
    )
    best = add_member(study, ctx, {"logit_loss.name": "dkd"}, [0.5, 1.0], [65.0, 85.0])
    queued = {
        "rkd": {"train.lr": 0.05},
        "aekt": {"train.lr": 0.1, "logit_loss.name": "aekt"},
    }
    for name, params in queued.items():
        study.enqueue_trial(params, user_attrs=TrialAttrs(portfolio=name).user_attrs())
    ctx.schedule = dataclasses.replace(ctx.schedule, finalists=1, final_seeds=1)
    enqueue_final_stage(study, ctx)
    options = worker_options(ctx, trials=10)

    run_worker(options, ctx, storage, worker_index=0, phase=Stage.FINAL)

    trials = study.get_trials()
    final = {
        (a.member, a.seed): (t.state, a.state)
        for t in trials
        if (a := TrialAttrs.read(t)).stage == Stage.FINAL
    }
    assert final == {
        (best, 0): (TrialState.COMPLETE, State.COMPLETE),
        (kd, 0): (TrialState.COMPLETE, State.COMPLETE),
    }
    recipes = [(t, TrialAttrs.read(t)) for t in trials if TrialAttrs.read(t).portfolio]
    popped = [(t.number, a.portfolio) for t, a in recipes if t.state == TrialState.PRUNED]
    waiting = [(t, a) for t, a in recipes if t.state == TrialState.WAITING]
    assert [name for _n, name in popped] == list(queued)
    assert all(TrialAttrs.read(trials[n]).state == State.SKIPPED for n, _ in popped)
    # Each recipe waits again, once, with its parameters, behind the final jobs.
    assert [a.portfolio for _t, a in waiting] == list(queued)
    last_job = max(t.number for t in trials if TrialAttrs.read(t).stage == Stage.FINAL)
    for (t, a), params in zip(waiting, queued.values(), strict=True):
        assert t.system_attrs["fixed_params"] == params
        assert a.stage is None and a.state is None
    assert min(t.number for t, _ in waiting) > last_job


def test_the_warm_start_may_take_extra_finalists_time_but_never_the_comparisons(ctx):
    clock = FakeClock()
    # The search phase is over; 1000 s are left, of which the final stage wants 900.
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        deadline=Deadline(1000.0, clock=clock),
        search_deadline=Deadline(0.0, clock=clock),
        final_reserve=900.0,
    )
    # Before any measurement: the plan's share for the first seed's comparison (the best
    # member and 3 baselines of 8 planned jobs: 1 finalist + 3 baselines, 2 seeds) = 450 s.
    assert not ctx.search_fits(1.0)
    assert ctx.search_fits(550.0, warm_start=True)
    assert not ctx.search_fits(551.0, warm_start=True)
    # Measured: the comparison costs 300 s of the whole stage's 900. The measurement, not the
    # plan's end of the search phase, now says what fits.
    ctx.measured_reserve = FinalReserve(whole=900.0, comparison=300.0, epochs=2)
    assert ctx.search_fits(100.0) and not ctx.search_fits(101.0)
    assert ctx.search_fits(700.0, warm_start=True)
    assert not ctx.search_fits(701.0, warm_start=True)


def test_until_the_study_has_a_member_the_warm_start_may_take_the_final_epochs_down_to_one(ctx):
    """A comparison of baselines alone says nothing: while no searched member has finished a
    rung, a warm-start job (here the portfolio's recipe, the study's only candidate) may run
    if the first seed's comparison still fits at 1 epoch; once a member has, it must leave the
    comparison at the epochs that fit now."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for name, overrides in ctx.space.settings.baselines.items():
        add_member(study, ctx, overrides, [5.0, 20.0], [60.0, 80.0], baseline=name)
    clock = FakeClock()
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        final_epochs=2,
        deadline=Deadline(1000.0, clock=clock),
        search_deadline=Deadline(0.0, clock=clock),
        final_reserve=100.0,
    )
    reserve = final_reserve_measured(study, ctx)
    assert reserve is not None and reserve.epochs == 2
    assert reserve.without_member is not None and reserve.without_member < reserve.comparison - 20
    ctx.measured_reserve = reserve
    # Fits beside the comparison at 1 epoch, not beside it at the 2 epochs that fit now.
    job = 1000.0 - (reserve.comparison + reserve.without_member) / 2
    assert ctx.search_fits(job, warm_start=True)
    assert not ctx.search_fits(job)  # a drawn trial leaves the whole stage, as before

    add_member(study, ctx, {"logit_loss.name": "dkd"}, [5.0, 20.0], [70.0, 90.0])
    ctx.measured_reserve = final_reserve_measured(study, ctx)
    assert ctx.measured_reserve.without_member is None
    assert ctx.measured_reserve.epochs == 2
    job = 1000.0 - ctx.measured_reserve.comparison + 1.0
    assert not ctx.search_fits(job, warm_start=True)
    assert ctx.search_fits(job - 2.0, warm_start=True)


@pytest.mark.parametrize("left", [400.0, 10.0])
def test_baselines_start_after_the_search_phase_ends_while_the_comparison_still_fits(
    ctx, tmp_path, left, monkeypatch
):
    """The plan's end of the search phase has passed. With ``left`` = 400 s a baseline's
    cheapest rung still fits beside the comparison's ~250 s (the plan's share of 500 s for the
    4 of its 8 jobs): both baselines train it (only it: the final stage retrains them), and a
    drawn trial runs too, as the final stage's cost measured from their rungs (~175 s, most of
    it the plan's share for the members not measured yet) leaves it room. With 10 s nothing
    fits: the first baseline is skipped and waits in the queue again for the next search."""
    # The final jobs' teacher caches at the cost model's rate (next to nothing here), not at
    # the rate the rungs' small cache builds measured: that rate is mostly their fixed cost
    # and grows with the machine's load, which this test is not about.
    from autosplit.search import job_cost

    measured = job_cost.cache_estimate

    def modelled(c, *args, **kwargs):
        held = c.teacher_cache
        built, by_taps, read = held.build_images, held.built, held.read_bytes
        held.build_images, held.built, held.read_bytes = 0.0, {}, 0.0
        try:
            return measured(c, *args, **kwargs)
        finally:
            held.build_images, held.built, held.read_bytes = built, by_taps, read

    monkeypatch.setattr(job_cost, "cache_estimate", modelled)
    # Each rung takes what the cost model planned for it, and each trial 1 s besides: the
    # rungs' and trials' real seconds grow with the machine's load (under load the measured
    # final stage reached 330-363 s here and the drawn trial no longer fitted), and the
    # order is what this test is about, not the measurement.
    pin_rung_seconds(ctx, monkeypatch, lambda _kind, modelled: modelled)

    def record_overhead(kind, started, busy):
        ctx.overheads.setdefault(kind, []).append(1.0)
        return busy + 1.0

    monkeypatch.setattr(ctx, "record_overhead", record_overhead)
    study, storage = sqlite_study(ctx, tmp_path)
    names = list(ctx.space.settings.baselines)[:2]
    for name in names:
        study.enqueue_trial({}, user_attrs=TrialAttrs(baseline=name).user_attrs())
    clock = FakeClock()  # it stands still: the jobs take no time on it
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        deadline=Deadline(left, clock=clock),
        search_deadline=Deadline(0.0, clock=clock),
        final_reserve=500.0,
    )
    options = worker_options(ctx, trials=3)

    run_worker(options, ctx, storage, worker_index=0, phase=Stage.SEARCH)

    trials = [(t, TrialAttrs.read(t)) for t in study.get_trials()]
    if left == 400.0:
        assert [(a.baseline, a.state, len(a.rungs)) for _t, a in trials[:2]] == [
            (names[0], State.STOPPED, 1),
            (names[1], State.STOPPED, 1),
        ]
        drawn = trials[2][1]
        assert drawn.baseline is None and drawn.rungs  # past the plan's end: measured room
        assert ctx.measured_reserve is not None and ctx.measured_reserve.whole < 300.0
    else:
        assert [(t.state, a.baseline, a.state) for t, a in trials] == [
            (TrialState.PRUNED, names[0], State.SKIPPED),
            (TrialState.WAITING, names[1], None),
            (TrialState.WAITING, names[0], None),  # given back, behind what waited
        ]


def test_at_the_switch_the_final_epochs_shrink_until_the_first_comparison_fits(ctx):
    study = optuna.create_study(directions=["maximize", "minimize"])
    for name, overrides in ctx.space.settings.baselines.items():
        add_member(study, ctx, overrides, [5.0, 20.0], [60.0, 80.0], baseline=name)
    add_member(study, ctx, {"logit_loss.name": "dkd"}, [5.0, 20.0], [70.0, 90.0])

    def needs(epochs: int) -> float:
        ctx.schedule = dataclasses.replace(ctx.schedule, final_epochs=epochs)
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        return jobs_seconds(ctx, trials, first_comparison(final_plan(study, ctx)))

    two, one = needs(2), needs(1)
    assert one < two - 10  # 4 jobs of ~20 s at 2 epochs (rung 1's fidelity), ~half at 1
    clock = FakeClock()
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        final_epochs=2,
        deadline=Deadline((one + two) / 2, clock=clock),
        final_reserve=100.0,
    )
    # The search phase already counts on the epochs the switch will choose: the reserve it
    # leaves is the comparison at 1 epoch (and its whole stage, both seeds, at 1 epoch too).
    reserve = final_reserve_measured(study, ctx)
    assert reserve is not None and reserve.epochs == 1
    assert one <= reserve.comparison <= (one + two) / 2 < reserve.whole
    warning = fit_final_epochs(study, ctx)
    assert ctx.schedule.final_epochs == 1
    assert warning is not None and "trains 1 of the 2 epochs planned" in warning
    enqueue_final_stage(study, ctx)
    jobs = [t for t in study.get_trials() if TrialAttrs.read(t).stage == Stage.FINAL]
    assert len(jobs) == 4 * 2  # the comparison at both seeds, now planned at 1 epoch
    assert all(
        TrialAttrs.read(t).estimate_s["train"] < two / 4 for t in jobs
    )  # a 2-epoch job alone is ~two / 4
    # With room for 2 epochs nothing changes; nor once the study holds final jobs.
    ctx.schedule = dataclasses.replace(
        ctx.schedule, final_epochs=2, deadline=Deadline(two + 100, clock=clock)
    )
    assert fit_final_epochs(study, ctx) is None and ctx.schedule.final_epochs == 2
    assert final_reserve_measured(study, ctx).epochs == 2
    ctx.schedule = dataclasses.replace(
        ctx.schedule, final_epochs=2, deadline=Deadline(1.0, clock=clock)
    )
    assert fit_final_epochs(study, ctx) is None and ctx.schedule.final_epochs == 2


@pytest.mark.parametrize("final_reserve", [100.0, 0.0])
def test_under_a_time_limit_a_baseline_stops_at_the_cheapest_rung(ctx, tmp_path, final_reserve):
    """With a final stage to plan for (``final_reserve`` > 0: a time limit), a baseline trains
    only its cheapest rung: the final stage retrains it at the final fidelity anyway. Without
    one it climbs like any trial (the first at a rung is always promoted)."""
    study, storage = sqlite_study(ctx, tmp_path)
    name = next(iter(ctx.space.settings.baselines))
    study.enqueue_trial({}, user_attrs=TrialAttrs(baseline=name).user_attrs())
    clock = FakeClock()
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        deadline=Deadline(10_000.0, clock=clock),
        search_deadline=Deadline(5_000.0, clock=clock),
        final_reserve=final_reserve,
    )
    options = worker_options(ctx, trials=1)

    run_worker(options, ctx, storage, worker_index=0, phase=Stage.SEARCH)

    (trial,) = study.get_trials()
    attrs = TrialAttrs.read(trial)
    assert attrs.baseline == name
    if final_reserve:
        assert (trial.state, attrs.state, len(attrs.rungs)) == (
            TrialState.PRUNED,
            State.STOPPED,
            1,
        )
    else:
        assert (trial.state, attrs.state, len(attrs.rungs)) == (
            TrialState.COMPLETE,
            State.COMPLETE,
            2,
        )


@pytest.mark.parametrize("room", ["both seeds at 3", "tie at 2", "one seed at 4"])
def test_at_the_switch_the_final_epochs_are_those_that_train_the_most_seeds_x_epochs(ctx, room):
    """Planned: 2 seeds at 4 epochs, which no longer fit. Rounds are trained whole or not at
    all, so one seed at 4 epochs and then nothing (a 30-minute command 1 ended at 18
    minutes that way) loses to both seeds at 3 epochs; at equal seeds x epochs more seeds
    win; and one seed at 4 beats both at 1."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for name, overrides in ctx.space.settings.baselines.items():
        add_member(study, ctx, overrides, [5.0, 20.0], [60.0, 80.0], baseline=name)
    add_member(study, ctx, {"logit_loss.name": "dkd"}, [5.0, 20.0], [70.0, 90.0])
    ctx.schedule = dataclasses.replace(ctx.schedule, final_epochs=4, final_seeds=2)
    rounds = [j for j in final_plan(study, ctx) if j[2] != Role.EXTRA]
    assert {seed for _m, seed, _r in rounds} == {0, 1}
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    switch = ctx.cost_model.fixed_seconds  # no job has finished: a job's overhead

    def needs(seeds: int, epochs: int) -> float:
        jobs = [j for j in rounds if j[1] < seeds]
        return jobs_seconds(ctx, trials, jobs, epochs) + switch

    assert needs(1, 4) + 4 < needs(2, 2) < needs(2, 3) - 10 < needs(2, 4) - 20
    left = {
        "both seeds at 3": (needs(2, 3) + needs(2, 4)) / 2,
        "tie at 2": (needs(2, 2) + needs(2, 3)) / 2,
        "one seed at 4": (needs(1, 4) + needs(2, 2)) / 2,
    }[room]
    ctx.schedule = dataclasses.replace(
        ctx.schedule, deadline=Deadline(left, clock=FakeClock()), final_reserve=100.0
    )
    warning = fit_final_epochs(study, ctx)
    expected = {"both seeds at 3": 3, "tie at 2": 2, "one seed at 4": 4}[room]
    assert ctx.schedule.final_epochs == expected
    if expected == 4:
        assert warning is None
    else:
        assert warning is not None
        assert f"trains {expected} of the 4 epochs planned" in warning
        assert "comparison over all 2 seeds" in warning


def test_a_jobs_cache_is_planned_at_the_rate_of_builds_of_the_same_outputs(ctx):
    from autosplit.search.job_cost import cache_estimate

    kd, fitnets = (
        ctx.space.base_candidate(ctx.max_flops).with_values(ctx.space.settings.baselines[name])
        for name in ("kd-single", "fitnets")
    )
    taps = {
        name: set(build_and_count(c, ctx.teacher.model, ctx.splits)[0].teacher_taps)
        for name, c in (("kd", kd), ("fitnets", fitnets))
    }
    assert taps["kd"] <= {"logits"} and taps["fitnets"] - {"logits"}  # the hint: a feature map
    held = ctx.teacher_cache
    for path in (
        cache_estimate(ctx, kd, taps["kd"])[1],
        cache_estimate(ctx, fitnets, taps["fitnets"])[1],
    ):
        Path(path).unlink(missing_ok=True)  # left by another test of the session's runs dir
    held.built = {
        ("logits",): [1.0, 10_000.0],
        tuple(sorted(taps["fitnets"] | {"logits"})): [3.0, 10_000.0],
    }
    held.build_seconds, held.build_images = 4.0, 20_000.0
    rows = train_rows(kd, ctx.splits)
    assert cache_estimate(ctx, kd, taps["kd"])[0] == pytest.approx(rows * 1.0e-4)
    assert cache_estimate(ctx, fitnets, taps["fitnets"])[0] == pytest.approx(rows * 3.0e-4)
    held.built = {("logits",): [1.0, 10_000.0]}  # no hint cache built yet: every build's rate
    assert cache_estimate(ctx, fitnets, taps["fitnets"])[0] == pytest.approx(rows * 2.0e-4)


def test_a_cache_on_disk_is_planned_at_the_rate_files_were_read_and_one_held_at_nothing(ctx):
    """A final job whose cache file an earlier run left on disk pays for reading it (a FitNets
    cache over all Fashion-MNIST rows took 7.5 s to load against 0.0 planned)."""
    from autosplit.search.job_cost import cache_estimate

    fitnets = ctx.space.base_candidate(ctx.max_flops).with_values(
        ctx.space.settings.baselines["fitnets"]
    )
    taps = set(build_and_count(fitnets, ctx.teacher.model, ctx.splits)[0].teacher_taps)
    held = ctx.teacher_cache
    held.held.clear()
    held.get(taps, fitnets)  # on disk now, whether this built it or another test did
    path = Path(cache_estimate(ctx, fitnets, taps)[1])
    assert path.is_file()
    assert held.holds(taps, fitnets)
    assert cache_estimate(ctx, fitnets, taps)[0] == 0.0  # served from memory
    held.held.clear()  # another job's cache took its place
    held.read_seconds, held.read_bytes = 0.0, 0.0
    assert cache_estimate(ctx, fitnets, taps)[0] == 0.0  # no load measured yet
    held.read_seconds, held.read_bytes = 2.0, 1.0e6
    assert not held.holds(taps, fitnets)
    assert cache_estimate(ctx, fitnets, taps)[0] == pytest.approx(path.stat().st_size * 2.0e-6)
    # The load it plans is measured: reading the file back adds its bytes and seconds.
    held.read_seconds, held.read_bytes = 0.0, 0.0
    assert held.get(taps, fitnets).hit
    assert held.read_bytes == path.stat().st_size and held.read_seconds > 0.0
    assert held.seconds_per_byte_read() == held.read_seconds / held.read_bytes


def test_a_first_rung_counts_the_auto_encoder_at_the_rate_the_study_measured(ctx):
    study = optuna.create_study(directions=["maximize", "minimize"])
    candidate = ctx.space.base_candidate(ctx.max_flops).with_values(
        {"train.max_train_samples": 600}
    )
    assert study_prepare_rate(study) is None  # nothing measured
    add_member(
        study,
        ctx,
        {"feature_loss.name": "iekd"},
        [5.0, 9.0],
        [60.0, 70.0],
        rung0={"prepare_seconds": 3.0, "prepare_images": 6000},  # 0.5 ms an image
    )
    assert study_prepare_rate(study) == pytest.approx(0.0005)
    per_pass = images_per_epoch(600, candidate.train.batch_size)
    assert first_prepare(0.0005, candidate, ctx.splits, passes=30) == pytest.approx(
        0.0005 * 30 * per_pass
    )


def test_before_any_rung_measured_an_auto_encoder_its_steps_are_timed_here(
    ctx, tmp_path, monkeypatch
):
    """The study's first IE-KD trial plans its auto-encoder at a few of its steps timed now
    (it was planned at nothing: 14 s planned, 59 s taken on Fashion-MNIST); a later one at
    the rate the first measured, without timing again."""
    from autosplit.distill.parts.iekd import IEKD

    distiller, _ = build_and_count(
        ctx.space.base_candidate(ctx.max_flops).with_values({"feature_loss.name": "iekd"}),
        ctx.teacher.model,
        ctx.splits,
    )
    assert distiller.prepare_seconds_per_image(ctx.runtime, 64) > 0
    plain, _ = build_and_count(
        ctx.space.base_candidate(ctx.max_flops), ctx.teacher.model, ctx.splits
    )
    assert plain.prepare_seconds_per_image(ctx.runtime, 64) == 0.0

    study, storage = sqlite_study(ctx, tmp_path)
    values = {"feature_loss.name": "iekd", "feature_loss.ae_epochs": 2}
    settings = dataclasses.replace(ctx.space.settings, baselines={"iekd": values})
    monkeypatch.setattr(ctx.space, "settings", settings)
    clock = FakeClock()
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        deadline=Deadline(10_000.0, clock=clock),
        search_deadline=Deadline(5_000.0, clock=clock),
        final_reserve=100.0,  # a baseline then stops at its cheapest rung
    )
    timed = 0.02  # seconds an image: the auto-encoder dominates the rung's plan
    monkeypatch.setattr(IEKD, "prepare_seconds_per_image", lambda self, runtime, batch: timed)
    study.enqueue_trial({}, user_attrs=TrialAttrs(baseline="iekd").user_attrs())
    run_worker(worker_options(ctx, trials=1), ctx, storage, worker_index=0, phase=Stage.SEARCH)

    (first,) = study.get_trials()
    rung0 = TrialAttrs.read(first).rungs[0]
    at = ctx.space.base_candidate(ctx.max_flops).with_values(
        {**values, "train.max_train_samples": rung0["rows"]}
    )
    planned = first_prepare(timed, at, ctx.splits, passes=2)
    assert planned > 10 * ctx.cost_model.fixed_seconds
    # The rest of the plan: a job's fixed seconds (training and the cache cost next to nothing
    # at the fixture's throughput).
    assert rung0["estimate_s"] == pytest.approx(planned + ctx.cost_model.fixed_seconds, rel=0.05)
    assert rung0["prepare_images"] > 0  # the auto-encoder trained: the study has a rate now

    def not_again(self, runtime, batch):
        raise AssertionError("timed again although the study measured a rate")

    monkeypatch.setattr(IEKD, "prepare_seconds_per_image", not_again)
    ctx.cost_model.ratios.clear()
    study.enqueue_trial({}, user_attrs=TrialAttrs(baseline="iekd").user_attrs())
    run_worker(worker_options(ctx, trials=2), ctx, storage, worker_index=0, phase=Stage.SEARCH)
    second = TrialAttrs.read(study.get_trials()[1]).rungs[0]
    measured = rung0["prepare_seconds"] / rung0["prepare_images"]
    assert second["estimate_s"] >= first_prepare(measured, at, ctx.splits, passes=2)


def test_each_structure_plans_its_trials_at_its_own_measured_correction(ctx, tmp_path, monkeypatch):
    """Branches with a hint train several small networks and regressors, slower per FLOP
    than one student of their FLOPs (Fashion-MNIST 0.25x: their first rung took 1.7-2.8x its
    estimate, a single student about its estimate). Once a structure and feature loss have
    finished a rung, their next trial is planned at their own ratio of taken to modelled
    seconds, not at the median of all trials; one not seen yet borrows that median."""
    pinned = {"split.budget_share": 1.0, "logit_loss.name": "kd", "feature_loss.name": "none"}
    pinned["logit_loss.temperature"] = 4.0
    structures = {
        "one": {**pinned, "structure.name": "single"},
        "br": {
            **pinned,
            "structure.name": "branches",
            "structure.n_parts": 2,
            "feature_loss.name": "hint",
        },
    }
    slower = {"single": 1.0, "branches": 3.0}  # taken / modelled, uncorrected
    settings = dataclasses.replace(ctx.space.settings, baselines=structures)
    monkeypatch.setattr(ctx.space, "settings", settings)
    first: dict[str, float] = {}  # each structure's first estimate: no ratio of its own yet

    def took(kind, value):
        first.setdefault(kind, value)
        return slower[kind.split("/")[1]] * first[kind]

    modelled = pin_rung_seconds(ctx, monkeypatch, took)
    ctx.cost_model.ratios.clear()
    clock = FakeClock()
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        deadline=Deadline(10_000.0, clock=clock),
        search_deadline=Deadline(5_000.0, clock=clock),
        final_reserve=100.0,  # a baseline then stops at its cheapest rung: one job each
    )
    study, storage = sqlite_study(ctx, tmp_path)
    for name in ("one", "br", "br", "one"):
        study.enqueue_trial({}, user_attrs=TrialAttrs(baseline=name).user_attrs())
    run_worker(worker_options(ctx, trials=4), ctx, storage, worker_index=0, phase=Stage.SEARCH)

    assert [kind for kind, _ in modelled] == [
        "trial/single/none",
        "trial/branches/hint",
        "trial/branches/hint",
        "trial/single/none",
    ]
    one, br = first["trial/single/none"], first["trial/branches/hint"]
    # The first branches trial borrowed the single's ratio (1.0); each second trial is at its
    # own structure's (3.0 and 1.0), where the median of all (2.0) was used before.
    assert modelled[2][1] == pytest.approx(3.0 * br, rel=1e-6)
    assert modelled[3][1] == pytest.approx(one, rel=1e-6)
    ratios = ctx.cost_model.ratios
    assert sorted(ratios["trial"]) == pytest.approx([1.0, 1.0, 3.0, 3.0])
    assert ratios["trial/branches"] == ratios["trial/branches/hint"] == pytest.approx([3.0, 3.0])


@pytest.mark.parametrize("slack", [0.0, 1.0])
def test_a_comparison_short_of_time_by_less_than_the_end_slack_still_trains(ctx, slack):
    """The search left the comparison its estimate, then the time shrank by a few seconds
    (an overrun): without slack the whole first round is dropped (equal seeds or none); with
    the end's slack it trains, and an extra member may not use that slack after it."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    comparison, extra, planned = enqueue_comparison_and_extra(study, ctx)
    short = 0.25 * min(planned.values())  # what an overrun took from the comparison's time
    clock = FakeClock()
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        deadline=Deadline(sum(planned[m] for m in comparison) - short, clock=clock),
        end_slack=slack * (2 * short + planned[extra]),  # the extra member's too, if it could
    )
    done = run_final_jobs(study, ctx, clock)
    wanted = State.COMPLETE if slack else State.SKIPPED
    assert [done[(m, 0)] for m in comparison] == [wanted] * len(comparison)
    if slack:
        assert done[(extra, 0)] == State.SKIPPED


@pytest.mark.parametrize(
    ("member_ran", "overrun", "baselines"),
    [
        (True, 0.0, State.SKIPPED),  # the end's slack alone does not cover the member's overrun
        (True, 1.0, State.COMPLETE),  # the limit's overrun does, once the member has trained
        (False, 1.0, State.SKIPPED),  # short by as much before the round: dropped whole
    ],
)
def test_once_the_best_member_has_trained_its_baselines_may_run_past_the_limit(
    ctx, member_ran, overrun, baselines
):
    """The search left the first seed's comparison its estimate and the best member overran
    its own by more than the whole stage's: its baselines no longer fit in the time left and
    the end's slack (a job's estimate at its start is at most its estimate when enqueued: a
    cache an earlier job built costs nothing then). Skipped, they would leave the member with
    nothing to compare against and the limit unused; once the member has trained they may run
    the limit's overrun past it. A round short of time by as much before any of its jobs has
    trained is dropped whole, and an extra member never uses the overrun."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    comparison, extra, planned = enqueue_comparison_and_extra(study, ctx)
    best, *_ = comparison
    over = sum(planned.values())  # the member's overrun
    clock = FakeClock()
    ctx.schedule = dataclasses.replace(
        ctx.schedule,
        deadline=Deadline(
            sum(planned[m] for m in comparison) - (0.0 if member_ran else over), clock=clock
        ),
        end_slack=0.25 * min(planned.values()),
        overrun=overrun * (over + planned[extra]),  # the extra member's too, if it could
    )
    done = run_final_jobs(study, ctx, clock, overran={best: over})
    assert done[(best, 0)] == (State.COMPLETE if member_ran else State.SKIPPED)
    assert [done[(m, 0)] for m in comparison[1:]] == [baselines] * (len(comparison) - 1)
    assert done[(extra, 0)] == State.SKIPPED
