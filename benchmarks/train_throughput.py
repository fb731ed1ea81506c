"""Training-loop throughput, measured side by side in one run (ratios, since the machine is shared).

Prints three figures:
1. images/s of autosplit's ``fit`` vs a minimal hand-written PyTorch loop (same model, data,
   optimiser, batch size) and their ratio (goal >= 1.0);
2. a KD epoch with the teacher's outputs from the cache vs with the teacher run live (goal >= 2x);
3. the share of this machine's measured fp32 matmul throughput that training reaches.

Usage: python benchmarks/train_throughput.py [--samples 12000] [--repeats 3] [--model resnet20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from autosplit.cache import LiveTeacher, teacher_outputs
from autosplit.config import DataConfig, TrainConfig
from autosplit.data import Split, TensorLoader, load_splits
from autosplit.device import resolve_runtime
from autosplit.distill.losses import kd_loss
from autosplit.flops import count_flops, format_flops
from autosplit.models import create_model
from autosplit.train import Classifier, fit, make_optimizer, seed_everything


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
    model: nn.Module, split: Split, mean: float, std: float, cfg: TrainConfig
) -> float:
    """The loop a careful person writes by hand: index batches of in-memory tensors."""
    optimizer = make_optimizer(model.parameters(), cfg)
    model.train()
    images_all = (split.images.float() / 255.0 - mean) / std
    n = len(split.labels)
    order = torch.randperm(n)
    started = time.perf_counter()
    for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        loss = F.cross_entropy(model(images_all[rows]), split.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (n // cfg.batch_size) * cfg.batch_size / (time.perf_counter() - started)


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12000, help="training images per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--student", default="resnet8")
    args = parser.parse_args()

    runtime = resolve_runtime("cpu")
    splits = load_splits(DataConfig(name="fashion-mnist", augment=False))
    train = Split(splits.train.images[: args.samples], splits.train.labels[: args.samples])
    val = Split(splits.val.images[:512], splits.val.labels[:512])
    info = splits.info
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.05)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"Fashion-MNIST {args.samples} train images, batch {cfg.batch_size}, no augmentation"
    )

    # 1. autosplit fit vs hand-written loop, alternated so both see the same machine load.
    ours, hand = [], []
    for repeat in range(args.repeats):
        seed_everything(repeat)
        model = create_model(args.model, num_classes=10, in_channels=1)
        loader = TensorLoader(
            train,
            info,
            batch_size=cfg.batch_size,
            shuffle=True,
            augment=False,
            seed=repeat,
            drop_last=True,
        )
        val_loader = TensorLoader(val, info, batch_size=512, shuffle=False, augment=False)
        ours.append(
            fit(Classifier(model), loader, val_loader, cfg, runtime, progress=False)
            .history[0]
            .images_per_second
        )
        seed_everything(repeat)
        model = create_model(args.model, num_classes=10, in_channels=1)
        hand.append(hand_written_epoch(model, train, info.mean[0], info.std[0], cfg))
    ours_med, hand_med = statistics.median(ours), statistics.median(hand)

    # 2. KD epoch: teacher outputs from the cache vs the teacher run on every batch.
    teacher = create_model(args.model, num_classes=10, in_channels=1).eval()
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        cached = teacher_outputs(
            teacher,
            train,
            info,
            runtime,
            taps=["logits"],
            teacher_key="bench",
            data_fingerprint=splits.fingerprint,
            split_name="train",
            cache_dir=cache_dir,
        )
        build_seconds = time.perf_counter() - started
    live = LiveTeacher(teacher, ["logits"], runtime)
    times = {"cache": [], "live": []}
    for repeat in range(args.repeats):
        for name, source in (("cache", cached), ("live", live)):
            seed_everything(repeat)
            student = create_model(args.student, num_classes=10, in_channels=1)
            loader = TensorLoader(
                train,
                info,
                batch_size=cfg.batch_size,
                shuffle=True,
                augment=False,
                seed=repeat,
                drop_last=True,
            )
            val_loader = TensorLoader(val, info, batch_size=512, shuffle=False, augment=False)
            result = fit(
                KDTask(student), loader, val_loader, cfg, runtime, teacher=source, progress=False
            )
            times[name].append(result.history[0].seconds)
    cache_med, live_med = statistics.median(times["cache"]), statistics.median(times["live"])

    # 3. Training compute vs the machine's fp32 matmul rate. Training ~ 3 x forward (fwd + 2 bwd);
    # fvcore counts multiply-adds, so 2 FLOPs each to compare with matmul's 2*n^3 convention.
    gflops = statistics.median(matmul_gflops() for _ in range(3))
    macs = count_flops(create_model(args.model, num_classes=10, in_channels=1), info.input_shape)
    train_gflops = ours_med * 3 * 2 * macs / 1e9
    print()
    print("| figure | value |")
    print("|---|---|")
    print(
        f"| {args.model} ({format_flops(macs)} FLOPs/img) autosplit fit, img/s (median of {args.repeats}) | {ours_med:.0f} |"
    )
    print(f"| hand-written loop, img/s | {hand_med:.0f} |")
    print(f"| ratio autosplit / hand-written (goal >= 1.0) | {ours_med / hand_med:.3f} |")
    print(f"| KD epoch of {args.student}, teacher live, s | {live_med:.2f} |")
    print(f"| KD epoch of {args.student}, teacher cached, s | {cache_med:.2f} |")
    print(f"| speed-up from the cache (goal >= 2x) | {live_med / cache_med:.2f}x |")
    print(f"| one-off cache build, s | {build_seconds:.2f} |")
    print(f"| machine fp32 matmul (1024^2, 2n^3 convention), GFLOP/s | {gflops:.1f} |")
    print(f"| training rate (3 x fwd x 2 FLOP/MAC), GFLOP/s | {train_gflops:.1f} |")
    print(f"| share of matmul rate reached by training | {100 * train_gflops / gflops:.1f} % |")


if __name__ == "__main__":
    main()
