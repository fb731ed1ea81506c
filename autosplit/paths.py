"""Where autosplit writes: output paths checked before work starts, study names that stay
inside ``runs/``, and file-system faults told in one line.

The checks probe by writing: ``os.access`` cannot see a full disk, and for root it allows
everything but a read-only mount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from autosplit.errors import UserError

# errno -> (the cause, what to do). These are the faults of the place, not of the program.
FAULTS = {
    errno.ENOSPC: ("no space left on device", "free space or choose another folder"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another folder"),
    errno.EROFS: ("read-only file system", "choose a writable folder"),
    errno.EACCES: ("permission denied", "check its permissions or choose another folder"),
}
# SQLite reports the same faults through its driver's own exception, by text.
_SQLITE_FAULTS = (("database or disk is full", errno.ENOSPC), ("readonly database", errno.EROFS))
_SQLITE_PATH = re.compile(r"sqlite:///(\S+?\.db)\b")
SQLITE_HEADER = b"SQLite format 3\x00"
# A probe big enough that a disk with no free block refuses it.
PROBE_BYTES = 4096
# A study name is one folder under runs/studies/ (and runs/exports/): no separators, no dots
# in front (``..``), nothing a shell or a file system treats specially.
_STUDY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,127}")


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Refuse now, before any work, a folder ``path`` that could not be created or written.

    Probes the folder, or its nearest existing ancestor when it does not exist yet, by writing
    and removing a small hidden file; nothing else is created.
    """
    _probe(Path(path), flag, Path(path))


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Refuse now a file path whose folder could not be created or written, or that is a
    folder itself."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path, e.g. {target / 'out.pt'}")
    _probe(target.absolute().parent, flag, target)


def _probe(folder: Path, flag: str, shown: str | os.PathLike) -> None:
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {shown}: {existing} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".autosplit-probe-")
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)  # a disk with delayed allocation reports a full disk here
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        cause, advice = FAULTS.get(
            exc.errno, (exc.strerror or type(exc).__name__, "choose another folder")
        )
        raise UserError(f"{flag} {shown}: cannot write in {existing} ({cause}); {advice}") from None


def check_sqlite_url(url: str, flag: str, *, write: bool = True) -> None:
    """Refuse now a ``sqlite:///`` URL whose file SQLite could not use: a folder, not a SQLite
    file, or (to ``write``) on a read-only, full or unwritable place. Other URLs pass."""
    if not url.startswith("sqlite:///") or url.removeprefix("sqlite:///") in ("", ":memory:"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    if path.is_dir():
        raise UserError(f"{flag} {url}: {path} is a folder, not a database file; name a .db file")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as handle:
            if handle.read(16) != SQLITE_HEADER:
                raise UserError(
                    f"{flag} {url}: {path} is not a SQLite database; name another "
                    "file (SQLite creates a missing one)"
                )
    if not write:
        return
    # SQLite writes a journal beside the database: its folder must take files.
    _probe(path.absolute().parent, flag, url)
    if path.is_file() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {url}: {path} is read-only; make it writable or name another file")


def check_study_name(name: str, flag: str = "--study-name") -> str:
    """A study name names a folder under ``runs/``; refuse one that could lead outside it."""
    if not _STUDY_NAME.fullmatch(name):
        raise UserError(
            f"{flag} {name!r}: use up to 128 letters, digits and _ . + = - "
            "(not starting with '.'), as it names a folder under runs/"
        )
    return name


@contextlib.contextmanager
def naming(path: str | os.PathLike, *, always: bool = False) -> Iterator[None]:
    """Name ``path`` in an ``OSError`` that names no file (a failed ``write``) or only the
    hidden temporary file an atomic write goes through; ``always``: whatever it named (a
    staging copy of ``path``)."""
    try:
        yield
    except OSError as exc:
        tmp = f".{Path(path).name}."
        if exc.errno is not None and (
            always or exc.filename is None or os.path.basename(str(exc.filename)).startswith(tmp)
        ):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def disk_fault(exc: BaseException | None) -> str | None:
    """One line for a failure caused by the place written to (full disk, quota, read-only,
    permission), found anywhere in ``exc``'s chain of causes; ``None`` for anything else, so
    real bugs still raise."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        # What Python would print as "the above exception ...": a ``from None`` ends the chain.
        exc = (
            exc.__cause__
            if exc.__cause__ is not None
            else (None if exc.__suppress_context__ else exc.__context__)
        )
    for link in chain:
        if isinstance(link, OSError) and link.errno in FAULTS:
            cause, advice = FAULTS[link.errno]
            where = link.filename if link.filename is not None else "a file being written"
            return f"{where}: {cause}; {advice}"
    for link in chain:
        text = str(link)
        for marker, code in _SQLITE_FAULTS:
            if marker in text:
                cause, advice = FAULTS[code]
                found = next(
                    (m.group(1) for m in map(_SQLITE_PATH.search, map(str, chain)) if m), None
                )
                return (
                    f"{found or 'a SQLite database'}: {cause} (SQLite: {marker}); {advice}, "
                    "e.g. another --runs-dir"
                )
    return None
