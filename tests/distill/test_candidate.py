"""Candidate: strict parsing with dotted paths, exact YAML round trips, dotted-path editing."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import yaml

from autosplit.config import DataConfig, TeacherConfig, TrainConfig, from_dict
from autosplit.distill.candidate import (
    Candidate,
    PartSpec,
    SplitSpec,
    StudentSpec,
    load_candidate,
)
from autosplit.distill.registry import FEATURE_LOSSES, LOGIT_LOSSES, STRUCTURES
from autosplit.errors import UserError

# One sensible candidate per structure (the splits each structure needs).
STRUCTURE_CASES: dict[str, dict[str, Any]] = {
    "single": {},
    "assistant": {
        "split": SplitSpec(budget_share=0.8, base_share=0.6),
        "structure": PartSpec("assistant", (("mimic_weight", 2.0), ("mimic_stages", "last"))),
    },
    "res_chain": {
        "split": SplitSpec(base_share=0.5, part_width=0.3),
        "structure": PartSpec(
            "res_chain", (("n_parts", 3), ("exit_threshold", 0.9), ("residual", "mse"))
        ),
        "student": StudentSpec(family="tiny", part_family="resnet8", part_depth=14),
    },
    "branches": {
        "structure": PartSpec("branches", (("mix_alpha", 0.25), ("hidden", 32))),
        "twi": True,
        "schedule": "staged",
    },
}


def make(**overrides: Any) -> Candidate:
    values: dict[str, Any] = {
        "data": DataConfig(name="digits"),
        "teacher": TeacherConfig("tiny", width=2.0),
        "max_flops": 40_000,
        "student": StudentSpec(family="tiny"),
        "logit_loss": PartSpec("dkd", (("beta", 2.0),)),
        "train": TrainConfig(epochs=2, milestones=(1,)),
    }
    values.update(overrides)
    return Candidate(**values)


def plain(**overrides: Any) -> dict[str, Any]:
    return make(**overrides).to_dict()


@pytest.mark.parametrize(
    ("field", "registry"),
    [("structure", STRUCTURES), ("logit_loss", LOGIT_LOSSES), ("feature_loss", FEATURE_LOSSES)],
)
def test_every_registered_part_is_checked_against_its_own_params(field: str, registry) -> None:
    """A part is named by its registry key and validated against that entry's ``Params``: its
    defaults spelled out are accepted and round-trip; any other key is refused, naming them."""
    make()  # validation fills the registries
    for name in STRUCTURE_CASES if field == "structure" else registry:
        defaults = dataclasses.asdict(registry.get(name).Params())
        base = dict(STRUCTURE_CASES[name]) if field == "structure" else {}
        spelled = make(**{**base, field: PartSpec(name, tuple(defaults.items()))})
        assert Candidate.from_dict(spelled.to_dict()) == spelled
        known = ", ".join(defaults) or "(none)"
        with pytest.raises(
            UserError,
            match=re.escape(f"{field}.bogus: unknown key") + ".*" + re.escape(f"{name!r}: {known}"),
        ):
            make(**{**base, field: PartSpec(name, (("bogus", 1),))})


@pytest.mark.parametrize("name", sorted(STRUCTURE_CASES))
def test_yaml_round_trip_is_exact_for_every_structure(name: str, tmp_path) -> None:
    candidate = make(**STRUCTURE_CASES[name])
    text = candidate.to_yaml()
    again = Candidate.from_dict(yaml.safe_load(text))
    assert again == candidate and hash(again) == hash(candidate)
    assert again.to_yaml() == text
    path = tmp_path / "candidate.yaml"
    path.write_text(text)
    assert load_candidate(path) == candidate


def test_part_yaml_form_is_flat_and_defaults_are_filled() -> None:
    data = plain()
    assert data["logit_loss"] == {
        "name": "dkd",
        "alpha": 1.0,
        "beta": 2.0,
        "ce_weight": 1.0,
        "temperature": 4.0,
        "warmup_epochs": 20,
    }
    data["structure"] = "res_chain"  # a bare name is accepted and completed
    data["split"]["base_share"] = 0.5
    data["logit_loss"] = {"name": "kd", "temperature": 2}  # int for a float param
    candidate = Candidate.from_dict(data)
    assert candidate.structure == PartSpec(
        "res_chain",
        {
            "n_parts": 2,
            "exit_threshold": None,
            "residual": "kd",
            "residual_weight": 1.0,
            "calibration_share": 0.1,
            "exit_max_drop": 0.1,
            "exit_flops_share": None,
        },
    )
    assert candidate.logit_loss.get("temperature") == 2.0
    assert isinstance(candidate.logit_loss.get("temperature"), float)
    assert candidate == make(
        structure=PartSpec("res_chain"),
        split=SplitSpec(base_share=0.5),
        logit_loss=PartSpec("kd", (("temperature", 2.0),)),
    )


def test_part_params_are_sorted_pairs_whatever_the_order_given() -> None:
    a = PartSpec("kd", (("temperature", 2.0), ("ce_weight", 0.5)))
    b = PartSpec("kd", {"ce_weight": 0.5, "temperature": 2.0})
    assert a == b and hash(a) == hash(b)
    assert a.params == (("ce_weight", 0.5), ("temperature", 2.0))
    assert a.get("temperature") == 2.0 and a.get("missing", 7) == 7
    assert a.as_dict() == {"ce_weight": 0.5, "temperature": 2.0}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["student"].update(widht=1.0), "student.widht: unknown key; known keys here: "),
        (lambda d: d["teacher"]["train"].update(lrr=0.1), "teacher.train.lrr: unknown key"),
        (lambda d: d.update(colour="red"), "colour: unknown key"),
        (lambda d: d.pop("max_flops"), "max_flops: missing key"),
        (lambda d: d["teacher"].pop("model"), "teacher.model: missing key"),
        (lambda d: d["structure"].pop("name"), "structure.name: missing key"),
        (
            lambda d: d["logit_loss"].update(gamma=1.0),
            "logit_loss.gamma: unknown key; known keys for logit loss 'dkd': alpha, beta, ",
        ),
        (
            lambda d: d["structure"].update(name="resnet"),
            "structure.name: unknown structure 'resnet'; known: assistant, branches, res_chain, single",
        ),
        (
            lambda d: d["logit_loss"].update(name="kl"),
            "logit_loss.name: unknown logit loss 'kl'; known: ",
        ),
        (
            lambda d: d["feature_loss"].update(name="crd"),
            "feature_loss.name: unknown feature loss 'crd'",
        ),
        (lambda d: d["logit_loss"].update(beta="high"), "logit_loss.beta: expected a number"),
        (
            lambda d: d["logit_loss"].update(beta=[1, 2]),
            "logit_loss.beta: expected a number, string",
        ),
        (lambda d: d.update(structure=3), "structure: expected a mapping"),
        (lambda d: d.update(schedule="async"), "schedule: 'async' is not one of 'joint', 'staged'"),
        (lambda d: d.update(max_flops=0), "max_flops: must be a positive integer"),
        (lambda d: d["split"].update(budget_share=1.5), "split.budget_share: must be in (0, 1]"),
        (
            lambda d: d["student"].update(family="resnet9"),
            "student.family: unknown model 'resnet9'",
        ),
    ],
)
def test_from_dict_is_strict_and_names_the_dotted_path(edit, message: str) -> None:
    data = plain()
    edit(data)
    with pytest.raises(UserError) as error:
        Candidate.from_dict(data)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"structure": PartSpec("single", (("n_parts", 2),))},
            "structure.n_parts: unknown key; known keys for structure 'single': (none)",
        ),
        (
            {"split": SplitSpec(part_width=0.5)},
            "split.part_width: structure 'single' has no residual",
        ),
        (
            {
                "student": StudentSpec(family="tiny", part_family="tiny"),
                "structure": PartSpec("branches"),
            },
            "student.part_family: structure 'branches' has no",
        ),
        ({"structure": PartSpec("assistant")}, "split.base_share: 1.0 gives the whole budget"),
        (
            {"structure": PartSpec("branches", (("mix_alpha", 0.5),))},
            "set twi: true, or mix_alpha: 0",
        ),
        (
            {"structure": PartSpec("branches", (("mix_alpha", 1.5),)), "twi": True},
            "structure.mix_alpha: must be in [0, 1]",
        ),
        (
            {
                "structure": PartSpec("res_chain", (("n_parts", 0),)),
                "split": SplitSpec(base_share=0.5),
            },
            "structure.n_parts: must be >= 1",
        ),
        (
            {
                "structure": PartSpec("res_chain", (("residual", "l1"),)),
                "split": SplitSpec(base_share=0.5),
            },
            "structure.residual: 'l1' is not one of 'kd', 'mse'",
        ),
    ],
)
def test_nonsensical_combinations_are_refused_with_a_reason(overrides: dict, message: str) -> None:
    with pytest.raises(UserError) as error:
        make(**overrides)
    assert message in str(error.value)


def test_flat_gives_dotted_scalars_and_with_values_inverts_it() -> None:
    candidate = make(**STRUCTURE_CASES["res_chain"])
    flat = candidate.flat()
    assert flat["structure.name"] == "res_chain" and flat["structure.n_parts"] == 3
    assert flat["split.part_width"] == 0.3 and flat["teacher.train.lr"] == 0.05
    assert flat["logit_loss.beta"] == 2.0 and flat["train.milestones"] == (1,)
    assert all(not isinstance(v, dict | list) for v in flat.values())
    assert candidate.with_values(flat) == candidate
    assert candidate.with_values({}) == candidate


def test_with_values_sets_by_dotted_path_and_validates() -> None:
    candidate = make()
    chain = candidate.with_values(
        {
            "structure.name": "res_chain",
            "structure.n_parts": 3,
            "split.base_share": 0.4,
            "train.lr": 0.1,
            "twi": True,
        }
    )
    assert chain.structure.get("n_parts") == 3 and chain.structure.get("residual") == "kd"
    assert chain.split.base_share == 0.4 and chain.train.lr == 0.1 and chain.twi
    assert chain.logit_loss == candidate.logit_loss  # untouched parts keep their params
    # a new part name drops the old part's params (dkd's beta means nothing to kd) ...
    kd = candidate.with_values({"logit_loss.name": "kd", "logit_loss.temperature": 3.0})
    assert (
        kd.logit_loss
        == from_dict(
            Candidate, {**plain(), "logit_loss": {"name": "kd", "temperature": 3.0}}
        ).logit_loss
    )
    # ... and the same name keeps them
    assert candidate.with_values({"logit_loss.name": "dkd"}).logit_loss.get("beta") == 2.0
    for dotted, message in [
        ({"student.famliy": "tiny"}, "student.famliy: unknown key"),
        ({"studnet.family": "tiny"}, "studnet: unknown key"),
        ({"max_flops.unit": "M"}, "max_flops.unit: max_flops is a value, not a section"),
        ({"split.budget_share": 0.0}, "split.budget_share: must be in (0, 1]"),
        ({"structure.n_parts": 2}, "structure.n_parts: unknown key"),
    ]:
        with pytest.raises(UserError) as error:
            candidate.with_values(dotted)
        assert message in str(error.value)


def test_load_candidate_names_the_file(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    data = plain()
    data["split"]["base_shar"] = 0.5
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"bad\.yaml: split\.base_shar: unknown key"):
        load_candidate(path)
