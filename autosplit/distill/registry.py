"""The three registries a candidate's parts are looked up in, by stable key.

Every entry is a class with a frozen ``Params`` dataclass attribute (defaults = the paper's
values); a candidate's part parameters are validated against it. Keys appear in exported YAML,
so never rename one.

- ``STRUCTURES``: ``single``, ``assistant``, ``res_chain``, ``branches`` — the ``Student``
  subclasses of :mod:`autosplit.distill.structures`, one file each.
- ``LOGIT_LOSSES``: ``ce``, ``kd``, ``dkd``, ``aekt``; ``FEATURE_LOSSES``: ``none``, ``hint``,
  ``iekd`` — the loss parts of :mod:`autosplit.distill.parts`.

One registration path: each entry registers itself with the registry's decorator where it is
defined, and importing :mod:`autosplit.distill` (which any of its modules does first) imports
those modules. This module imports none of them, so every one of them can import it.
"""

from __future__ import annotations

from typing import Any

from autosplit.registry import Registry

STRUCTURES: Registry[Any] = Registry("structure")
LOGIT_LOSSES: Registry[Any] = Registry("logit loss")
FEATURE_LOSSES: Registry[Any] = Registry("feature loss")
