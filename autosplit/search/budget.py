"""The budget: an absolute FLOPs figure (``5M``, ``1.2G``) or a share of the teacher's (``0.25x``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autosplit.errors import UserError
from autosplit.flops import BudgetTooSmall

if TYPE_CHECKING:
    from autosplit.data import Splits
    from autosplit.distill import Candidate, Distiller, StudentFlops
    from autosplit.models import ZooModel

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*x\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    text: str
    relative: float | None  # share of the teacher's FLOPs, or None for an absolute figure
    absolute: int | None

    def resolve(self, teacher_flops: int) -> int:
        """The cap in FLOPs (fvcore convention)."""
        if self.relative is not None:
            return int(self.relative * teacher_flops)
        assert self.absolute is not None
        return self.absolute

    @property
    def slug(self) -> str:
        """A name-safe form for study names: ``0.25x``, ``5M``."""
        return re.sub(r"[^0-9A-Za-z.]+", "", self.text)


def parse_budget(text: str | int | float) -> Budget:
    """``0.25x`` -> relative; ``5M``/``1.2G``/``350k``/``123456`` -> absolute (one line on junk)."""
    from autosplit.flops import parse_flops

    raw = str(text).strip()
    match = _RELATIVE.match(raw)
    if match:
        share = float(match.group(1))
        if not 0 < share:
            raise UserError(f"--budget {raw}: a relative budget must be > 0x, e.g. 0.25x")
        return Budget(raw, share, None)
    try:
        flops = parse_flops(raw)
    except UserError:
        raise UserError(
            f"--budget {raw!r}: expected a share of the teacher like 0.25x or FLOPs like 5M, 1.2G"
        ) from None
    if flops <= 0:
        raise UserError(f"--budget {raw}: must be > 0")
    return Budget(raw, None, flops)


def parse_duration(text: str | None, flag: str = "--time-limit") -> float | None:
    """``90``, ``90s``, ``15m``, ``2h`` -> seconds; ``none``/``off`` -> no limit (``None``)."""
    if text is None or str(text).strip().lower() in ("none", "off"):
        return None
    units = {"s": 1, "m": 60, "h": 3600}
    raw = str(text).strip().lower()
    try:
        seconds = float(raw[:-1]) * units[raw[-1]] if raw and raw[-1] in units else float(raw)
    except ValueError:
        raise UserError(
            f"{flag} {text!r}: expected seconds or a duration like 30m, 2h (or off)"
        ) from None
    if seconds <= 0:
        raise UserError(f"{flag} {text!r}: must be > 0 (or off for no limit)")
    return seconds


def within_budget(
    candidate: Candidate,
    teacher_model: ZooModel,
    splits: Splits,
    *,
    max_flops: int | None,
    over: Callable[[int], str] | None = None,
    none_fits: Callable[[BudgetTooSmall], str] | None = None,
) -> tuple[Distiller, StudentFlops]:
    """The one budget check, before any training: ``candidate``'s Distiller and its student's
    FLOPs, counted with ``teacher_model`` (an untrained teacher of the architecture serves:
    counting needs its structure, not its weights). A student whose worst case is over
    ``max_flops`` is refused with the line ``over(worst_case)``; a candidate whose widths no
    width fits, with ``none_fits(error)`` (else the solver's own line). ``max_flops`` None:
    no cap to check (the widths were solved to fit it)."""
    from autosplit.distill.run import build_and_count

    try:
        distiller, flops = build_and_count(candidate, teacher_model, splits)
    except BudgetTooSmall as exc:
        if none_fits is None:
            raise
        raise UserError(none_fits(exc)) from None
    if max_flops is not None and flops.worst_case > max_flops:
        worst_case = int(flops.worst_case)
        raise UserError(over(worst_case) if over else f"{worst_case:,} FLOPs > {max_flops:,}")
    return distiller, flops
