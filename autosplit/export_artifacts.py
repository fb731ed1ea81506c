"""The files of an export besides its documents: each member's ONNX graph, and the folder put
in place whole (staged beside ``out_dir``, swapped in once every file is there).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from autosplit.errors import UserError
from autosplit.paths import naming


def write_onnx(
    student: Any, input_shape: Any, staging: Path, out_dir: Path, stem: str
) -> list[str]:
    """``student`` as ONNX under ``staging/front/<stem>``; the names of the files written. A
    failed write names the file it would have become, not the staging copy."""
    from autosplit.deploy import export_onnx

    with naming(out_dir / "front" / f"{stem}.onnx", always=True):
        return export_onnx(student, input_shape, staging / "front" / stem)


def copy_onnx(
    files: list[str], stem: str, target: Path, staging: Path, out_dir: Path, student: Any
) -> dict[str, Any]:
    """The ONNX files of ``target`` (written for ``front/<stem>``, copied for ``best``) and
    what runs them: ``autosplit.deploy.OnnxStudent.from_export(<this yaml>)``."""
    from autosplit.deploy import gated

    names = [target.name + name.removeprefix(stem) for name in files]
    for source, name in zip(files, names, strict=True):
        if target.parent != Path("front"):
            with naming(out_dir / target.parent / name, always=True):
                shutil.copyfile(staging / "front" / source, staging / target.parent / name)
    return {
        "files": names,
        "exit_threshold": student.exit_threshold if gated(student) else None,
        "run": "autosplit.deploy.OnnxStudent.from_export(<this file>)",
    }


def staging_parent(out_dir: Path) -> Path:
    """Where the export is staged: ``out_dir``'s parent (made if missing), so that the swap is a
    rename on one file system; refused in one line when it cannot be written."""
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--out {out_dir}: cannot create {parent} ({exc.strerror}); choose a writable folder"
        ) from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out_dir}: {parent} is not writable; choose a writable folder")
    return parent


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Put the finished ``staging`` folder where ``out_dir`` is; an older export is removed only
    after the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
