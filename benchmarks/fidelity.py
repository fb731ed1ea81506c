"""How well the search spends its time, measured on Fashion-MNIST at budget 0.25x.

(a) Proxy fidelity: ``--candidates`` candidates drawn at random from the default space, each
    trained at every rung (1 epoch / 10k rows, 3 epochs / 10k rows) and at the final fidelity
    (the space's final stage, seed 0). Kendall tau between each rung's val accuracy and the
    final val accuracy.
(b) At the same ``--time-limit`` (teacher cached, so the limit is search + final stage):
    successive halving (TPE), today's full-length trials (TPE, every trial at the top rung), and
    random sampling (with successive halving), over ``--search-seeds`` seeds. For each: the
    hypervolume of the final front (all at the final fidelity, so comparable), and for
    successive halving the time its search front needed to reach the full-length search's
    final search-front hypervolume. Also the wall time outside training per trial.
(c) The best final student of the successive-halving search (seed 0) against the teacher and
    the same-FLOPs KD student, both retrained at the final fidelity over ``--final-seeds``
    seeds: test accuracy mean ± sd (test is read here, never by the search).

Every figure comes from this one run, so ratios are side by side on the same machine load.

Usage: python benchmarks/fidelity.py [--parts abc] [--candidates 10] [--time-limit 8m]
           [--search-seeds 2] [--final-seeds 3] [--runs-dir runs]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import optuna
from scipy.stats import kendalltau

from autosplit.search import study as studies
from autosplit.search.attrs import Stage, State, StudyAttrs, TrialAttrs
from autosplit.search.budget import parse_budget, parse_duration
from autosplit.search.context import SearchContext
from autosplit.search.driver import run_search
from autosplit.search.front import (
    FLOPS_CONVENTION,
    final_front,
    final_members,
    hypervolume,
    search_records,
)
from autosplit.search.setup import SearchOptions, prepare
from autosplit.search.space import Rung, SearchSpace
from autosplit.search.trial import at_fidelity, build_or_smallest
from autosplit.tracking import MlflowTracker

ROOT = Path(__file__).resolve().parent.parent


def train_at(ctx: SearchContext, candidate, rung: Rung, seed: int = 0):
    """Train ``candidate`` at ``rung`` with ``seed`` through the search's own code path."""
    from autosplit.distill.run import train_candidate

    at = at_fidelity(candidate, rung).with_values({"train.seed": candidate.train.seed + seed})
    distiller, flops = build_or_smallest(at, ctx)
    taps = set(distiller.teacher_taps)
    del distiller
    return at, train_candidate(
        at,
        ctx.splits,
        ctx.teacher.model,
        ctx.runtime,
        teacher_source=ctx.teacher_cache.get(taps, at),
        progress=False,
        flops=flops,
    )


def mean_sd(values: list[float], digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def random_feasible(ctx: SearchContext, n: int, seed: int):
    """The first ``n`` candidates a seeded random sampler draws from the space within the
    budget, with their FLOPs: the same ones, in the same order, on every call."""
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    drawn = 0
    while drawn < n:
        trial = study.ask()
        candidate = ctx.space.suggest(trial, ctx.max_flops)
        _, flops = build_or_smallest(candidate, ctx)
        if flops.worst_case > ctx.max_flops:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        drawn += 1
        yield candidate, flops


def part_a(ctx: SearchContext, n: int, seed: int) -> None:
    fidelity = ctx.space.settings.fidelity
    final = Rung(fidelity.final.epochs, fidelity.final.rows)
    rows = []
    started = time.perf_counter()
    for candidate, flops in random_feasible(ctx, n, seed):
        accs = [train_at(ctx, candidate, rung)[1].val_acc for rung in fidelity.rungs]
        final_acc = train_at(ctx, candidate, final)[1].val_acc
        rows.append((candidate.label, flops.worst_case, accs, final_acc))
        print(
            f"  (a) {len(rows)}/{n} {candidate.label}: rungs "
            f"{', '.join(f'{a:.2f}' for a in accs)} -> final {final_acc:.2f} "
            f"({time.perf_counter() - started:.0f}s)",
            flush=True,
        )
    finals = [r[3] for r in rows]
    print()
    print(
        f"(a) proxy fidelity over {n} random candidates (final: {final.epochs} epochs x "
        f"{final.rows or 'all'} rows, seed 0; val accuracy)"
    )
    print("| proxy | Kendall tau vs final | p-value |")
    print("|---|---|---|")
    for k, rung in enumerate(fidelity.rungs):
        result = kendalltau([r[2][k] for r in rows], finals)
        print(
            f"| rung {k}: {rung.epochs} epoch(s) x {rung.rows or 'all'} rows | "
            f"{result.statistic:+.3f} | {result.pvalue:.3f} |"
        )
    print()


def search_phase_hv_times(study: optuna.Study, budget: int, cost: str) -> list[tuple[float, float]]:
    """(seconds since the study's first trial started, hypervolume of the search front) after
    each search trial that reached the top rung, in order of completion."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False)
        if TrialAttrs.read(t).stage != Stage.FINAL and t.datetime_complete
    ]
    if not trials:
        return []
    start = min(t.datetime_start for t in trials)
    done = sorted(trials, key=lambda t: t.datetime_complete)
    out = []
    for i, trial in enumerate(done):
        records = [studies.record_of(t) for t in done[: i + 1]]
        out.append(
            (
                (trial.datetime_complete - start).total_seconds(),
                hypervolume(search_records(records), budget, cost=cost),
            )
        )
    return out


def overhead_shares(study: optuna.Study) -> list[float]:
    """Per finished trial: 1 - (seconds inside the training loop) / (trial wall seconds)."""
    shares = []
    for trial in study.get_trials(deepcopy=False):
        train = TrialAttrs.read(trial).train_seconds
        if train is None or trial.datetime_complete is None:
            continue
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        shares.append(max(0.0, 1.0 - train / wall))
    return shares


def part_b(
    base: SearchOptions, tracking_uri: str, seeds: int, tag: str
) -> dict[str, list[optuna.Study]]:
    modes = {
        "halving (TPE)": ("tpe", True),
        "full-length (TPE)": ("tpe", False),
        "random (halving)": ("random", True),
    }
    studies_of: dict[str, list[optuna.Study]] = {m: [] for m in modes}
    walls: dict[str, list[float]] = {m: [] for m in modes}
    for seed in range(seeds):
        for mode, (sampler, halving) in modes.items():
            name = f"bench-{sampler}-{'sh' if halving else 'full'}-s{seed}-{tag}"
            options = dataclasses.replace(
                base, sampler=sampler, halving=halving, seed=seed, study_name=name
            )
            started = time.perf_counter()
            tracker = MlflowTracker(tracking_uri)  # one per search: one parent run each
            study, ctx = run_search(options, tracker=tracker, say=lambda _m: None)
            walls[mode].append(time.perf_counter() - started)
            studies_of[mode].append(study)
            print(
                f"  (b) {mode} seed {seed}: {len(study.get_trials())} trials in "
                f"{walls[mode][-1]:.0f}s (limit {base.time_limit:.0f}s)",
                flush=True,
            )
    budget = ctx.max_flops
    cost = "expected_flops" if base.space.settings.objective_flops == "expected" else "flops"

    def final_hv(study: optuna.Study) -> float:
        members = final_members(studies.records(study), StudyAttrs.read(study).final_members)
        return hypervolume([m.record() for m in members], budget, cost=cost)

    print()
    print(
        f"(b) at the same time limit ({base.time_limit / 60:.1f} min, teacher cached), "
        f"{seeds} search seeds; hypervolume normalised to [0, 1]"
    )
    print("| mode | search trials (top rung) | final-front hypervolume | wall s (limit) |")
    print("|---|---|---|---|")
    for mode, found in studies_of.items():
        tops = [
            sum(
                1
                for t in s.get_trials()
                if (attrs := TrialAttrs.read(t)).stage != Stage.FINAL
                and attrs.state == State.COMPLETE
            )
            for s in found
        ]
        alls = [
            sum(
                1
                for t in s.get_trials()
                if (attrs := TrialAttrs.read(t)).stage != Stage.FINAL
                and attrs.state in (State.COMPLETE, State.STOPPED)
            )
            for s in found
        ]
        print(
            f"| {mode} | {statistics.fmean(alls):.1f} ({statistics.fmean(tops):.1f}) | "
            f"{mean_sd([final_hv(s) for s in found], 4)} "
            f"(each: {', '.join(f'{final_hv(s):.4f}' for s in found)}) | "
            f"{', '.join(f'{w:.0f}' for w in walls[mode])} ({base.time_limit:.0f}) |"
        )
    for sh, full in zip(studies_of["halving (TPE)"], studies_of["full-length (TPE)"], strict=True):
        target = hypervolume(search_records(studies.records(full)), budget, cost=cost)
        full_times = search_phase_hv_times(full, budget, cost)
        full_time = full_times[-1][0] if full_times else float("nan")
        reached = next(
            (t for t, hv in search_phase_hv_times(sh, budget, cost) if hv >= target), None
        )
        print(
            f"time for halving's search front to reach full-length's final search-front "
            f"hypervolume {target:.4f}: "
            + (
                f"{reached:.0f}s vs {full_time:.0f}s = {reached / full_time:.2f}x (goal <= 0.33)"
                if reached is not None
                else f"not reached (full-length took {full_time:.0f}s)"
            )
        )
    # Restart, not resume: a promoted trial trains its new rung from scratch. What resuming
    # could save at most is the training time of the rungs below the one each trial ended at.
    redone = total = 0.0
    for study in studies_of["halving (TPE)"]:
        for t in study.get_trials(deepcopy=False):
            attrs = TrialAttrs.read(t)
            rungs = attrs.rungs or []
            if attrs.stage == Stage.SEARCH and rungs:
                redone += sum(r["seconds"] for r in rungs[:-1])
                total += sum(r["seconds"] for r in rungs)
    if total:
        print(
            f"restart instead of resume: {100 * redone / total:.1f}% of halving's search "
            f"training time ({redone:.0f}s of {total:.0f}s) went to lower rungs of trials "
            "that were then promoted: the most resuming could save"
        )
    shares = [s for found in studies_of.values() for study in found for s in overhead_shares(study)]
    if shares:
        print(
            f"wall time outside training per trial: median {100 * statistics.median(shares):.1f}%"
            f", mean {100 * statistics.fmean(shares):.1f}%, max {100 * max(shares):.1f}% "
            f"(goal: median <= 5 %; {len(shares)} trials)"
        )
    print()
    return studies_of


def part_c(ctx: SearchContext, study: optuna.Study, seeds: int) -> None:
    from autosplit.distill.candidate import Candidate
    from autosplit.evaluation import test_loader
    from autosplit.train import evaluate

    fidelity = ctx.space.settings.fidelity.final
    final = Rung(fidelity.epochs, fidelity.rows)
    budget = ctx.max_flops
    cost = "expected_flops" if ctx.space.settings.objective_flops == "expected" else "flops"
    members = final_members(studies.records(study), StudyAttrs.read(study).final_members)
    front = final_front(members, budget, cost=cost)
    best = max(front, key=lambda m: m.val_mean)
    trials = {t.number: t for t in study.get_trials()}
    kd = next(m for m in members if m.baseline == "kd-single")
    rows = []
    for who, member in (("best final student", best), ("same-FLOPs KD student", kd)):
        candidate = Candidate.from_dict(TrialAttrs.read(trials[member.number]).candidate)
        if candidate.structure.get("exit_threshold") is not None:
            candidate = candidate.with_values({"structure.exit_threshold": None})
        vals, tests = [], []
        for seed in range(seeds):
            _, result = train_at(ctx, candidate, final, seed)
            vals.append(result.val_acc)
            # The deployed student as trained (its exit gate, if any, already calibrated).
            student = ctx.runtime.prepare(result.student).eval()
            tests.append(evaluate(student, test_loader(ctx.splits, ctx.runtime), ctx.runtime))
        rows.append((who, member, vals, tests))
    print(
        f"(c) best final student vs teacher and same-FLOPs KD, at the final fidelity "
        f"({final.epochs} epochs x {final.rows or 'all'} rows), {seeds} seeds"
    )
    print("| network | FLOPs | val % | test % |")
    print("|---|---|---|---|")
    for who, member, vals, tests in rows:
        print(
            f"| {who} (trial {member.number}: {member.label}) | {member.flops:,} | "
            f"{mean_sd(vals)} | {mean_sd(tests)} |"
        )
    print(
        f"| teacher ({ctx.space.teacher.model}) | {ctx.teacher_flops:,} | "
        f"{ctx.teacher.val_acc:.2f} | {ctx.teacher.test_acc:.2f} |"
    )
    (b_test, kd_test) = (rows[0][3], rows[1][3])
    sd = statistics.stdev(kd_test) if len(kd_test) > 1 else 0.0
    print(
        f"best - KD, test: {statistics.fmean(b_test) - statistics.fmean(kd_test):+.2f} pt "
        f"(KD sd {sd:.2f}; goal > 2 sd); best - teacher, test: "
        f"{statistics.fmean(b_test) - ctx.teacher.test_acc:+.2f} pt (goal >= 0)"
    )


def scaled_space(path: Path, folder: Path, args: argparse.Namespace) -> Path:
    """The space, with the teacher and fidelities the flags set (written beside the results,
    so every study records the space it really ran)."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    if args.teacher_epochs:
        raw["teacher"]["train"]["epochs"] = args.teacher_epochs
    fidelity = raw["search"]["fidelity"]
    if args.rung_rows:
        for rung in fidelity["rungs"]:
            rung["rows"] = args.rung_rows
    if args.final_epochs:
        fidelity["final"]["epochs"] = args.final_epochs
    if args.final_rows:
        fidelity["final"]["rows"] = args.final_rows
    out = folder / f"{path.stem}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "fashion_mnist.yaml"))
    parser.add_argument("--parts", default="abc", help="which parts to run: any of a, b, c")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--time-limit", default="8m", help="each search of part (b)")
    parser.add_argument("--search-seeds", type=int, default=2)
    parser.add_argument("--final-seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="part (a)'s random draws")
    parser.add_argument("--runs-dir", default="runs", help="holds the cached teacher")
    parser.add_argument(
        "--teacher-epochs", type=int, help="train (or reuse) the teacher with this many epochs"
    )
    parser.add_argument("--rung-rows", type=int, help="training rows of every rung")
    parser.add_argument("--final-epochs", type=int, help="epochs of the final fidelity")
    parser.add_argument("--final-rows", type=int, help="training rows of the final fidelity")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runs = Path(args.runs_dir).resolve()
    bench = (
        runs / f"bench-fidelity-{args.parts}"
    )  # one folder per process: parts may run side by side
    bench.mkdir(parents=True, exist_ok=True)
    space = SearchSpace.from_yaml(scaled_space(Path(args.space), bench, args))
    base = SearchOptions(
        space=space,
        budget=parse_budget("0.25x"),
        trials=space.settings.trials,
        time_limit=parse_duration(args.time_limit),
        storage=f"sqlite:///{bench}/optuna.db",
        device="cpu",
        runs_dir=runs,
        progress=False,
    )
    tracking_uri = f"sqlite:///{bench}/mlflow.db"
    ctx = prepare(dataclasses.replace(base, time_limit=None), log_teacher=print)
    print(
        f"budget 0.25x = {ctx.max_flops:,} FLOPs ({FLOPS_CONVENTION}); "
        f"teacher {ctx.teacher_flops:,} FLOPs, test {ctx.teacher.test_acc:.2f}%",
        flush=True,
    )
    if "a" in args.parts:
        part_a(ctx, args.candidates, args.seed)
    found = None
    if "b" in args.parts or "c" in args.parts:
        tag = str(int(time.time()))
        seeds = args.search_seeds if "b" in args.parts else 1
        found = part_b(base, tracking_uri, seeds, tag) if "b" in args.parts else None
        if found is None:
            study, _ = run_search(
                dataclasses.replace(base, study_name=f"bench-c-{tag}", seed=0),
                tracker=MlflowTracker(tracking_uri),
                say=lambda _m: None,
            )
        else:
            study = found["halving (TPE)"][0]
        if "c" in args.parts:
            part_c(ctx, study, args.final_seeds)


if __name__ == "__main__":
    main()
