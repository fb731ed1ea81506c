"""What a network costs, counted with fvcore — the only module of autosplit that imports it.

Convention (fvcore's): one multiply-add is one FLOP, i.e. what CNN papers report as MACs or
FLOPs; one image (batch 1), eval mode. Convolutions, linear layers and adaptive average
pooling are counted; batch-norm is not, because at deployment it folds into the preceding
convolution (fvcore's own docs suggest this), and it keeps the figures equal to half of
torch's ``FlopCounterMode``.
Element-wise operators fvcore has no formula for (activations, additions) are left out and
reported: logged at INFO and listed by ``count_flops_report``.

Also here: the width solver that turns a FLOPs target into the widest model that fits, and the
parser/formatter for the figures users type and read ("5M", "1.2G").
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from autosplit.errors import UserError
from autosplit.modules import eval_mode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlopReport:
    """One count: total FLOPs, FLOPs per top-level child module, uncounted operators."""

    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    unsupported: dict[str, int] = field(default_factory=dict)  # operator -> number of calls


class _TupleOutputs(nn.Module):
    """Tracing wants tensors or tuples out; zoo models may return a dict of taps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return tuple(_tensors(self.model(images)))


def _tensors(output: object) -> Iterator[Tensor]:
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, list | tuple):
        for value in output:
            yield from _tensors(value)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """fvcore and the TorchScript tracer it uses warn a lot; none of it is news to our users."""
    fvcore_logger = logging.getLogger("fvcore")
    level = fvcore_logger.level
    fvcore_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        fvcore_logger.setLevel(level)


def _folded_into_conv(inputs: list, outputs: list) -> int:
    """Batch-norm costs nothing at deployment. (fvcore's ``set_op_handle(op, None)`` does not
    remove a built-in handle, fvcore 0.1.5, so the op gets a zero handle instead.)"""
    return 0


def _check_shape(input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise UserError(
            f"input shape must be (channels, height, width) of positive ints, got {input_shape!r}"
        )


def count_flops_report(model: nn.Module, input_shape: tuple[int, int, int]) -> FlopReport:
    """Count ``model`` on one zero image of ``input_shape`` (C, H, W); see the module docstring.

    The model is switched to eval mode for the count and every submodule's own training flag is
    restored afterwards (a frozen teacher inside a training student stays frozen).
    """
    _check_shape(input_shape)
    with _quiet():
        from fvcore.nn import FlopCountAnalysis  # importing it warns about TorchScript

    parameter = next(model.parameters(), None)
    images = torch.zeros(
        (1, *input_shape),
        device=parameter.device if parameter is not None else None,
        dtype=parameter.dtype if parameter is not None else None,
    )
    # One image through a small net: a thread pool only adds synchronisation, which on a busy
    # machine made a count 10-200x slower than on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with eval_mode(model), torch.no_grad(), _quiet():
            analysis = (
                FlopCountAnalysis(_TupleOutputs(model), images)
                .unsupported_ops_warnings(False)
                .uncalled_modules_warnings(False)
                .tracer_warnings("none")
                .set_op_handle("aten::batch_norm", _folded_into_conv)
            )
            total = int(analysis.total())
            per_module = analysis.by_module()
            unsupported = dict(sorted(analysis.unsupported_ops().items()))
    finally:
        torch.set_num_threads(threads)
    by_module = {
        name: int(per_module.get(f"model.{name}", 0)) for name, _ in model.named_children()
    }
    if unsupported:
        listed = ", ".join(f"{op} x{count}" for op, count in unsupported.items())
        logger.info(
            "%s: operators not counted (no fvcore formula): %s", type(model).__name__, listed
        )
    return FlopReport(total=total, by_module=by_module, unsupported=unsupported)


def count_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """FLOPs (multiply-adds) of one forward pass of ``model`` on one image of shape (C, H, W)."""
    return count_flops_report(model, input_shape).total


SMALLEST_WIDTH = 0.05  # the width solver's lower end (``solve_width``)


class BudgetTooSmall(UserError):
    """No width of a family fits a FLOPs target (the search records such a candidate as
    infeasible instead of failing)."""


def solve_width(
    build: Callable[[float], nn.Module],
    input_shape: tuple[int, int, int],
    target_flops: int,
    *,
    low: float = SMALLEST_WIDTH,
    high: float = 4.0,
    tol: float = 1e-3,
) -> float:
    """The widest width in [low, high] whose ``build(width)`` costs at most ``target_flops``.

    Relies on FLOPs being non-decreasing in width (true of every zoo family): a bracket is found
    by doubling from ``low``, then bisection keeps ``flops(lo) <= target < flops(hi)`` and stops
    once ``hi - lo <= tol``. Channel counts are integers, so many widths build the same
    network: counts are memoised by the network's parameter shapes as well as by width, since
    tracing is the slow part. The answer is within ``tol`` of the true boundary, and
    ``flops(answer + tol) > target``.
    """
    if not 0 < low < high or tol <= 0:
        raise ValueError(f"need 0 < low < high and tol > 0, got low={low}, high={high}, tol={tol}")
    if target_flops <= 0:
        raise UserError(f"FLOPs target must be positive, got {target_flops}")
    by_width: dict[float, int] = {}
    by_shapes: dict[tuple[tuple[int, ...], ...], int] = {}

    def flops_at(width: float) -> int:
        if width not in by_width:
            model = build(width)
            shapes = tuple(tuple(p.shape) for p in model.parameters())
            if shapes not in by_shapes:
                by_shapes[shapes] = count_flops(model, input_shape)
            by_width[width] = by_shapes[shapes]
        return by_width[width]

    if flops_at(low) > target_flops:
        raise BudgetTooSmall(
            f"no width fits {format_flops(target_flops)} FLOPs: the narrowest allowed (width "
            f"{low:g}) already needs {format_flops(flops_at(low))}; raise the budget or give this "
            "part a larger share of it"
        )
    # Bracket from below, doubling: wide networks are the slow ones to build and trace, and a
    # budget split rarely asks for one, so never probe far past the answer.
    lo, hi = low, min(2 * low, high)
    while flops_at(hi) <= target_flops:
        if hi == high:
            return high
        lo, hi = hi, min(2 * hi, high)
    while hi - lo > tol:  # invariant: flops(lo) <= target < flops(hi)
        mid = (lo + hi) / 2
        if flops_at(mid) <= target_flops:
            lo = mid
        else:
            hi = mid
    return lo


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_FLOPS_RE = re.compile(
    r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<exponent>e[+-]?\d+)?\s*(?P<unit>[kmgt]?)\s*(?:flops?)?\s*$",
    re.IGNORECASE,
)


def parse_flops(text: str) -> int:
    """Parse "5M", "1.2G", "350k", "123456" or "3e6" into FLOPs (units are powers of 1000)."""
    match = _FLOPS_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise UserError(
            f"{text!r} is not a FLOPs figure; write a number with an optional k/M/G/T suffix, "
            "e.g. 350k, 5M, 1.2G or 123456"
        )
    value = float(match["number"] + (match["exponent"] or "")) * _UNITS[match["unit"].lower()]
    if not math.isfinite(value) or value < 1:
        raise UserError(f"{text!r}: a FLOPs figure must be at least 1")
    return round(value)


def format_flops(n: float) -> str:
    """177_800_000 -> "177.8M", 1_085_600_000 -> "1.09G": at least 3 significant digits."""
    if abs(n) < 1000:
        return str(round(n))
    for suffix, scale in (("k", 10**3), ("M", 10**6), ("G", 10**9), ("T", 10**12)):
        value = n / scale
        if abs(value) < 1000 or suffix == "T":
            text = f"{value:.{2 if abs(value) < 10 else 1}f}"
            if abs(float(text)) < 1000 or suffix == "T":
                return f"{text}{suffix}"
            # else 999.96M printed as 1000.0M: say 1.00G instead
    raise AssertionError("unreachable")


# The largest image `flops` builds activations for (C*H*W): 3x2048x2048 fits, with room.
MAX_INPUT_VALUES = 2**24


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``autosplit flops --input``: "CxHxW" as (C, H, W), refused in one line when malformed or
    larger than ``MAX_INPUT_VALUES``."""
    try:
        c, h, w = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--input {text!r}: expected CxHxW, e.g. 3x32x32") from None
    if min(c, h, w) < 1:
        raise UserError(f"--input {text!r}: every size must be >= 1, e.g. 3x32x32")
    if c * h * w > MAX_INPUT_VALUES:
        raise UserError(
            f"--input {text}: {c * h * w:,} values per image, more than the "
            f"{MAX_INPUT_VALUES:,} autosplit counts on; use a smaller input, e.g. "
            "3x224x224"
        )
    return c, h, w
