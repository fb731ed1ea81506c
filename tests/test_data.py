"""Datasets from tiny files in the real on-disk formats, splits, augmentation and the loader."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from autosplit import data
from autosplit.config import DataConfig
from autosplit.data import DATASETS, Split, dataset_info, load_splits
from autosplit.errors import UserError
from autosplit.loader import TensorLoader, augment, normalize


def _unique_images(n: int, channels: int, size: int) -> np.ndarray:
    """uint8 (n, C, size, size) whose first two pixels encode the row, so rows are traceable."""
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return images


def _row_ids(images: torch.Tensor) -> set[int]:
    return set((images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist())


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _fashion_dir(root: Path, n_train: int = 200, n_test: int = 30) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", _unique_images(n, 1, 28)[:, 0])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No system Fashion-MNIST, no runs/data, and a torchvision download that fails as offline."""

    def fail(kind: str, root: Path) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "no-runs")
    monkeypatch.setattr(data, "_torchvision_download", fail)


def test_fashion_mnist_idx_files_load(tmp_path: Path, offline: None) -> None:
    splits = load_splits(
        DataConfig(name="fashion-mnist", data_dir=str(_fashion_dir(tmp_path / "f")))
    )
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert splits.train.images.shape[1:] == (1, 28, 28) == splits.info.input_shape
    assert (len(splits.train), len(splits.val), len(splits.test)) == (180, 20, 30)
    assert torch.bincount(splits.val.labels).tolist() == [2] * 10  # stratified
    assert _row_ids(splits.train.images) | _row_ids(splits.val.images) == set(range(200))
    assert not _row_ids(splits.train.images) & _row_ids(splits.val.images)


def test_splits_are_deterministic_and_fingerprinted(tmp_path: Path, offline: None) -> None:
    folder = str(_fashion_dir(tmp_path / "f", n_train=500))
    first, again = (load_splits(DataConfig(data_dir=folder, val_fraction=0.3)) for _ in range(2))
    assert first.fingerprint == again.fingerprint
    for a, b in ((first.train, again.train), (first.val, again.val), (first.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(first.val) == 150
    other_seed = load_splits(DataConfig(data_dir=folder, val_fraction=0.3, split_seed=1))
    assert other_seed.fingerprint != first.fingerprint
    assert _row_ids(other_seed.val.images) != _row_ids(first.val.images)
    assert (
        load_splits(DataConfig(data_dir=folder, val_fraction=0.2)).fingerprint != first.fingerprint
    )


def test_a_split_no_stratification_fits_keeps_its_size_and_seed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A one-image class, or fewer held-out rows than classes: drawn at random, with a warning,
    still exactly round(fraction * N) rows and the same rows for a seed."""
    for labels, fraction in (
        (torch.tensor([0, 0, 0, 1, 1, 1, 2]), 0.3),
        (torch.arange(40) % 10, 0.1),
    ):
        keep, held = data._stratified_split(labels, fraction, seed=3)
        assert len(held) == round(fraction * len(labels)) and len(keep) + len(held) == len(labels)
        assert set(keep.tolist()) | set(held.tolist()) == set(range(len(labels)))
        assert torch.equal(held, data._stratified_split(labels, fraction, seed=3)[1])
    assert caplog.text.count("cannot keep every class in proportion") == 4


def test_fashion_mnist_missing_names_file_and_three_fixes(tmp_path: Path, offline: None) -> None:
    with pytest.raises(UserError) as err:
        load_splits(DataConfig(data_dir=str(tmp_path / "empty")))
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "empty" / "train-images-idx3-ubyte.gz") in message
    assert "--data-dir" in message and "apt-get install dataset-fashion-mnist" in message
    assert "network" in message


@pytest.mark.parametrize("damage", ["magic", "truncated_data", "truncated_gzip"])
def test_fashion_mnist_corrupt_file_is_named(tmp_path: Path, offline: None, damage: str) -> None:
    folder = _fashion_dir(tmp_path / "f")
    bad = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    if damage == "magic":
        bad.write_bytes(gzip.compress(b"\x00\x00\x09\x03" + raw[4:]))
    elif damage == "truncated_data":
        bad.write_bytes(gzip.compress(raw[:-100]))
    else:
        bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.raises(UserError, match=str(bad)):
        load_splits(DataConfig(data_dir=str(folder)))


def _cifar_dir(root: Path, kind: str) -> Path:
    """torchvision's python-pickle layout, few images, pickled the way the originals are."""

    def dump(path: Path, n: int, label_key: str, n_classes: int) -> None:
        entry = {
            "batch_label": "tiny",
            "data": _unique_images(n, 3, 32).reshape(n, 3072),
            label_key: [int(x) for x in np.arange(n) % n_classes],
        }
        if label_key == "fine_labels":
            entry["coarse_labels"] = [0] * n
        path.write_bytes(pickle.dumps(entry, protocol=2))

    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            dump(folder / f"data_batch_{i}", 20, "labels", 10)
        dump(folder / "test_batch", 10, "labels", 10)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", 200, "fine_labels", 100)
        dump(folder / "test", 50, "fine_labels", 100)
    return root


@pytest.mark.parametrize(
    ("kind", "n_train", "n_test"), [("cifar10", 100, 10), ("cifar100", 200, 50)]
)
def test_cifar_pickles_load(
    tmp_path: Path, offline: None, kind: str, n_train: int, n_test: int
) -> None:
    splits = load_splits(
        DataConfig(name=kind, data_dir=str(_cifar_dir(tmp_path, kind)), val_fraction=0.5)
    )
    assert splits.info.input_shape == (3, 32, 32) and splits.info.crop_padding == 4
    assert splits.train.images.shape == (n_train // 2, 3, 32, 32)
    assert len(splits.val) == n_train // 2 and len(splits.test) == n_test
    assert int(splits.train.labels.max()) < splits.info.num_classes
    assert _row_ids(splits.train.images) | _row_ids(splits.val.images) <= set(range(n_train))


def test_cifar_missing_and_corrupt_files(tmp_path: Path, offline: None) -> None:
    with pytest.raises(UserError) as err:
        load_splits(DataConfig(name="cifar10", data_dir=str(tmp_path)))
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert "cifar-10-python.tar.gz" in message and "--data-dir" in message and "network" in message
    root = _cifar_dir(tmp_path / "c", "cifar100")
    (root / "cifar-100-python" / "test").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="cifar-100-python/test"):
        load_splits(DataConfig(name="cifar100", data_dir=str(root)))
    # A pickle that would run code is refused, not executed.
    (root / "cifar-100-python" / "test").write_bytes(pickle.dumps(os.getpid, protocol=2))
    with pytest.raises(UserError, match="refusing"):
        load_splits(DataConfig(name="cifar100", data_dir=str(root)))


def _image_folder(root: Path, test_name: str = "test") -> Path:
    colours = {"cat": (200, 30, 30), "dog": (20, 180, 40)}
    for split, n in (("train", 6), (test_name, 2)):
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):  # non-square on purpose: resize shorter side + centre crop
                Image.new("RGB", (40 + i, 30), colour).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_loads_pngs(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "pets", test_name="val")
    splits = load_splits(DataConfig(name=f"imagefolder:{root}", image_size=16, val_fraction=0.25))
    assert splits.info.input_shape == (3, 16, 16) and splits.info.num_classes == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 4)
    cat = splits.test.images[splits.test.labels == 0]
    assert cat.dtype == torch.uint8 and cat[:, :, 8, 8].tolist() == [[200, 30, 30]] * 2
    assert splits.info.mean[0] == pytest.approx((200 + 20) / 2 / 255, abs=1e-3)


def test_image_folder_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match=r"expected .*/train/<class>/<image>"):
        load_splits(DataConfig(name=f"imagefolder:{tmp_path / 'flat'}"))
    root = _image_folder(tmp_path / "pets")
    monkeypatch.setattr(data, "IMAGEFOLDER_MAX_BYTES", 1000)
    with pytest.raises(UserError, match="image_size smaller"):
        load_splits(DataConfig(name=f"imagefolder:{root}"))
    monkeypatch.undo()
    broken = root / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match=str(broken)):
        load_splits(DataConfig(name=f"imagefolder:{root}", image_size=8))


def test_digits_load_with_a_fixed_test_split() -> None:
    splits = load_splits(DataConfig(name="digits"))
    other = load_splits(DataConfig(name="digits", split_seed=7))
    assert splits.info.input_shape == (1, 8, 8)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert int(splits.train.images.max()) == 255
    assert torch.equal(splits.test.images, other.test.images)  # test does not move with split_seed
    assert not torch.equal(splits.val.images, other.val.images)  # val does


def test_registry_info_and_unknown_name() -> None:
    assert set(DATASETS.names()) == {"fashion-mnist", "digits", "cifar10", "cifar100"}
    assert dataset_info("cifar100").input_shape == (3, 32, 32)
    with pytest.raises(UserError, match="imagefolder:PATH"):
        load_splits(DataConfig(name="mnist-typo"))


def _toy_split(n: int = 50) -> tuple[Split, data.DatasetInfo]:
    info = dataset_info("cifar10")
    return Split(torch.from_numpy(_unique_images(n, 3, 32)), torch.arange(n) % 10), info


def test_augment_matches_a_per_sample_reference() -> None:
    split, info = _toy_split(20)
    rows = torch.arange(20)
    out = augment(split.images, rows, info, view=3, seed=5)
    pad = info.crop_padding
    padded = torch.nn.functional.pad(split.images, (pad,) * 4)
    for i in range(20):  # find the (dy, dx, flip) that explains each output: a real crop/flip
        matches = [
            (dy, dx, f)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in (0, 1)
            if torch.equal(
                out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy : dy + 32, dx : dx + 32])
            )
        ]
        assert matches, f"sample {i} is not a padded crop (+ flip) of its input"
    assert not torch.equal(out, split.images)
    assert not torch.equal(out, augment(split.images, rows, info, view=4, seed=5))


def test_augment_is_independent_of_batching_and_order() -> None:
    split, info = _toy_split()
    reference = augment(split.images, torch.arange(50), info, view=2, seed=9)  # what a cache stores
    for batch_size, shuffle in ((7, True), (50, False), (16, True)):
        loader = TensorLoader(
            split, info, batch_size=batch_size, shuffle=shuffle, augment=True, seed=9, n_views=3
        )
        loader.set_epoch(5)  # view 5 % 3 == 2
        seen = torch.zeros(50, dtype=torch.bool)
        for batch in loader:
            assert batch.view == 2 and batch.images.dtype == torch.float32
            assert torch.allclose(batch.images, normalize(reference[batch.indices], info))
            assert torch.equal(batch.labels, split.labels[batch.indices])
            seen[batch.indices] = True
        assert seen.all()


def test_loader_order_length_and_normalisation() -> None:
    split, info = _toy_split()
    loader = TensorLoader(split, info, batch_size=16, shuffle=True, augment=False, drop_last=True)
    assert (
        len(loader) == 3
        and len(TensorLoader(split, info, batch_size=16, shuffle=False, augment=False)) == 4
    )
    views = TensorLoader(split, info, batch_size=8, shuffle=False, augment=True)
    assert [views.view_for_epoch(e) for e in (0, 3, 7)] == [0, 3, 7]
    orders = []
    for epoch in (0, 0, 1):
        loader.set_epoch(epoch)
        orders.append(torch.cat([b.indices for b in loader]))
        assert all(b.view == 0 for b in loader)
    assert torch.equal(orders[0], orders[1]) and not torch.equal(orders[0], orders[2])
    assert len(orders[0]) == 48 and len(set(orders[0].tolist())) == 48
    for batch in loader:  # each batch holds exactly the rows it names
        assert torch.equal(batch.images, normalize(split.images[batch.indices], info))
        assert torch.equal(batch.labels, split.labels[batch.indices])
    expected = (split.images.float() / 255 - torch.tensor(info.mean).view(3, 1, 1)) / torch.tensor(
        info.std
    ).view(3, 1, 1)
    assert torch.allclose(normalize(split.images, info), expected, atol=1e-5)


@pytest.mark.skipif(
    not (data.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_from_debian_package() -> None:
    splits = load_splits(DataConfig(name="fashion-mnist", val_fraction=0.1))
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (60_000, 10_000)
    assert len(splits.val) == 6000 and torch.bincount(splits.test.labels).tolist() == [1000] * 10


def _class_ordered_folder(root: Path, n_classes: int, per_class: int) -> Path:
    """An image folder as users have them: listed class by class (the loader sorts the files)."""
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(n_classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("L", (8, 8), 40 * c + i % 7).save(root / split / f"class{c}" / f"{i}.png")
    return root


def _worst_share_gap(labels: torch.Tensor, n_classes: int) -> float:
    """max over prefixes and classes of |count of the class in the prefix - prefix * share|."""
    one_hot = torch.nn.functional.one_hot(labels, n_classes).double()
    counts = one_hot.cumsum(0)  # (N, C)
    lengths = torch.arange(1, len(labels) + 1, dtype=torch.float64)[:, None]
    share = one_hot.mean(0)[None]
    return float((counts - lengths * share).abs().max())


def test_every_prefix_of_a_class_ordered_folder_holds_every_class(tmp_path: Path) -> None:
    """5 classes x 40 images listed class by class: any prefix of the training rows (a rung's
    rows, max_train_samples) and ResKD's calibration rows hold each class within one row of its
    share. Before the interleaving, the first 50 of 180 rows were classes 0 and 1 only."""
    from autosplit.distill.run import _calibration_split
    from autosplit.distill.structures.res_chain import ResChainParams

    root = _class_ordered_folder(tmp_path / "ordered", n_classes=5, per_class=40)
    splits = load_splits(DataConfig(name=f"imagefolder:{root}", image_size=8, val_fraction=0.1))
    labels = splits.train.labels
    assert len(labels) == 180 and torch.bincount(labels).tolist() == [36] * 5
    assert _worst_share_gap(labels, 5) < 1.0
    assert set(labels[:5].tolist()) == set(range(5))

    gated = SimpleNamespace(exit_gate=True, params=ResChainParams())
    for rung_rows in (50, 100, 180):  # rung prefixes, then ResKD's held-out first 10 % of them
        prefix = Split(splits.train.images[:rung_rows], labels[:rung_rows])
        held, calibration = _calibration_split(gated, prefix, 5)
        assert calibration is not None and held == len(calibration) == round(0.1 * rung_rows)
        counts = torch.bincount(calibration.labels, minlength=5).double()
        assert (counts - held / 5).abs().max() < 1.0

    # The same seed gives the same order; another split seed another one.
    again = load_splits(DataConfig(name=f"imagefolder:{root}", image_size=8, val_fraction=0.1))
    assert torch.equal(again.train.images, splits.train.images)
    other = load_splits(
        DataConfig(name=f"imagefolder:{root}", image_size=8, val_fraction=0.1, split_seed=1)
    )
    assert not torch.equal(other.train.labels, labels)


def test_interleaving_holds_unequal_classes_to_one_row() -> None:
    """Unequal class sizes: the deficit rule keeps every prefix within one row of each share,
    and the order is a permutation of the rows."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        n_classes = 2 + trial % 9
        sizes = torch.randint(1, 120, (n_classes,), generator=generator)
        labels = torch.repeat_interleave(torch.arange(n_classes), sizes)
        order = data.interleaved_order(labels, seed=trial)
        assert sorted(order.tolist()) == list(range(len(labels)))
        assert _worst_share_gap(labels[order], n_classes) < 1.0


def test_a_prefix_smaller_than_the_classes_warns_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data.warn_if_prefix_misses_classes(4, 10, "train.max_train_samples")
    data.warn_if_prefix_misses_classes(10, 10, "train.max_train_samples")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "train.max_train_samples: 4 rows cannot hold all 10 classes; raise it to at least 10"
    ]
