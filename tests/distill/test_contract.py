"""The contract every recipe and every structure keeps, whatever its losses.

Parametrised over every recipe in ``METHODS``, every structure, every logit and feature loss on
every structure, and TWI: the distiller's outputs have the right shapes; its loss is finite,
named ``loss`` + ``loss_<term>`` and their sum; after backward every trainable parameter has a
gradient and the teacher none; stages partition the parameters and terms; the student's FLOPs
count; a state_dict loaded into a fresh distiller gives identical predictions and losses.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from distill_cases import CLASSES, INPUT_SHAPE, WITH_PARTS, batch
from distill_cases import make_candidate as tiny_candidate

from autosplit.distill import (
    FEATURE_LOSSES,
    LOGIT_LOSSES,
    METHODS,
    STRUCTURES,
    Candidate,
    Distiller,
    build_distiller,
    recipe_candidate,
    student_flops,
)
from autosplit.models import ZooModel

SMALL = {"res_chain": {"n_parts": 2}, "branches": {"n_parts": 2}}  # fewer parts: faster


@pytest.fixture(scope="module")
def teacher(tiny_teacher: ZooModel) -> ZooModel:
    return tiny_teacher


def make_candidate(structure: str = "single", *args: Any, **kwargs: Any) -> Candidate:
    """The shared tiny candidate, with fewer parts than the defaults (``SMALL``)."""
    return tiny_candidate(structure, *args, structure_params=SMALL.get(structure), **kwargs)


def from_recipe(name: str) -> Candidate:
    candidate = recipe_candidate(name, make_candidate())
    parts = candidate.structure.name in WITH_PARTS
    values: dict[str, Any] = {"split.base_width": 0.5, "split.part_width": 0.25 if parts else None}
    if candidate.structure.name in SMALL:
        values.update({f"structure.{k}": v for k, v in SMALL[candidate.structure.name].items()})
    return candidate.with_values(values)


def _cases() -> list[Any]:
    cases = [pytest.param(("recipe", name), id=f"recipe-{name}") for name in METHODS]
    for structure in STRUCTURES:
        for logit in LOGIT_LOSSES:
            cases.append(pytest.param((structure, logit, "none", False), id=f"{structure}-{logit}"))
        for feature in FEATURE_LOSSES:
            if feature != "none":
                cases.append(
                    pytest.param((structure, "kd", feature, False), id=f"{structure}-{feature}")
                )
        cases.append(pytest.param((structure, "kd", "none", True), id=f"{structure}-twi"))
    extra = [
        (("res_chain", "dkd", "hint", True), {"structure.residual": "mse"}, "res_chain-mse"),
        (
            ("assistant", "aekt", "none", False),
            {"logit_loss.layout": "parallel"},
            "assistant-aekt-par",
        ),
        (("branches", "aekt", "iekd", True), {"structure.mix_alpha": 0.5}, "branches-iekd-mixed"),
        (("single", "aekt", "iekd", True), {"logit_loss.layout": "parallel"}, "single-all"),
    ]
    cases += [pytest.param((*case, values), id=name) for case, values, name in extra]
    return cases


def _build(case: tuple, teacher: ZooModel, seed: int = 0) -> Distiller:
    if case[0] == "recipe":
        candidate = from_recipe(case[1])
    else:
        structure, logit, feature, twi, *values = case
        candidate = make_candidate(
            structure, logit, feature, twi=twi, **(values[0] if values else {})
        )
    torch.manual_seed(seed)
    return build_distiller(
        candidate, teacher=teacher, num_classes=CLASSES, in_channels=1, input_shape=INPUT_SHAPE
    )


def _batch(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return batch(size, seed=1)


def _teacher_outputs(teacher: ZooModel, distiller: Distiller, images: torch.Tensor) -> dict:
    with torch.no_grad():
        taps = teacher.forward_taps(images)
    return {name: taps[name] for name in distiller.teacher_taps}


@pytest.mark.parametrize("case", _cases())
def test_distiller_contract(case: tuple, teacher: ZooModel) -> None:
    distiller = _build(case, teacher)
    images, labels = _batch()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    # Outputs: the final logits and every logit stream are (B, C).
    distiller.train()
    outputs = distiller(images)
    assert outputs["logits"].shape == (6, CLASSES)
    assert outputs["logit_streams"] and all(
        z.shape == (6, CLASSES) for z in outputs["logit_streams"]
    )
    assert distiller.teacher_taps <= set(teacher.forward_taps(images[:2]))

    # Loss: finite, "loss" + loss_<term>, the total is the sum of the terms.
    losses = distiller.loss(outputs, _teacher_outputs(teacher, distiller, images), labels, epoch=0)
    assert "loss" in losses and len(losses) > 1
    assert all(key.startswith("loss_") for key in losses if key != "loss")
    assert all(math.isfinite(float(value.detach())) for value in losses.values())
    terms = sum(value for key, value in losses.items() if key != "loss")
    assert torch.allclose(losses["loss"], terms)

    # Gradients reach every trainable parameter, never the teacher nor a frozen head.
    losses["loss"].backward()
    trainable = distiller.trainable_parameters()
    names = {id(p): name for name, p in distiller.named_parameters()}
    no_grad = [
        names[id(p)] for p in trainable if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not no_grad, f"no gradient for {no_grad}"
    assert all(p.requires_grad for p in trainable)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in trainable}
    assert all(p.grad is None for p in teacher.parameters())
    frozen = [p for p in distiller.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())

    # Staged: the stages partition the trainable parameters and the loss terms.
    stages = distiller.stages("staged")
    staged_ids = [id(p) for stage in stages for p in stage.parameters]
    assert len(staged_ids) == len(set(staged_ids)) and set(staged_ids) == {id(p) for p in trainable}
    staged_terms = [key for stage in stages for key in stage.terms]
    assert sorted(staged_terms) == sorted(k for k in losses if k != "loss")
    assert [s.index for s in stages] == sorted({s.index for s in stages})

    # FLOPs are counted on the deployed student.
    flops = student_flops(distiller.student, INPUT_SHAPE)
    assert flops.worst_case > 0 and sum(flops.by_part.values()) == flops.worst_case

    # state_dict round trip: a fresh distiller of the same candidate predicts identically.
    with torch.no_grad():  # move BN running stats away from their init
        distiller.train()
        distiller(images)
    clone = _build(case, teacher, seed=123)
    clone.load_state_dict(distiller.state_dict())
    distiller.eval()
    clone.eval()
    with torch.no_grad():
        assert torch.equal(distiller.predict(images), clone.predict(images))
        teacher_out = _teacher_outputs(teacher, distiller, images)
        first = distiller.loss(distiller(images), teacher_out, labels, epoch=3)
        second = clone.loss(clone(images), teacher_out, labels, epoch=3)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_a_structure_and_its_loss_part_share_one_params_class(name: str, teacher: ZooModel) -> None:
    """What a candidate's ``structure.*`` sets is what the structure's loss reads: no second
    Params class a candidate could not reach."""
    structure = STRUCTURES.get(name)
    if structure.loss_part is not None:
        assert structure.loss_part.Params is structure.Params
    distiller = _build((name, "kd", "none", False), teacher)
    part = distiller.parts["structure"] if "structure" in distiller.parts else None
    assert part is None or part.params is distiller.student.params
