from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from autosplit.config import TrainConfig
from autosplit.device import Runtime
from autosplit.errors import UserError
from autosplit.loader import TensorLoader
from autosplit.models import create_model
from autosplit.train import (
    Classifier,
    StopTraining,
    fit,
    lr_factor,
    make_optimizer,
    seed_everything,
)


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


class _ThreeTerms(Classifier):
    """CE plus an L2 logit penalty: a loss dict with several terms, like a distiller's."""

    def loss(self, outputs, teacher_outputs, labels, *, epoch):
        ce = F.cross_entropy(outputs["logits"], labels)
        l2 = 1e-3 * outputs["logits"].pow(2).mean()
        return {"loss": ce + l2, "loss_ce": ce, "loss_l2": l2}


def _reference_fit(task, loader, cfg):
    """fit's arithmetic written out term by term, as the loop did before it stacked the terms:
    per-step lr, SGD, and per-key on-device sums of term x batch size."""
    optimizer = make_optimizer(task.trainable_parameters(), cfg)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    step, epochs = 0, []
    for epoch in range(cfg.epochs):
        task.train()
        loader.set_epoch(epoch)
        sums, correct, seen = {}, torch.zeros((), dtype=torch.long), 0
        for batch in loader:
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * lr_factor(cfg, step, len(loader))
            outputs = task(batch.images)
            losses = task.loss(outputs, None, batch.labels, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() * batch.labels.numel()
            correct += (outputs["logits"].detach().argmax(1) == batch.labels).sum()
            seen += batch.labels.numel()
            step += 1
        epochs.append(({k: float(v) / seen for k, v in sums.items()}, 100.0 * int(correct) / seen))
    return epochs


def test_fit_computes_exactly_what_the_plain_loop_computes(digits_splits):
    # A fixed-format fp32 runtime, so the reference loop needs no memory-format handling.
    runtime = Runtime(torch.device("cpu"), None, channels_last=False)
    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=64, schedule="cosine")
    runs = []
    for run in (fit, _reference_fit):
        seed_everything(0)
        model = create_model("tiny", num_classes=10, in_channels=1)
        task = _ThreeTerms(model)
        train, val = _loaders(digits_splits)
        if run is fit:
            history = fit(task, train, val, cfg, runtime, progress=False).history
            epochs = [({"loss": h.train_loss, **h.loss_terms}, h.train_acc) for h in history]
        else:
            epochs = _reference_fit(task, train, cfg)
        runs.append((epochs, [p.detach().clone() for p in task.parameters()]))
    (fit_epochs, fit_weights), (ref_epochs, ref_weights) = runs
    assert fit_epochs == ref_epochs  # bit-identical loss terms and accuracy, every epoch
    assert set(fit_epochs[0][0]) == {"loss", "loss_ce", "loss_l2"}
    assert all(torch.equal(a, b) for a, b in zip(fit_weights, ref_weights, strict=True))


class _SometimesExtra(Classifier):
    """A term present on every other batch only: the loop must still average every term."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = 0

    def loss(self, outputs, teacher_outputs, labels, *, epoch):
        ce = F.cross_entropy(outputs["logits"], labels)
        self.calls += 1
        if self.calls % 2:
            return {"loss": ce, "loss_ce": ce}
        return {"loss": ce, "loss_ce": ce, "loss_extra": torch.ones(())}


def test_loss_terms_that_come_and_go_are_averaged_over_all_samples(digits_splits, cpu):
    train, val = _loaders(digits_splits, batch_size=len(digits_splits.train) // 4)
    train.drop_last = True  # four equal batches, two of which report loss_extra = 1
    seed_everything(0)
    task = _SometimesExtra(create_model("tiny", num_classes=10, in_channels=1))
    history = fit(task, train, val, TrainConfig(epochs=1), cpu, progress=False).history
    assert history[0].loss_terms["loss_extra"] == pytest.approx(0.5)
    assert history[0].loss_terms["loss_ce"] == pytest.approx(history[0].train_loss)


def test_fit_steps_with_the_fused_sgd_kernel_and_the_same_updates(digits_splits, cpu):
    """fit's SGD is torch's fused kernel on CPU (one kernel for all tensors, not a Python loop
    over them), and it moves the weights as the unfused SGD with the same settings does."""
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.1, weight_decay=5e-4)
    fused_flags = []
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: fused_flags.append(optimizer.defaults["fused"])
    )
    try:
        task = _task(digits_splits)
        train, val = _loaders(digits_splits)
        fit(task, train, val, cfg, cpu, progress=False)
    finally:
        handle.remove()
    assert fused_flags and all(fused_flags)

    reference = _task(digits_splits)  # the same seed: the same initial weights
    optimizer = torch.optim.SGD(
        reference.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        fused=False,
    )
    reference.train()
    train.set_epoch(0)
    for step, batch in enumerate(train):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, step, len(train))
        loss = reference.loss(reference(batch.images), None, batch.labels, epoch=0)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for ours, theirs in zip(task.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert make_optimizer(task.parameters(), cfg).defaults["fused"]
