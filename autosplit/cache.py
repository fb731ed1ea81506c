"""Teacher outputs, computed once and reused by every later training run.

The teacher is frozen, so its logits and feature taps over a split depend only on (teacher
weights, data, split, transform). Without augmentation one pass serves every epoch of every
trial; with augmentation a fixed number of views is stored and epoch ``e`` trains on view
``e % n_views`` (the loader produces exactly those images: augmentation is a pure function of
sample index, view and seed). Files live under ``runs/cache/``, keyed by content.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from autosplit.config import atomic_write_bytes, config_hash
from autosplit.data import DatasetInfo, Split
from autosplit.device import Runtime
from autosplit.loader import Batch, TensorLoader
from autosplit.modules import freeze

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


class LiveTeacher:
    """Runs the frozen teacher on each batch (the fallback when nothing is cached)."""

    def __init__(self, model: nn.Module, taps: Sequence[str], runtime: Runtime) -> None:
        self.model = freeze(model)
        self.taps = tuple(taps)
        self.runtime = runtime

    @torch.no_grad()
    def outputs(self, batch: Batch) -> dict[str, Tensor]:
        with self.runtime.autocast():
            taps = self.model.forward_taps(self.runtime.images(batch.images))
        return {name: taps[name].float() for name in self.taps}


@dataclass
class CachedTeacher:
    """Teacher outputs for every sample of a split: ``tensors[view][tap]`` has N rows."""

    tensors: list[dict[str, Tensor]]
    device: torch.device
    path: Path | None = None
    hit: bool = False

    @property
    def n_views(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for view in self.tensors for t in view.values())

    def outputs(self, batch: Batch) -> dict[str, Tensor]:
        view = self.tensors[batch.view % self.n_views]
        rows = batch.indices  # int64 (B,), CPU
        # index_select rather than t[rows]: 6x faster for fp16 feature maps on CPU (155 -> 24 us
        # for (128, 64, 7, 7)); the fp16 -> fp32 cast runs after the copy, on the device.
        return {
            name: torch.index_select(t, 0, rows).to(self.device, non_blocking=True).float()
            for name, t in view.items()
        }


def cache_key(
    *,
    teacher_key: str,
    data_fingerprint: str,
    split: str,
    taps: Sequence[str],
    augment: bool,
    n_views: int,
    seed: int,
    fp16: bool,
) -> str:
    return config_hash(
        {
            "format": CACHE_FORMAT,
            "teacher": teacher_key,
            "data": data_fingerprint,
            "split": split,
            "taps": sorted(taps),
            "augment": augment,
            "views": n_views if augment else 1,
            "seed": seed if augment else 0,
            "fp16": fp16,
        },
        24,
    )


@torch.no_grad()
def teacher_outputs(
    model: nn.Module,
    split: Split,
    info: DatasetInfo,
    runtime: Runtime,
    *,
    taps: Sequence[str],
    teacher_key: str,
    data_fingerprint: str,
    split_name: str,
    cache_dir: str | Path,
    augment: bool = False,
    n_views: int = 1,
    seed: int = 0,
    fp16: bool = False,
    batch_size: int = 512,
) -> CachedTeacher:
    """Load the teacher's outputs over ``split`` from the cache, computing them on a miss.

    Logits are always kept in fp32 (they drive every logit loss); ``fp16`` halves feature maps.
    """
    taps = sorted(set(taps) | {"logits"})
    key = cache_key(
        teacher_key=teacher_key,
        data_fingerprint=data_fingerprint,
        split=split_name,
        taps=taps,
        augment=augment,
        n_views=n_views,
        seed=seed,
        fp16=fp16,
    )
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") == key:
                cached = CachedTeacher(payload["views"], runtime.device, path, hit=True)
                log.info("teacher cache hit %s (%.1f MB)", path, cached.nbytes / 2**20)
                return cached
        except Exception as exc:  # noqa: BLE001 - a damaged cache file is rebuilt, not fatal
            log.warning("teacher cache %s unreadable (%s); rebuilding", path, exc)
    started = time.perf_counter()
    model = model.eval()
    views = []
    for view in range(n_views if augment else 1):
        loader = TensorLoader(
            split,
            info,
            batch_size=batch_size,
            shuffle=False,
            augment=augment,
            seed=seed,
            n_views=n_views if augment else None,
            device=runtime.device,
        )
        loader.set_epoch(view)
        parts: dict[str, list[Tensor]] = {name: [] for name in taps}
        for batch in loader:
            with runtime.autocast():
                outputs = model.forward_taps(runtime.images(batch.images))
            for name in taps:
                value = outputs[name].float().cpu()
                parts[name].append(value.half() if fp16 and name != "logits" else value)
        views.append({name: torch.cat(chunks) for name, chunks in parts.items()})
    buffer = io.BytesIO()
    torch.save({"key": key, "views": views}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    cached = CachedTeacher(views, runtime.device, path, hit=False)
    log.info(
        "teacher cache built %s: %d view(s), taps %s, %.1f MB in %.1fs",
        path,
        len(views),
        ",".join(taps),
        cached.nbytes / 2**20,
        time.perf_counter() - started,
    )
    return cached


def train_rows(candidate: Any, splits: Any) -> int:
    """How many training rows ``candidate`` trains on (a prefix of the training split)."""
    return min(candidate.train.max_train_samples or len(splits.train), len(splits.train))


def _cache_args(
    candidate: Any, teacher_key: str, splits: Any, *, views: int, taps: set[str]
) -> dict[str, Any]:
    rows = train_rows(candidate, splits)
    return dict(
        taps=sorted(taps | {"logits"}),
        teacher_key=teacher_key,
        data_fingerprint=splits.fingerprint,
        split_name=f"train[:{rows}]",
        augment=candidate.data.augment,
        n_views=views,
        seed=candidate.train.seed,
        fp16=True,
    )


def teacher_cache_file(
    candidate: Any,
    teacher_key: str,
    splits: Any,
    runs_dir: str | Path,
    *,
    views: int = 1,
    taps: set[str] | None = None,
) -> Path:
    """The file :func:`teacher_cache_for` reads, or writes on a miss."""
    args = _cache_args(candidate, teacher_key, splits, views=views, taps=taps or set())
    key = cache_key(
        teacher_key=args["teacher_key"],
        data_fingerprint=args["data_fingerprint"],
        split=args["split_name"],
        taps=args["taps"],
        augment=args["augment"],
        n_views=args["n_views"],
        seed=args["seed"],
        fp16=args["fp16"],
    )
    return Path(runs_dir) / "cache" / f"{key}.pt"


def cache_views(views: int, candidate: Any, passes: int = 0) -> int:
    """The augmented views a job's teacher cache needs: the space's ``views``, but no more
    than the passes the job makes over its rows (its epochs, or the distiller's ``prepare``
    passes if more). Pass ``p`` reads view ``p % n``; for every ``p`` below that bound that is
    the same view index whether ``n`` is this or ``views``, and an augmented image is a pure
    function of (seed, view, row), so the job trains on exactly the same images and teacher
    outputs: a view no pass reads is only teacher time spent for nothing (a 1-epoch final job
    over all rows reads one view of three)."""
    if not candidate.data.augment:
        return 1
    return max(1, min(views, max(candidate.train.epochs, passes)))


def usable_cache_views(
    candidate: Any,
    teacher_key: str,
    splits: Any,
    runs_dir: str | Path,
    *,
    views: int,
    passes: int = 0,
    taps: set[str] | None = None,
) -> tuple[int, Path, bool]:
    """The views of the cache ``candidate``'s job should read, its file, and whether that is
    on disk: the most views among the files on disk that serve it (any with at least
    ``cache_views``), else ``cache_views`` (to build)."""
    needed = cache_views(views, candidate, passes)
    for n in range(max(views, needed), needed - 1, -1):
        path = teacher_cache_file(candidate, teacher_key, splits, runs_dir, views=n, taps=taps)
        if path.is_file():
            return n, path, True
    return needed, path, False


def teacher_cache_exists(
    candidate: Any,
    teacher_key: str,
    splits: Any,
    runs_dir: str | Path,
    *,
    views: int = 1,
    taps: set[str] | None = None,
) -> bool:
    """Whether :func:`teacher_cache_for` would load its outputs from disk (no teacher pass)."""
    return teacher_cache_file(
        candidate, teacher_key, splits, runs_dir, views=views, taps=taps
    ).is_file()


def teacher_cache_for(
    candidate: Any,
    teacher: Any,
    splits: Any,
    runtime: Runtime,
    runs_dir: str | Path,
    *,
    taps: set[str],
    views: int = 1,
) -> Any:
    """Teacher outputs over the training rows a candidate uses (the search's and retrain's path).

    Feature taps are stored in fp16, logits in fp32; ``views`` augmented views when the data
    augments, so epoch ``e`` trains on view ``e % views``. ``taps``: the distiller's
    ``teacher_taps`` (the caller has built it; this module sits below autosplit.distill).
    """
    rows = train_rows(candidate, splits)
    split = Split(splits.train.images[:rows], splits.train.labels[:rows])
    return teacher_outputs(
        teacher.model,
        split,
        splits.info,
        runtime,
        cache_dir=Path(runs_dir) / "cache",
        **_cache_args(candidate, teacher.key, splits, views=views, taps=taps),
    )


class HeldTeacherCache:
    """The teacher outputs a search's jobs train from, one cache held in memory at a time
    (a final stage's full-data cache is large), with what getting them cost: ``hits`` (held,
    or found on disk), ``builds``, and the seconds and images the builds took (the teacher's
    forward time here, which later jobs' estimates read)."""

    def __init__(
        self, teacher: Any, splits: Any, runtime: Runtime, runs_dir: Path, *, views: int
    ) -> None:
        self.teacher, self.splits, self.runtime, self.runs_dir = teacher, splits, runtime, runs_dir
        self.views = views  # stored per row when the data augments
        self.held: dict[tuple[object, ...], CachedTeacher] = {}
        self.hits = self.builds = 0
        self.build_seconds = self.build_images = 0.0
        # The same by the outputs cached: a feature map costs more to store than logits (on
        # Fashion-MNIST a FitNets cache ~0.25 ms an image and view, a logits one ~0.15).
        self.built: dict[tuple[str, ...], list[float]] = {}
        # Reading a cache file back is not free either: a FitNets cache over all 54k Fashion-MNIST
        # rows took 7.5 s to load, 4 % of its job.
        self.read_seconds = self.read_bytes = 0.0

    def seconds_per_image(self, taps: set[str]) -> float | None:
        """Seconds a cache build took here per image and view: over the builds that cached
        these ``taps`` when there were any, else over every build; None before any."""
        seconds, images = self.built.get(tuple(sorted(taps | {"logits"})), (0.0, 0.0))
        if not images:
            seconds, images = self.build_seconds, self.build_images
        return seconds / images if images else None

    def seconds_per_byte_read(self) -> float | None:
        """Seconds a cache file took to load here per byte of it; None before any load."""
        return self.read_seconds / self.read_bytes if self.read_bytes else None

    def holds(self, taps: set[str], candidate: Any, *, passes: int = 0) -> bool:
        """Whether :meth:`get` would serve ``candidate`` from memory (no build, no read)."""
        needed = cache_views(self.views, candidate, passes)
        return self._serving(self._key(taps | {"logits"}, candidate), needed) is not None

    def _serving(self, key: tuple[object, ...], needed: int) -> CachedTeacher | None:
        held = self.held.get(key)
        return held if held is not None and held.n_views >= needed else None

    def _key(self, taps: set[str], candidate: Any) -> tuple[object, ...]:
        # What the outputs depend on besides the teacher and data (a space may search these).
        augment = candidate.data.augment
        return (
            tuple(sorted(taps)),
            train_rows(candidate, self.splits),
            augment,
            candidate.train.seed if augment else 0,
        )

    def get(self, taps: set[str], candidate: Any, *, passes: int = 0) -> CachedTeacher:
        """The cached teacher outputs holding ``taps`` over the rows ``candidate`` trains on,
        with the views its job reads (``cache_views``; ``passes``: the distiller's prepare
        passes). A held cache or a file on disk with more views serves it as well."""
        taps = taps | {"logits"}
        key = self._key(taps, candidate)
        needed = cache_views(self.views, candidate, passes)
        served = self._serving(key, needed)
        if served is not None:
            self.hits += 1
            return served
        self.held.clear()
        views, _path, _on_disk = usable_cache_views(
            candidate,
            self.teacher.key,
            self.splits,
            self.runs_dir,
            views=self.views,
            passes=passes,
            taps=taps,
        )
        started = time.perf_counter()
        cache = teacher_cache_for(
            candidate,
            self.teacher,
            self.splits,
            self.runtime,
            self.runs_dir,
            views=views,
            taps=taps,
        )
        if cache.hit:
            self.hits += 1
            if cache.path is not None:
                self.read_seconds += time.perf_counter() - started
                self.read_bytes += cache.path.stat().st_size
        else:
            self.builds += 1
            took, images = time.perf_counter() - started, key[1] * cache.n_views
            self.build_seconds += took
            self.build_images += images
            seen = self.built.setdefault(key[0], [0.0, 0.0])
            seen[0] += took
            seen[1] += images
        self.held[key] = cache
        return cache
