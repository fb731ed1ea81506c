"""``single``: the base alone, trained by the recipe's losses (+ TWI's CE term when set)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autosplit.distill.parts.twi import TWI
from autosplit.distill.registry import STRUCTURES
from autosplit.distill.student import BuildContext, Student


@dataclass(frozen=True)
class SingleParams:
    """``single`` has no parameters."""


@STRUCTURES.register("single")
class SingleStudent(Student):
    """The base alone: the whole target goes to one network (``base_share`` is ignored)."""

    kind = "single"
    Params = SingleParams
    twi_part = TWI

    @classmethod
    def build(cls, ctx: BuildContext, params: Any) -> Student:
        width = ctx.width(
            ctx.candidate.split.base_width, "student base", ctx.base, ctx.target_flops
        )
        return cls(ctx.base(width), params=params, base_width=width)
