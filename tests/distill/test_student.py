"""Student structures, their FLOPs by part, the width solver's split, and ResKD's early exit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from autosplit.config import DataConfig, TeacherConfig
from autosplit.device import resolve_runtime
from autosplit.distill.candidate import Candidate, PartSpec, SplitSpec, StudentSpec
from autosplit.distill.exit import (
    calibrate_threshold,
    candidate_thresholds,
    exit_points,
    exit_profile,
    measure_exit,
)
from autosplit.distill.student import (
    Student,
    build_student,
    expected_flops,
    student_flops,
)
from autosplit.errors import UserError
from autosplit.flops import count_flops
from autosplit.loader import Batch
from autosplit.models import create_model
from autosplit.modules import resize

SHAPE = (1, 8, 8)
CLASSES = 10
BUDGET = 32_000  # about half the teacher (tiny at width 2: 65k FLOPs)

STRUCTURES: dict[str, dict[str, Any]] = {
    "single": {},
    "assistant": {"structure": PartSpec("assistant"), "split": SplitSpec(base_share=0.6)},
    "res_chain": {
        "split": SplitSpec(base_share=0.5),
        "structure": PartSpec("res_chain", (("n_parts", 3),)),
    },
    "branches": {"structure": PartSpec("branches", (("n_parts", 2),))},
    "branches_mixed": {
        "structure": PartSpec("branches", (("n_parts", 2), ("mix_alpha", 0.5))),
        "twi": True,
    },
    "assistant_twi": {
        "structure": PartSpec("assistant"),
        "split": SplitSpec(base_share=0.6),
        "twi": True,
    },
}


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tiny", num_classes=CLASSES, in_channels=1, width=2.0).eval()


def candidate(case: str = "single", **overrides: Any) -> Candidate:
    values: dict[str, Any] = {
        "data": DataConfig(name="digits"),
        "teacher": TeacherConfig("tiny", width=2.0),
        "max_flops": BUDGET,
        "student": StudentSpec(family="tiny"),
    }
    values.update(STRUCTURES[case])
    values.update(overrides)
    return Candidate(**values)


def build(teacher: nn.Module, case: str = "single", **overrides: Any) -> Student:
    torch.manual_seed(1)
    return build_student(
        candidate(case, **overrides),
        num_classes=CLASSES,
        in_channels=1,
        input_shape=SHAPE,
        teacher=teacher,
    )


@pytest.fixture(scope="module")
def students(teacher: nn.Module) -> dict[str, Student]:
    return {case: build(teacher, case) for case in STRUCTURES}


@pytest.mark.parametrize("case", sorted(STRUCTURES))
def test_output_shapes(students: dict[str, Student], teacher: nn.Module, case: str) -> None:
    student, images = students[case], torch.randn(4, *SHAPE)
    student.train()
    outputs = student.forward_train(images)
    assert outputs["logits"].shape == (4, CLASSES)
    assert outputs["base_taps"]["pooled"].shape == (4, student.base.tap("pooled").channels)
    student.eval()
    assert student(images).shape == (4, CLASSES)
    teacher_map = teacher.forward_stages(images)["stage2"]  # (4, 32, 2, 2)
    teacher_pooled = teacher.head.in_features
    if student.kind == "assistant":
        assert outputs["feat_base"].shape == outputs["feat_assistant"].shape == teacher_map.shape
        assert len(student.parts) == 1
    elif student.kind == "res_chain":
        assert len(outputs["partial_logits"]) == 4 and len(outputs["part_logits"]) == 3
        assert all(
            z.shape == (4, CLASSES) for z in outputs["partial_logits"] + outputs["part_logits"]
        )
    elif student.kind == "branches":
        assert outputs["pooled_proj"].shape == (4, teacher_pooled)
        assert [d.shape for d in outputs["deltas"]] == [(4, teacher_pooled)] * 2
        assert [z.shape for z in outputs["recon_logits"]] == [(4, CLASSES)] * 2
        assert outputs["proj_logits"].shape == outputs["logits_student"].shape == (4, CLASSES)
        assert len(student.parts) == 2


def test_res_chain_logits_are_the_sum_of_its_parts(students: dict[str, Student]) -> None:
    student, images = students["res_chain"], torch.randn(6, *SHAPE)
    student.eval()
    with torch.no_grad():
        outputs = student.forward_train(images)
        by_hand = student.base(images) + sum(part(images) for part in student.parts)
        deployed = student(images)
    partial, parts = outputs["partial_logits"], outputs["part_logits"]
    torch.testing.assert_close(partial[0], outputs["base_taps"]["logits"])
    for k in range(1, 4):
        torch.testing.assert_close(partial[k], partial[k - 1] + parts[k - 1])
    torch.testing.assert_close(outputs["logits"], partial[-1])
    torch.testing.assert_close(deployed, by_hand)
    torch.testing.assert_close(deployed, partial[-1])


def test_branches_mix_the_base_and_the_teacher_head(students: dict[str, Student]) -> None:
    images = torch.randn(4, *SHAPE)
    for case, alpha in (("branches", 0.0), ("branches_mixed", 0.5)):
        student = students[case].eval()
        with torch.no_grad():
            outputs, deployed = student.forward_train(images), student(images)
        mixed = (1 - alpha) * outputs["logits_student"] + alpha * outputs["recon_logits"][-1]
        torch.testing.assert_close(outputs["logits"], mixed)
        torch.testing.assert_close(deployed, mixed)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_branches_run_the_teacher_head_once_per_forward(teacher: nn.Module, alpha: float) -> None:
    """ERA deployed: one head pass on f^(M), the logits of the former pass per branch; fvcore's
    count of the head is that one pass; training also classifies every f^(i) in one call."""
    student = build(
        teacher,
        structure=PartSpec("branches", (("n_parts", 3), ("mix_alpha", alpha))),
        twi=True,
    ).eval()
    head = student.teacher_head
    with torch.no_grad():  # a bias far from zero: a bias added M times would show
        head.bias.copy_(torch.linspace(-3.0, 3.0, CLASSES))
        for branch in student.parts:  # BN's affine at init makes a branch's Delta_i small
            branch[-1].weight.fill_(2.0)
    calls: list[int] = []
    hook = head.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
    images = torch.randn(5, *SHAPE)
    try:
        with torch.no_grad():
            deployed = student(images)
            assert calls == [5]  # once, on the batch
            outputs = student.forward_train(images)
            assert calls == [5, 4 * 5]  # P f_S and f^(1..3), stacked: one call
            # The former procedure: the head on every f^(i), keeping the last.
            pooled = student.base.pool(student.base.forward_stages(images)["stage2"])
            recon = student.projector(pooled)
            for branch in student.parts:
                recon = recon + branch(pooled)
                former = head(recon)
    finally:
        hook.remove()
    expected = former if alpha == 1.0 else 0.5 * student.base.head(pooled) + 0.5 * former
    torch.testing.assert_close(deployed, expected)
    torch.testing.assert_close(outputs["recon_logits"][-1], former)
    torch.testing.assert_close(outputs["proj_logits"], head(student.projector(pooled)))
    flops = student_flops(student, SHAPE)
    assert flops.by_part["teacher_head"] == head.in_features * head.out_features


def test_deployed_flops_count_what_runs(students: dict[str, Student]) -> None:
    def alone(module: nn.Module) -> int:
        return count_flops(module, SHAPE)

    for case, student in students.items():
        flops = student_flops(student, SHAPE)
        assert sum(flops.by_part.values()) == flops.worst_case == alone(student), case
        assert list(flops.by_part) == [name for name, _ in student.inference_modules()]
    # ERA with mix_alpha 0 deploys the base alone; > 0 adds branches, projector, teacher head
    plain = student_flops(students["branches"], SHAPE)
    assert plain.by_part == {"base": alone(students["branches"].base)}
    mixed = student_flops(students["branches_mixed"], SHAPE)
    assert set(mixed.by_part) == {"base", "projector", "branch1", "branch2", "teacher_head"}
    assert mixed.worst_case > alone(students["branches_mixed"].base)
    assert all(mixed.by_part[name] > 0 for name in mixed.by_part)
    # RKD: the assistant, both adapters and the new head are counted on top of the base
    flops = student_flops(students["assistant"], SHAPE)
    assert flops.by_part["assistant"] > 0 and flops.by_part["adapter_base"] > 0
    assert flops.worst_case > flops.by_part["base"]
    # ResKD: every res-student counted once
    chain = students["res_chain"]
    flops = student_flops(chain, SHAPE)
    assert flops.worst_case == alone(chain.base) + sum(alone(part) for part in chain.parts)
    assert [flops.by_part[f"res{k}"] for k in (1, 2, 3)] == [alone(chain.res1)] * 3
    assert expected_flops(flops, [1.0, 1.0, 1.0]) == flops.worst_case
    assert expected_flops(flops, [0.0, 0.0, 0.0]) == flops.by_part["base"]
    assert expected_flops(flops, [0.5, 0.5, 0.0]) == pytest.approx(
        flops.by_part["base"] + flops.by_part["res1"]
    )


@pytest.mark.parametrize("case", sorted(STRUCTURES))
def test_solved_widths_fit_the_budget_and_follow_base_share(
    students: dict[str, Student], case: str
) -> None:
    student = students[case]
    flops = student_flops(student, SHAPE)
    assert 0.75 * BUDGET <= flops.worst_case <= BUDGET  # widest that fits, not just any fit
    if student.kind in ("assistant", "res_chain"):
        share = candidate(case).split.base_share
        base_side = flops.by_part["base"] + flops.by_part.get("adapter_base", 0)
        assert abs(base_side / BUDGET - share) < 0.12
        assert student.part_width is not None
    else:
        assert student.part_width is None


def test_budget_share_scales_the_target(teacher: nn.Module) -> None:
    student = build(teacher, "res_chain", split=SplitSpec(budget_share=0.5, base_share=0.5))
    assert student_flops(student, SHAPE).worst_case <= 0.5 * BUDGET


def test_explicit_widths_are_honoured(teacher: nn.Module) -> None:
    def shapes(module: nn.Module) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in module.parameters()]

    student = build(
        teacher, "res_chain", split=SplitSpec(base_share=0.5, base_width=0.5, part_width=0.25)
    )
    assert (student.base_width, student.part_width) == (0.5, 0.25)
    assert shapes(student.base) == shapes(
        create_model("tiny", num_classes=CLASSES, in_channels=1, width=0.5)
    )
    narrow = create_model("tiny", num_classes=CLASSES, in_channels=1, width=0.25)
    assert all(shapes(part) == shapes(narrow) for part in student.parts)
    # pinned base, solved parts
    half = build(teacher, "assistant", split=SplitSpec(base_share=0.6, base_width=0.5))
    assert half.base_width == 0.5 and half.part_width not in (None, 0.5)


def test_too_small_a_budget_says_which_part(teacher: nn.Module) -> None:
    with pytest.raises(UserError, match="res-students: no width fits"):
        build(teacher, "res_chain", max_flops=5_000, split=SplitSpec(base_share=0.95))


@pytest.mark.parametrize("case", ["branches", "branches_mixed", "assistant_twi"])
def test_teacher_head_copy_is_frozen_and_equal(
    students: dict[str, Student], teacher: nn.Module, case: str
) -> None:
    student = students[case]
    head = student.head if student.kind == "assistant" else student.teacher_head
    assert head is not teacher.head
    assert all(not p.requires_grad for p in head.parameters())
    torch.testing.assert_close(head.weight, teacher.head.weight, rtol=0, atol=0)
    torch.testing.assert_close(head.bias, teacher.head.bias, rtol=0, atol=0)
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert len(trainable) == len(list(student.parameters())) - 2


def test_assistant_without_twi_has_a_new_trainable_head(students: dict[str, Student]) -> None:
    assert all(p.requires_grad for p in students["assistant"].head.parameters())


def test_reusing_a_head_with_other_classes_is_refused() -> None:
    five_classes = create_model("tiny", num_classes=5, in_channels=1, width=2.0)
    with pytest.raises(UserError, match="teacher: its head has 5 classes, the data 10"):
        build(five_classes, "branches")


def test_resize_pools_down_and_interpolates_up() -> None:
    feature_map = torch.arange(16.0).view(1, 1, 4, 4)
    assert resize(feature_map, (4, 4)) is feature_map
    torch.testing.assert_close(resize(feature_map, (1, 1)), feature_map.mean().view(1, 1, 1, 1))
    assert resize(feature_map, (8, 8)).shape == (1, 1, 8, 8)


# --- early exit (ResKD) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(students: dict[str, Student]) -> Student:
    student = students["res_chain"]
    with torch.no_grad():  # sharpen the random heads so confidences spread over (0, 1)
        for model in (student.base, *student.parts):
            model.head.weight.mul_(20.0)
    return student.eval()


def _loader(n_batches: int = 4, batch: int = 16) -> list[Batch]:
    gen = torch.Generator().manual_seed(3)
    return [
        Batch(
            images=torch.randn(batch, *SHAPE, generator=gen),
            labels=torch.randint(0, CLASSES, (batch,), generator=gen),
            indices=torch.arange(batch),
            view=0,
        )
        for _ in range(n_batches)
    ]


def test_gated_forward_gives_each_sample_its_exit_logits(chain: Student) -> None:
    loader = _loader()
    profile = exit_profile(chain, loader, resolve_runtime("cpu"))
    assert profile.confidence.shape == profile.correct.shape == (64, 4)
    # θ between two observed confidences, in the widest gap near the median: a θ equal to
    # one sample's confidence would make that sample's exit depend on the last bit, which
    # differs between the batched and the full forward.
    observed = torch.unique(profile.confidence[:, :3].double())  # sorted
    middle = observed.numel() // 2
    window = observed[middle - 8 : middle + 9]
    gaps = window[1:] - window[:-1]
    widest = int(gaps.argmax())
    assert float(gaps[widest]) > 1e-4  # far wider than fp32 rounding of a softmax
    theta = float((window[widest] + window[widest + 1]) / 2)
    points = exit_points(profile, theta)
    assert len(points.unique()) >= 3  # samples leave at different partial sums
    images = torch.cat([b.images for b in loader])
    with torch.no_grad():
        partial = chain.forward_train(images)["partial_logits"]
        chain.exit_threshold = theta
        try:
            gated = chain(images)
        finally:
            chain.exit_threshold = None
    expected = torch.stack([partial[k][i] for i, k in enumerate(points.tolist())])
    torch.testing.assert_close(gated, expected)


def test_threshold_extremes(chain: Student) -> None:
    profile = exit_profile(chain, _loader(), resolve_runtime("cpu"))
    flops = student_flops(chain, SHAPE)
    never = measure_exit(profile, flops, 1.0 + 1e-6)
    assert never.reach_rates == [1.0, 1.0, 1.0] and never.expected_flops == flops.worst_case
    no_gate = measure_exit(profile, flops, None)
    assert (no_gate.reach_rates, no_gate.expected_flops) == (
        never.reach_rates,
        never.expected_flops,
    )
    always = measure_exit(profile, flops, 0.0)
    assert always.reach_rates == [0.0, 0.0, 0.0] and always.expected_flops == flops.by_part["base"]
    assert always.accuracy == pytest.approx(100.0 * profile.correct[:, 0].float().mean().item())
    images = _loader()[0].images
    with torch.no_grad():
        chain.exit_threshold = 0.0
        exits_at_base = chain(images)
        chain.exit_threshold = 1.0 + 1e-6
        runs_to_the_end = chain(images)
        chain.exit_threshold = None
        torch.testing.assert_close(exits_at_base, chain.base(images))
        torch.testing.assert_close(runs_to_the_end, chain(images))


def test_calibration_meets_a_flops_or_accuracy_target(chain: Student) -> None:
    profile = exit_profile(chain, _loader(), resolve_runtime("cpu"))
    flops = student_flops(chain, SHAPE)
    all_choices = [measure_exit(profile, flops, t) for t in candidate_thresholds(profile)]
    target = flops.by_part["base"] + 0.5 * (flops.worst_case - flops.by_part["base"])
    choice = calibrate_threshold(profile, flops, target_expected_flops=target)
    assert choice.expected_flops <= target
    assert choice.accuracy == max(c.accuracy for c in all_choices if c.expected_flops <= target)
    measured = measure_exit(profile, flops, choice.threshold)
    assert measured.reach_rates == choice.reach_rates
    assert choice.reach_rates == sorted(choice.reach_rates, reverse=True)
    assert 0.0 < sum(choice.reach_rates) < 3.0  # some samples exit early, some go on
    goal = sorted(c.accuracy for c in all_choices)[len(all_choices) // 2]
    cheap = calibrate_threshold(profile, flops, target_accuracy=goal)
    assert cheap.accuracy >= goal
    assert cheap.expected_flops == min(c.expected_flops for c in all_choices if c.accuracy >= goal)
