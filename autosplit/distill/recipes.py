"""The published methods as named recipes: partial candidates with the papers' defaults.

``recipe_candidate("dkd", base)`` keeps everything about ``base`` that is not the method (data,
teacher, budget, student family, split shares, training) and sets the method's structure, losses,
TWI switch and schedule. Each named part is reset to its registered defaults (the papers'
values); the structure's loss weights too. Where a paper's values depend on the data set, the
recipe reads ``base.data`` (``era``: ERA's KD base for CIFAR-like or ImageNet-like data, see
``imagenet_scale``). A recipe with residual parts gives them a share of the budget
(``split.base_share``) only when ``base`` gives them none. Keys are stable API.
``scaled_recipe`` is a recipe as the search and the benchmarks train it: warm-ups scaled to
the run's epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autosplit.data import IMAGEFOLDER_DEFAULT_SIZE
from autosplit.distill.registry import STRUCTURES
from autosplit.registry import Registry

if TYPE_CHECKING:
    from autosplit.config import DataConfig
    from autosplit.distill.candidate import Candidate

METHODS: Registry[dict[str, Any]] = Registry("method")


def _recipe(
    structure: str,
    logit: str,
    feature: str = "none",
    *,
    twi: bool = False,
    schedule: str = "joint",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "structure": {"name": structure},
        "logit_loss": {"name": logit},
        "feature_loss": {"name": feature},
        "twi": twi,
        "schedule": schedule,
        **extra,
    }


# Baselines.
METHODS.add("ce", _recipe("single", "ce"))
METHODS.add("kd", _recipe("single", "kd"))  # Hinton et al., NIPS-W 2015
METHODS.add("dkd", _recipe("single", "dkd"))  # Zhao et al., CVPR 2022
METHODS.add("fitnets", _recipe("single", "ce", "hint"))  # Romero et al., ICLR 2015: CE + 100 hint
# Residual methods. RKD: widths 0.8 / 0.6 of one model cost about the model (cost ~ width^2),
# hence base_share 0.64; the paper's order is staged (docs/methods.md: a reading).
METHODS.add("rkd", _recipe("assistant", "ce", schedule="staged", **{"split.base_share": 0.64}))
# ResKD: the base with KD, then each res-student in turn on the remaining gap; much lighter parts.
METHODS.add("reskd", _recipe("res_chain", "kd", schedule="staged", **{"split.base_share": 0.8}))
METHODS.add("iekd", _recipe("single", "ce", "iekd"))  # Huang et al., CVPR 2021
METHODS.add("era", _recipe("branches", "kd", twi=True))  # Yan et al., arXiv 2025: KD-base + ERA
METHODS.add("aekt", _recipe("single", "aekt"))  # Park & Lee, arXiv 2024

_PART_ONLY = ("student.part_family", "student.part_depth", "split.part_width")

IMAGENET_SIDE = 128  # input side (px) from which a data set counts as ImageNet-scale


def imagenet_scale(data: DataConfig) -> bool:
    """Whether ``data`` is ImageNet-like (an image folder at >= ``IMAGENET_SIDE`` px, e.g. 224)
    rather than CIFAR-like: the built-in data sets (CIFAR's 32 px, Fashion-MNIST's 28, digits'
    8) and smaller folders (64 px by default) are CIFAR-like. Read from the config: no data is
    loaded."""
    if not data.name.startswith("imagefolder:"):
        return False
    return (data.image_size or IMAGEFOLDER_DEFAULT_SIZE) >= IMAGENET_SIDE


def _era_kd_base(data: DataConfig) -> dict[str, Any]:
    """ERA's KD base as its code sets it (not Hinton's 0.1 / 0.9): CE 0.9, KD 1.0 at tau 4 on
    CIFAR; CE 1, KD 2 at tau 1 on ImageNet. TWI's cross-entropies take the same CE weight."""
    ce, kd, tau = (1.0, 2.0, 1.0) if imagenet_scale(data) else (0.9, 1.0, 4.0)
    return {"logit_loss.ce_weight": ce, "logit_loss.kd_weight": kd, "logit_loss.temperature": tau}


# Values a recipe takes from the data set it is applied to (the papers differ by data set).
_BY_DATA: dict[str, Callable[[DataConfig], dict[str, Any]]] = {"era": _era_kd_base}


def recipe_candidate(name: str, base: Candidate) -> Candidate:
    """``base`` with method ``name``'s recipe applied (unknown name: ``UserError`` listing them)."""
    values = dict(METHODS.get(name))
    if name in _BY_DATA:
        values.update(_BY_DATA[name](base.data))
    if not STRUCTURES.get(values["structure"]["name"]).part_networks:
        values.update(dict.fromkeys(_PART_ONLY))  # a single network has no parts to shape
    elif base.split.part_width is not None or base.split.base_share < 1.0:
        values.pop("split.base_share", None)  # the base already shares its budget: keep that
    return base.with_values(values)


def scaled_warmup(candidate: Candidate) -> Candidate:
    """``candidate`` with its logit loss's warm-up (DKD, AEKT) at the shipped spaces' rule for
    its epochs (``warmup_epochs_for``): the papers' 20 epochs would never end in a short run."""
    from autosplit.distill._base import warmup_epochs_for

    if "logit_loss.warmup_epochs" not in candidate.flat():
        return candidate
    warmup = warmup_epochs_for(candidate.train.epochs)
    return candidate.with_values({"logit_loss.warmup_epochs": warmup})


def scaled_recipe(name: str, base: Candidate) -> Candidate:
    """Method ``name``'s recipe on ``base`` (``recipe_candidate``), its warm-up scaled to
    ``base``'s epochs (``scaled_warmup``); widths follow ``base``'s budget and split shares."""
    return scaled_warmup(recipe_candidate(name, base))
