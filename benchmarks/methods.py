"""Every distillation recipe at equal FLOPs and equal training budget, over several seeds.

On Fashion-MNIST with the default space's teacher (trained once and cached), at budgets of
about 1/8 and 1/4 of the teacher's FLOPs. Each recipe (plus cross-combinations no paper tried)
trains on the same rows with the teacher's outputs from the cache, at its paper's procedure: a
staged recipe (RKD, ResKD) trains every stage for the full ``--epochs`` (``train.stage_epochs:
full``), and is shown again at equal training cost (``shared``: the epochs split over its
stages, as many images seen as a joint recipe). DKD and AEKT warm up by the shipped spaces'
rule. The table gives FLOPs (worst case / expected, fvcore: one multiply-add = one FLOP),
validation and test accuracy as mean ± sd over seeds, the training cost (images seen x student
FLOPs, relative to one joint run of ``--epochs``) and training time.

Usage: python benchmarks/methods.py [--seeds 3] [--epochs 3] [--samples 12000]
                                    [--budgets 0.125 0.25] [--methods kd dkd ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from autosplit.cache import teacher_cache_for
from autosplit.distill import METHODS
from autosplit.distill._base import warmup_epochs_for
from autosplit.distill.recipes import recipe_candidate, scaled_warmup
from autosplit.evaluation import test_loader
from autosplit.flops import count_flops, format_flops
from autosplit.search.budget import parse_budget
from autosplit.search.setup import SearchOptions, prepare
from autosplit.search.space import SearchSpace
from autosplit.train import evaluate

ROOT = Path(__file__).resolve().parent.parent
# Recipes no paper combined: a res-student chain trained with DKD, an RKD assistant with AEKT.
CROSS = {
    "res_chain+dkd": {
        "structure.name": "res_chain",
        "logit_loss.name": "dkd",
        "split.base_share": 0.8,
    },
    "assistant+aekt": {
        "structure.name": "assistant",
        "logit_loss.name": "aekt",
        "split.base_share": 0.64,
    },
    "branches+dkd+twi": {"structure.name": "branches", "logit_loss.name": "dkd", "twi": True},
}


def candidates(base, methods):
    """(row name, procedure, candidate): each recipe at its paper's procedure, and a staged one
    again at equal training cost."""
    for name in methods:
        candidate = base.with_values(CROSS[name]) if name in CROSS else recipe_candidate(name, base)
        candidate = scaled_warmup(candidate)  # DKD and AEKT: the shipped spaces' warm-up
        if candidate.schedule == "staged":
            yield name, "paper", candidate.with_values({"train.stage_epochs": "full"})
            yield name, "equal cost", candidate.with_values({"train.stage_epochs": "shared"})
        else:
            yield name, "paper", candidate


def mean_sd(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "fashion_mnist.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=12000, help="training rows per epoch")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25])
    parser.add_argument("--methods", nargs="+", default=[*METHODS.names(), *CROSS])
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()

    space = SearchSpace.from_yaml(args.space)
    ctx = prepare(
        SearchOptions(
            space=space,
            budget=parse_budget("1x"),
            trials=0,
            device="cpu",
            runs_dir=Path(args.runs_dir),
            progress=False,
        )
    )
    teacher_flops = count_flops(ctx.teacher.model, ctx.splits.info.input_shape)
    print(
        f"teacher {space.teacher.model}: test {ctx.teacher.test_acc:.2f}%, "
        f"{format_flops(teacher_flops)} FLOPs; {args.epochs} epochs x {args.samples} rows, "
        f"seeds {list(range(args.seeds))}; DKD/AEKT warm-up "
        f"{warmup_epochs_for(args.epochs)} epoch(s) (DKD's 20/240 of the run, at least 1); "
        f"gradient norm clipped at {space.base_candidate(1).train.grad_clip_norm}"
    )
    rows = []
    for share in args.budgets:
        max_flops = int(share * teacher_flops)
        base = space.base_candidate(max_flops).with_values(
            {
                "train.epochs": args.epochs,
                "train.max_train_samples": args.samples,
                "split.budget_share": 1.0,
            }
        )
        for name, procedure, candidate in candidates(base, args.methods):
            vals, tests, seconds, flops, expected, cost = [], [], [], 0, [], 0.0
            from autosplit.distill.run import build_and_count, train_candidate

            # The teacher taps a candidate reads do not depend on its seed: one build for all.
            distiller, _ = build_and_count(candidate, ctx.teacher.model, ctx.splits)
            for seed in range(args.seeds):
                seeded = candidate.with_values({"train.seed": seed})
                source = teacher_cache_for(
                    seeded,
                    ctx.teacher,
                    ctx.splits,
                    ctx.runtime,
                    Path(args.runs_dir),
                    taps=set(distiller.teacher_taps),
                    views=space.settings.teacher_views,
                )
                started = time.perf_counter()
                result = train_candidate(
                    seeded,
                    ctx.splits,
                    ctx.teacher.model,
                    ctx.runtime,
                    teacher_source=source,
                    progress=False,
                )
                seconds.append(time.perf_counter() - started)
                vals.append(result.val_acc)
                tests.append(
                    evaluate(result.student, test_loader(ctx.splits, ctx.runtime), ctx.runtime)
                )
                flops, cost = result.worst_case_flops, result.train_cost
                expected.append(result.expected_flops)
            row = (
                f"| {share:g}x | {name} | {procedure} | {candidate.structure.name} | "
                f"{format_flops(flops)} / {format_flops(int(statistics.fmean(expected)))} | "
                f"{mean_sd(vals)} | {mean_sd(tests)} | {cost:.1f}x | "
                f"{statistics.fmean(seconds):.0f} |"
            )
            rows.append(row)
            print(row, flush=True)
    print()
    print(
        "budgets: "
        + ", ".join(f"{s:g}x = {format_flops(int(s * teacher_flops))}" for s in args.budgets)
    )
    print(
        "| budget | method | procedure | structure | FLOPs worst / expected | val acc % "
        "| test acc % | train cost | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
