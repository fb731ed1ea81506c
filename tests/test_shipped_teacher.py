"""The teacher the package ships for the default space: its manifest is the file's, it stands
for the default space's teacher on this data, a search loads it instead of training, and it
scores on Fashion-MNIST's test split what its manifest records. Skipped where Fashion-MNIST is
not installed (`apt-get install dataset-fashion-mnist`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autosplit import evaluation
from autosplit.checkpoint import sha256_file
from autosplit.data import FASHION_MNIST_SYSTEM_DIR, load_splits
from autosplit.device import resolve_runtime
from autosplit.search.space import find_space, load_space_sections
from autosplit.teacher import PRETRAINED_DIR, get_teacher, is_cached, teacher_key
from autosplit.train import evaluate

MANIFEST = PRETRAINED_DIR / "fashion_mnist_resnet20.json"

pytestmark = pytest.mark.skipif(
    not (FASHION_MNIST_SYSTEM_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist",
)


def test_the_manifest_is_the_shipped_files():
    manifest = json.loads(MANIFEST.read_text())
    checkpoint = MANIFEST.with_suffix(".pt")
    assert sha256_file(checkpoint) == manifest["sha256"]
    assert manifest["model"] == "resnet20" and manifest["data"] == "fashion-mnist"
    assert checkpoint.stat().st_size < 2_000_000  # about 1 MB: fit for a wheel
    for field in ("command", "commit", "val_acc", "test_acc", "flops", "epochs"):
        assert manifest[field], field


def test_the_default_space_loads_the_shipped_teacher_and_it_scores_its_recorded_accuracy(
    tmp_path: Path,
):
    manifest = json.loads(MANIFEST.read_text())
    data, teacher_cfg = load_space_sections(find_space(None))
    splits = load_splits(data)
    assert teacher_key(teacher_cfg, splits.fingerprint) == manifest["teacher_key"]
    assert splits.fingerprint == manifest["data_fingerprint"]
    runtime = resolve_runtime("cpu", precision="fp32")
    runs = tmp_path / "runs"
    assert is_cached(teacher_cfg, splits, runs)  # the planner counts no teacher time
    teacher = get_teacher(teacher_cfg, data, splits, runtime, runs_dir=runs, progress=False)
    assert teacher.from_cache and teacher.path == MANIFEST.with_suffix(".pt")
    assert not (runs / "teachers").exists()  # loaded, nothing trained or written
    measured = evaluate(teacher.model, evaluation.test_loader(splits, runtime), runtime)
    # fp32 on any CPU: the same argmax but for a rare tie at the last bit; 0.05 pt = 5 images.
    assert measured == pytest.approx(manifest["test_acc"], abs=0.05)
    assert teacher.test_acc == pytest.approx(manifest["test_acc"], abs=1e-9)
