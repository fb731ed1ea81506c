"""The budget: an absolute FLOPs figure (``5M``, ``1.2G``) or a share of the teacher's (``0.25x``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from autosplit.errors import UserError

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
