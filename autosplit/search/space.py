"""Search spaces: YAML data (``safe_load``, never code) naming the dataset, the teacher, the
fixed part of every candidate and the searchable parameters as dotted paths into ``Candidate``.

```yaml
data: {name: fashion-mnist}
teacher: {model: resnet20, train: {epochs: 8}}
budget: 0.25x                       # default for --budget
candidate: {student: {family: resnet20}, train: {epochs: 3}}   # fixed settings
params:                             # in order; `when` makes a parameter conditional
  structure.name: {choices: [single, assistant, res_chain, branches]}
  structure.n_parts: {type: int, low: 1, high: 3, when: {structure.name: [res_chain]}}
  logit_loss.temperature: {type: float, low: 1, high: 8, log: true}
search: {trials: 30, sampler: tpe}
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from autosplit.config import DataConfig, TeacherConfig, from_dict, load_yaml, to_dict
from autosplit.errors import UserError

if TYPE_CHECKING:
    import optuna

    from autosplit.distill.candidate import Candidate

Choice = str | int | float | bool | None
_TOP_LEVEL = ("data", "teacher", "budget", "candidate", "params", "search")


@dataclass(frozen=True)
class ParamSpec:
    """One searchable value: a dotted path into the candidate, its distribution, its condition."""

    name: str
    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Choice, ...] = ()
    when: dict[str, tuple[Choice, ...]] = field(default_factory=dict)

    def active(self, values: dict[str, Any]) -> bool:
        """True when every ``when`` condition holds for the values chosen so far."""
        return all(values.get(key) in allowed for key, allowed in self.when.items())

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(
            self.name, float(self.low), float(self.high), step=self.step, log=self.log
        )

    def sample_value(self) -> Any:
        """A value inside the distribution, for validating the path at load time."""
        return (
            self.choices[0]
            if self.type == "categorical"
            else (int(self.low) if self.type == "int" else float(self.low))
        )

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        return isinstance(value, int | float) and self.low <= value <= self.high


@dataclass(frozen=True)
class Rung:
    """One fidelity: ``epochs`` over the first ``rows`` training rows (``None``: all of them)."""

    epochs: int
    rows: int | None = None

    def validate(self, path: str = "") -> None:
        if self.epochs < 1:
            raise UserError(f"{path}.epochs: must be >= 1, got {self.epochs}")
        if self.rows is not None and self.rows < 1:
            raise UserError(f"{path}.rows: must be >= 1 or null (all rows), got {self.rows}")


@dataclass(frozen=True)
class FinalStage:
    """After the search: the front's ``top_k`` members and the baselines, each trained at this
    fidelity with ``seeds`` seeds (``train.seed``, ``train.seed + 1``, ...)."""

    epochs: int
    rows: int | None = None
    seeds: int = 2
    top_k: int = 2

    def validate(self, path: str = "") -> None:
        Rung(self.epochs, self.rows).validate(path)
        if self.seeds < 1 or self.top_k < 1:
            raise UserError(f"{path}: seeds and top_k must be >= 1, got {self.seeds}, {self.top_k}")


@dataclass(frozen=True)
class Fidelity:
    """How a search spends its time: rungs from cheap to dear, the reduction factor ``eta`` of
    successive halving (the top 1/eta of a rung go on), and the final stage.

    With no rungs, every trial trains once at the candidate's own ``train.epochs`` and
    ``train.max_train_samples``; with no final stage, ``front`` and ``export`` use the top rung.
    """

    rungs: tuple[Rung, ...] = ()
    eta: int = 3
    final: FinalStage | None = None

    def validate(self, path: str = "") -> None:
        if self.eta < 2:
            raise UserError(f"{path}.eta: must be >= 2, got {self.eta}")
        work = [r.epochs * (r.rows or 10**12) for r in self.rungs]
        if any(b <= a for a, b in zip(work, work[1:], strict=False)):
            raise UserError(
                f"{path}.rungs: list them from cheap to dear (epochs x rows must "
                "grow from one rung to the next)"
            )


@dataclass(frozen=True)
class SearchSettings:
    trials: int = 30  # a cap: under a time limit the search phase may run fewer
    time_limit: str | None = None  # default for --time-limit: the whole job, e.g. "30m"
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    objective_flops: Literal["worst_case", "expected"] = "expected"
    fidelity: Fidelity = field(default_factory=Fidelity)
    # Baselines run first, so every front shows what the search beat: name -> dotted overrides.
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The warm start: method recipes (``autosplit.distill.METHODS`` keys) run after the
    # baselines, before any sampled trial, each at its paper's settings on this space's
    # candidate (``SearchSpace.portfolio_trial``).
    portfolio: tuple[str, ...] = ()
    teacher_views: int = 1  # augmented views of the teacher cache (1 = augmentation off in trials)


class SearchSpace:
    """A loaded, validated space file."""

    def __init__(
        self,
        path: Path,
        data: DataConfig,
        teacher: TeacherConfig,
        budget: str | None,
        fixed: dict[str, Any],
        params: list[ParamSpec],
        settings: SearchSettings,
    ) -> None:
        self.path, self.data, self.teacher, self.budget = path, data, teacher, budget
        self.fixed, self.params, self.settings = fixed, params, settings

    @property
    def name(self) -> str:
        return self.path.stem

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        path = Path(path)
        raw = load_yaml(path)
        try:
            return cls._parse(path, raw)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None

    @classmethod
    def _parse(cls, path: Path, raw: Any) -> SearchSpace:
        if not isinstance(raw, dict):
            raise UserError("expected a mapping with keys " + ", ".join(_TOP_LEVEL))
        for key in raw:
            if key not in _TOP_LEVEL:
                raise UserError(f"{key}: unknown key; known keys here: {', '.join(_TOP_LEVEL)}")
        for key in ("data", "teacher"):
            if key not in raw:
                raise UserError(f"{key}: missing key")
        data = from_dict(DataConfig, raw["data"], "data")
        teacher = from_dict(TeacherConfig, raw["teacher"], "teacher")
        budget = raw.get("budget")
        if budget is not None:
            from autosplit.search.budget import parse_budget

            parse_budget(budget)
            budget = str(budget)
        fixed = raw.get("candidate") or {}
        if not isinstance(fixed, dict):
            raise UserError("candidate: expected a mapping of fixed candidate settings")
        for key in ("data", "teacher", "max_flops"):
            if key in fixed:
                raise UserError(
                    f"candidate.{key}: set by the space's top level and --budget, remove it here"
                )
        params = [_parse_param(name, spec) for name, spec in (raw.get("params") or {}).items()]
        settings = from_dict(SearchSettings, raw.get("search") or {}, "search")
        if settings.time_limit is not None:
            from autosplit.search.budget import parse_duration

            try:
                parse_duration(settings.time_limit)
            except UserError:
                raise UserError(
                    f"search.time_limit: {settings.time_limit!r} is not a duration like 30m or 2h"
                ) from None
        space = cls(path, data, teacher, budget, fixed, params, settings)
        space._validate()
        return space

    # --- candidates -------------------------------------------------------------------------

    def base_candidate(self, max_flops: int) -> Candidate:
        from autosplit.distill.candidate import Candidate

        plain = {
            **self.fixed,
            "data": to_dict(self.data),
            "teacher": to_dict(self.teacher),
            "max_flops": int(max_flops),
        }
        return Candidate.from_dict(plain)

    def suggest(
        self, trial: optuna.Trial, max_flops: int, *, overrides: dict[str, Any] | None = None
    ) -> Candidate:
        """Draw the trial's values (conditional parameters in file order) into a candidate.

        ``overrides`` (a baseline) pin values: those are not drawn, so the trial's Optuna
        parameters hold only values it trains with, and the conditions of the others are
        read with the pinned values (a single student draws no ``n_parts``). Parameters of a
        part a baseline renames (``logit_loss.name``) are not drawn either.
        """
        base = self.base_candidate(max_flops)
        overrides = dict(overrides or {})
        renamed = {key.removesuffix(".name") for key in overrides if key.endswith(".name")}
        values: dict[str, Any] = {**base.flat(), **overrides}
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.name in overrides or param.name.split(".")[0] in renamed:
                continue
            if param.active(values):
                chosen[param.name] = values[param.name] = param.suggest(trial)
        return base.with_values({**chosen, **overrides})

    def portfolio_trial(self, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Recipe ``name`` of the portfolio as (params, pinned): ``params`` are the values of
        the space's parameters the recipe takes inside their distributions, enqueued as the
        trial's Optuna parameters so the sampler learns from them like any drawn trial;
        ``pinned`` are ``suggest``'s overrides: the recipe's values of settings the space does
        not search, and of parameters outside their range (e.g. ERA's 4 branches where the
        space draws 1-3) or of a part the space cannot name (a recipe's CE logit loss where
        the space draws kd | dkd). ``suggest`` with both gives the recipe's candidate."""
        from autosplit.distill.recipes import scaled_recipe

        base = self.base_candidate(10**9)  # the recipe's values do not depend on the budget
        recipe, base_flat = scaled_recipe(name, base).flat(), base.flat()
        # Not in the recipe: a setting of a part the recipe replaces (a CE loss has no
        # temperature), pinned away with that part's name below.
        active = [p for p in self.params if p.name in recipe and p.active(recipe)]
        drawn = {p.name for p in active}
        # What the recipe changes that no parameter draws here (a parameter whose condition
        # the recipe does not meet, e.g. AEKT's warm-up where the space conditions it on dkd).
        pinned = {k: v for k, v in recipe.items() if k not in drawn and v != base_flat.get(k)}
        # A part whose name is pinned has all its parameters pinned (``suggest`` draws none).
        for param in active:
            if param.name.endswith(".name") and not param.contains(recipe[param.name]):
                pinned[param.name] = recipe[param.name]
        renamed = {key.removesuffix(".name") for key in pinned if key.endswith(".name")}
        params = {}
        for param in active:
            value = recipe[param.name]
            if param.name in pinned:
                continue
            if param.name.split(".")[0] in renamed or not param.contains(value):
                pinned[param.name] = value
            else:
                params[param.name] = value
        return params, pinned

    def overrides(self, *, baseline: str | None = None, portfolio: str | None = None) -> dict:
        """The values ``suggest`` pins for a baseline or portfolio trial (none for others)."""
        if baseline:
            return dict(self.settings.baselines.get(baseline, {}))
        if portfolio:
            return self.portfolio_trial(portfolio)[1]
        return {}

    def _draw(self, base: Candidate, pinned: dict[str, Any]) -> dict[str, Any]:
        """A deterministic full draw (pinned values, else each parameter's first/low value)."""
        return _draw_values(self.params, base.flat(), pinned)

    def _validate(self) -> None:
        """Every parameter path and baseline must make a valid candidate: fail at load, not
        in trial 17."""
        base = self.base_candidate(10**9)
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise UserError("params: a parameter is listed twice")
        for param in self.params:
            for key in param.when:
                if key not in names and key not in base.flat():
                    raise UserError(
                        f"params.{param.name}.when.{key}: not a parameter or a candidate path"
                    )
            # Every choice of every parameter, in a full draw where its conditions hold.
            for value in param.choices if param.type == "categorical" else (param.low, param.high):
                if param.type == "int":
                    value = int(value)
                pinned = {key: allowed[0] for key, allowed in param.when.items()}
                pinned[param.name] = value
                try:
                    base.with_values(self._draw(base, pinned))
                except UserError as exc:
                    raise UserError(f"params.{param.name} = {value!r}: {exc}") from None
        for name, overrides in self.settings.baselines.items():
            try:
                base.with_values(overrides)
            except UserError as exc:
                raise UserError(f"search.baselines.{name}: {exc}") from None
        from autosplit.distill.recipes import METHODS

        if len(set(self.settings.portfolio)) != len(self.settings.portfolio):
            raise UserError("search.portfolio: a recipe is listed twice")
        for name in self.settings.portfolio:
            if name not in METHODS.names():
                raise UserError(
                    f"search.portfolio: {name!r} is not a method recipe; known: "
                    f"{', '.join(METHODS.names())}"
                )
            try:
                self.portfolio_trial(name)
            except UserError as exc:
                raise UserError(f"search.portfolio.{name}: {exc}") from None


def _draw_values(
    params: list[ParamSpec], flat: dict[str, Any], pinned: dict[str, Any]
) -> dict[str, Any]:
    values, chosen = dict(flat), {}
    for param in params:
        if param.active(values):
            value = pinned[param.name] if param.name in pinned else param.sample_value()
            chosen[param.name] = values[param.name] = value
    return chosen


def _parse_param(name: str, spec: Any) -> ParamSpec:
    where = f"params.{name}"
    if not isinstance(spec, dict):
        raise UserError(
            f"{where}: expected a mapping like {{type: float, low: 0.1, high: 1}} "
            "or {choices: [a, b]}"
        )
    spec = dict(spec)
    if "choices" in spec:
        spec.setdefault("type", "categorical")
    when = spec.pop("when", {}) or {}
    if not isinstance(when, dict):
        raise UserError(f"{where}.when: expected a mapping of path -> allowed values")
    when = {k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in when.items()}
    param = from_dict(ParamSpec, {"name": name, **spec}, where)
    param = dataclasses.replace(param, when=when)
    if param.type == "categorical":
        if not param.choices:
            raise UserError(f"{where}.choices: a categorical parameter needs choices")
    else:
        if param.low is None or param.high is None or not param.low < param.high:
            raise UserError(f"{where}: needs low < high, got low={param.low} high={param.high}")
        if param.log and param.low <= 0:
            raise UserError(f"{where}.low: a log-scale parameter needs low > 0")
    return param


DEFAULT_SPACE = "fashion_mnist.yaml"


def find_space(name: str | None) -> Path:
    """``--space`` as given, else the default space from ./search_spaces or the source tree."""
    if name is not None:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--space {name}: file not found; see search_spaces/ for examples")
        return path
    for folder in (
        Path.cwd() / "search_spaces",
        Path(__file__).resolve().parents[2] / "search_spaces",  # the source tree's
    ):
        if (folder / DEFAULT_SPACE).is_file():
            return folder / DEFAULT_SPACE
    raise UserError(
        f"no --space given and search_spaces/{DEFAULT_SPACE} not found; pass --space FILE"
    )


def load_space_sections(path: Path) -> tuple[DataConfig, TeacherConfig]:
    """The ``data`` and ``teacher`` sections of a search-space file, strictly validated (what
    ``autosplit teacher`` needs, without the searchable part)."""
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    for section in ("data", "teacher"):
        if section not in raw:
            raise UserError(f"{path}: missing section {section!r}")
    try:
        data = from_dict(DataConfig, raw["data"], "data")
        teacher = from_dict(TeacherConfig, raw["teacher"], "teacher")
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return data, teacher
