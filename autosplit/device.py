"""Device and precision choices, made in this one place.

On CUDA: automatic mixed precision (bf16 where supported, else fp16 with a grad scaler) and
channels_last memory format. On CPU: fp32, channels_last too (oneDNN's NHWC convolutions are the
fast ones; ``benchmarks/train_throughput.py`` measures it against contiguous and torch.compile),
and torch's intra-op threads left as the machine gives them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

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


def resolve_runtime(device: str = "auto", *, amp: bool = True) -> Runtime:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a user error.
    ``cuda:N`` also becomes this process's current CUDA device, for the code that asks torch
    for "the" device (memory queries, bf16 support)."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if os.environ.get(FAKE_GPUS_ENV) and device.startswith("cuda"):
        if device not in visible_gpus() and device != "cuda":
            raise UserError(f"--device {device}: not one of {', '.join(visible_gpus())}")
        return _cpu_runtime(name=device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            torch.cuda.set_device(dev)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(dev, dtype if amp else None, channels_last=True)
    return _cpu_runtime()


def _cpu_runtime(name: str | None = None) -> Runtime:
    # Diverging runs drift into subnormal floats, which are orders of magnitude slower on x86
    # CPUs; flushing them to zero costs nothing in accuracy.
    torch.set_flush_denormal(True)
    # channels_last trains every zoo model tried faster on CPU than contiguous NCHW (2-core
    # AVX-512 EPYC, a training step at batch 128: resnet20 1.27-1.31x, resnet8 1.34-1.57x,
    # resnet56 1.36x, wrn_16_2 1.19x, mobilenetv2 1.63x, resnet8x4 1.12x). torch.compile is
    # faster per step still but compiles for minutes per architecture, longer than a search
    # trial trains, so it stays off. fp32: no autocast on CPU.
    return Runtime(torch.device("cpu"), None, channels_last=True, name=name)


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
