from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from autosplit import teacher as teacher_module
from autosplit.checkpoint import save_checkpoint, sha256_file
from autosplit.config import DataConfig, TeacherConfig, TrainConfig
from autosplit.errors import UserError
from autosplit.models import create_model
from autosplit.teacher import get_teacher, is_cached

DATA = DataConfig(name="digits", val_fraction=0.2, augment=False)
CONFIG = TeacherConfig(model="tiny", train=TrainConfig(epochs=5, lr=0.1, batch_size=64))


def test_teacher_is_trained_once_then_served_from_cache(digits_splits, cpu, tmp_path):
    first = get_teacher(CONFIG, DATA, digits_splits, cpu, runs_dir=tmp_path, progress=False)
    assert not first.from_cache
    assert first.val_acc > 80.0 and first.test_acc > 80.0
    assert first.path.is_file() and first.path.parent.parent == tmp_path / "teachers"
    assert not (first.path.parent / "fit-state.pt").exists()  # the resume state is cleaned up

    started = time.perf_counter()
    second = get_teacher(CONFIG, DATA, digits_splits, cpu, runs_dir=tmp_path, progress=False)
    assert second.from_cache and time.perf_counter() - started < 5.0
    assert (second.val_acc, second.test_acc) == (first.val_acc, first.test_acc)
    for a, b in zip(
        first.model.state_dict().values(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a.cpu(), b.cpu())
    assert not any(p.requires_grad for p in second.model.parameters())

    other = get_teacher(
        TeacherConfig(model="tiny", train=TrainConfig(epochs=1)),
        DATA,
        digits_splits,
        cpu,
        runs_dir=tmp_path,
        progress=False,
    )
    assert other.key != first.key and not other.from_cache


def test_user_checkpoint_is_imported(digits_splits, cpu, tmp_path):
    model = create_model("tiny", num_classes=10, in_channels=1)
    path = tmp_path / "mine.pt"
    torch.save(model.state_dict(), path)
    config = TeacherConfig(model="tiny", checkpoint=str(path))
    teacher = get_teacher(config, DATA, digits_splits, cpu, runs_dir=tmp_path, progress=False)
    for a, b in zip(model.state_dict().values(), teacher.model.state_dict().values(), strict=True):
        assert torch.equal(a, b.cpu())


def test_mismatched_checkpoint_is_refused_with_its_path(digits_splits, cpu, tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save(create_model("resnet8", num_classes=10, in_channels=1).state_dict(), path)
    with pytest.raises(UserError, match=r"wrong\.pt: weights do not fit"):
        get_teacher(
            TeacherConfig(model="tiny", checkpoint=str(path)),
            DATA,
            digits_splits,
            cpu,
            runs_dir=tmp_path,
            progress=False,
        )


def test_corrupt_checkpoint_is_refused_with_its_path(digits_splits, cpu, tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match=r"broken\.pt: not a readable weights file"):
        get_teacher(
            TeacherConfig(model="tiny", checkpoint=str(path)),
            DATA,
            digits_splits,
            cpu,
            runs_dir=tmp_path,
            progress=False,
        )


def test_checkpoint_loading_runs_no_code(tmp_path):
    """weights_only loading refuses a pickle that would execute code."""
    import pickle

    from autosplit.checkpoint import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="evil.pt: not a readable checkpoint"):
        load_checkpoint(path)
    save_checkpoint(tmp_path / "ok.pt", kind="teacher", state_dict={}, config={"a": 1})
    with pytest.raises(UserError, match="expected 'fit-state'"):
        load_checkpoint(tmp_path / "ok.pt", kind="fit-state")


def _ship(source: Path, folder: Path, key: str) -> Path:
    """What scripts/ship_teacher.py writes: the checkpoint and a manifest naming key and hash."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "shipped.pt"
    shutil.copyfile(source, target)
    manifest = {"teacher_key": key, "sha256": sha256_file(target)}
    (folder / "shipped.json").write_text(json.dumps(manifest))
    return target


def test_a_shipped_teacher_is_loaded_not_trained_and_retrain_trains_afresh(
    digits_splits, cpu, tmp_path, monkeypatch, caplog
):
    trained = get_teacher(CONFIG, DATA, digits_splits, cpu, runs_dir=tmp_path / "a", progress=False)
    shipped = _ship(trained.path, tmp_path / "pretrained", trained.key)
    monkeypatch.setattr(teacher_module, "PRETRAINED_DIR", tmp_path / "pretrained")
    fresh_runs = tmp_path / "b"
    assert is_cached(CONFIG, digits_splits, fresh_runs)  # the planner counts no teacher training
    assert not is_cached(CONFIG, digits_splits, fresh_runs, retrain=True)

    loaded = get_teacher(CONFIG, DATA, digits_splits, cpu, runs_dir=fresh_runs, progress=False)
    assert loaded.from_cache and loaded.path == shipped
    assert (loaded.val_acc, loaded.test_acc) == (trained.val_acc, trained.test_acc)
    assert not (fresh_runs / "teachers").exists()  # nothing trained, nothing written

    again = get_teacher(
        CONFIG, DATA, digits_splits, cpu, runs_dir=fresh_runs, progress=False, retrain=True
    )
    assert not again.from_cache and again.path.parent.parent == fresh_runs / "teachers"

    # A shipped file whose bytes are not the manifest's is never loaded.
    shipped.write_bytes(shipped.read_bytes()[:-8] + b"tampered")
    assert not is_cached(CONFIG, digits_splits, tmp_path / "c")
    third = get_teacher(CONFIG, DATA, digits_splits, cpu, runs_dir=tmp_path / "c", progress=False)
    assert not third.from_cache
    assert "SHA-256" in caplog.text and "training the teacher instead" in caplog.text
