"""Checkpoints that carry their own config, written atomically and loaded with weights_only."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from autosplit.config import atomic_write_bytes
from autosplit.errors import UserError

FORMAT = "autosplit-checkpoint-1"


def sha256_file(path: str | os.PathLike) -> str:
    """The file's SHA-256: what identifies a teacher across hosts and in export provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class UnreadableCheckpoint(UserError):
    """A file torch cannot load; ``reason`` says why in a few words (for a warning line)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def save_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    state_dict: dict[str, Any],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Save weights plus the plain-data config that rebuilds the module (no pickled classes)."""
    payload = {
        "format": FORMAT,
        "kind": kind,
        "config": config,
        "state_dict": state_dict,
        "extra": extra or {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_or_rescue(path: str | os.PathLike, runs_dir: str | os.PathLike, **checkpoint: Any) -> None:
    """``save_checkpoint(path, **checkpoint)``; if that fails now (the disk filled while the
    weights trained), save them under ``runs_dir/rescued/`` instead so the training is not lost,
    and say so in one line naming ``path`` (as ``--out``) either way."""
    from autosplit.paths import disk_fault

    try:
        save_checkpoint(path, **checkpoint)
    except OSError as exc:
        cause = disk_fault(exc) or f"{exc.filename or path}: {exc.strerror or exc}"
        rescue = Path(runs_dir) / "rescued" / Path(path).name
        try:
            save_checkpoint(rescue, **checkpoint)
        except OSError:
            raise UserError(f"--out {path}: could not write the weights ({cause})") from None
        raise UserError(
            f"--out {path}: could not write the weights ({cause}); saved them to {rescue} instead"
        ) from None


def load_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    fix: str = "re-create it or point to another file",
) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no code runs); refuse corrupt or foreign files by path,
    ending the line with ``fix``, what the user can do about it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; check the path")
    payload = _torch_load(path, "checkpoint", fix=fix)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not an autosplit checkpoint (no '{FORMAT}' header); {fix}")
    if kind is not None and payload.get("kind") != kind:
        raise UserError(
            f"{path}: holds a {payload.get('kind')!r} checkpoint, expected {kind!r}; {fix}"
        )
    return payload


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A user's own weights: an autosplit checkpoint or a bare state_dict, loaded weights_only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; check teacher.checkpoint")
    payload = _torch_load(path, "weights file", fix="point teacher.checkpoint to another file")
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        payload = payload["state_dict"]
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(
        isinstance(v, torch.Tensor) for v in payload.values()
    ):
        raise UserError(
            f"{path}: holds no state_dict of tensors; point teacher.checkpoint to "
            "a file saved with torch.save(model.state_dict(), path)"
        )
    return payload


def _torch_load(
    path: Path, what: str, *, fix: str = "re-create it or point to another file"
) -> object:
    """``torch.load`` with ``weights_only=True``; any failure becomes one sentence naming the
    file and why (torch's own messages run to paragraphs)."""
    try:
        with warnings.catch_warnings():
            # A foreign pickle makes torch warn before it fails; the failure says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file can fail in many ways inside torch
        reason = _why(exc)
        raise UnreadableCheckpoint(
            f"{path}: not a readable {what}: {reason}; {fix}", reason
        ) from None


def _why(exc: Exception) -> str:
    text = str(exc)
    # A zip cut short fails in torch's reader, or (about 1 cut in 8) as EINVAL from a seek
    # past the end of the file.
    truncated = isinstance(exc, OSError) and exc.errno == errno.EINVAL
    if (
        truncated
        or isinstance(exc, EOFError)
        or "zip archive" in text
        or "central directory" in text
    ):
        return "the file is empty, truncated or corrupt"
    if "Weights only load failed" in text:
        return (
            "it holds Python objects besides tensors, which autosplit does not unpickle "
            "(torch.load weights_only=True)"
        )
    if isinstance(exc, KeyError | ValueError) or "load key" in text:
        return "the file is not a PyTorch file"
    return f"torch.load raised {type(exc).__name__}"
