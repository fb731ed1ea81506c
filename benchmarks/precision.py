"""Training precision on CPU, side by side in one run: fp32 against bf16 autocast and torch.compile.

Two tables, from one run:
1. throughput: images/s of autosplit's ``fit`` (forward + backward + SGD step, batch 128,
   channels_last, 28x28 Fashion-MNIST images, validation excluded) for the default space's
   teacher (ResNet-20 from the zoo) and for students of its family at 0.25x and 0.125x of the
   teacher's FLOPs (widths from the search's width solver), in fp32, bf16 autocast and
   torch.compile where it applies: of fp32, and of bf16 too where the CPU has native bf16 (an
   emulated bf16 is never chosen, so its compiled speed decides nothing); compile time beside.
   Variants run in rounds, in alternating order, on the same images; a figure is the median
   over rounds and a ratio the median of the per-round ratios to fp32 (the machine is shared;
   see train_throughput.py). A run is sized from the variants' first runs to take about
   ``--run-seconds`` for the slowest, at least ``--min-batches`` batches;
2. accuracy: the 0.25x student trained with plain CE for ``--epochs`` over the first
   ``--rows`` training rows, once per seed in fp32 and in bf16 autocast (interleaved), validation
   accuracy mean ± sd over seeds and the difference of the means against the pooled sd.

It ends with the precision ``autosplit.device`` chooses on this machine and why: bf16 only where
the CPU has native bf16 (its flags and oneDNN agree); emulated bf16 is what table 1 measures on a
CPU without it.

Usage: python3 benchmarks/precision.py [--rounds 5] [--run-seconds 3] [--min-batches 3]
                                       [--seeds 3] [--epochs 1] [--rows 10000]
                                       [--val-rows 2000] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from train_throughput import fit_epoch, head, in_rounds, ratio

from autosplit.config import DataConfig, TrainConfig
from autosplit.data import DatasetInfo, Split, load_splits
from autosplit.device import Runtime, cpu_bf16_support, resolve_runtime
from autosplit.flops import count_flops, format_flops, solve_width
from autosplit.loader import TensorLoader
from autosplit.models import create_model
from autosplit.search.space import SearchSpace
from autosplit.train import Classifier, fit, seed_everything

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "fashion_mnist.yaml"
CPU = torch.device("cpu")
PRECISIONS = {
    "fp32": Runtime(CPU, None, channels_last=True),
    "bf16 autocast": Runtime(CPU, torch.bfloat16, channels_last=True),
}


def models_to_measure(info: DatasetInfo, shares: list[float]) -> dict[str, callable]:
    """name -> builder: the space's teacher, and its student family at each share of its FLOPs."""
    space = SearchSpace.from_yaml(SPACE)
    teacher, family = space.teacher.model, space.fixed["student"]["family"]
    shape = info.input_shape

    def build(name: str, width: float = 1.0) -> nn.Module:
        return create_model(name, num_classes=info.num_classes, in_channels=1, width=width)

    teacher_flops = count_flops(build(teacher), shape)
    builders = {f"{teacher} (teacher) {format_flops(teacher_flops)}": lambda: build(teacher)}
    for share in shares:
        width = solve_width(lambda w: build(family, w), shape, int(share * teacher_flops))
        flops = count_flops(build(family, width), shape)
        label = f"{family} w{width:.3f} ({share:g}x) {format_flops(flops)}"
        builders[label] = lambda width=width: build(family, width)
    return builders


def throughput_rows(label: str, builder, train: Split, val: Split, info, args) -> list[str]:
    """One model's variants in rounds; returns its table rows."""
    variants: dict[str, tuple[Runtime, bool]] = {
        name: (runtime, False) for name, runtime in PRECISIONS.items()
    }
    if args.compile:
        native = cpu_bf16_support().native
        for name, runtime in PRECISIONS.items():
            if runtime.amp_dtype is None or native:
                variants[f"torch.compile {name}"] = (runtime, True)
    seed_everything(0)
    initial = builder().state_dict()
    # One model per variant, reset to the same weights every run: a compiled model keeps its
    # graphs, so only its first run pays for compilation.
    models = {name: runtime.prepare(builder()) for name, (runtime, _) in variants.items()}

    def run(name: str, rows: int, seed: int = 0) -> float:
        models[name].load_state_dict(initial)
        task = Classifier(models[name])
        return fit_epoch(task, head(train, rows), val, info, variants[name][0], seed)

    first, first_rate = {}, {}
    for name, (_, compiled) in variants.items():  # oneDNN set-up; tracing + codegen
        started = time.perf_counter()
        if compiled:
            import torch._inductor.config as inductor_config

            # Cold, as a search trial's new architecture compiles (no on-disk cache hits).
            inductor_config.force_disable_caches = True
            models[name].compile()
        first_rate[name] = run(name, 2 * 128)
        first[name] = time.perf_counter() - started
    # Sized on the slowest uncompiled variant's first run (set-up included, so an
    # underestimate of its rate): no run is much shorter than --run-seconds.
    slowest = min(rate for name, rate in first_rate.items() if not variants[name][1])
    batches = max(args.min_batches, int(slowest * args.run_seconds) // 128)
    rows = min(batches * 128, len(train.labels) // 128 * 128)
    rates = in_rounds(
        {name: lambda r, name=name: run(name, rows, r) for name in variants}, args.rounds
    )
    lines = []
    for name in variants:
        low, high = min(rates[name]), max(rates[name])
        lines.append(
            f"| {label} | {name} | {statistics.median(rates[name]):.0f} ({low:.0f}-{high:.0f}) | "
            f"{ratio(rates, name, 'fp32'):.2f}x | {first[name]:.1f} |"
        )
    lines.append(f"| {label} | (images per run) | {rows} | | |")
    return lines


def accuracy_table(train: Split, val: Split, info: DatasetInfo, builder, label: str, args) -> None:
    """The 0.25x student, plain CE, equal epochs and rows in each precision, per seed."""
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=128, lr=0.1, weight_decay=5e-4, schedule="cosine"
    )
    rows = head(train, args.rows)
    accs: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    seconds: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    names = list(PRECISIONS)
    for seed in range(args.seeds):
        for name in names if seed % 2 == 0 else names[::-1]:
            runtime = PRECISIONS[name]
            seed_everything(seed)
            task = Classifier(runtime.prepare(builder()))
            loader = TensorLoader(
                rows, info, batch_size=cfg.batch_size, shuffle=True, augment=False, seed=seed
            )
            val_loader = TensorLoader(val, info, batch_size=512, shuffle=False, augment=False)
            started = time.perf_counter()
            result = fit(task, loader, val_loader, cfg, runtime, progress=False)
            seconds[name].append(time.perf_counter() - started)
            accs[name].append(result.history[-1].val_acc)

    def sd(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    print(
        f"\n## 2. Accuracy: {label}, plain CE, {args.epochs} epoch(s) on the first {args.rows} "
        f"training rows, val on {len(val.labels)} rows, seeds 0-{args.seeds - 1}\n"
    )
    print("| precision | val acc % per seed | mean ± sd | train s per run (median) |")
    print("|---|---|---|---|")
    for name in names:
        per_seed = ", ".join(f"{a:.2f}" for a in accs[name])
        print(
            f"| {name} | {per_seed} | {statistics.fmean(accs[name]):.2f} ± {sd(accs[name]):.2f} | "
            f"{statistics.median(seconds[name]):.1f} |"
        )
    delta = statistics.fmean(accs["bf16 autocast"]) - statistics.fmean(accs["fp32"])
    pooled = ((sd(accs["fp32"]) ** 2 + sd(accs["bf16 autocast"]) ** 2) / 2) ** 0.5
    verdict = "within" if abs(delta) <= pooled else "beyond"
    print(f"\nbf16 - fp32: {delta:+.2f} points, {verdict} 1 pooled sd ({pooled:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="runs of each variant (median)")
    parser.add_argument("--run-seconds", type=float, default=3.0, help="target length of a run")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.125])
    parser.add_argument("--min-batches", type=int, default=3, help="least batches in a run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rows", type=int, default=10000, help="training rows of a seed's run")
    parser.add_argument("--val-rows", type=int, default=2000, help="validation rows scored")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--only", choices=("throughput", "accuracy"), default=None, help="one table only"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    splits = load_splits(DataConfig(name="fashion-mnist", augment=False))
    train, info = splits.train, splits.info
    builders = models_to_measure(info, args.shares)
    chosen = resolve_runtime("cpu")
    support = cpu_bf16_support()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128, channels_last, "
        f"no augmentation; CPU bf16: {support.describe()}"
    )
    started = time.perf_counter()
    if args.only in (None, "throughput"):
        print(
            f"\n## 1. Throughput: fit's training step on Fashion-MNIST, {args.rounds} rounds, "
            f"runs of ~{args.run_seconds:g} s\n"
        )
        print(
            "| model (FLOPs/img) | variant | img/s median (min-max) | ratio to fp32 (median) "
            "| first run incl. compile, s |"
        )
        print("|---|---|---|---|---|", flush=True)
        for label, builder in builders.items():  # each model's rows as soon as measured
            rows = throughput_rows(label, builder, train, head(splits.val, 128), info, args)
            print("\n".join(rows), flush=True)
    if args.only in (None, "accuracy"):
        label, builder = [(k, v) for k, v in builders.items() if "(0.25x)" in k][0]
        accuracy_table(train, head(splits.val, args.val_rows), info, builder, label, args)
    print(f"\nautosplit's choice here: {chosen.precision} ({support.describe()})")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
