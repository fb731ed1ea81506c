"""The one place device and precision are decided: its CUDA settings (autocast, channels_last)
driven through the real training loop on CPU, where bfloat16 autocast also runs."""

from __future__ import annotations

import math

import pytest
import torch

from autosplit import device
from autosplit.cache import LiveTeacher
from autosplit.config import TrainConfig
from autosplit.data import Split, dataset_info
from autosplit.device import Runtime, resolve_runtime
from autosplit.errors import UserError
from autosplit.loader import TensorLoader
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


def test_resolve_runtime_on_cpu(monkeypatch):
    _cpu(monkeypatch, AMD_AVX2, onednn=False)
    runtime = resolve_runtime("cpu")
    assert runtime.device.type == "cpu" and runtime.amp_dtype is None
    assert runtime.channels_last  # the faster format on CPU (benchmarks/train_throughput.py)
    assert not runtime.is_cuda
    assert not runtime.grad_scaler().is_enabled()


_NARROW_SHORTCUT = """
import torch
from torch import nn
from autosplit.device import resolve_runtime

block = resolve_runtime("cpu").prepare(
    nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 11, 1, stride=2))
)
for _ in range(50):
    block(torch.randn(64, 1, 8, 8)).sum().backward()
print("trained", flush=True)
"""


def test_a_narrow_strided_pointwise_conv_trains_without_corrupting_the_heap() -> None:
    """oneDNN's channels_last backward of a 1x1 stride-2 conv with 2-6 input channels aborts
    the process (seen on an AVX2 CPU with torch 2.14.1); the runtime runs such convs in NCHW.
    In a child process, since the failure is an abort, not an exception."""
    import subprocess
    import sys

    from autosplit.device import resolve_runtime

    done = subprocess.run(
        [sys.executable, "-c", _NARROW_SHORTCUT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-500:]

    block = resolve_runtime("cpu").prepare(
        torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Conv2d(6, 11, 1, 2))
    )
    wide, narrow = block[0].weight, block[1].weight
    assert wide.is_contiguous(memory_format=torch.channels_last)
    assert narrow.stride() == (6, 1, 1, 1)  # NCHW strides, not the channels_last (6, 1, 6, 6)


AMD_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def _cpu(monkeypatch, cpuinfo: str, onednn: bool) -> None:
    """This process's CPU as ``cpuinfo`` says, and oneDNN's bf16 verdict."""
    monkeypatch.setattr(device, "_cpu_flags", lambda: device.parse_cpu_flags(cpuinfo))
    monkeypatch.setattr(device, "_onednn_bf16", lambda: onednn)


def test_cpu_flags_are_read_from_cpuinfo_text():
    assert device.parse_cpu_flags(SAPPHIRE) >= {"avx512_bf16", "amx_bf16"}
    assert device.parse_cpu_flags(AMD_AVX2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert device.parse_cpu_flags("") == set()


def test_auto_precision_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    # oneDNN says True on AVX-512 CPUs that only emulate bf16: the flags decide.
    _cpu(monkeypatch, AMD_AVX2, onednn=True)
    runtime = resolve_runtime("cpu")
    assert runtime.amp_dtype is None and runtime.precision == "fp32"
    assert runtime.describe() == "cpu fp32 (auto: no native bf16 on this CPU)"


def test_auto_precision_is_bf16_where_the_cpu_has_it(monkeypatch):
    _cpu(monkeypatch, SAPPHIRE, onednn=True)
    runtime = resolve_runtime("cpu")
    assert runtime.amp_dtype == torch.bfloat16 and runtime.precision == "bf16"
    assert "avx512_bf16, amx_bf16" in runtime.why
    # Flags but a torch without oneDNN's bf16 kernels: fp32.
    _cpu(monkeypatch, SAPPHIRE, onednn=False)
    assert resolve_runtime("cpu").precision == "fp32"


def test_precision_override(monkeypatch):
    _cpu(monkeypatch, AMD_AVX2, onednn=False)
    assert resolve_runtime("cpu", precision="bf16").amp_dtype == torch.bfloat16  # emulated
    _cpu(monkeypatch, SAPPHIRE, onednn=True)
    assert resolve_runtime("cpu", precision="fp32").amp_dtype is None
    with pytest.raises(UserError, match="--precision: 'fp16' is not one of auto, fp32, bf16"):
        resolve_runtime("cpu", precision="fp16")
