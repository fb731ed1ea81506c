"""Measure this machine's training throughput at run time (the planner never uses a time
measured elsewhere: machines of one kind differ 3-4x)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from autosplit.device import Runtime
from autosplit.train import sgd, timed_images_per_second


def training_images_per_second(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    num_classes: int,
    runtime: Runtime,
    *,
    batch_size: int,
    max_seconds: float = 2.0,
    max_steps: int = 30,
) -> float:
    """Training images/s of ``model`` (forward, cross-entropy, backward, SGD step) here.

    Runs on a copy, so the model passed in is left as it was. Two warm-up steps are not timed;
    then steps run until ``max_seconds`` or ``max_steps``, at least three of them.
    """
    model = runtime.prepare(copy.deepcopy(model)).train()
    # The SGD trials step (fused where torch has the kernel), so the probe times what they run.
    optimizer = sgd(model.parameters(), lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, *input_shape, generator=generator).to(runtime.device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(runtime.device)
    images = runtime.images(images)

    def step() -> None:
        with runtime.autocast():
            out = model(images)
            logits = out["logits"] if isinstance(out, dict) else out
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed_images_per_second(
        step, batch_size, runtime, max_seconds=max_seconds, max_steps=max_steps
    )
