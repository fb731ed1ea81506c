"""Ctrl-C and SIGTERM: one way to stop, with nothing swallowed.

The handler raises ``KeyboardInterrupt`` at once, so a running trial stops within a batch. A
signal that lands while Python runs a finaliser (``__del__`` or a weakref callback, e.g.
SQLAlchemy's ``_collection_gced`` during the garbage collection Optuna runs after each trial)
has its exception dropped by Python, with a traceback through ``sys.unraisablehook``. So the
request is also remembered: ``check()``, called at every training step and at the start of
every trial, raises it again, and that traceback is not printed. A second signal exits at
once; the next start fails and re-runs whatever was left open.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_requested: str | None = None  # the name of the signal that asked to stop


def handler(signum: int, _frame: Any) -> None:
    global _requested
    if _requested is not None:
        os._exit(130)
    _requested = signal.Signals(signum).name
    raise KeyboardInterrupt(_requested)


def check() -> None:
    """Raise the stop a signal asked for, if one did (cheap: call it often)."""
    if _requested is not None:
        raise KeyboardInterrupt(_requested)


_unraisable_before: Any = None


def _unraisable(info: Any) -> None:
    """Silence our own stop dropped in a finaliser (``check()`` raises it again); report
    everything else as Python would."""
    if isinstance(info.exc_value, KeyboardInterrupt) and _requested is not None:
        return
    (_unraisable_before or sys.__unraisablehook__)(info)


def install(*signals: signal.Signals) -> dict[signal.Signals, Any]:
    """Handle ``signals`` here (main thread only); returns the handlers they had."""
    global _unraisable_before
    if sys.unraisablehook is not _unraisable:
        _unraisable_before, sys.unraisablehook = sys.unraisablehook, _unraisable
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore(previous: dict[signal.Signals, Any]) -> None:
    global _requested
    for sig, old in previous.items():
        signal.signal(sig, old)
    if sys.unraisablehook is _unraisable:
        sys.unraisablehook = _unraisable_before or sys.__unraisablehook__
    _requested = None
