"""Device and precision choices, made in this one place.

On CUDA: automatic mixed precision (bf16 where supported, else fp16 with a grad scaler) and
channels_last memory format. On CPU: fp32, channels_last too (oneDNN's NHWC convolutions are the
fast ones; ``benchmarks/train_throughput.py`` measures it against contiguous and torch.compile),
and torch's intra-op threads left as the machine gives them.
"""

from __future__ import annotations

import contextlib
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

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

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
                _narrow_strided_pointwise_in_nchw(module)
        return module

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Put an image batch in the runtime's memory format (already on device)."""
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images


# torch 2.14's CPU backward of a channels_last 1x1 convolution with stride > 1 and fewer than 7
# input channels corrupts the heap ("free(): invalid next size", SIGABRT or SIGSEGV): a ResNet
# downsample of a narrow res-student (5 -> 10 channels) on digits aborts the whole search.
# 7 and more input channels, other kernels and stride 1 passed; those convolutions run NCHW.
_NARROW_CHANNELS = 7


def _narrow_strided_pointwise_in_nchw(module: nn.Module) -> None:
    for conv in module.modules():
        if (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (1, 1)
            and max(conv.stride) > 1
            and conv.in_channels < _NARROW_CHANNELS
        ):
            # A 1x1 kernel's channels_last strides pass is_contiguous(): copy to plain strides.
            weight = torch.empty(conv.weight.shape, dtype=conv.weight.dtype, device="cpu")
            conv.weight.data = weight.copy_(conv.weight.data)
            conv.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(_conv: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0].contiguous(), *args[1:])


def resolve_runtime(device: str = "auto", *, amp: bool = True) -> Runtime:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    dev = torch.device(device)
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return Runtime(dev, dtype if amp else None, channels_last=True)
    # Diverging runs drift into subnormal floats, which are orders of magnitude slower on x86
    # CPUs; flushing them to zero costs nothing in accuracy.
    torch.set_flush_denormal(True)
    # channels_last trains every zoo model tried faster on CPU than contiguous NCHW (2-core
    # AVX-512 EPYC, a training step at batch 128: resnet20 1.27-1.31x, resnet8 1.34-1.57x,
    # resnet56 1.36x, wrn_16_2 1.19x, mobilenetv2 1.63x, resnet8x4 1.12x). torch.compile is
    # faster per step still but compiles for minutes per architecture, longer than a search
    # trial trains, so it stays off. fp32: no autocast on CPU.
    return Runtime(dev, None, channels_last=True)
