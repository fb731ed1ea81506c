"""The one place device and precision are decided: its CUDA settings (autocast, channels_last)
driven through the real training loop on CPU, where bfloat16 autocast also runs."""

from __future__ import annotations

import math

import torch

from autosplit.cache import LiveTeacher
from autosplit.config import TrainConfig
from autosplit.data import Split, TensorLoader, dataset_info
from autosplit.device import Runtime, resolve_runtime
from autosplit.models import create_model
from autosplit.train import Classifier, fit, seed_everything


class _Recording(Classifier):
    """The plain task, noting the memory format and dtype of what passes through it."""

    def __init__(self, model):
        super().__init__(model)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, images):
        outputs = super().forward(images)
        self.seen.append(
            (images.is_contiguous(memory_format=torch.channels_last), outputs["logits"].dtype)
        )
        return outputs

    def predict(self, images):
        self.seen.append((images.is_contiguous(memory_format=torch.channels_last), None))
        return super().predict(images)


def _rgb_split(n: int = 32) -> Split:
    # 3 channels: for 1-channel images NCHW and channels_last are the same layout.
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return Split(images, torch.arange(n) % 10)


def test_channels_last_and_bf16_autocast_run_through_fit():
    runtime = Runtime(torch.device("cpu"), torch.bfloat16, channels_last=True)
    info, split = dataset_info("cifar10"), _rgb_split()
    seed_everything(0)
    model = runtime.prepare(create_model("tiny", num_classes=10, in_channels=3))
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.stem[0].weight.is_contiguous()  # really converted, not trivially both
    task = _Recording(model)
    before = [p.detach().clone() for p in task.parameters()]
    train = TensorLoader(split, info, batch_size=16, shuffle=True, augment=False)
    val = TensorLoader(split, info, batch_size=32, shuffle=False, augment=False)
    assert not next(iter(train)).images.is_contiguous(memory_format=torch.channels_last)

    history = fit(task, train, val, TrainConfig(epochs=1), runtime, progress=False).history

    train_steps, eval_steps = task.seen[:2], task.seen[2:]
    assert train_steps == [(True, torch.bfloat16)] * 2  # channels_last images, bf16 logits
    assert eval_steps == [(True, None)]  # evaluation sees the same format
    assert math.isfinite(history[0].train_loss)
    assert all(p.dtype == torch.float32 for p in task.parameters())  # autocast, not a cast
    assert all(not torch.equal(a, b) for a, b in zip(before, task.parameters(), strict=True))


def test_live_teacher_gives_fp32_outputs_under_autocast():
    runtime = Runtime(torch.device("cpu"), torch.bfloat16, channels_last=True)
    info = dataset_info("cifar10")
    teacher = runtime.prepare(create_model("tiny", num_classes=10, in_channels=3))
    batch = next(iter(TensorLoader(_rgb_split(), info, batch_size=8, shuffle=False, augment=False)))
    outputs = LiveTeacher(teacher, ["stage1", "logits"], runtime).outputs(batch)
    assert {name: t.dtype for name, t in outputs.items()} == {
        "stage1": torch.float32,
        "logits": torch.float32,
    }


def test_resolve_runtime_on_cpu():
    runtime = resolve_runtime("cpu")
    assert runtime.device.type == "cpu" and runtime.amp_dtype is None
    assert runtime.channels_last  # the faster format on CPU (benchmarks/train_throughput.py)
    assert not runtime.is_cuda
    assert not runtime.grad_scaler().is_enabled()


def test_narrow_strided_pointwise_convs_train_on_cpu_without_corrupting_memory():
    # torch 2.14 aborts (heap corruption) in the CPU backward of a channels_last 1x1 stride-2
    # convolution with 4-6 input channels, a narrow res-student's downsample: in a child
    # process, so that a crash fails this test instead of killing the test run.
    import subprocess
    import sys

    code = """
import torch
from autosplit.device import resolve_runtime
runtime = resolve_runtime("cpu")
for channels in (4, 5, 6):
    model = runtime.prepare(torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1),
        torch.nn.Conv2d(channels, 2 * channels, 1, stride=2, bias=False),
    ))
    assert runtime.channels_last and model[0].weight.is_contiguous(memory_format=torch.channels_last)
    for _ in range(40):
        model(runtime.images(torch.randn(64, 1, 8, 8))).sum().backward()
print("trained")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]
