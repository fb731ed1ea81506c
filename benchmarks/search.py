"""The search itself, measured: sampler quality, early stopping, overhead, and what it found.

On Fashion-MNIST at budget 0.25x (the default space), three studies with equal trials:
1. random sampling with early stopping,
2. the same random draws without early stopping (a seeded random sampler draws the same
   candidates whatever the results, so every pruned trial's full-training outcome is known),
3. TPE with early stopping.
It prints the hypervolume of TPE's front vs random's, the time early stopping saved and
whether it ever stopped a trial that belongs on the final front, the share of each trial's wall
time spent outside training, and the best candidate's test accuracy against the teacher's and
the equal-FLOPs KD student's.

Usage: python benchmarks/search.py [--trials 12] [--seed 0] [--runs-dir runs/bench-search]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from autosplit.export import trained_test_accuracy
from autosplit.search import study as studies
from autosplit.search.budget import parse_budget
from autosplit.search.driver import SearchOptions, run_search
from autosplit.search.front import hypervolume, pareto_front
from autosplit.search.space import SearchSpace

ROOT = Path(__file__).resolve().parent.parent


def overhead_shares(study) -> list[float]:
    """Per trial: 1 - (time inside the training loop) / (trial wall time)."""
    shares = []
    for trial in study.get_trials():
        train = trial.user_attrs.get("autosplit.train_seconds")
        if train is None or trial.datetime_complete is None:
            continue
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        shares.append(max(0.0, 1.0 - train / wall))
    return shares


def test_accuracy(ctx, trial) -> float:
    return trained_test_accuracy(trial.user_attrs["autosplit.candidate"],
                                 trial.user_attrs["autosplit.weights"], ctx.teacher.model,
                                 ctx.splits, ctx.runtime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "fashion_mnist.yaml"))
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", default="runs/bench-search")
    args = parser.parse_args()
    runs = Path(args.runs_dir)
    space = SearchSpace.from_yaml(args.space)
    # The teacher cache of the default runs dir is reused when present.
    base = SearchOptions(space=space, budget=parse_budget("0.25x"), trials=args.trials,
                         storage=f"sqlite:///{runs.resolve()}/optuna.db",
                         tracking_uri=f"sqlite:///{runs.resolve()}/mlflow.db", seed=args.seed,
                         device="cpu", runs_dir=Path("runs"), progress=False)
    tag = f"s{args.seed}-t{args.trials}-{int(time.time())}"
    results = {}
    for name, sampler, early in (("random+es", "random", True), ("random", "random", False),
                                 ("tpe+es", "tpe", True)):
        options = dataclasses.replace(base, sampler=sampler, early_stopping=early,
                                      study_name=f"bench-{name}-{tag}")
        started = time.perf_counter()
        study, ctx = run_search(options, say=lambda _m: None)
        results[name] = (study, time.perf_counter() - started)
        print(f"{name}: {len(study.get_trials())} trials in {results[name][1]:.0f}s", flush=True)

    budget = ctx.max_flops
    hv = {name: hypervolume(studies.records(study), budget) for name, (study, _) in results.items()}
    print()
    print(f"budget 0.25x = {budget:,} FLOPs (fvcore: one multiply-add = one FLOP); "
          f"{args.trials} trials per study, seed {args.seed}")
    print("| figure | value |")
    print("|---|---|")
    print(f"| hypervolume, TPE (+early stopping) | {hv['tpe+es']:.4f} |")
    print(f"| hypervolume, random (+early stopping) | {hv['random+es']:.4f} |")
    print(f"| hypervolume, random without early stopping | {hv['random']:.4f} |")

    es_study, es_time = results["random+es"]
    full_study, full_time = results["random"]
    pruned = [t.number for t in es_study.get_trials() if t.user_attrs.get("autosplit.state") == "pruned"]
    full_front = {r.number for r in pareto_front(studies.records(full_study), budget)}
    same_draws = all(a.params == b.params for a, b in zip(es_study.get_trials(), full_study.get_trials(), strict=False))
    killed = sorted(set(pruned) & full_front)
    print(f"| early stopping: trials stopped | {len(pruned)} of {len(es_study.get_trials())} |")
    print(f"| early stopping: study time with / without | {es_time:.0f}s / {full_time:.0f}s "
          f"({100 * (1 - es_time / full_time):.0f}% saved) |")
    print(f"| early stopping: stopped trials that are on the full run's front | "
          f"{killed or 'none'} (same draws in both runs: {same_draws}) |")

    shares = [s for study, _ in results.values() for s in overhead_shares(study)]
    print(f"| wall time outside training per trial, median / mean / max | "
          f"{100 * statistics.median(shares):.1f}% / {100 * statistics.fmean(shares):.1f}% / "
          f"{100 * max(shares):.1f}% |")

    tpe = results["tpe+es"][0]
    front = pareto_front(studies.records(tpe), budget)
    best = max(front, key=lambda r: r.val_acc)
    trials = tpe.get_trials()
    kd = next(t for t in trials if t.user_attrs.get("autosplit.baseline") == "kd-single")
    best_test, kd_test = test_accuracy(ctx, trials[best.number]), test_accuracy(ctx, kd)
    print(f"| best candidate (trial {best.number}: {best.label}), val / test | "
          f"{best.val_acc:.2f}% / {best_test:.2f}% at {best.flops:,} FLOPs |")
    print(f"| equal-FLOPs KD student (baseline trial {kd.number}), val / test | "
          f"{kd.user_attrs.get('autosplit.val_acc', float('nan')):.2f}% / {kd_test:.2f}% |")
    print(f"| teacher, test | {ctx.teacher.test_acc:.2f}% at {ctx.teacher_flops:,} FLOPs |")


if __name__ == "__main__":
    main()
