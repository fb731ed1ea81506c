"""The model zoo: every network autosplit can build, behind one registry and one factory.

``create_model(name, num_classes=..., width=..., depth=...)`` is the only way the rest of
autosplit builds a network, so a teacher, a base student and a residual part are all built the
same way and all offer the same surface (``ZooModel``: named feature taps, ``pooled``, one
linear ``head``). Model keys are stable API: they appear in exported YAML.

Families, and what ``width`` / ``depth`` mean for each:

- ``resnet8`` ... ``resnet110``, ``resnet8x4``, ``resnet32x4`` (CIFAR ResNets): every channel
  count scaled by ``width``; ``depth`` = 6n+2.
- ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (WideResNets): channels scaled; ``depth`` = 6n+4.
- ``mobilenetv2``, ``mobilenetv2_050`` (small-image MobileNetV2): channels scaled; ``depth`` =
  number of inverted-residual blocks (>= 7; 17 is the standard network).
- ``tiny``: two stages for seconds-fast tests; ``depth`` = convolutions per stage.
- ``resnet18/34/50``, ``mobilenet_v2``, ``mobilenet_v3_small/large`` (torchvision ImageNet
  models, never with downloaded weights): width only, depth fixed by the name.
"""

from __future__ import annotations

import math

from autosplit.errors import UserError

# Importing a family module registers its models into MODELS (``_registry``).
from autosplit.models import mobilenetv2, resnet_cifar, tiny, torchvision_models, wrn  # noqa: F401
from autosplit.models._base import FeatureTap, ZooModel
from autosplit.models._registry import MODELS, ModelFactory

__all__ = [
    "MODELS",
    "FeatureTap",
    "ModelFactory",
    "ZooModel",
    "create_model",
]


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    width: float = 1.0,
    depth: int | None = None,
) -> ZooModel:
    """Build zoo model ``name``; bad names, widths or depths raise ``UserError`` saying what's valid."""
    factory = MODELS.get(name)
    if isinstance(width, bool) or not isinstance(width, int | float) or not math.isfinite(width):
        raise UserError(f"model {name!r}: width must be a positive number, got {width!r}")
    if width <= 0:
        raise UserError(
            f"model {name!r}: width must be > 0 (1.0 = the standard network), got {width!r}"
        )
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
        raise UserError(f"model {name!r}: depth must be an integer or omitted, got {depth!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"model {name!r}: num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise UserError(f"model {name!r}: in_channels must be an integer >= 1, got {in_channels!r}")
    return factory(
        num_classes=num_classes, in_channels=in_channels, width=float(width), depth=depth
    )
