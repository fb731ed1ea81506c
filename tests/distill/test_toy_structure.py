"""Adding a structure, shown: a toy one defined and registered in this file alone.

``pair``: two students of the base's family at one solved width, side by side, whose logits are
averaged. Nothing under ``autosplit/`` names it. It keeps the contract every structure keeps
(``test_contract.test_distiller_contract``: shapes, loss terms, gradients, staged stages, FLOPs,
state_dict) under every logit and feature loss and TWI, trains end to end through
``train_candidate``, and the search labels and narrows it. It is registered only while this
module's tests run, so the other tests still see the four shipped structures.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import test_contract as contract  # the contract machinery, as is (a module: not re-collected)
import torch
from torch import Tensor, nn

from autosplit.data import Splits
from autosplit.device import Runtime
from autosplit.distill import (
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    STRUCTURES,
    Student,
    student_flops,
    train_candidate,
)
from autosplit.distill.parts.twi import TWI
from autosplit.distill.student import BuildContext
from autosplit.models import ZooModel


@dataclass(frozen=True)
class PairParams:
    """``pair`` has no parameters."""


class PairStudent(Student):
    """Two networks of the base's family, each at the width solved for the pair; z = (z_1 + z_2)/2.

    The twin is built like the base (no ``part_*`` widths: ``part_networks`` stays False) and
    trains with it, so a staged schedule has one stage.
    """

    kind = "pair"
    Params = PairParams
    part_names = ("twin",)
    twi_part = TWI  # twi: true adds TWI's CE term on the base's pooled feature

    def __init__(self, base: ZooModel, twin: ZooModel, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        self.twin = twin

    @classmethod
    def build(cls, ctx: BuildContext, params: Any) -> Student:
        def pair(width: float) -> Student:
            return cls(ctx.base(width), ctx.base(width), params=params, base_width=width)

        width = ctx.width(ctx.candidate.split.base_width, "student pair", pair, ctx.target_flops)
        return pair(width)

    def forward(self, images: Tensor) -> Tensor:
        return (self.base(images) + self.twin(images)) / 2  # (B, C)

    def forward_train(self, images: Tensor) -> dict[str, Any]:
        taps = self.base.forward_taps(images)
        return {"logits": (taps["logits"] + self.twin(images)) / 2, "base_taps": taps}

    def inference_modules(self) -> list[tuple[str, nn.Module]]:
        return [("base", self.base), ("twin", self.twin)]

    def part_stage(self, k: int) -> int:
        return 0


@pytest.fixture(scope="module", autouse=True)
def _pair_registered() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(STRUCTURES, "_entries", dict(STRUCTURES._entries))  # undone afterwards
        STRUCTURES.register("pair")(PairStudent)  # the one registration line
        yield


@pytest.fixture(scope="module")
def teacher(tiny_teacher: ZooModel) -> ZooModel:
    return tiny_teacher


def _cases() -> list[Any]:
    cases = [
        pytest.param(("pair", logit, "none", False), id=f"pair-{logit}") for logit in LOGIT_LOSSES
    ]
    cases += [
        pytest.param(("pair", "kd", feature, False), id=f"pair-{feature}")
        for feature in FEATURE_LOSSES
        if feature != "none"
    ]
    cases.append(pytest.param(("pair", "kd", "none", True), id="pair-twi"))
    cases.append(
        pytest.param(
            ("pair", "aekt", "hint", True, {"logit_loss.layout": "parallel"}), id="pair-all"
        )
    )
    return cases


@pytest.mark.parametrize("case", _cases())
def test_a_toy_structure_keeps_the_contract(case: tuple, teacher: ZooModel) -> None:
    contract.test_distiller_contract(case, teacher)
    distiller = contract._build(case, teacher)
    assert isinstance(distiller.student, PairStudent)
    flops = student_flops(distiller.student, contract.INPUT_SHAPE)
    assert flops.by_part["twin"] == flops.by_part["base"] > 0  # both halves are counted
    assert len(distiller.stages("staged")) == 1
    assert ("twi" in distiller.parts) is case[3]


def test_a_toy_structure_trains_end_to_end(
    teacher: ZooModel, digits_splits: Splits, cpu: Runtime
) -> None:
    candidate = contract.make_candidate("pair", "ce", **{"train.epochs": 2, "train.lr": 0.1})
    torch.manual_seed(0)
    result = train_candidate(candidate, digits_splits, teacher, cpu, progress=False)
    assert isinstance(result.student, PairStudent)
    assert result.val_acc > 30.0  # chance is 10%
    assert result.exit is None and result.expected_flops == result.flops.worst_case
    assert set(result.flops.by_part) == {"base", "twin"}
    # The search asks the structure too: its label, and its narrowest build (no part widths).
    assert candidate.label == "pair + ce"
    assert candidate.narrowest().split.part_width is None
