"""Training-loop throughput, measured side by side in one run (ratios, since the machine is shared).

Every comparison runs its variants in rounds, in alternating order (A B, B A, ...), all on the
same number of images: a short probe measures the slowest variant and sizes each run to take
about ``--run-seconds``. A figure is the median over rounds; a ratio is the median of the
per-round ratios, so load that changes between rounds cancels out. Times exclude validation.

Prints four tables, from one run:
1. loop: autosplit's ``fit`` vs a minimal hand-written loop (same model, data, SGD settings,
   batch size and memory format), images/s and their ratio (goal >= 1.0); the hand loop runs
   torch's default SGD kernel (on CPU a Python loop over the tensors) and again with the fused
   kernel fit picks, so the second ratio is the loop's own overhead;
2. teacher cache: a KD epoch with the teacher's outputs from the cache vs the teacher run live,
   on the default space's pair (its teacher, a student of its family at its budget) and on a
   teacher-dominated pair on CIFAR-shaped data (goal >= 2x on the latter), and the cached run
   against the student trained alone (CE, no teacher): the cache path's own cost;
3. CPU options: fp32 contiguous, channels_last and torch.compile (images/s, ratio to fp32
   contiguous, compile time);
4. the share of this machine's fp32 matmul rate that training reaches.

Usage: python3 benchmarks/train_throughput.py [--rounds 7] [--run-seconds 4] [--no-compile]
  larger runs: --rounds 9 --run-seconds 15 --teacher-pair resnet32x4:resnet8x4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autosplit.cache import LiveTeacher, teacher_outputs
from autosplit.config import DataConfig, TrainConfig
from autosplit.data import DatasetInfo, Split, dataset_info, load_splits
from autosplit.device import Runtime, resolve_runtime
from autosplit.distill.losses import kd_loss
from autosplit.flops import count_flops, format_flops, solve_width
from autosplit.loader import TensorLoader
from autosplit.models import create_model
from autosplit.search.budget import parse_budget
from autosplit.search.space import SearchSpace
from autosplit.train import Classifier, fit, seed_everything

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "fashion_mnist.yaml"
CFG = TrainConfig(epochs=1, batch_size=128, lr=0.05)


class KDTask(nn.Module):
    """Hinton KD on a student (the benchmark's own minimal task; the trainer sees only the Task API)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images):
        return {"logits": self.model(images)}

    def loss(self, outputs, teacher_outputs, labels, *, epoch):
        ce = F.cross_entropy(outputs["logits"], labels)
        kd = kd_loss(outputs["logits"], teacher_outputs["logits"], temperature=4.0)
        return {"loss": 0.1 * ce + 0.9 * kd, "loss_ce": ce, "loss_kd": kd}

    def trainable_parameters(self):
        return self.model.parameters()

    def predict(self, images):
        return self.model(images)


def hand_written_epoch(
    model: nn.Module,
    split: Split,
    info: DatasetInfo,
    runtime: Runtime,
    seed: int,
    *,
    fused: bool | None = None,
) -> float:
    """The loop a careful person writes by hand: index batches of in-memory tensors (normalised
    once, outside the timing); the runtime's memory format, as fit has; ``torch.optim.SGD`` with
    fit's settings and torch's default kernel (``fused=True``: the kernel fit picks, so the
    ratio is the loop's own overhead). Returns images/s."""
    model = runtime.prepare(model).train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=CFG.lr,
        momentum=CFG.momentum,
        nesterov=CFG.nesterov,
        weight_decay=CFG.weight_decay,
        fused=fused,
    )
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    images_all = (split.images.float() / 255.0 - mean) / std
    n = len(split.labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    started = time.perf_counter()
    for start in range(0, n - CFG.batch_size + 1, CFG.batch_size):
        rows = order[start : start + CFG.batch_size]
        loss = F.cross_entropy(model(runtime.images(images_all[rows])), split.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (n // CFG.batch_size) * CFG.batch_size / (time.perf_counter() - started)


def fit_epoch(
    task: nn.Module,
    split: Split,
    val: Split,
    info: DatasetInfo,
    runtime: Runtime,
    seed: int,
    teacher=None,
) -> float:
    """One epoch of autosplit's fit over ``split``; training images/s (validation excluded)."""
    loader = TensorLoader(
        split,
        info,
        batch_size=CFG.batch_size,
        shuffle=True,
        augment=False,
        seed=seed,
        drop_last=True,
    )
    val_loader = TensorLoader(val, info, batch_size=512, shuffle=False, augment=False)
    result = fit(task, loader, val_loader, CFG, runtime, teacher=teacher, progress=False)
    return result.history[0].images_per_second


def in_rounds(variants: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    """Each variant once per round (it gets the round number and returns images/s), the order
    reversed every other round so neither always runs first."""
    names = list(variants)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            rates[name].append(variants[name](index))
    return rates


def ratio(rates: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(rates[name], rates[base], strict=True))


def sized(probe: Callable[[int], float], rows: int, run_seconds: float) -> int:
    """Images per run so the slowest variant (``probe(rows)`` -> images/s) takes ~run_seconds,
    at least 6 batches. The probe runs twice: the first call of a shape pays oneDNN's set-up."""
    probe_rows = min(rows, 4 * CFG.batch_size)
    probe(probe_rows)
    rate = probe(probe_rows)
    want = int(rate * run_seconds) // CFG.batch_size * CFG.batch_size
    return max(6 * CFG.batch_size, min(want, rows // CFG.batch_size * CFG.batch_size))


def head(split: Split, rows: int) -> Split:
    return Split(split.images[:rows], split.labels[:rows])


def cifar_shaped(rows: int) -> Split:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (rows, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return Split(images, torch.randint(0, 10, (rows,), generator=generator))


def loop_table(train: Split, val: Split, info: DatasetInfo, runtime: Runtime, args) -> float:
    """fit vs the hand-written loop on the space's teacher model; returns fit's images/s."""

    def model(seed: int) -> nn.Module:
        seed_everything(seed)
        return create_model(args.model, num_classes=info.num_classes, in_channels=1)

    def ours(rows: int, seed: int = 0) -> float:
        task = Classifier(runtime.prepare(model(seed)))
        return fit_epoch(task, head(train, rows), val, info, runtime, seed)

    rows = sized(ours, len(train), args.run_seconds)
    rates = in_rounds(
        {
            "fit": lambda r: ours(rows, r),
            "hand": lambda r: hand_written_epoch(model(r), head(train, rows), info, runtime, r),
            "hand fused": lambda r: hand_written_epoch(
                model(r), head(train, rows), info, runtime, r, fused=True
            ),
        },
        args.rounds,
    )
    fit_rate = statistics.median(rates["fit"])
    print(f"\n## 1. Loop: {args.model}, {rows} Fashion-MNIST images/run, {args.rounds} rounds\n")
    print("| loop | img/s (median) |\n|---|---|")
    print(f"| autosplit fit (fused SGD) | {fit_rate:.0f} |")
    print(
        f"| hand-written, torch.optim.SGD's default kernel | {statistics.median(rates['hand']):.0f} |"
    )
    print(f"| hand-written, fused SGD | {statistics.median(rates['hand fused']):.0f} |")
    print(f"| **ratio fit / hand-written** (goal >= 1.0) | **{ratio(rates, 'fit', 'hand'):.3f}** |")
    print(
        f"| ratio fit / hand-written with fused SGD (the loop's own overhead) "
        f"| {ratio(rates, 'fit', 'hand fused'):.3f} |"
    )
    return fit_rate


def cache_row(
    label: str,
    teacher_name: str,
    student: Callable[[], nn.Module],
    train: Split,
    val: Split,
    info: DatasetInfo,
    runtime: Runtime,
    args,
) -> str:
    """One pair's KD epoch, teacher live vs cached; returns the table row."""
    channels = info.in_channels
    seed_everything(0)
    teacher = runtime.prepare(create_model(teacher_name, num_classes=10, in_channels=channels))
    live = LiveTeacher(teacher.eval(), ["logits"], runtime)

    def kd(rows: int, source, seed: int = 0) -> float:
        seed_everything(seed)
        model = runtime.prepare(student())
        task = KDTask(model) if source is not None else Classifier(model)  # None: CE, no teacher
        return fit_epoch(task, head(train, rows), val, info, runtime, seed, teacher=source)

    rows = sized(lambda n: kd(n, live), len(train), args.run_seconds)
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        cached = teacher_outputs(
            teacher,
            head(train, rows),
            info,
            runtime,
            taps=["logits"],
            teacher_key=teacher_name,
            data_fingerprint=label,
            split_name="train",
            cache_dir=cache_dir,
            fp16=True,
        )
        build = time.perf_counter() - started
    rates = in_rounds(
        {
            "live": lambda r: kd(rows, live, r),
            "cached": lambda r: kd(rows, cached, r),
            "alone": lambda r: kd(rows, None, r),
        },
        args.rounds,
    )
    shape = info.input_shape
    flops_t = count_flops(teacher, shape)
    flops_s = count_flops(student(), shape)
    return (
        f"| {label} | {teacher_name} {format_flops(flops_t)} | {format_flops(flops_s)} "
        f"({flops_s / flops_t:.2f}x) | {rows} | {statistics.median(rates['live']):.0f} | "
        f"{statistics.median(rates['cached']):.0f} | **{ratio(rates, 'cached', 'live'):.2f}x** "
        f"| {ratio(rates, 'cached', 'alone'):.3f} | {build:.1f} |"
    )


def cache_tables(train: Split, val: Split, info: DatasetInfo, runtime: Runtime, args) -> None:
    space = SearchSpace.from_yaml(SPACE)
    teacher_name, family = space.teacher.model, space.fixed["student"]["family"]
    shape = info.input_shape
    budget = parse_budget(space.budget).resolve(
        count_flops(create_model(teacher_name, num_classes=10, in_channels=1), shape)
    )

    def build(width: float) -> nn.Module:
        return create_model(family, num_classes=10, in_channels=1, width=width)

    width = solve_width(build, shape, budget)
    big, small = args.teacher_pair.split(":")
    cifar = dataset_info("cifar10")
    lines = (
        cache_row(
            f"default space: Fashion-MNIST, {family} w{width:.3f} at {space.budget}",
            teacher_name,
            lambda: build(width),
            train,
            val,
            info,
            runtime,
            args,
        ),
        cache_row(
            "teacher-dominated: CIFAR-shaped random uint8",
            big,
            lambda: create_model(small, num_classes=10, in_channels=3),
            cifar_shaped(len(train)),
            cifar_shaped(512),
            cifar,
            runtime,
            args,
        ),
    )
    print(f"\n## 2. Teacher cache: KD epoch, teacher live vs cached, {args.rounds} rounds\n")
    print(
        "| pair | teacher (FLOPs/img) | student FLOPs | images/run | live img/s | cached img/s "
        "| speed-up (goal >= 2x) | cached / student alone (CE) | one-off cache build, s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


def options_table(train: Split, val: Split, info: DatasetInfo, args) -> None:
    """fp32 contiguous vs channels_last vs torch.compile, on fit with the space's teacher model."""
    contiguous = Runtime(torch.device("cpu"), None, channels_last=False)
    cl = Runtime(torch.device("cpu"), None, channels_last=True)
    default = resolve_runtime("cpu")
    seed_everything(0)
    initial = create_model(args.model, num_classes=info.num_classes, in_channels=1).state_dict()
    # One model per variant, reset to the same weights every run: a compiled model keeps its
    # compiled graphs, so only its first run pays for compilation.
    variants = {"fp32 contiguous": contiguous, "channels_last": cl}
    compiled_format = "channels_last" if default.channels_last else "contiguous"
    if args.compile:
        variants[f"torch.compile ({compiled_format})"] = default
    models = {}
    for name, runtime in variants.items():
        model = create_model(args.model, num_classes=info.num_classes, in_channels=1)
        models[name] = runtime.prepare(model)

    def run(name: str, rows: int, seed: int = 0) -> float:
        models[name].load_state_dict(initial)
        task = Classifier(models[name])
        return fit_epoch(task, head(train, rows), val, info, variants[name], seed)

    warm = {}
    for name in variants:  # first calls: oneDNN set-up, and for compile tracing + codegen
        started = time.perf_counter()
        if name.startswith("torch.compile"):
            import torch._inductor.config as inductor_config

            # A cold compile, as a search trial's new architecture gets (the on-disk cache
            # would otherwise serve a second run of this benchmark: 47 s cold -> 7 s here).
            inductor_config.force_disable_caches = True
            models[name].compile()
        run(name, 2 * CFG.batch_size)
        warm[name] = time.perf_counter() - started
    rows = sized(lambda n: run("fp32 contiguous", n), len(train), args.run_seconds)
    rates = in_rounds(
        {name: lambda r, name=name: run(name, rows, r) for name in variants}, args.rounds
    )
    default_name = "channels_last" if default.channels_last else "fp32 contiguous"
    print(f"\n## 3. CPU options: fit on {args.model}, {rows} images/run, {args.rounds} rounds\n")
    print("| variant | img/s (median) | ratio to fp32 contiguous | first run incl. compile, s |")
    print("|---|---|---|---|")
    for name in variants:
        mark = " (default)" if name == default_name else ""
        print(
            f"| {name}{mark} | {statistics.median(rates[name]):.0f} | "
            f"{ratio(rates, name, 'fp32 contiguous'):.3f} | {warm[name]:.1f} |"
        )
    print("\n(first run: 2 training batches + validation; for torch.compile, compile time is that")
    print(" minus the same variant's uncompiled first run, and recurs for every new architecture)")


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="runs of each variant (median)")
    parser.add_argument("--run-seconds", type=float, default=4.0, help="target length of a run")
    parser.add_argument("--model", default="resnet20", help="model of the loop and CPU tables")
    parser.add_argument(
        "--teacher-pair", default="resnet56:resnet8", help="teacher:student, CIFAR-shaped data"
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--only", choices=("loop", "cache", "options"), default=None, help="one table only"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runtime = resolve_runtime("cpu")
    splits = load_splits(DataConfig(name="fashion-mnist", augment=False))
    train, val, info = splits.train, head(splits.val, 512), splits.info
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, default CPU runtime: "
        f"{'channels_last' if runtime.channels_last else 'contiguous'} fp32; batch "
        f"{CFG.batch_size}, no augmentation, runs of ~{args.run_seconds:g} s"
    )
    started = time.perf_counter()
    fit_rate = None
    if args.only in (None, "loop"):
        fit_rate = loop_table(train, val, info, runtime, args)
    if args.only in (None, "cache"):
        cache_tables(train, val, info, runtime, args)
    if args.only in (None, "options"):
        options_table(train, val, info, args)
    if fit_rate is not None:
        # Training ~ 3 x forward (fwd + 2 bwd); fvcore counts multiply-adds, so 2 FLOPs each to
        # compare with matmul's 2 n^3 convention.
        gflops = statistics.median(matmul_gflops() for _ in range(3))
        macs = count_flops(
            create_model(args.model, num_classes=10, in_channels=1), info.input_shape
        )
        train_gflops = fit_rate * 3 * 2 * macs / 1e9
        print("\n## 4. Compute rate\n\n| figure | value |\n|---|---|")
        print(f"| machine fp32 matmul (1024^2, 2n^3 convention), GFLOP/s | {gflops:.1f} |")
        print(
            f"| {args.model} training ({format_flops(macs)} MACs/img, 3 x fwd x 2), GFLOP/s "
            f"| {train_gflops:.1f} |"
        )
        print(f"| share of the matmul rate | {100 * train_gflops / gflops:.1f} % |")
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
