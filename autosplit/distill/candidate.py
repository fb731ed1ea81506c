"""A candidate: one point of the search, the full recipe of a student and how to distil it.

Pure input data: frozen dataclasses, validated strictly (unknown or missing keys name their
dotted path), written to YAML and read back into an equal object, so what ``export`` writes is
exactly what ``train --config`` retrains. The search sets values by dotted path
(``with_values``) and logs ``flat()`` as MLflow params.

A part (``structure``, ``logit_loss``, ``feature_loss``) is a registry key plus that part's own
hyper-parameters, written flat in YAML (``{name: dkd, alpha: 1.0, beta: 8.0}``). Its parameters
are checked against the registered class's ``Params`` dataclass and completed with its defaults,
so two candidates that mean the same recipe compare equal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autosplit.config import (
    DataConfig,
    TeacherConfig,
    TrainConfig,
    dump_yaml,
    from_dict,
    load_yaml,
    to_dict,
)
from autosplit.distill.registry import FEATURE_LOSSES, LOGIT_LOSSES, STRUCTURES
from autosplit.errors import UserError
from autosplit.flops import SMALLEST_WIDTH

Scalar = float | int | str | bool | None
_SCALARS = (float, int, str, bool, type(None))
_PART_FIELDS = ("structure", "logit_loss", "feature_loss")


@dataclass(frozen=True)
class PartSpec:
    """A registry key plus that part's hyper-parameters, as sorted (key, value) pairs (hashable)."""

    name: str
    params: tuple[tuple[str, Scalar], ...] = ()

    def __post_init__(self) -> None:
        pairs = self.params.items() if isinstance(self.params, dict) else self.params
        params = tuple(sorted((str(key), value) for key, value in pairs))
        keys = [key for key, _ in params]
        if len(set(keys)) != len(keys) or "name" in keys:
            raise UserError(
                f"part {self.name!r}: repeated or reserved ('name') parameter in {keys}"
            )
        object.__setattr__(self, "params", params)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def as_dict(self) -> dict[str, Scalar]:
        return dict(self.params)

    def to_plain(self) -> dict[str, Scalar]:
        """The flat YAML form ``{name: ..., <param>: ...}`` (``config.to_dict`` hook)."""
        return {"name": self.name, **self.as_dict()}

    @classmethod
    def from_plain(cls, data: Any, path: str = "") -> PartSpec:
        """``{name: kd, temperature: 4}`` or just ``kd`` (``config.from_dict`` hook).

        Only the shape is checked here; the parameters are checked against the registered part
        by ``Candidate``, which knows which registry this part belongs to.
        """
        where = path or "part"
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, dict):
            raise UserError(
                f"{where}: expected a mapping like {{name: kd, temperature: 4.0}}, got {data!r}"
            )
        if "name" not in data:
            raise UserError(f"{where}.name: missing key")
        name = data["name"]
        if not isinstance(name, str):
            raise UserError(f"{where}.name: expected a string, got {name!r}")
        for key, value in data.items():
            if not isinstance(value, _SCALARS):
                raise UserError(
                    f"{where}.{key}: expected a number, string, true/false or null, got {value!r}"
                )
        return cls(name, tuple((str(k), v) for k, v in data.items() if k != "name"))


@dataclass(frozen=True)
class StudentSpec:
    """Which zoo families the base and the residual parts (assistant / res-students) come from."""

    family: str = "resnet20"
    depth: int | None = None
    part_family: str | None = None  # None = same family as the base
    part_depth: int | None = None

    def validate(self, path: str = "") -> None:
        from autosplit.models import MODELS

        for key in ("family", "part_family"):
            value = getattr(self, key)
            if value is not None and value not in MODELS:
                raise UserError(
                    f"{_join(path, key)}: unknown model {value!r}; known: {', '.join(MODELS)}"
                )
        for key in ("depth", "part_depth"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"{_join(path, key)}: must be >= 1 or null, got {value}")


@dataclass(frozen=True)
class SplitSpec:
    """How the budget is shared: fractions the width solver turns into widths.

    ``budget_share`` of ``max_flops`` is the student's target; the base gets ``base_share`` of it
    and the residual parts share the rest. Explicit widths (pinned at export) skip the solver.
    ``single`` and ``branches`` ignore ``base_share``: their only solved network is the base
    (ERA's branches are sized by ``structure.hidden``).
    """

    budget_share: float = 1.0
    base_share: float = 1.0
    base_width: float | None = None
    part_width: float | None = None

    def validate(self, path: str = "") -> None:
        for key in ("budget_share", "base_share"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise UserError(f"{_join(path, key)}: must be in (0, 1], got {value}")
        for key in ("base_width", "part_width"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise UserError(f"{_join(path, key)}: must be > 0 or null, got {value}")


@dataclass(frozen=True)
class Candidate:
    """One full recipe: teacher, budget, student structure and widths, losses, training.

    ``max_flops`` is the budget in fvcore FLOPs (one multiply-add = one FLOP).
    """

    data: DataConfig
    teacher: TeacherConfig
    max_flops: int
    student: StudentSpec = StudentSpec()
    split: SplitSpec = SplitSpec()
    structure: PartSpec = PartSpec("single")
    logit_loss: PartSpec = PartSpec("kd")
    feature_loss: PartSpec = PartSpec("none")
    twi: bool = False  # reuse the teacher's frozen classifier head (ERA's TWI)
    schedule: Literal["joint", "staged"] = "joint"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # Normalise the parts (defaults filled in) so equal recipes compare equal, then refuse
        # combinations that cannot mean anything, saying why.
        for key, registry in zip(
            _PART_FIELDS, (STRUCTURES, LOGIT_LOSSES, FEATURE_LOSSES), strict=True
        ):
            object.__setattr__(self, key, _resolve_part(registry, getattr(self, key), key))
        self.student.validate("student")
        self.split.validate("split")
        if (
            isinstance(self.max_flops, bool)
            or not isinstance(self.max_flops, int)
            or self.max_flops < 1
        ):
            raise UserError(
                f"max_flops: must be a positive integer FLOPs count, got {self.max_flops!r}"
            )
        self._check_combination()

    def _check_combination(self) -> None:
        kind = self.structure.name
        structure = STRUCTURES.get(kind)
        if not structure.part_networks:
            shaped = " / ".join(n for n in STRUCTURES if STRUCTURES.get(n).part_networks)
            for key, value in (
                ("student.part_family", self.student.part_family),
                ("student.part_depth", self.student.part_depth),
                ("split.part_width", self.split.part_width),
            ):
                if value is not None:
                    raise UserError(
                        f"{key}: structure {kind!r} has no residual networks to shape; remove it "
                        f"(or use structure {shaped})"
                    )
        elif self.split.part_width is None and self.split.base_share >= 1.0:
            raise UserError(
                f"split.base_share: 1.0 gives the whole budget to the base and none to the "
                f"{kind} parts; use a value < 1 or pin split.part_width"
            )
        structure.check(self)

    # --- plain data, YAML, dotted paths -------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> Candidate:
        return from_dict(cls, data, path)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self)

    def flat(self) -> dict[str, Scalar | tuple[Any, ...]]:
        """Dotted-path flattening, e.g. ``{"structure.n_parts": 2, "train.lr": 0.05, ...}``.

        Lists (e.g. ``train.milestones``) stay whole, as tuples; ``with_values(flat())`` is a no-op.
        """
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                flat[prefix] = tuple(value) if isinstance(value, list) else value

        walk("", self.to_dict())
        return flat

    def with_values(self, dotted: dict[str, Any]) -> Candidate:
        """A copy with values set by dotted path, e.g. ``{"structure.name": "res_chain"}``.

        Changing a part's ``name`` resets that part's other parameters to the new part's
        defaults, except those also given here: a dkd ``beta`` means nothing to kd. The result is
        validated like a loaded file (unknown paths raise, naming them).
        """
        plain = self.to_dict()
        for key in _PART_FIELDS:
            new_name = dotted.get(f"{key}.name", dotted.get(key))
            if isinstance(new_name, str) and new_name != plain[key]["name"]:
                plain[key] = {"name": new_name}
        for key, value in dotted.items():
            *parents, leaf = key.split(".")
            node = plain
            for depth, parent in enumerate(parents):
                here = ".".join(parents[: depth + 1])
                if parent not in node:
                    raise UserError(f"{here}: unknown key; known keys here: {', '.join(node)}")
                node = node[parent]
                if not isinstance(node, dict):
                    raise UserError(f"{key}: {here} is a value, not a section")
            node[leaf] = list(value) if isinstance(value, tuple) else value
        return from_dict(Candidate, plain)

    # --- what the search says of it -----------------------------------------------------------

    @property
    def label(self) -> str:
        """A short description of the recipe, e.g. ``res_chain K=2 + dkd + hint + twi``."""
        text = STRUCTURES.get(self.structure.name).label(self.structure)
        text += f" + {self.logit_loss.name}"
        if self.feature_loss.name != "none":
            text += f" + {self.feature_loss.name}"
        if self.twi:
            text += " + twi"
        return text

    def narrowest(self) -> Candidate:
        """This recipe with every width at the width solver's lower end: its smallest build."""
        structure = STRUCTURES.get(self.structure.name)
        return self.with_values(structure.narrowest_widths(SMALLEST_WIDTH))


def load_candidate(path: str | Path) -> Candidate:
    """Read a candidate YAML file (as ``export`` writes it); errors name the file and key."""
    try:
        return from_dict(Candidate, load_yaml(path))
    except UserError as exc:
        message = str(exc)
        raise UserError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None


def _resolve_part(registry: Any, spec: PartSpec | str, path: str) -> PartSpec:
    """Check ``spec`` against its registered class's ``Params``; defaults filled in."""
    if isinstance(spec, str):
        spec = PartSpec(spec)
    if spec.name not in registry:
        raise UserError(
            f"{path}.name: unknown {registry.kind} {spec.name!r}; known: {', '.join(registry)}"
        )
    params_cls = registry.get(spec.name).Params
    known = [f.name for f in dataclasses.fields(params_cls)]
    for key in spec.as_dict():
        if key not in known:
            raise UserError(
                f"{path}.{key}: unknown key; known keys for {registry.kind} {spec.name!r}: "
                f"{', '.join(known) or '(none)'}"
            )
    params = from_dict(params_cls, spec.as_dict(), path)
    return PartSpec(spec.name, tuple(to_dict(params).items()))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
