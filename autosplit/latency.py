"""CPU latency of a deployed network, measured in this process, and read back from an export.

Median wall time of ``runs`` calls after ``warmup`` calls, at batch 1 and batch 64, on one
thread (torch's thread count is put back afterwards; onnxruntime sessions get one intra-op
thread). The calls cycle through real test images, so an exit gate exits as it would on real
data. Absolute times depend on the machine and its load; ratios to the teacher measured in the
same process are what compares (``autosplit front --latency``).
"""

from __future__ import annotations

import itertools
import logging
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autosplit.errors import UserError

DEFAULT_RUNS = 100
BATCHES = (1, 64)


def median_ms(
    call: Callable[[Any], Any],
    inputs: Sequence[Any],
    *,
    runs: int,
    clock: Callable[[], float] | None = None,
) -> float:
    """Median milliseconds of ``call(inputs[i % len(inputs)])`` over ``runs`` timed calls, on
    one torch thread, timed by ``torch.utils.benchmark.Timer`` (``clock``: its clock, for tests).

    Each timed call is one ``Timer.timeit(1)``, so the median is over single calls, as a
    deployment sees them, not over blocks of calls; ``timeit`` runs two untimed calls on the
    same input before each (its own warm-up). One timer per input keeps the timed calls cycling
    through the inputs.
    """
    timer_class = _timer_class()
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    # Timer restores torch's thread count after each measurement; its clock syncs CUDA if used.
    options: dict[str, Any] = {"num_threads": 1} | ({"timer": clock} if clock else {})
    feed = itertools.cycle(inputs)
    warm_up = timer_class("call(next(feed))", globals={"call": call, "feed": feed}, **options)
    warm_up.timeit(max(3, runs // 10))  # allocator, kernels picked, caches
    timers = [timer_class("call(x)", globals={"call": call, "x": x}, **options) for x in inputs]
    times = [timers[i % len(timers)].timeit(1).median for i in range(runs)]
    return 1000.0 * statistics.median(times)


def _timer_class() -> Any:
    """``torch.utils.benchmark.Timer``, imported without the warning its import of
    ``cpp_extension`` logs on a CUDA build of torch with no CUDA runtime ("No CUDA runtime is
    found"): it says nothing about CPU timing, and ``export`` would print it."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        logger.setLevel(level)
    return Timer


def batches(images: Any, size: int) -> list[Any]:
    """Consecutive batches of ``size`` rows (images repeated when fewer than ``size``)."""
    while len(images) < size:
        images = images[[*range(len(images)), *range(len(images))]]
    return [images[i : i + size] for i in range(0, len(images) - size + 1, size)]


def torch_latency(module: Any, images: Any, *, runs: int) -> dict[str, float]:
    """``{"b1": ms, "b64": ms}`` of ``module`` (eval, CPU) on ``images`` float32 (N, C, H, W)."""
    import torch

    with torch.inference_mode():
        return {f"b{size}": median_ms(module, batches(images, size), runs=runs) for size in BATCHES}


def onnx_latency(run: Callable[[Any], Any], images: Any, *, runs: int) -> dict[str, float]:
    """The same for a numpy callable (``deploy.OnnxStudent`` with one thread)."""
    array = images.numpy()
    return {f"b{size}": median_ms(run, batches(array, size), runs=runs) for size in BATCHES}


def record(torch_ms: dict[str, float], onnx_ms: dict[str, float] | None, runs: int) -> dict:
    """What an export YAML holds: milliseconds per backend and batch, and how measured."""
    out: dict[str, Any] = {"torch": _rounded(torch_ms)}
    if onnx_ms is not None:
        out["onnx"] = _rounded(onnx_ms)
    out["measured"] = (
        f"median of {runs} runs after warm-up, 1 thread, CPU {platform.machine()}, "
        "in the process that exported"
    )
    return out


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items()}


# --- reading an export back ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExportLatency:
    """The latency an export recorded: the teacher's, and each front member's by trial."""

    folder: Path
    teacher: dict[str, dict[str, float]]
    members: dict[int, dict[str, dict[str, float]]]
    measured: str

    def shares(self, number: int) -> dict[str, float] | None:
        """``{"torch b1": share of the teacher's, ...}`` of trial ``number``; None if absent."""
        member = self.members.get(number)
        if member is None:
            return None
        return {
            f"{backend} {batch}": ms / self.teacher[backend][batch]
            for backend, by_batch in member.items()
            if backend in self.teacher
            for batch, ms in by_batch.items()
            if self.teacher[backend].get(batch)
        }


def read_export_latency(folder: Path, study_name: str, *, fix: str) -> ExportLatency:
    """The latency recorded in the export at ``folder``; one line ending in ``fix`` when there
    is no export of ``study_name`` there or it recorded none."""
    from autosplit.config import load_yaml

    configs = sorted((folder / "front").glob("trial-*.yaml")) if folder.is_dir() else []
    if not configs:
        raise UserError(f"--latency: no export of study {study_name!r} at {folder}; {fix}")
    teacher: dict[str, Any] = {}
    members, measured = {}, ""
    for path in configs:
        raw = load_yaml(path)
        provenance, result = raw.get("provenance") or {}, raw.get("result") or {}
        if provenance.get("study") != study_name:
            raise UserError(
                f"--latency: {path} is an export of study {provenance.get('study')!r}, not "
                f"{study_name!r}; {fix}"
            )
        if "latency_ms" in result and provenance.get("teacher_latency_ms"):
            latency = dict(result["latency_ms"])
            measured = latency.pop("measured", measured)
            members[int(provenance["trial"])] = latency
            teacher = provenance["teacher_latency_ms"]
    if not members:
        raise UserError(
            f"--latency: the export at {folder} recorded no latency (exported with "
            f"--latency-runs 0, or by an older autosplit); {fix}"
        )
    teacher = {k: v for k, v in teacher.items() if k != "measured"}
    return ExportLatency(folder, teacher, members, measured)


def front_columns(folder: Path, study_name: str, *, fix: str) -> Any:
    """``front --latency``: each member's latency as a share of the teacher's, read from what
    ``autosplit export`` measured at ``folder`` (in one process, so the shares compare on a
    noisy machine; front itself measures nothing), as ``front_text.ExtraColumns``."""
    from autosplit.search.front_text import ExtraColumns

    latency = read_export_latency(folder, study_name, fix=fix)
    keys = [
        f"{backend} {batch}"
        for backend in ("torch", "onnx")
        if backend in latency.teacher
        for batch in ("b1", "b64")
    ]
    cells = {}
    for number in latency.members:
        shares = latency.shares(number) or {}
        cells[number] = tuple(f"{100 * shares[k]:.0f}%" if k in shares else "-" for k in keys)
    teacher = ", ".join(
        f"{backend} b1 {ms['b1']:.2f} ms, b64 {ms['b64']:.2f} ms"
        for backend, ms in latency.teacher.items()
    )
    notes = (
        "%teacher: FLOPs as a share of the teacher's; lat <backend> <batch>: latency as a share "
        "of the teacher's (onnx = onnxruntime), measured by autosplit export",
        f"latency from {folder} ({latency.measured}); teacher: {teacher}; - = not in that export",
    )
    return ExtraColumns(tuple(f"lat {k}" for k in keys), cells, notes)
