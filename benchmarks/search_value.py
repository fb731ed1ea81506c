"""Does the search pay? autosplit against hand-picked recipes and random sampling, on Fashion-MNIST.

(tau)   Proxy fidelity: ``--candidates`` candidates drawn at random from the space (not
        finalists), each trained at every rung and at the space's real final fidelity (seed
        0). Kendall tau of each rung's val accuracy against the final val accuracy, with n and
        the p-value.
(value) At the same wall time ``--time-limit`` per seed: autosplit (search + final stage, the
        shipped or cached teacher), the same search with random sampling, and each of the KD,
        DKD and FitNets recipes (as their papers set them) trained on all rows for as many
        epochs as that time holds (planned from a throughput probe; the real wall time is
        printed). Test accuracy mean ± sd over ``--seeds`` seeds: for a search, its best final
        member's test accuracy (mean over its final seeds, read by export, never by the search);
        for a recipe, the student trained with that seed.

Both parts run at ``--budgets`` (fractions of the teacher's FLOPs). Every finished job is
appended to ``<out>/results.jsonl`` at once, and a second run skips it: the benchmark runs for
hours and may be stopped and started again at any point (a job cut short runs again from its
start). The tables are printed from that file, whatever has finished, with n per cell.

Usage: python benchmarks/search_value.py [--parts tau,value] [--budgets 0.25 0.125]
           [--candidates 12] [--time-limit 20m] [--seeds 3] [--first-seed 0] [--runs-dir runs] [--out DIR]
           [--tables-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import mean_sd, random_feasible, train_at  # noqa: E402  (the search's own training path)

from autosplit.config import load_yaml  # noqa: E402
from autosplit.device import resolve_runtime  # noqa: E402
from autosplit.distill.recipes import recipe_candidate, scaled_warmup  # noqa: E402
from autosplit.errors import UserError  # noqa: E402
from autosplit.evaluation import test_loader  # noqa: E402
from autosplit.export import export_study  # noqa: E402
from autosplit.search.attrs import Stage, TrialAttrs  # noqa: E402
from autosplit.search.budget import parse_budget, parse_duration  # noqa: E402
from autosplit.search.context import SearchContext  # noqa: E402
from autosplit.search.driver import run_search  # noqa: E402
from autosplit.search.front import FLOPS_CONVENTION  # noqa: E402
from autosplit.search.job_cost import estimate_job  # noqa: E402
from autosplit.search.setup import SearchOptions, prepare  # noqa: E402
from autosplit.search.space import Rung, SearchSpace  # noqa: E402
from autosplit.search.trial import at_fidelity, build_or_smallest  # noqa: E402
from autosplit.tracking import MlflowTracker  # noqa: E402
from autosplit.train import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("kd", "dkd", "fitnets")
SEARCH_ARMS = {"autosplit (TPE)": "tpe", "random sampling": "random"}
ARMS = (*SEARCH_ARMS.values(), *RECIPES)  # the names --arms takes


class Results:
    """Finished jobs, one JSON line each, keyed; appended and flushed as each job ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:  # a line cut by a kill: its job runs again
                        continue
                    self.rows[row["key"]] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.rows[row["key"]] = row

    def where(self, prefix: str) -> list[dict[str, Any]]:
        return [r for k, r in self.rows.items() if k.startswith(prefix)]


def final_rung(ctx: SearchContext) -> Rung:
    final = ctx.space.settings.fidelity.final
    return Rung(final.epochs, final.rows)


def part_tau(ctx: SearchContext, budget: str, n: int, seed: int, results: Results) -> None:
    """Random candidates at every rung and at the final fidelity. The draws are the same on
    every run (a seeded sampler, asked in the same order), so finished ones are skipped."""
    rungs, final = ctx.space.settings.fidelity.rungs, final_rung(ctx)
    for drawn, (candidate, flops) in enumerate(random_feasible(ctx, n, seed), start=1):
        key = f"tau/{budget}/{seed}/{drawn - 1}"
        if key in results:
            continue
        started = time.perf_counter()
        accs = [train_at(ctx, candidate, rung)[1].val_acc for rung in rungs]
        final_acc = train_at(ctx, candidate, final)[1].val_acc
        results.add(
            {
                "key": key,
                "label": candidate.label,
                "flops": flops.worst_case,
                "rungs": accs,
                "final": final_acc,
                "final_fidelity": [final.epochs, final.rows],
                "seconds": time.perf_counter() - started,
            }
        )
        print(
            f"  tau {budget} {drawn}/{n} {candidate.label}: rungs "
            f"{', '.join(f'{a:.2f}' for a in accs)} -> final {final_acc:.2f}",
            flush=True,
        )


def search_job(
    base: SearchOptions, arm: str, seed: int, budget: str, out: Path, results: Results
) -> None:
    key = f"value/{budget}/{arm}/{seed}"
    if key in results:
        return
    searched = f"search/{budget}/{arm}/{seed}"
    if searched in results:  # searched to its end, then stopped (or failed) exporting
        name, wall = results.rows[searched]["study"], results.rows[searched]["wall"]
        study = optuna.load_study(study_name=name, storage=base.storage)
        runtime = resolve_runtime(base.device, precision=base.precision)
    else:
        # A search cut short left a study behind: start a fresh one (a resumed search would
        # get a second time limit).
        prefix = f"sv-{budget}-{SEARCH_ARMS[arm]}-s{seed}-"
        taken = optuna.get_all_study_names(base.storage) if (out / "optuna.db").is_file() else []
        attempt = sum(1 for study_name in taken if study_name.startswith(prefix))
        name = f"{prefix}{attempt}"
        options = dataclasses.replace(base, sampler=SEARCH_ARMS[arm], seed=seed, study_name=name)
        started = time.perf_counter()
        tracker = MlflowTracker(f"sqlite:///{out}/mlflow.db")
        study, ctx = run_search(options, tracker=tracker, say=lambda _m: None)
        wall = time.perf_counter() - started
        runtime = ctx.runtime
        results.add({"key": searched, "study": name, "wall": wall})
    export_dir = out / f"export-{name.removeprefix('sv-')}"
    search_trials = sum(1 for t in study.get_trials() if TrialAttrs.read(t).stage != Stage.FINAL)
    try:
        export_study(
            study,
            export_dir,
            storage_url=base.storage,
            runtime=runtime,
            runs_dir=base.runs_dir,
            say=lambda _m: None,
        )
    except UserError as exc:  # nothing finished within the limit: that is the arm's result
        results.add(
            {
                "key": key,
                "study": name,
                "test": None,
                "val": None,
                "flops": None,
                "label": "-",
                "trials": search_trials,
                "wall": wall,
                "limit": base.time_limit,
                "note": str(exc),
            }
        )
        print(f"  value {budget} {arm} seed {seed}: {wall:.0f}s, {exc}")
        return
    best = load_yaml(export_dir / "best.yaml")
    result, provenance = best["result"], best["provenance"]
    results.add(
        {
            "key": key,
            "study": name,
            "label": provenance["label"],
            "baseline": provenance["baseline"],
            "flops": result["flops_worst_case"],
            "expected_flops": result["flops_expected"],
            "val": result.get("val_acc_mean", result["val_acc"]),
            "test": result.get("test_acc_mean", result["test_acc"]),
            "final_seeds": len(result.get("seeds", [])) or 1,
            "fidelity": result.get("fidelity"),
            "trials": search_trials,
            "wall": wall,
            "limit": base.time_limit,
        }
    )
    print(f"  value {budget} {arm} seed {seed}: {wall:.0f}s, best test {results.rows[key]['test']}")


PROBE_ROWS = (5000, 10000)


def probe_rows(ctx: SearchContext) -> list[int]:
    """Rows of the two probe epochs: ``PROBE_ROWS``, within the training rows and distinct (two
    probes over the same rows cannot separate a job's fixed seconds from its seconds per image)."""
    rows = len(ctx.splits.train)
    return [min(PROBE_ROWS[0], rows // 2), min(PROBE_ROWS[1], rows)]


def probe_seconds(ctx: SearchContext, candidate, rows: int) -> float:
    """Seconds ``candidate`` trains one epoch over ``rows`` rows, without building its teacher
    cache (the estimate adds the full job's cache from the build rate this process measured)."""
    built = ctx.teacher_cache.build_seconds
    started = time.perf_counter()
    train_at(ctx, candidate, Rung(1, rows))
    return time.perf_counter() - started - (ctx.teacher_cache.build_seconds - built)


def planned_epochs(ctx: SearchContext, candidate, probes: list[list[float]], limit: float):
    """The most epochs on all rows whose cost, as the search's own final-job estimator reads it
    from the probes (fixed seconds + seconds per image, plus the teacher cache the job builds),
    fits ``limit``; with that estimate in seconds."""
    distiller, flops = build_or_smallest(candidate, ctx)
    taps, n_stages = set(distiller.teacher_taps), len(distiller.stages())
    passes = distiller.prepare_passes
    del distiller
    rungs = [
        (at_fidelity(candidate, Rung(1, int(rows))), {"seconds": seconds})
        for rows, seconds in probes
    ]

    def cost(epochs: int) -> float:
        at = fit_epochs(candidate, epochs)
        return estimate_job(
            ctx,
            at,
            taps=taps,
            n_stages=n_stages,
            passes=passes,
            rungs=rungs,
            flops=flops.worst_case,
        ).total()

    epochs, seconds = 1, cost(1)
    while (more := cost(epochs + 1)) <= limit:
        epochs, seconds = epochs + 1, more
    return epochs, seconds


def fit_epochs(candidate, epochs: int):
    """``candidate`` at ``epochs`` on all rows, its warm-up (DKD, AEKT) at the shipped spaces'
    rule for those epochs."""
    fitted = scaled_warmup(candidate.with_values({"train.epochs": epochs}))
    return at_fidelity(fitted, Rung(epochs, None))


def recipe_job(
    ctx: SearchContext, recipe: str, seed: int, budget: str, limit: float, results: Results
) -> None:
    """The recipe trained on all rows for as many epochs as ``limit`` holds: planned by the
    search's final-job estimator from two probe epochs (``probe_rows``, once per recipe and
    budget, kept in the results too), so the fixed cost of a job is not read as per-image cost."""
    key = f"value/{budget}/{recipe}/{seed}"
    if key in results:
        return
    base = ctx.space.base_candidate(ctx.max_flops)
    candidate = recipe_candidate(recipe, base)
    probe_key = f"probes/{budget}/{recipe}"
    if probe_key not in results:
        rows = probe_rows(ctx)
        probe_seconds(ctx, candidate, rows[0])  # warm-up: the first training in a process pays
        # one-time costs (kernels, allocator, workers) a probe would read as the job's own
        probes = [[n, probe_seconds(ctx, candidate, n)] for n in rows]
        results.add({"key": probe_key, "probes": probes})
    epochs, planned = planned_epochs(ctx, candidate, results.rows[probe_key]["probes"], limit)
    fitted = fit_epochs(candidate, epochs)
    started = time.perf_counter()
    _, result = train_at(ctx, fitted, Rung(epochs, None), seed)
    wall = time.perf_counter() - started
    student = ctx.runtime.prepare(result.student).eval()
    test = evaluate(student, test_loader(ctx.splits, ctx.runtime), ctx.runtime)
    results.add(
        {
            "key": key,
            "label": fitted.label,
            "flops": result.flops.worst_case,
            "val": result.val_acc,
            "test": test,
            "epochs": epochs,
            "planned": planned,
            "wall": wall,
            "limit": limit,
        }
    )
    print(
        f"  value {budget} {recipe} seed {seed}: {epochs} epochs, planned {planned:.0f}s, "
        f"took {wall:.0f}s, test {test:.2f}",
        flush=True,
    )


def tau_table(results: Results, budget: str, ctx: SearchContext) -> None:
    rows = sorted(results.where(f"tau/{budget}/"), key=lambda r: r["key"])
    final = final_rung(ctx)
    print(
        f"\n(tau) budget {budget}x: {len(rows)} random candidates, final fidelity "
        f"{final.epochs} epochs x {final.rows or 'all'} rows (the space's own), seed 0"
    )
    print("| proxy | n | Kendall tau vs final | p |")
    print("|---|---|---|---|")
    for k, rung in enumerate(ctx.space.settings.fidelity.rungs):
        name = f"rung {k}: {rung.epochs} epoch(s) x {rung.rows or 'all'} rows"
        if len(rows) < 5:
            print(f"| {name} | {len(rows)} | no figure: fewer than 5 candidates | |")
            continue
        tau = kendalltau([r["rungs"][k] for r in rows], [r["final"] for r in rows])
        print(f"| {name} | {len(rows)} | {tau.statistic:+.3f} | {tau.pvalue:.3g} |")


def value_table(results: Results, budget: str, ctx: SearchContext, limit: float) -> None:
    print(
        f"\n(value) budget {budget}x ({ctx.max_flops:,} FLOPs, {FLOPS_CONVENTION}), "
        f"{limit:.0f} s of wall time per job; test accuracy %, mean ± sd over seeds"
    )
    print("| arm | seeds done | test % | val % | FLOPs | wall s | what it trained |")
    print("|---|---|---|---|---|---|---|")
    means: dict[str, list[float]] = {}
    val_means: dict[str, float] = {}
    for arm in (*SEARCH_ARMS, *RECIPES):
        rows = results.where(f"value/{budget}/{arm}/")
        if not rows:
            print(f"| {arm} | 0 | not run yet | | | | |")
            continue
        done = [r for r in rows if r["test"] is not None]
        if not done:
            print(f"| {arm} | {len(rows)} | no member finished within the limit | | | | |")
            continue
        tests = [r["test"] for r in done]
        means[arm] = tests
        vals = [r["val"] for r in done]
        val_means[arm] = statistics.fmean(vals)
        walls = ", ".join(f"{r['wall']:.0f}" for r in rows)
        what = (
            "; ".join(f"{r['trials']} trials, best {r['label']}{final_fidelity(r)}" for r in rows)
            if arm in SEARCH_ARMS
            else f"{rows[0]['epochs']} epochs on all rows"
        )
        print(
            f"| {arm} | {len(done)} of {len(rows)} | {spread(tests)} | {spread(vals)} | "
            f"{statistics.fmean(float(r['flops']) for r in done):,.0f} | "
            f"{walls} | {what} |"
        )
    hand = [r for r in RECIPES if r in means]
    if "autosplit (TPE)" in means and hand:
        best = max(hand, key=lambda r: val_means[r])  # chosen on val, as a user would
        ours, theirs = means["autosplit (TPE)"], means[best]
        sd = statistics.stdev(theirs) if len(theirs) > 1 else None
        gap = statistics.fmean(ours) - statistics.fmean(theirs)
        print(
            f"autosplit - the hand-picked recipe best on val ({best}), test: {gap:+.2f} pt"
            + (
                f" ({best} sd {sd:.2f}; {'>' if gap > 2 * sd else '<='} 2 sd)"
                if sd
                else " (1 seed)"
            )
        )
    if "autosplit (TPE)" in means:
        print(
            f"autosplit - teacher, test: "
            f"{statistics.fmean(means['autosplit (TPE)']) - ctx.teacher.test_acc:+.2f} pt "
            f"(teacher {ctx.teacher.test_acc:.2f} %; long goal: >= 0 at <= 25 % of its FLOPs)"
        )
    if "autosplit (TPE)" in means and "kd" in means:
        kd = means["kd"]
        gap = statistics.fmean(means["autosplit (TPE)"]) - statistics.fmean(kd)
        sd = statistics.stdev(kd) if len(kd) > 1 else None
        print(
            f"autosplit - same-FLOPs KD student, test: {gap:+.2f} pt"
            + (f" (KD sd {sd:.2f}; long goal: > 2 sd)" if sd else " (1 seed: no sd)")
        )


def final_fidelity(row: dict[str, Any]) -> str:
    """What the search's final stage trained its best member at: the plan may have shrunk the
    space's final fidelity (epochs, seeds) to fit the time, and the table says so."""
    fidelity = row.get("fidelity") or {}
    if not fidelity:
        return ""
    rows = fidelity.get("rows") or "all"
    return (
        f", final {fidelity.get('epochs')} epoch(s) x {rows} rows x "
        f"{row.get('final_seeds', 1)} seed(s)"
    )


def spread(values: list[float]) -> str:
    return mean_sd(values) if len(values) > 1 else f"{values[0]:.2f} (1 seed)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "fashion_mnist.yaml"))
    parser.add_argument("--parts", default="tau,value")
    parser.add_argument("--budgets", nargs="+", default=["0.25", "0.125"])
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--time-limit", default="20m", help="wall time of each job of (value)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds of (value)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="(value) runs seeds first-seed .. first-seed + seeds - 1: one seed on its own "
        "machine or session, the rows gathered in one results.jsonl",
    )
    parser.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"the arms of (value) to run, of {', '.join(ARMS)}: one arm again after a change "
        "to it, in its own --out",
    )
    parser.add_argument("--seed", type=int, default=0, help="the random draws of (tau)")
    parser.add_argument("--runs-dir", default="runs", help="holds the cached teacher")
    parser.add_argument("--out", default=None, help="default: <runs-dir>/bench-search-value")
    parser.add_argument("--tables-only", action="store_true", help="print what has finished")
    args = parser.parse_args()
    runs = Path(args.runs_dir).resolve()
    out = Path(args.out).resolve() if args.out else runs / "bench-search-value"
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / "results.jsonl")
    space = SearchSpace.from_yaml(Path(args.space))
    limit = parse_duration(args.time_limit)
    parts = set(args.parts.split(","))
    arms = set(args.arms.split(","))
    if unknown := arms - set(ARMS):
        parser.error(f"--arms: unknown {', '.join(sorted(unknown))}; choose of {', '.join(ARMS)}")
    for budget in args.budgets:
        base = SearchOptions(
            space=space,
            budget=parse_budget(f"{budget}x"),
            trials=space.settings.trials,
            time_limit=limit,
            storage=f"sqlite:///{out}/optuna.db",
            device="cpu",
            runs_dir=runs,
            progress=False,
        )
        ctx = prepare(dataclasses.replace(base, time_limit=None), log_teacher=print)
        print(
            f"budget {budget}x = {ctx.max_flops:,} FLOPs ({FLOPS_CONVENTION}); teacher "
            f"{ctx.teacher_flops:,} FLOPs, test {ctx.teacher.test_acc:.2f}%",
            flush=True,
        )
        if not args.tables_only and "tau" in parts:
            part_tau(ctx, budget, args.candidates, args.seed, results)
        if not args.tables_only and "value" in parts:
            # every arm at one seed before the next seed: a stop leaves pairs
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for arm, sampler in SEARCH_ARMS.items():
                    if sampler in arms:
                        search_job(base, arm, seed, budget, out, results)
                for recipe in RECIPES:
                    if recipe in arms:
                        recipe_job(ctx, recipe, seed, budget, limit, results)
        tau_table(results, budget, ctx)
        value_table(results, budget, ctx, limit)


if __name__ == "__main__":
    main()
