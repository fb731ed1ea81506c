"""The zoo's registry, in a module of its own (as timm's ``_registry.py``): the family modules
register into ``MODELS`` and import nothing from the package, so the package's ``__init__``
imports them without a cycle."""

from __future__ import annotations

from typing import Protocol

from autosplit.models._base import ZooModel
from autosplit.registry import Registry


class ModelFactory(Protocol):
    """What a registered model is: a builder taking the four knobs of ``create_model``."""

    def __call__(
        self, *, num_classes: int, in_channels: int, width: float, depth: int | None
    ) -> ZooModel: ...


MODELS: Registry[ModelFactory] = Registry("model")
