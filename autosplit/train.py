"""The training loop: one readable function, ``fit``, used for teachers, trials and retraining.

A *task* is an ``nn.Module`` that maps images to an outputs dict (``logits`` at least), turns
outputs + teacher outputs + labels into a loss dict with a ``loss`` key, lists the parameters
the optimiser steps, and predicts the deployable logits. ``Classifier`` is the plain CE task;
every distillation method implements the same four calls, so the loop never changes per method.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from autosplit import interrupts
from autosplit.checkpoint import load_checkpoint, save_checkpoint
from autosplit.config import TrainConfig
from autosplit.device import Runtime
from autosplit.errors import UserError

log = logging.getLogger(__name__)


class Task(Protocol):
    def __call__(self, images: Tensor) -> dict[str, Tensor]: ...
    def loss(
        self,
        outputs: dict[str, Tensor],
        teacher_outputs: dict[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]: ...
    def trainable_parameters(self) -> Iterable[nn.Parameter]: ...
    def predict(self, images: Tensor) -> Tensor: ...
    def train(self, mode: bool = True) -> Any: ...


class TeacherSource(Protocol):
    """Gives the teacher's outputs for a batch: computed live, or looked up in the cache."""

    def outputs(self, batch: Any) -> dict[str, Tensor]: ...


class Classifier(nn.Module):
    """The plain task: cross-entropy on a model's logits (teachers and the CE baseline)."""

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return {"logits": self.model(images)}

    def loss(
        self,
        outputs: dict[str, Tensor],
        teacher_outputs: dict[str, Tensor] | None,
        labels: Tensor,
        *,
        epoch: int,
    ) -> dict[str, Tensor]:
        ce = F.cross_entropy(outputs["logits"], labels, label_smoothing=self.label_smoothing)
        return {"loss": ce, "loss_ce": ce}

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.model.parameters()

    def predict(self, images: Tensor) -> Tensor:
        return self.model(images)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float
    lr: float
    seconds: float
    images_per_second: float
    loss_terms: dict[str, float] = field(default_factory=dict)


@dataclass
class FitResult:
    history: list[EpochStats]
    seconds: float

    @property
    def val_acc(self) -> float:
        return self.history[-1].val_acc if self.history else float("nan")

    @property
    def images_per_second(self) -> float:
        return float(np.mean([e.images_per_second for e in self.history])) if self.history else 0.0


class StopTraining(Exception):  # noqa: N818 - a control-flow signal, like StopIteration
    """Raised by ``on_epoch_end`` to end training early (e.g. a pruned search trial)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fusable(params: list[nn.Parameter]) -> bool:
    """Whether torch's fused SGD kernel can step ``params``: floating point, on CPU or CUDA.

    Fused, one kernel updates every tensor; unfused on CPU, SGD loops over the tensors in Python
    (ResNet-20's 65 tensors: ~1 ms a step against ~0.15 ms fused, measured in torch 2.14)."""
    return bool(params) and all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params
    )


def timed_images_per_second(
    step: Callable[[], None],
    batch_size: int,
    runtime: Runtime,
    *,
    max_seconds: float = 2.0,
    max_steps: int = 30,
) -> float:
    """Images/s of ``step`` (one batch of ``batch_size``) here: two warm-up steps not timed,
    then steps until ``max_seconds`` or ``max_steps``, at least three of them. What the planner
    measures at run time (machines of one kind differ 3-4x) is timed here."""
    for _ in range(2):
        step()
    if runtime.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    steps = 0
    while steps < 3 or (steps < max_steps and time.perf_counter() - started < max_seconds):
        step()
        steps += 1
    if runtime.is_cuda:
        torch.cuda.synchronize()
    return steps * batch_size / max(time.perf_counter() - started, 1e-9)


def sgd(
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> torch.optim.SGD:
    """SGD over the parameters that train, with the fused kernel wherever torch has one: every
    SGD autosplit steps (trials, teachers, the IE-KD auto-encoder) is made here."""
    params = [p for p in params if p.requires_grad]
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
        fused=_fusable(params) or None,
    )


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.SGD:
    return sgd(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (per-step, so short runs anneal)."""
    epoch_float = step / steps_per_epoch
    if cfg.warmup_epochs and epoch_float < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if cfg.schedule == "multistep":
        passed = sum(1 for m in cfg.milestones if int(epoch_float) >= m)
        return cfg.gamma**passed
    return 1.0


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], loader: Iterable[Any], runtime: Runtime) -> float:
    """Top-1 accuracy (%) of ``predict`` over a loader of batches."""
    correct, total = 0, 0
    for batch in loader:
        with runtime.autocast():
            logits = predict(runtime.images(batch.images))
        correct += int((logits.argmax(1) == batch.labels).sum())
        total += batch.labels.numel()
    return 100.0 * correct / max(total, 1)


def fit(
    task: Task,
    train_loader: Any,
    val_loader: Any,
    cfg: TrainConfig,
    runtime: Runtime,
    *,
    teacher: TeacherSource | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_config: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``task`` for ``cfg.epochs`` epochs and validate after each one.

    ``on_epoch_end`` sees every epoch's stats; it may log them or raise ``StopTraining``.
    With ``checkpoint``, the task and optimiser state are written atomically after every epoch
    together with ``checkpoint_config``; a later call with the same config resumes from there.
    """
    optimizer = make_optimizer(task.trainable_parameters(), cfg)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = runtime.grad_scaler()
    steps_per_epoch = len(train_loader)
    history: list[EpochStats] = []
    started = time.perf_counter()
    start_epoch = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        start_epoch, history = _resume(checkpoint, checkpoint_config, task, optimizer)
    step = start_epoch * steps_per_epoch
    show = progress and os.environ.get("AUTOSPLIT_NO_PROGRESS") != "1"
    # On a terminal the bar redraws twice a second; into a log file, once a minute.
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=step,
        desc=desc,
        disable=not show,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 60.0,
    )
    try:
        for epoch in range(start_epoch, cfg.epochs):
            task.train()
            train_loader.set_epoch(epoch)
            epoch_start = time.perf_counter()
            # Loss terms times batch size, summed on-device per key set (a method's keys do not
            # change within an epoch, so this holds one (K,) tensor): one sync per epoch.
            sums: dict[tuple[str, ...], Tensor] = {}
            correct = torch.zeros((), dtype=torch.long, device=runtime.device)
            seen = 0
            for batch in train_loader:
                factor = lr_factor(cfg, step, steps_per_epoch)
                for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                    group["lr"] = base * factor
                images = runtime.images(batch.images)
                with runtime.autocast():
                    outputs = task(images)
                    teacher_outputs = teacher.outputs(batch) if teacher is not None else None
                    losses = task.loss(outputs, teacher_outputs, batch.labels, epoch=epoch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                if cfg.grad_clip_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(stepped, cfg.grad_clip_norm)
                scaler.step(optimizer)
                scaler.update()
                # One stack + one add for all K terms instead of three small ops per term; the
                # same fp32 products and sums as adding term by term, so the same figures.
                n_batch = batch.labels.numel()
                keys = tuple(losses)
                weighted = torch.stack([v.detach() for v in losses.values()]).float() * n_batch
                total = sums.get(keys)
                sums[keys] = weighted if total is None else total.add_(weighted)  # (K,)
                correct += (outputs["logits"].detach().argmax(1) == batch.labels).sum()
                seen += n_batch
                step += 1
                bar.update(1)
                interrupts.check()  # a Ctrl-C whose KeyboardInterrupt a finaliser swallowed
            train_seconds = time.perf_counter() - epoch_start
            task.train(False)
            val_acc = evaluate(task.predict, val_loader, runtime)
            totals: dict[str, float] = {}
            for keys, total in sums.items():
                for key, value in zip(keys, total.tolist(), strict=True):
                    totals[key] = totals.get(key, 0.0) + value
            terms = {k: v / max(seen, 1) for k, v in totals.items()}
            stats = EpochStats(
                epoch=epoch + 1,
                train_loss=terms.get("loss", float("nan")),
                train_acc=100.0 * int(correct) / max(seen, 1),
                val_acc=val_acc,
                lr=optimizer.param_groups[0]["lr"],
                seconds=time.perf_counter() - epoch_start,
                images_per_second=seen / max(train_seconds, 1e-9),
                loss_terms={k: v for k, v in terms.items() if k != "loss"},
            )
            history.append(stats)
            bar.set_postfix(epoch=epoch + 1, loss=f"{stats.train_loss:.3f}", val=f"{val_acc:.2f}")
            log.info(
                "%s epoch %d/%d loss %.4f train %.2f%% val %.2f%% (%.1fs, %.0f img/s)",
                desc,
                epoch + 1,
                cfg.epochs,
                stats.train_loss,
                stats.train_acc,
                val_acc,
                stats.seconds,
                stats.images_per_second,
            )
            if not math.isfinite(stats.train_loss):
                raise FloatingPointError(
                    f"{desc}: training loss became {stats.train_loss} at "
                    f"epoch {epoch + 1}; lower the learning rate"
                )
            if checkpoint is not None:
                save_checkpoint(
                    checkpoint,
                    kind="fit-state",
                    config=checkpoint_config or {},
                    state_dict=task.state_dict(),
                    extra={
                        "epoch": epoch + 1,
                        "optimizer": optimizer.state_dict(),
                        "history": [asdict(h) for h in history],
                    },
                )
            if on_epoch_end is not None:
                on_epoch_end(stats)
    finally:
        bar.close()
        task.train(False)
    return FitResult(history=history, seconds=time.perf_counter() - started)


def _resume(
    path: str | os.PathLike,
    config: dict[str, Any] | None,
    task: Task,
    optimizer: torch.optim.Optimizer,
) -> tuple[int, list[EpochStats]]:
    """Restore a fit-state checkpoint written by ``fit``; a different config is refused."""
    payload = load_checkpoint(path, kind="fit-state")
    if payload["config"] != (config or {}):
        raise UserError(f"{path}: was written for another configuration; delete it to start over")
    task.load_state_dict(payload["state_dict"])  # type: ignore[attr-defined]
    optimizer.load_state_dict(payload["extra"]["optimizer"])
    history = [EpochStats(**h) for h in payload["extra"]["history"]]
    log.info("resuming %s at epoch %d", path, payload["extra"]["epoch"])
    return int(payload["extra"]["epoch"]), history
