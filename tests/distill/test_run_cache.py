"""train_candidate on cached teacher outputs trains exactly as with the teacher run live."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autosplit.cache import LiveTeacher, teacher_outputs
from autosplit.config import DataConfig, TeacherConfig, TrainConfig
from autosplit.data import load_splits
from autosplit.distill.candidate import Candidate
from autosplit.distill.run import train_candidate
from autosplit.models import create_model


def setup(cpu, tmp_path, *, augment: bool, batch_size: int):
    """Digits, a tiny teacher, a tiny-student KD candidate and a 2-view teacher cache."""
    data = DataConfig(name="digits", val_fraction=0.2, augment=augment)
    splits = load_splits(data)
    torch.manual_seed(0)
    teacher = create_model("tiny", num_classes=10, in_channels=1).eval()
    candidate = Candidate(
        data=data,
        teacher=TeacherConfig(model="tiny"),
        max_flops=10**6,
        train=TrainConfig(epochs=3, lr=0.05, batch_size=batch_size, seed=1),
    )
    candidate = dataclasses.replace(
        candidate, student=dataclasses.replace(candidate.student, family="tiny")
    )
    cache = teacher_outputs(
        teacher,
        splits.train,
        splits.info,
        cpu,
        taps=["logits"],
        teacher_key="t",
        data_fingerprint=splits.fingerprint,
        split_name="train",
        cache_dir=tmp_path,
        augment=augment,
        n_views=2,
        seed=1,
    )
    return splits, teacher, candidate, cache


@pytest.mark.parametrize("augment", [False, True])
def test_cached_and_live_teacher_give_the_same_training(cpu, tmp_path, augment):
    splits, teacher, candidate, cache = setup(cpu, tmp_path, augment=augment, batch_size=64)
    cached = train_candidate(candidate, splits, teacher, cpu, teacher_source=cache, progress=False)
    live = train_candidate(
        candidate,
        splits,
        teacher,
        cpu,
        progress=False,
        teacher_source=LiveTeacher(teacher, ["logits"], cpu),
    )
    losses_cached = [h.train_loss for h in cached.history]
    losses_live = [h.train_loss for h in live.history]
    if augment:
        # Live sees a fresh view each epoch; the cache cycles 2 views, so epoch 3 differs.
        assert losses_cached[:2] == pytest.approx(losses_live[:2], rel=1e-4)
    else:
        assert losses_cached == pytest.approx(losses_live, rel=1e-4)
        assert cached.val_acc == pytest.approx(live.val_acc, abs=1e-6)


class Spy:
    """Checks, batch by batch, that the cached outputs are the teacher's on the images shown."""

    def __init__(self, cache, live):
        self.cache, self.live, self.views = cache, live, []
        self.n_views = cache.n_views
        self.tensors = cache.tensors

    def outputs(self, batch):
        self.views.append(batch.view)
        got = self.cache.outputs(batch)
        torch.testing.assert_close(
            got["logits"], self.live.outputs(batch)["logits"], rtol=1e-4, atol=1e-4
        )
        return got


def test_every_epoch_trains_on_the_view_the_cache_holds(cpu, tmp_path):
    splits, teacher, candidate, cache = setup(cpu, tmp_path, augment=True, batch_size=256)
    spy = Spy(cache, LiveTeacher(teacher, ["logits"], cpu))
    train_candidate(candidate, splits, teacher, cpu, teacher_source=spy, progress=False)
    assert sorted(set(spy.views)) == [0, 1]  # epoch 3 reuses view 0 instead of a new view 2
