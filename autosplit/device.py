"""Device and precision choices, made in this one place.

On CUDA: automatic mixed precision (bf16 where supported, else fp16 with a grad scaler) and
channels_last memory format. On CPU: bf16 autocast where the CPU has native bf16 (AVX-512 BF16
or AMX), fp32 elsewhere; channels_last too (oneDNN's NHWC convolutions are the fast ones;
``benchmarks/train_throughput.py`` measures it against contiguous and torch.compile), and torch's
intra-op threads left as the machine gives them. ``benchmarks/precision.py`` measures fp32
against bf16 autocast and torch.compile, speed and accuracy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autosplit.errors import UserError


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: device, autocast dtype (None = fp32) and memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    why: str = ""  # how the precision was chosen, for the plan line and the trial records

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        """ "fp32", "bf16" or "fp16": what trials compute in (autocast's dtype, else fp32)."""
        return _NAMES.get(self.amp_dtype, "fp32")

    def describe(self) -> str:
        """e.g. "cpu fp32 (auto: no native bf16 on this CPU)"."""
        return f"{self.device.type} {self.precision}" + (f" ({self.why})" if self.why else "")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; bf16 has fp32's range.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Put an image batch in the runtime's memory format (already on device)."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images


_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
PRECISIONS = ("auto", "fp32", "bf16")
# CPU flags of native bf16 arithmetic: AVX-512 BF16 (dot products) and AMX (tile matmuls).
# torch.backends.cpu.get_cpu_capability() says only "AVX512" on such CPUs, so it cannot tell.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuBf16:
    """What this CPU offers for bf16: its native-bf16 flags and oneDNN's own verdict."""

    flags: tuple[str, ...]  # the BF16_FLAGS the CPU lists
    onednn: bool  # torch.ops.mkldnn._is_mkldnn_bf16_supported()

    @property
    def native(self) -> bool:
        # Both: oneDNN alone says True on AVX-512 CPUs without bf16 units (it emulates), and
        # the flags alone do not say this torch build has oneDNN's bf16 kernels.
        return bool(self.flags) and self.onednn

    def describe(self) -> str:
        if self.native:
            return f"native bf16: {', '.join(self.flags)}, oneDNN bf16"
        if self.flags:
            return f"bf16 flags {', '.join(self.flags)} but no oneDNN bf16 in this torch"
        return "no native bf16 on this CPU"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere, which reads as
    no native bf16 (fp32: the safe choice)."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return set()


def parse_cpu_flags(cpuinfo: str) -> set[str]:
    """The first processor's flags in /proc/cpuinfo's text (every core lists the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_support() -> CpuBf16:
    flags = _cpu_flags()
    return CpuBf16(tuple(f for f in BF16_FLAGS if f in flags), _onednn_bf16())


def resolve_runtime(device: str = "auto", *, precision: str = "auto") -> Runtime:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a user error.

    ``precision``: ``auto`` is bf16 autocast where the device computes bf16 natively (CUDA's
    ``is_bf16_supported``; a CPU with AVX-512 BF16 or AMX, see ``CpuBf16``), else fp16 AMP on
    CUDA and fp32 on CPU; ``fp32`` turns autocast off; ``bf16`` forces it (on a CPU without
    native bf16 it is emulated, slower: ``benchmarks/precision.py``)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    dev = torch.device(device)
    if dev.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not native:
            raise UserError("--precision bf16: this GPU has no bf16; use auto or fp32")
        if precision == "fp32":
            return Runtime(dev, None, channels_last=True, why="--precision fp32")
        if native:
            return Runtime(dev, torch.bfloat16, channels_last=True, why=f"{precision}: GPU bf16")
        return Runtime(dev, torch.float16, channels_last=True, why="auto: GPU without bf16, AMP")
    # Diverging runs drift into subnormal floats, which are orders of magnitude slower on x86
    # CPUs; flushing them to zero costs nothing in accuracy.
    torch.set_flush_denormal(True)
    # channels_last trains every zoo model tried faster on CPU than contiguous NCHW (2-core
    # AVX-512 EPYC, a training step at batch 128: resnet20 1.27-1.31x, resnet8 1.34-1.57x,
    # resnet56 1.36x, wrn_16_2 1.19x, mobilenetv2 1.63x, resnet8x4 1.12x). torch.compile is
    # faster per step still but compiles for minutes per architecture, longer than a search
    # trial trains, so it stays off.
    if precision != "auto":
        dtype = torch.bfloat16 if precision == "bf16" else None
        return Runtime(dev, dtype, channels_last=True, why=f"--precision {precision}")
    support = cpu_bf16_support()
    # Native bf16 autocast trains ResNet-20 ~1.9x faster than fp32 (AVX-512 BF16 EPYC, issue
    # 18); without it bf16 is emulated and slower than fp32 (benchmarks/precision.py).
    dtype = torch.bfloat16 if support.native else None
    return Runtime(dev, dtype, channels_last=True, why=f"auto: {support.describe()}")
