"""The time planner, with a fake clock and made-up throughput: shares add up, work shrinks in
the documented order, and nothing starts that cannot finish."""

import pytest

from autosplit.search.plan import (
    RESERVE,
    CostModel,
    Deadline,
    PlanInput,
    TimeLimitTooShort,
    make_plan,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def inputs(**kw) -> PlanInput:
    base = dict(
        time_limit=1800.0,
        teacher_cached=False,
        teacher_epochs=10,
        teacher_epoch_seconds=60.0,
        final_seconds=50.0,
        final_fixed_seconds=20.0,
        final_members=2,
        final_seeds=2,
        baselines=2,
        rung0_seconds=10.0,
    )
    base.update(kw)
    return PlanInput(**base)


def test_shares_add_up_to_the_usable_limit():
    plan = make_plan(inputs())
    usable = 1800.0 * (1 - RESERVE)
    assert plan.teacher_seconds == 600.0  # 10 epochs x 60 s
    assert plan.final_seconds == 20.0 + (2 + 2) * 2 * 50.0  # cache + members+baselines x seeds
    assert plan.teacher_seconds + plan.search_seconds + plan.final_seconds == pytest.approx(usable)
    assert (plan.finalists, plan.seeds, plan.teacher_epochs) == (2, 2, 10)
    assert plan.warnings == ()


def test_a_cached_teacher_costs_nothing_and_the_search_gets_its_time():
    plan = make_plan(inputs(teacher_cached=True))
    assert plan.teacher_seconds == 0.0
    assert plan.search_seconds == pytest.approx(1800 * (1 - RESERVE) - 420.0)
    assert "teacher cached" in plan.describe()


def test_shrinks_search_then_finalists_then_seeds_then_teacher():
    # usable = 0.96 L. Search needs (2 baselines + 2) x 10 s = 40 s at least.
    # Full plan: 600 + 420 + 40 = 1060 s usable -> L >= 1104.2
    assert make_plan(inputs(time_limit=1110)).finalists == 2
    # One finalist: final = 20 + 3 x 2 x 50 = 320 -> needs 960 usable (L = 1000)
    plan = make_plan(inputs(time_limit=1010))
    assert (plan.finalists, plan.seeds, plan.teacher_epochs) == (1, 2, 10)
    # One seed: final = 20 + 3 x 50 = 170 -> needs 810 usable (L = 843.75)
    plan = make_plan(inputs(time_limit=850))
    assert (plan.finalists, plan.seeds, plan.teacher_epochs) == (1, 1, 10)
    # Below that the teacher gives up epochs, with a warning, and the final stage is at its
    # smallest: usable 672 - 170 (1 finalist, 1 seed) - 40 = 462 -> 7 teacher epochs.
    plan = make_plan(inputs(time_limit=700))
    assert (plan.finalists, plan.seeds, plan.teacher_epochs) == (1, 1, 7)
    assert plan.warnings and "7 of the 10 epochs" in plan.warnings[-1]
    assert plan.teacher_seconds + plan.search_seconds + plan.final_seconds <= 672 + 1e-9


def test_final_epochs_shrink_after_seeds_and_before_the_teacher():
    # A final job of 4 epochs costs 80 s (20 s an epoch). Full teacher 600 s, search min 40 s.
    four = dict(final_seconds=80.0, final_epochs=4, final_fixed_seconds=0.0)
    # 1 finalist + 2 baselines, 1 seed, 4 epochs: 240 s -> needs 880 usable.
    plan = make_plan(inputs(time_limit=880 / 0.96 + 1, **four))
    assert (plan.finalists, plan.seeds, plan.final_epochs, plan.teacher_epochs) == (1, 1, 4, 10)
    assert plan.warnings == ()
    # 2 epochs: 3 x 40 = 120 s -> needs 760 usable; the final stage warns, the teacher is whole.
    plan = make_plan(inputs(time_limit=760 / 0.96 + 1, **four))
    assert (plan.final_epochs, plan.teacher_epochs, plan.final_seconds) == (2, 10, 120.0)
    assert len(plan.warnings) == 1 and "final stage 2 of the 4 epochs" in plan.warnings[0]
    # Below 1 epoch's worth (60 s -> 700 usable), the teacher gives up epochs too.
    plan = make_plan(inputs(time_limit=650 / 0.96, **four))
    # 650 usable - 60 - 40 = 550 -> 9 teacher epochs (of 60 s)
    assert (plan.final_epochs, plan.teacher_epochs) == (1, 9)
    assert "final stage 1 of the 4" in plan.warnings[0] and "9 of the 10" in plan.warnings[1]
    assert "at 1 epoch" in plan.describe() and "(9 epochs)" in plan.describe()


def test_a_limit_that_fits_nothing_is_refused_with_the_minimum():
    with pytest.raises(TimeLimitTooShort, match="too short on this machine.*needs about"):
        make_plan(inputs(time_limit=200))
    with pytest.raises(TimeLimitTooShort):
        make_plan(inputs(time_limit=100, teacher_cached=True))


def test_no_final_stage_leaves_everything_to_the_search():
    plan = make_plan(inputs(final_members=0, final_seeds=0, baselines=0, teacher_cached=True))
    assert plan.final_seconds == 0.0
    assert plan.search_seconds == pytest.approx(1800 * (1 - RESERVE))


def test_cost_model_interpolates_throughput_in_log_log_space():
    model = CostModel({1e6: 4000.0, 16e6: 1000.0}, fixed_seconds=0.0)
    # Between the points: images/s falls as FLOPs^-0.5 here, so at 4M: 4000 / 2 = 2000.
    assert model.images_per_second(4e6) == pytest.approx(2000.0)
    # One epoch of 1000 rows and 300 val rows (a third of the work each) at 4M FLOPs:
    assert model.training_seconds(flops=4e6, epochs=1, rows=1000, val_rows=300) == pytest.approx(
        1100 / 2000
    )
    single = CostModel({1e6: 1000.0}, fixed_seconds=0.0)
    assert single.images_per_second(2e6) == pytest.approx(500.0)  # time proportional to FLOPs


def test_cost_model_learns_from_finished_jobs():
    model = CostModel({1e6: 1000.0}, fixed_seconds=0.0)
    predicted = model.training_seconds(flops=1e6, epochs=1, rows=1000, val_rows=0)
    assert predicted == pytest.approx(1.0)
    for actual in (2.0, 3.0, 2.5):  # this machine is slower than the micro-benchmark said
        model.observe(
            "trial", model.training_seconds(flops=1e6, epochs=1, rows=1000, val_rows=0), actual
        )
    # Ratios observed against the uncorrected prediction: 2, 3, 2.5 -> median 2.5.
    assert model.training_seconds(flops=1e6, epochs=1, rows=1000, val_rows=0) == pytest.approx(2.5)
    # A kind with no history of its own borrows the trials' correction.
    assert model.training_seconds(
        flops=1e6, epochs=1, rows=1000, val_rows=0, kind="final"
    ) == pytest.approx(2.5)


def test_cost_model_corrects_each_kind_by_its_own_jobs_then_the_nearest_enclosing_kind():
    model = CostModel({1e6: 1000.0}, fixed_seconds=0.0)

    def predict(kind: str) -> float:
        return model.training_seconds(flops=1e6, epochs=1, rows=1000, val_rows=0, kind=kind)

    assert predict("trial/branches/hint") == pytest.approx(1.0)  # nothing measured yet
    model.observe("trial/branches/hint", predict("trial/branches/hint"), 3.0)
    model.observe("trial/single/none", predict("trial/single/none"), 1.0)
    # Ratios against the uncorrected prediction: 3.0 for the first; the single borrowed the
    # trials' 3.0 and took 1.0, a ratio of 1.0 to the uncorrected 1.0.
    assert model.ratios["trial"] == pytest.approx([3.0, 1.0])
    assert predict("trial/branches/hint") == pytest.approx(3.0)
    assert predict("trial/single/none") == pytest.approx(1.0)
    assert predict("trial/branches/none") == pytest.approx(3.0)  # the branches' measured
    assert predict("trial/res_chain/none") == pytest.approx(2.0)  # every trial's median
    assert predict("final") == pytest.approx(2.0)


def test_nothing_starts_that_cannot_finish():
    clock = FakeClock()
    deadline = Deadline(100.0, clock=clock)
    started = []
    for job, seconds in enumerate([30.0, 30.0, 30.0, 30.0, 5.0, 20.0]):
        if deadline.fits(seconds):
            started.append(job)
            clock.now += seconds  # the job runs exactly as long as predicted
    assert started == [0, 1, 2, 4]  # job 3 (30 s) no longer fits at 90 s; job 4 (5 s) does
    assert deadline.remaining() == pytest.approx(5.0)
    assert clock.now - deadline.started <= 100.0
    unlimited = Deadline(None, clock=clock)
    assert unlimited.fits(1e12) and Deadline.until(clock.now - 1, clock=clock).remaining() < 0


def one_finalist_four_epochs(*, final_fixed_seconds: float) -> dict:
    """A cached teacher; 1 finalist + 2 baselines x 1 seed, final jobs of 4 epochs x 20 s."""
    return dict(
        final_seconds=80.0,
        final_epochs=4,
        final_fixed_seconds=final_fixed_seconds,
        final_members=1,
        final_seeds=1,
        teacher_cached=True,
    )


def test_the_warm_start_and_its_teacher_caches_are_the_shortest_search():
    # Cached teacher, 1 finalist + 2 baselines x 1 seed at 4 epochs of 20 s: 240 s final.
    # Without a portfolio the shortest search is 2 baselines + 2 trials of 10 s (40 s); with
    # 5 recipes and 30 s of rung-0 teacher caches it is (2 + 5) x 10 + 30 = 100 s.
    four = one_finalist_four_epochs(final_fixed_seconds=0.0)
    limit = (240 + 40) / (1 - RESERVE) + 1
    plan = make_plan(inputs(time_limit=limit, **four))
    assert plan.final_epochs == 4
    # The same limit no longer holds 4 epochs beside the warm start: the final stage shrinks
    # (3 epochs: 180 s), never the warm start.
    plan = make_plan(inputs(time_limit=limit, portfolio=5, rung0_fixed_seconds=30.0, **four))
    assert (plan.final_epochs, plan.final_seconds) == (3, 180.0)
    assert plan.search_seconds >= 100.0
    with pytest.raises(TimeLimitTooShort, match="baselines and the portfolio's 5 recipes"):
        make_plan(inputs(time_limit=150, portfolio=5, rung0_fixed_seconds=30.0, **four))


def test_the_final_teacher_cache_shrinks_with_the_final_epochs_it_serves():
    # 4 epochs of 20 s per job for 1 finalist + 2 baselines; a 3-view cache of 90 s, 30 s a
    # view. At 2 epochs the cache holds 2 views (60 s): 60 + 3 x 40 = 180 s.
    four = one_finalist_four_epochs(final_fixed_seconds=90.0)
    limit = (180 + 40) / (1 - RESERVE) + 1
    plan = make_plan(inputs(time_limit=limit, final_cache_views=3, **four))
    assert (plan.final_epochs, plan.final_seconds) == (2, 180.0)
    # Counted whole whatever the epochs (a cache without augmentation has one view).
    plan = make_plan(inputs(time_limit=limit, **four))
    assert (plan.final_epochs, plan.final_seconds) == (1, 90.0 + 60.0)


def test_a_workers_schedule_keeps_the_plans_end_slack():
    """Workers in other processes plan from the parent's schedule: the slack the first seed's
    comparison may use at the end crosses over with the deadlines."""
    import pickle
    from types import SimpleNamespace

    from autosplit.search.context import Schedule, SharedPlan

    schedule = Schedule(
        deadline=Deadline(600.0),
        search_deadline=Deadline(300.0),
        final_reserve=200.0,
        end_slack=24.0,
    )
    ctx = SimpleNamespace(
        schedule=schedule,
        cost_model=CostModel({1.0: 1e9}),
        teacher=SimpleNamespace(config=SimpleNamespace(train=SimpleNamespace(epochs=10))),
        runtime=SimpleNamespace(where="cpu"),
    )
    worker = pickle.loads(pickle.dumps(SharedPlan.of(ctx))).schedule()
    assert (worker.end_slack, worker.final_reserve) == (24.0, 200.0)
    assert 500.0 < worker.deadline.remaining() <= 600.0
