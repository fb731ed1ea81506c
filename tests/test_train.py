from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from autosplit.config import TrainConfig
from autosplit.data import TensorLoader
from autosplit.errors import UserError
from autosplit.models import create_model
from autosplit.train import Classifier, StopTraining, fit, lr_factor, seed_everything


def _loaders(splits, batch_size=64):
    train = TensorLoader(
        splits.train, splits.info, batch_size=batch_size, shuffle=True, augment=False, seed=0
    )
    val = TensorLoader(splits.val, splits.info, batch_size=256, shuffle=False, augment=False)
    return train, val


def _task(splits, seed=0):
    seed_everything(seed)
    model = create_model(
        "tiny", num_classes=splits.info.num_classes, in_channels=splits.info.in_channels
    )
    return Classifier(model)


def test_fit_learns_digits(digits_splits, cpu):
    train, val = _loaders(digits_splits)
    cfg = TrainConfig(epochs=6, lr=0.1, batch_size=64)
    result = fit(_task(digits_splits), train, val, cfg, cpu, progress=False)
    assert len(result.history) == 6
    assert result.val_acc > 80.0  # chance is 10 %
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].images_per_second > 0


def test_same_seed_gives_the_same_run(digits_splits, cpu):
    cfg = TrainConfig(epochs=2, lr=0.1)
    runs = []
    for _ in range(2):
        train, val = _loaders(digits_splits)
        runs.append(fit(_task(digits_splits), train, val, cfg, cpu, progress=False))
    assert runs[0].history[-1].train_loss == runs[1].history[-1].train_loss
    assert runs[0].val_acc == runs[1].val_acc


def test_cosine_and_multistep_schedules():
    cosine = TrainConfig(epochs=4, schedule="cosine")
    assert lr_factor(cosine, 0, 10) == 1.0
    assert math.isclose(lr_factor(cosine, 20, 10), 0.5, abs_tol=1e-9)
    assert lr_factor(cosine, 40, 10) < 1e-9
    multi = TrainConfig(epochs=4, schedule="multistep", milestones=(1, 3), gamma=0.1)
    assert [round(lr_factor(multi, s, 10), 6) for s in (0, 9, 10, 29, 30)] == [1, 1, 0.1, 0.1, 0.01]
    warm = TrainConfig(epochs=4, warmup_epochs=1)
    assert lr_factor(warm, 0, 10) == pytest.approx(0.1)


def test_stop_training_from_the_epoch_hook(digits_splits, cpu):
    train, val = _loaders(digits_splits)
    seen = []

    def hook(stats):
        seen.append(stats.epoch)
        if stats.epoch == 2:
            raise StopTraining

    with pytest.raises(StopTraining):
        fit(
            _task(digits_splits),
            train,
            val,
            TrainConfig(epochs=5),
            cpu,
            progress=False,
            on_epoch_end=hook,
        )
    assert seen == [1, 2]


def test_checkpoint_resumes_where_it_stopped(digits_splits, cpu, tmp_path):
    ckpt = tmp_path / "state.pt"
    cfg = TrainConfig(epochs=3, lr=0.1)

    def stop_after_two(stats):
        if stats.epoch == 2:
            raise StopTraining

    train, val = _loaders(digits_splits)
    with pytest.raises(StopTraining):
        fit(
            _task(digits_splits),
            train,
            val,
            cfg,
            cpu,
            progress=False,
            checkpoint=ckpt,
            checkpoint_config={"run": 1},
            on_epoch_end=stop_after_two,
        )
    train, val = _loaders(digits_splits)
    resumed = fit(
        _task(digits_splits, seed=99),
        train,
        val,
        cfg,
        cpu,
        progress=False,
        checkpoint=ckpt,
        checkpoint_config={"run": 1},
    )
    assert [h.epoch for h in resumed.history] == [1, 2, 3]  # only epoch 3 was trained again

    train, val = _loaders(digits_splits)
    straight = fit(_task(digits_splits), train, val, cfg, cpu, progress=False)
    assert resumed.val_acc == pytest.approx(straight.val_acc, abs=1e-9)

    with pytest.raises(UserError, match="another configuration"):
        fit(
            _task(digits_splits),
            train,
            val,
            cfg,
            cpu,
            progress=False,
            checkpoint=ckpt,
            checkpoint_config={"run": 2},
        )


def test_diverging_loss_stops_with_a_clear_error(digits_splits, cpu):
    train, val = _loaders(digits_splits)
    task = _task(digits_splits)
    with torch.no_grad():
        for p in task.parameters():
            p.mul_(float("nan")) if p.dim() > 1 else None
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        fit(task, train, val, replace(TrainConfig(), epochs=1), cpu, progress=False)


def test_gradient_clipping_bounds_the_step(digits_splits, cpu):
    train = TensorLoader(
        digits_splits.train, digits_splits.info, batch_size=4096, shuffle=False, augment=False
    )  # one batch: one optimiser step
    val = TensorLoader(
        digits_splits.val, digits_splits.info, batch_size=512, shuffle=False, augment=False
    )
    cfg = TrainConfig(
        epochs=1,
        lr=0.5,
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        schedule="constant",
        grad_clip_norm=1e-3,
    )
    task = _task(digits_splits)
    before = torch.cat([p.detach().flatten().clone() for p in task.parameters()])
    fit(task, train, val, cfg, cpu, progress=False)
    after = torch.cat([p.detach().flatten() for p in task.parameters()])
    assert 0 < float((after - before).norm()) <= 0.5 * 1e-3 * 1.0001
