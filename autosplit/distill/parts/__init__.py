"""The loss parts of a recipe, one file each; importing this package registers them.

``LOGIT_LOSSES``: ce, kd, dkd, aekt. ``FEATURE_LOSSES``: none, hint, iekd. A structure's own
residual loss (RKD, ResKD, ERA) is keyed by structure name in ``STRUCTURE_LOSSES``: its
parameters live in the structure's ``Params`` (``candidate.structure``). TWI's CE term joins
single and res_chain students when ``candidate.twi`` is set (assistant and branches reuse the
teacher head inside the Student).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from autosplit.config import from_dict
from autosplit.distill._base import NoLoss, Part, PartContext
from autosplit.distill.parts.aekt import AEKT
from autosplit.distill.parts.ce import CrossEntropy
from autosplit.distill.parts.dkd import DKD
from autosplit.distill.parts.era import ERA
from autosplit.distill.parts.hint import Hint
from autosplit.distill.parts.iekd import IEKD
from autosplit.distill.parts.kd import KD
from autosplit.distill.parts.reskd import ResKD
from autosplit.distill.parts.rkd import RKD
from autosplit.distill.parts.twi import TWI
from autosplit.distill.registry import FEATURE_LOSSES, LOGIT_LOSSES

if TYPE_CHECKING:
    from autosplit.distill.candidate import Candidate

FEATURE_LOSSES.add("none", NoLoss)

STRUCTURE_LOSSES: dict[str, type[Part]] = {"assistant": RKD, "res_chain": ResKD, "branches": ERA}
TWI_STRUCTURES = ("single", "res_chain")

__all__ = [
    "AEKT",
    "CrossEntropy",
    "DKD",
    "ERA",
    "Hint",
    "IEKD",
    "KD",
    "NoLoss",
    "RKD",
    "ResKD",
    "STRUCTURE_LOSSES",
    "TWI",
    "build_parts",
    "structure_loss_params",
]


def structure_loss_params(params_cls: type, structure_params: Mapping[str, Any]) -> Any:
    """The structure loss's own ``Params`` from the structure's (missing keys: defaults)."""
    names = {f.name for f in dataclasses.fields(params_cls)}
    return from_dict(
        params_cls, {k: v for k, v in structure_params.items() if k in names}, "structure"
    )


def build_parts(candidate: Candidate, ctx: PartContext) -> dict[str, Part]:
    """The candidate's loss parts by role: structure (if any), logit, feature, twi (if any)."""
    parts: dict[str, Part] = {}
    structure_cls = STRUCTURE_LOSSES.get(ctx.structure)
    if structure_cls is not None:
        parts["structure"] = structure_cls(
            structure_loss_params(structure_cls.Params, ctx.structure_params), ctx
        )
    for role, spec, registry in (
        ("logit", candidate.logit_loss, LOGIT_LOSSES),
        ("feature", candidate.feature_loss, FEATURE_LOSSES),
    ):
        cls = registry.get(spec.name)
        parts[role] = cls(from_dict(cls.Params, spec.as_dict(), f"{role}_loss"), ctx)
    if candidate.twi and ctx.structure in TWI_STRUCTURES:
        parts["twi"] = TWI(TWI.Params(), ctx)
    return parts
