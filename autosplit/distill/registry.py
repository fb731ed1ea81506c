"""The three registries a candidate's parts are looked up in, by stable key.

Every entry is a class with a frozen ``Params`` dataclass attribute (defaults = the paper's
values); a candidate's part parameters are validated against it. Keys appear in exported YAML,
so never rename one.

- ``STRUCTURES``: ``single``, ``assistant``, ``res_chain``, ``branches`` — the ``Student``
  subclasses of :mod:`autosplit.distill.structures`.
- ``LOGIT_LOSSES``: ``ce``, ``kd``, ``dkd``, ``aekt``; ``FEATURE_LOSSES``: ``none``, ``hint``,
  ``iekd`` — the loss parts of :mod:`autosplit.distill.parts`.
"""

from __future__ import annotations

import importlib
from typing import Any

from autosplit.registry import Registry

STRUCTURES: Registry[Any] = Registry("structure")
LOGIT_LOSSES: Registry[Any] = Registry("logit loss")
FEATURE_LOSSES: Registry[Any] = Registry("feature loss")

_REGISTERING_MODULES = ("autosplit.distill.structures", "autosplit.distill.parts")


def ensure_registered() -> None:
    """Import the modules that fill the registries (they register on import; cheap after once).

    Done lazily, when a candidate is validated or a student built, so that importing the config
    layer never imports torch.
    """
    for name in _REGISTERING_MODULES:
        importlib.import_module(name)
