from __future__ import annotations

import time

import pytest
import torch

from autosplit.checkpoint import save_checkpoint
from autosplit.config import DataConfig, TeacherConfig, TrainConfig
from autosplit.errors import UserError
from autosplit.models import create_model
from autosplit.teacher import get_teacher

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
