"""Datasets held in memory as uint8 tensors, and deterministic train/val/test splits.

Every dataset autosplit uses fits in memory: each registered format (``DATASETS``) is read from
disk into one uint8 tensor per split, val is carved from train (stratified, seeded), the training
rows are put in a class-interleaved order, and the whole is fingerprinted for caches and
provenance. Batches are gathered from these tensors by ``loader.py``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from autosplit.config import DataConfig
from autosplit.errors import UserError
from autosplit.registry import Registry

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
DEFAULT_DATA_DIR = Path("runs/data")
IMAGEFOLDER_MAX_BYTES = 4 * 2**30  # decoded uint8 images must fit comfortably in RAM
IMAGEFOLDER_DEFAULT_SIZE = 64
_IMAGE_SUFFIXES = set(".png .jpg .jpeg .bmp .gif .webp .tif .tiff .ppm .pgm".split())
_log = logging.getLogger(__name__)
# Bump when the split or the row order changes, so old caches are not reused.
# 3: training rows in a seeded, class-interleaved order.
_FINGERPRINT_VERSION = 3


@dataclass(frozen=True)
class DatasetInfo:
    """What models and transforms need to know about a dataset, without touching its images."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: Literal["crop_flip", "crop", "none"]
    crop_padding: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)  # (C, H, W)


@dataclass
class Split:
    """One split in CPU memory; row numbers are stable and index cached teacher outputs."""

    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Splits:
    info: DatasetInfo
    train: Split
    val: Split  # carved from the training set; the search objective
    test: Split  # touched only by final evaluation
    fingerprint: str  # content + split settings; provenance and cache keys


class RawDataset(NamedTuple):
    """What a registered dataset loader returns: the full training set and the test set."""

    info: DatasetInfo
    train: Split
    test: Split


DATASETS: Registry[Callable[[DataConfig], RawDataset]] = Registry("dataset")

_INFOS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "crop_flip", 2),
    # digits are not mirror-symmetric: shift only; mean/std measured on the 8x8 uint8 images.
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3759,), "crop", 1),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip", 4
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip", 4
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """Shape and statistics of a registered dataset without loading it (for FLOPs, model sizes)."""
    if name.startswith("imagefolder:"):
        raise UserError(f"{name}: an image folder's info is only known after load_splits")
    DATASETS.get(name)  # unknown name -> UserError listing the known ones
    return _INFOS[name]


def _split_of(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(
        torch.from_numpy(np.array(images, dtype=np.uint8, order="C")),  # copy: writable
        torch.from_numpy(np.asarray(labels, dtype=np.int64)),
    )


def _torchvision_download(kind: str, root: Path) -> None:
    """Let torchvision fetch a dataset into ``root`` (its own layout); raises when offline."""
    import torchvision.datasets as tvd  # heavy import, only on this rare path

    names = {"fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
    for train in (True, False):
        getattr(tvd, names[kind])(str(root), train=train, download=True)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: the idx .gz files, read directly.

_FMNIST_FILES = [
    f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
]


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (magic 0x0000 08 ndim), checking header and size."""
    try:
        with gzip.open(path, "rb") as handle:
            blob = handle.read()
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; truncation is an EOFError
        raise UserError(
            f"{path}: not a readable gzip file ({exc}); delete it and fetch it again"
        ) from None
    magic = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if magic != 0x0800 | ndim:
        raise UserError(
            f"{path}: bad idx magic number {magic:#x} (expected {0x0800 | ndim:#x}); "
            "the file is corrupt or not an idx file"
        )
    dims = [int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(blob) != offset + int(np.prod(dims)):
        raise UserError(
            f"{path}: holds {len(blob) - offset} data bytes but its header says "
            f"{'x'.join(map(str, dims))}; the file is truncated or corrupt"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=offset).reshape(dims)


@DATASETS.register("fashion-mnist")
def _load_fashion_mnist(cfg: DataConfig) -> RawDataset:
    root = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR
    candidates = ([root, root / "FashionMNIST" / "raw"] if cfg.data_dir else []) + [
        FASHION_MNIST_SYSTEM_DIR,
        DEFAULT_DATA_DIR / "FashionMNIST" / "raw",
    ]
    found = next((d for d in candidates if all((d / f).is_file() for f in _FMNIST_FILES)), None)
    if found is None:
        try:
            _torchvision_download("fashion-mnist", root)
            found = root / "FashionMNIST" / "raw"
        except Exception:  # offline, proxy, SSL: any failure means "not available"
            first = candidates[0]
            missing = next(f for f in _FMNIST_FILES if not (first / f).is_file())
            raise UserError(
                f"fashion-mnist: {first / missing} not found; pass --data-dir DIR holding the four "
                f"idx .gz files, or `apt-get install dataset-fashion-mnist` (installs them in "
                f"{FASHION_MNIST_SYSTEM_DIR}), or allow the network so torchvision can "
                f"download them into {root}"
            ) from None
    _log.info("fashion-mnist: reading %s", found)

    def read(prefix: str) -> Split:
        path = found / f"{prefix}-images-idx3-ubyte.gz"
        images, labels = _read_idx(path, 3), _read_idx(found / f"{prefix}-labels-idx1-ubyte.gz", 1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise UserError(
                f"{path}: {images.shape} images for {len(labels)} labels; expected 28x28"
            )
        return _split_of(images[:, None], labels)  # (N, 1, 28, 28)

    return RawDataset(_INFOS["fashion-mnist"], read("train"), read("t10k"))


# ---------------------------------------------------------------------------------------------
# CIFAR: torchvision's on-disk pickles, read directly.


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a data file must not run code."""

    _ALLOWED = set(
        "numpy.ndarray numpy.dtype _codecs.encode numpy.core.multiarray._reconstruct "
        "numpy._core.multiarray._reconstruct numpy.core.numeric._frombuffer "
        "numpy._core.numeric._frombuffer".split()
    )

    def find_class(self, module: str, name: str) -> type:
        if f"{module}.{name}" not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


_CIFAR_LAYOUT = {  # kind -> (folder, train files, test files, label key), as torchvision unpacks
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels"),
}


def _read_cifar_batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="latin1").load()  # py2 pickles, as torchvision
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)  # rows are R(1024) G(1024) B(1024)
    except Exception as exc:  # a damaged pickle can fail in many ways; all mean "corrupt"
        raise UserError(
            f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc}); "
            "delete it and fetch the dataset again"
        ) from None
    if len(images) != len(labels) or not np.all((labels >= 0) & (labels < n_classes)):
        raise UserError(f"{path}: {len(images)} images, {len(labels)} labels; corrupt batch")
    return images, labels


def _load_cifar(cfg: DataConfig, kind: str) -> RawDataset:
    root = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_DIR
    folder, train_files, test_files, label_key = _CIFAR_LAYOUT[kind]
    url = f"https://www.cs.toronto.edu/~kriz/{kind.replace('cifar', 'cifar-')}-python.tar.gz"
    paths = [root / folder / f for f in train_files + test_files]
    if not all(p.is_file() for p in paths):
        try:
            _torchvision_download(kind, root)
        except Exception:
            missing = next(p for p in paths if not p.is_file())
            raise UserError(
                f"{kind}: {missing} not found; extract {url} into {root}, or pass --data-dir DIR "
                f"that holds {folder}/, or allow the network so torchvision can download it"
            ) from None

    def read(files: list[str]) -> Split:
        n_classes = _INFOS[kind].num_classes
        parts = [_read_cifar_batch(root / folder / f, label_key, n_classes) for f in files]
        images, labels = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        return _split_of(images, labels)

    return RawDataset(_INFOS[kind], read(train_files), read(test_files))


DATASETS.add("cifar10", functools.partial(_load_cifar, kind="cifar10"))
DATASETS.add("cifar100", functools.partial(_load_cifar, kind="cifar100"))


# ---------------------------------------------------------------------------------------------
# Digits (bundled with scikit-learn) and image folders.


@DATASETS.register("digits")
def _load_digits(cfg: DataConfig) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    everything = _split_of(images, bunch.target)
    # A fixed test split (not cfg.split_seed): the test set must not move when the val split does.
    train_rows, test_rows = _stratified_split(everything.labels, 0.2, seed=20240101)
    return RawDataset(_INFOS["digits"], _take(everything, train_rows), _take(everything, test_rows))


class _DecodeDataset(torch.utils.data.Dataset):
    """Decodes one image file to a square uint8 (3, S, S) tensor; failures are flagged, not raised,
    so that the main process can name the bad file in one line (a worker's traceback cannot)."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, bool]:
        from PIL import Image, ImageOps

        try:
            with Image.open(self.files[i]) as img:
                # Resize the shorter side to S and centre-crop S x S, in one step.
                img = ImageOps.fit(
                    img.convert("RGB"), (self.size, self.size), Image.Resampling.BILINEAR
                )
                return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), True
        except Exception:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False


def _load_imagefolder(path_text: str, cfg: DataConfig) -> RawDataset:
    root = Path(path_text).expanduser()
    layout = (
        f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> "
        "(val/ is accepted instead of test/)"
    )
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserError(f"imagefolder:{root}: {layout}; {root}/train or {root}/test is missing")
    classes = sorted(
        d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not classes:
        raise UserError(f"imagefolder:{root}: no class folders in {root}/train; {layout}")
    extra = sorted({d.name for d in test_dir.iterdir() if d.is_dir()} - set(classes))
    if extra:
        raise UserError(f"imagefolder:{root}: {test_dir.name}/ has classes not in train/: {extra}")
    size = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    if size < 8:
        raise UserError(f"data.image_size: must be >= 8, got {size}")

    def listing(split_dir: Path) -> tuple[list[Path], list[int]]:
        files, labels = [], []
        for label, name in enumerate(classes):
            found = sorted(
                p
                for p in (split_dir / name).glob("*")
                if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".")
            )
            files += found
            labels += [label] * len(found)
        if not files:
            raise UserError(f"imagefolder:{root}: no images in {split_dir}/<class>/; {layout}")
        return files, labels

    train_files, train_labels = listing(root / "train")
    test_files, test_labels = listing(test_dir)
    n_bytes = (len(train_files) + len(test_files)) * 3 * size * size
    if n_bytes > IMAGEFOLDER_MAX_BYTES:
        raise UserError(
            f"imagefolder:{root}: {len(train_files) + len(test_files)} images at {size}x{size} "
            f"need {n_bytes / 2**30:.1f} GiB in memory, over the "
            f"{IMAGEFOLDER_MAX_BYTES / 2**30:.1f} GiB cap; set data.image_size smaller"
        )

    def decode(files: list[Path]) -> Tensor:
        workers = 2 if len(files) >= 2000 else 0  # worker start-up costs more than small folders
        loader = torch.utils.data.DataLoader(
            _DecodeDataset(files, size), batch_size=256, num_workers=workers
        )
        images, oks = zip(*((x, ok) for x, ok in loader), strict=True)
        ok = torch.cat(oks)
        if not bool(ok.all()):
            raise UserError(f"{files[int((~ok).nonzero()[0])]}: cannot be decoded as an image")
        return torch.cat(images)  # uint8 (N, 3, S, S)

    train_images, test_images = decode(train_files), decode(test_files)
    if all(torch.equal(x[:, 0], x[:, c]) for x in (train_images, test_images) for c in (1, 2)):
        train_images, test_images = train_images[:, :1].clone(), test_images[:, :1].clone()
    pixels = train_images.float().div_(255).transpose(0, 1).flatten(1)  # (C, N*S*S)
    mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist())
    channels, name = train_images.shape[1], f"imagefolder:{path_text}"
    info = DatasetInfo(
        name, len(classes), channels, size, mean, std, "crop_flip", max(1, size // 8)
    )
    train, test = (
        Split(train_images, torch.tensor(train_labels)),
        Split(test_images, torch.tensor(test_labels)),
    )
    return RawDataset(info, train, test)


# ---------------------------------------------------------------------------------------------
# Splits.


def _stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted (keep, held_out) row numbers; exactly round(fraction * N) held out, each class in
    proportion (scikit-learn's stratified shuffle split, seeded by ``seed``). Where no stratified
    split exists (a class of one image, or fewer held-out rows than classes) the rows are
    held out at random instead, with a warning."""
    from sklearn.model_selection import train_test_split

    n = labels.shape[0]
    if n < 2:
        raise UserError(f"cannot carve a split from {n} image(s); the dataset is too small")
    n_held = min(max(round(fraction * n), 1), n - 1)
    per_class = np.bincount(labels.numpy())
    per_class = per_class[per_class > 0]
    stratify = (
        labels.numpy()
        if per_class.min() >= 2 and min(n_held, n - n_held) >= per_class.size
        else None
    )
    if stratify is None:
        _log.warning(
            "a split of %d of %d images over %d classes cannot keep every class in proportion; "
            "its rows are drawn at random",
            n_held,
            n,
            per_class.size,
        )
    keep, held = train_test_split(
        np.arange(n), test_size=n_held, random_state=seed % 2**32, stratify=stratify
    )  # NumPy seeds are 32-bit
    return torch.from_numpy(np.sort(keep)), torch.from_numpy(np.sort(held))


def _take(split: Split, rows: Tensor) -> Split:
    return Split(split.images[rows].contiguous(), split.labels[rows].contiguous())


def _fingerprint(raw: RawDataset, cfg: DataConfig) -> str:
    digest = hashlib.sha256()
    settings = [_FINGERPRINT_VERSION, asdict(raw.info), cfg.val_fraction, cfg.split_seed]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for tensor in (raw.train.images, raw.train.labels, raw.test.images, raw.test.labels):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_splits(cfg: DataConfig) -> Splits:
    """Load ``cfg.name`` and carve val from train (stratified, seeded by ``cfg.split_seed``).

    Same cfg -> identical tensors and fingerprint. The test split is never mixed in."""
    if cfg.name.startswith("imagefolder:"):
        raw = _load_imagefolder(cfg.name.removeprefix("imagefolder:"), cfg)
    elif cfg.name in DATASETS:
        raw = DATASETS.get(cfg.name)(cfg)
    else:
        raise UserError(
            f"data.name: unknown dataset {cfg.name!r}; known: "
            f"{', '.join(DATASETS.names())}, or imagefolder:PATH"
        )
    train_rows, val_rows = _stratified_split(raw.train.labels, cfg.val_fraction, cfg.split_seed)
    # Rungs, max_train_samples and ResKD's calibration rows take prefixes of the training rows:
    # keep them in an order whose every prefix holds each class in proportion.
    train_rows = train_rows[interleaved_order(raw.train.labels[train_rows], cfg.split_seed)]
    train, val = _take(raw.train, train_rows), _take(raw.train, val_rows)
    return Splits(raw.info, train, val, raw.test, _fingerprint(raw, cfg))


def interleaved_order(labels: Tensor, seed: int) -> Tensor:
    """A seeded permutation of ``labels``' rows, interleaved by class, so that every prefix of
    it holds each class within one row of its share (``len(prefix) * n_c / N``).

    Each step takes a row of the class furthest behind its share (the largest deficit
    ``m * p_c - count_c``); that greedy keeps every deficit in (-1, 1). Within a class rows are
    shuffled; ties between classes go by a seeded class order. Files listed class by class (an
    image folder) would otherwise give a rung's prefix only the first classes."""
    n = labels.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    rng = np.random.default_rng([seed % 2**32, 0x0DE5])  # NumPy seeds are 32-bit
    label_array = labels.numpy()
    classes, counts = np.unique(label_array, return_counts=True)
    tie_order = rng.permutation(classes.size)  # ties go to the earlier class in this order
    classes, counts = classes[tie_order], counts[tie_order]
    pools = [rng.permutation(np.flatnonzero(label_array == c)) for c in classes]
    share = counts / n
    taken = np.zeros(classes.size, dtype=np.int64)
    picks = np.empty(n, dtype=np.int64)  # class position taken at each step
    for step in range(n):
        deficit = (step + 1) * share - taken
        deficit[taken >= counts] = -np.inf  # exhausted (only rounding could ask for more)
        chosen = int(np.argmax(deficit))
        picks[step] = chosen
        taken[chosen] += 1
    order = np.empty(n, dtype=np.int64)
    for position, pool in enumerate(pools):
        order[picks == position] = pool
    return torch.from_numpy(order)


def warn_if_prefix_misses_classes(rows: int, n_classes: int, what: str) -> None:
    """One line when ``rows`` interleaved training rows cannot hold every class."""
    if 0 < rows < n_classes:
        _log.warning(
            "%s: %d rows cannot hold all %d classes; raise it to at least %d",
            what,
            rows,
            n_classes,
            n_classes,
        )
