"""Typed, strictly validated configuration dataclasses and their YAML round trip.

Every config is a frozen dataclass. ``from_dict`` refuses unknown and missing keys and names the
dotted path at fault; ``to_dict`` gives plain data that ``from_dict`` turns back into an equal
object, so config -> YAML -> config is exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from autosplit.errors import UserError
from autosplit.paths import naming

C = TypeVar("C")

_MISSING = dataclasses.MISSING


def _convert(value: Any, annotation: Any, path: str) -> Any:
    """Check/convert one plain YAML value against a type annotation."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise UserError(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise UserError(f"{path}: expected a list, got {value!r}")
        args = get_args(annotation)
        item_type = args[0] if args else Any
        items = [_convert(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path}: expected a mapping, got {value!r}")
        _, value_type = get_args(annotation) or (str, Any)
        return {str(k): _convert(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, path)
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{path}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {annotation!r}")


def from_dict(cls: type[C], data: Any, path: str = "") -> C:
    """Build dataclass ``cls`` from plain data; unknown or missing keys raise with their path.

    A dataclass may own its plain form instead: a classmethod ``from_plain(data, path)`` here and
    a method ``to_plain()`` in :func:`to_dict` (e.g. a part spec written flat as
    ``{name: dkd, beta: 8.0}``).
    """
    where = path or cls.__name__
    from_plain = getattr(cls, "from_plain", None)
    if from_plain is not None:  # a dataclass with its own plain form (e.g. distill's PartSpec)
        return from_plain(data, path)
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            dotted = f"{path}.{key}" if path else str(key)
            raise UserError(f"{dotted}: unknown key; known keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], dotted)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise UserError(f"{dotted}: missing key")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for a dataclass; tuples become lists for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_plain = getattr(obj, "to_plain", None)
        if to_plain is not None:  # the counterpart of ``from_plain`` in ``from_dict``
            return to_plain()
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def config_hash(obj: Any, length: int = 16) -> str:
    """A stable content hash of a config (or any plain data), used as a cache key."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# ---------------------------------------------------------------------------------------------
# Files: YAML is data (safe_load only) and every write is atomic.


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    with naming(path):  # a failed write (full disk) says which file it was writing
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(to_dict(data), sort_keys=False, default_flow_style=False)


def load_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        kind = " (a .pt checkpoint?)" if path.suffix in (".pt", ".pth", ".ckpt") else ""
        raise UserError(
            f"{path}: is binary, not a YAML text file{kind}; pass a YAML file, "
            "e.g. the best.yaml written by `autosplit export`"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None


# ---------------------------------------------------------------------------------------------
# The foundation's configs.


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how the validation split is carved from train."""

    name: str = "fashion-mnist"
    data_dir: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: bool = True
    image_size: int | None = None  # imagefolder only: side of the square images (default 64)

    def validate(self, path: str = "") -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(
                f"{_join(path, 'val_fraction')}: must be in (0, 1), got {self.val_fraction}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings. Defaults follow the CIFAR distillation protocol."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    seed: int = 0
    max_train_samples: int | None = None
    grad_clip_norm: float | None = None  # clip the global gradient norm (None: no clipping)
    # A staged schedule: "full" gives every stage the whole schedule above (the papers' way:
    # ResKD trains S, then each res-student, each for ``epochs``); "shared" splits ``epochs``
    # over the stages, so the candidate sees as many images as a joint one (equal training cost).
    stage_epochs: Literal["full", "shared"] = "full"

    def validate(self, path: str = "") -> None:
        if self.epochs < 1:
            raise UserError(f"{_join(path, 'epochs')}: must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"{_join(path, 'batch_size')}: must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise UserError(f"{_join(path, 'lr')}: must be > 0, got {self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"{_join(path, 'label_smoothing')}: must be in [0, 1)")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise UserError(f"{_join(path, 'grad_clip_norm')}: must be > 0 or null")
        if self.schedule == "multistep" and not self.milestones:
            raise UserError(
                f"{_join(path, 'milestones')}: multistep needs milestones, e.g. [150, 180, 210]"
            )


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: a zoo model trained by autosplit, or a user checkpoint (``checkpoint``)."""

    model: str
    width: float = 1.0
    depth: int | None = None
    checkpoint: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
