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
import os
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
    name: str | None = None  # the device as asked for, when it differs (a fake GPU in tests)
    why: str = ""  # how the precision was chosen, for the plan line and the trial records

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def where(self) -> str:
        """The device for messages: ``cuda:1``, ``cpu``."""
        return self.name or str(self.device)

    def free_memory(self) -> None:
        """Give back the cached blocks of a failed allocation, so the next trial starts from
        an empty cache rather than the fragments of the one that ran out of memory."""
        if self.is_cuda:
            torch.cuda.empty_cache()

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
            if self.device.type == "cpu":
                keep_narrow_strided_pointwise_convs_contiguous(module)
        return module

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Put an image batch in the runtime's memory format (already on device)."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images


# Tests: this many fake GPUs (``cuda:0``…), each running on the CPU, so that the placement of
# workers on devices can be checked on a machine without one.
FAKE_GPUS_ENV = "AUTOSPLIT_FAKE_GPUS"


def visible_gpus() -> list[str]:
    """Every CUDA device this process sees, as ``cuda:N``."""
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake:
        return [f"cuda:{i}" for i in range(int(fake))]
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def resolve_devices(spec: str = "auto") -> list[str]:
    """``--devices``: ``auto`` (every visible GPU, else the CPU), ``cpu``, ``cuda`` (every GPU)
    or a comma list such as ``cuda:0,cuda:1``. One search worker runs on each entry."""
    gpus = visible_gpus()
    if spec == "auto":
        return gpus or ["cpu"]
    if spec == "cuda":
        if not gpus:
            raise UserError("--devices cuda: no CUDA device is visible; use --devices cpu or auto")
        return gpus
    devices = [part.strip() for part in spec.split(",") if part.strip()]
    for device in devices:
        if device != "cpu" and device not in gpus:
            seen = ", ".join(gpus) or "none"
            raise UserError(
                f"--devices {spec}: {device!r} is not cpu or a visible GPU (visible: {seen}); "
                "e.g. --devices cuda:0,cuda:1 or --devices cpu"
            )
    if not devices:
        raise UserError(f"--devices {spec!r}: empty; e.g. --devices cuda:0,cuda:1 or cpu")
    return devices


_CPU = torch.device("cpu")
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
    ``cuda:N`` also becomes this process's current CUDA device, for the code that asks torch
    for "the" device (memory queries, bf16 support).

    ``precision``: ``auto`` is bf16 autocast where the device computes bf16 natively (CUDA's
    ``is_bf16_supported``; a CPU with AVX-512 BF16 or AMX, see ``CpuBf16``), else fp16 AMP on
    CUDA and fp32 on CPU; ``fp32`` turns autocast off; ``bf16`` forces it (on a CPU without
    native bf16 it is emulated, slower: ``benchmarks/precision.py``)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if os.environ.get(FAKE_GPUS_ENV) and device.startswith("cuda"):
        if device not in visible_gpus() and device != "cuda":
            raise UserError(f"--device {device}: not one of {', '.join(visible_gpus())}")
        return _cpu_runtime(name=device, precision=precision)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            torch.cuda.set_device(dev)
        native = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not native:
            raise UserError("--precision bf16: this GPU has no bf16; use auto or fp32")
        if precision == "fp32":
            return Runtime(dev, None, channels_last=True, why="--precision fp32")
        if native:
            return Runtime(dev, torch.bfloat16, channels_last=True, why=f"{precision}: GPU bf16")
        return Runtime(dev, torch.float16, channels_last=True, why="auto: GPU without bf16, AMP")
    return _cpu_runtime(precision=precision)


def _cpu_runtime(name: str | None = None, *, precision: str = "auto") -> Runtime:
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
        return Runtime(_CPU, dtype, channels_last=True, name=name, why=f"--precision {precision}")
    support = cpu_bf16_support()
    # Native bf16 autocast trains ResNet-20 ~1.9x faster than fp32 (AVX-512 BF16 EPYC, issue
    # 18); without it bf16 is emulated and slower than fp32 (benchmarks/precision.py).
    dtype = torch.bfloat16 if support.native else None
    return Runtime(_CPU, dtype, channels_last=True, name=name, why=f"auto: {support.describe()}")


# oneDNN on CPU (torch 2.14.1, an AVX2 AMD EPYC: no AVX-512) corrupts the heap in the backward
# pass of a channels_last 1x1 convolution with stride 2 and 2-6 input channels (seen: 2, 3, 4,
# 5, 6 crash within 50 steps; 1, 7, 8, 10, 12, 14 and every 3x3 do not; contiguous NCHW never
# does). Narrow students' downsample shortcuts are such convolutions, and a search then aborts
# with "corrupted double-linked list". Those few convolutions run in NCHW; the rest of the
# network stays channels_last.
_NARROW_POINTWISE_MAX_CHANNELS = 8


def _to_contiguous(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def keep_narrow_strided_pointwise_convs_contiguous(module: nn.Module) -> None:
    for conv in module.modules():
        if (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (1, 1)
            and max(conv.stride) > 1
            and conv.in_channels < _NARROW_POINTWISE_MAX_CHANNELS
            and not getattr(conv, "_autosplit_nchw", False)
        ):
            # Not .contiguous(): a (O, I, 1, 1) channels_last weight already counts as
            # contiguous and keeps its NHWC strides, which oneDNN reads.
            weight = conv.weight.data
            conv.weight.data = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            conv.weight.data.copy_(weight)
            conv.register_forward_pre_hook(_to_contiguous)
            conv._autosplit_nchw = True  # prepare may run twice on one module
