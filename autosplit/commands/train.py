"""``autosplit train --config``: retrain an exported candidate (or a bare candidate YAML) through
the search's own code path, report its val and test accuracy against what the export measured,
and optionally save its weights. The retraining and evaluation are ``evaluation.py``'s, which
``autosplit export`` shares; this is what the user sees of them. Heavy imports happen inside.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from autosplit.checkpoint import save_or_rescue
    from autosplit.data import load_splits
    from autosplit.device import resolve_runtime
    from autosplit.evaluation import retrain
    from autosplit.export_document import read_config
    from autosplit.flops import format_flops
    from autosplit.paths import check_output_dir, check_output_file
    from autosplit.search.budget import within_budget
    from autosplit.search.front import FLOPS_CONVENTION
    from autosplit.teacher import build_teacher_model, get_teacher

    config = read_config(args.config)
    # Every place this run writes is checked now, not after training with the weights lost.
    if args.out:
        check_output_file(args.out, "--out")
    check_output_dir(args.runs_dir, "--runs-dir")
    candidate = config.candidate
    if args.epochs is not None:
        candidate = candidate.with_values({"train.epochs": args.epochs})
    if args.seed is not None:
        candidate = candidate.with_values({"train.seed": args.seed})
    if args.data_dir:
        candidate = dataclasses.replace(
            candidate, data=dataclasses.replace(candidate.data, data_dir=args.data_dir)
        )
    runtime = resolve_runtime(args.device, precision=args.precision)
    splits = load_splits(candidate.data)

    def over(worst_case: int) -> str:
        return (
            f"{args.config}: the student's widths give {format_flops(worst_case)} "
            f"FLOPs ({worst_case:,}), over its max_flops "
            f"{format_flops(candidate.max_flops)} ({candidate.max_flops:,}); lower "
            "split.base_width / split.part_width or raise max_flops"
        )

    # Refused before any training: an edited config whose widths exceed its max_flops.
    teacher_shape = build_teacher_model(candidate.teacher, splits)
    within_budget(candidate, teacher_shape, splits, max_flops=candidate.max_flops, over=over)
    teacher = get_teacher(
        candidate.teacher,
        candidate.data,
        splits,
        runtime,
        runs_dir=args.runs_dir,
        progress=not args.quiet,
    )
    outcome = retrain(
        candidate,
        splits,
        teacher,
        runtime,
        Path(args.runs_dir),
        teacher_views=config.teacher_views,
        progress=not args.quiet,
    )
    result = outcome["result"]
    print(
        f"{args.config}: val {outcome['val_acc']:.2f}%  test {outcome['test_acc']:.2f}%  "
        f"FLOPs {format_flops(result.worst_case_flops)} worst case, "
        f"{format_flops(int(result.expected_flops))} expected ({FLOPS_CONVENTION})"
    )
    if "val_acc_mean" in config.result:
        mean, sd = config.result["val_acc_mean"], config.result["val_acc_sd"]
        tolerance = max(sd, 0.5)
        verdict = "within" if abs(outcome["val_acc"] - mean) <= tolerance else "OUTSIDE"
        n_seeds = len(config.result.get("seeds", []))
        spread = f"{mean:.2f}% over 1 seed" if n_seeds == 1 else f"{mean:.2f} ± {sd:.2f}% over "
        spread += "" if n_seeds == 1 else f"{n_seeds} seeds"
        print(f"final stage measured val {spread}; this run is {verdict} {tolerance:.2f} pt of it")
    elif "val_acc" in config.result:
        print(f"search measured val {config.result['val_acc']:.2f}% for this candidate")
    if args.out:
        save_or_rescue(
            args.out,
            args.runs_dir,
            kind="student",
            config=candidate.to_dict(),
            state_dict={k: v.cpu() for k, v in result.student.state_dict().items()},
            extra={"val_acc": outcome["val_acc"], "test_acc": outcome["test_acc"]},
        )
        print(f"weights: {args.out}")
    return 0
