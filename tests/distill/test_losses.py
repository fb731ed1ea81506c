"""Hand-checkable values and invariants of the pure distillation losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from autosplit.distill.losses import (
    aekt_loss,
    aekt_weight,
    dkd_loss,
    era_residual_loss,
    era_targets,
    factor_distance,
    hint_loss,
    iekd_loss,
    kd_loss,
    normalized_mse,
    reskd_residual_mse,
    tckd_nckd,
)

N_CLASSES = 10


def _logits(seed: int, batch: int = 8, scale: float = 3.0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, N_CLASSES, generator=gen)
    teacher = scale * torch.randn(batch, N_CLASSES, generator=gen)
    labels = torch.randint(0, N_CLASSES, (batch,), generator=gen)
    return student, teacher, labels


def _p_target(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits / temperature, dim=1).gather(1, labels[:, None]).squeeze(1)


# ---- KD ------------------------------------------------------------------------------------


def test_kd_of_identical_logits_is_zero() -> None:
    student, _, _ = _logits(0)
    assert kd_loss(student, student.clone(), temperature=4.0).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_matches_hand_computed_two_class_value(temperature: float) -> None:
    # Teacher logits tau*[ln 3, 0] give p_T = [3/4, 1/4] at any tau; the student is uniform.
    teacher = torch.tensor([[temperature * math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected = temperature**2 * kl
    assert kd_loss(student, teacher, temperature=temperature).item() == pytest.approx(expected)


def test_kd_is_non_negative_and_a_batch_mean() -> None:
    student, teacher, _ = _logits(1)
    per_sample = [
        kd_loss(row_student[None], row_teacher[None], temperature=4.0)
        for row_student, row_teacher in zip(student, teacher, strict=True)
    ]
    assert all(value.item() > 0 for value in per_sample)
    batch = kd_loss(student, teacher, temperature=4.0)
    assert batch.dim() == 0
    assert batch.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-5)


def test_kd_gradient_reaches_only_the_student() -> None:
    student, teacher, _ = _logits(2)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    kd_loss(student, teacher, temperature=4.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


# ---- DKD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_tckd_plus_weighted_nckd_is_kd_per_sample(temperature: float) -> None:
    student, teacher, labels = _logits(3)
    tckd, nckd = tckd_nckd(student, teacher, labels, temperature=temperature)
    assert tckd.shape == nckd.shape == labels.shape
    assert (tckd >= 0).all() and (nckd >= 0).all()
    weight = 1 - _p_target(teacher, labels, temperature)
    for i in range(len(labels)):
        kd_i = kd_loss(student[i : i + 1], teacher[i : i + 1], temperature=temperature)
        expected = kd_i.item() / temperature**2
        assert (tckd[i] + weight[i] * nckd[i]).item() == pytest.approx(expected, rel=1e-5)


def test_tckd_nckd_hand_values_three_classes() -> None:
    # Target 0. Teacher p = [1/2, 1/4, 1/4]; student uniform. Non-target parts are both uniform.
    teacher = torch.log(torch.tensor([[2.0, 1.0, 1.0]]))
    student = torch.zeros(1, 3)
    tckd, nckd = tckd_nckd(student, teacher, torch.tensor([0]), temperature=1.0)
    expected_tckd = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    assert tckd.item() == pytest.approx(expected_tckd, rel=1e-6)
    assert nckd.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("seed", [4, 5, 6])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_with_kd_weights_equals_kd(seed: int, temperature: float) -> None:
    student, teacher, labels = _logits(seed)
    beta = 1 - _p_target(teacher, labels, temperature)  # per-sample (B,)
    dkd = dkd_loss(student, teacher, labels, alpha=1.0, beta=beta, temperature=temperature)
    kd = kd_loss(student, teacher, temperature=temperature)
    assert dkd.item() == pytest.approx(kd.item(), abs=1e-5)


def test_dkd_float_weights_and_tau_squared_scaling() -> None:
    student, teacher, labels = _logits(7)
    tckd, nckd = tckd_nckd(student, teacher, labels, temperature=4.0)
    expected = 16.0 * (2.0 * tckd + 8.0 * nckd).mean()
    got = dkd_loss(student, teacher, labels, alpha=2.0, beta=8.0, temperature=4.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_dkd_is_finite_for_saturated_logits() -> None:
    # One-hot-like teacher and a student confidently wrong: naive log(softmax) would hit log(0).
    teacher = torch.tensor([[300.0, -300.0, 0.0], [-300.0, 300.0, 0.0]])
    student = torch.tensor([[-300.0, 300.0, 0.0], [300.0, -300.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = dkd_loss(student, teacher, labels, alpha=1.0, beta=8.0, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("loss", ["kd", "dkd", "aekt"])
def test_softmax_losses_compute_in_fp32_under_cpu_bf16_autocast(loss: str) -> None:
    # CPU bf16 autocast runs log_softmax and logsumexp in bf16 on a bf16 student's logits; the
    # losses must give what fp32 gives on the same (bf16-rounded) logits, in fp32.
    student, teacher, labels = _logits(7, batch=64)
    student = student.bfloat16()
    losses = {
        "kd": lambda s: kd_loss(s, teacher, temperature=4.0),
        "dkd": lambda s: dkd_loss(s, teacher, labels, beta=8.0, temperature=4.0),
        "aekt": lambda s: aekt_loss(s, teacher, labels, w_min=0.5, w_max=2.0),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = losses[loss](student)
    in_fp32 = losses[loss](student.float())
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(in_fp32.item(), rel=1e-6)


# ---- AEKT ----------------------------------------------------------------------------------


def test_aekt_with_fixed_weight_is_weighted_tckd_nckd() -> None:
    student, teacher, labels = _logits(8)
    weight = torch.linspace(0.5, 2.0, len(labels))
    tckd, nckd = tckd_nckd(student, teacher, labels, temperature=4.0)
    expected = 16.0 * (3.0 * nckd + weight * tckd).mean()
    got = aekt_loss(
        student, teacher, labels, beta=3.0, temperature=4.0, w_min=0.0, w_max=1.0, weight=weight
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_aekt_weight_is_detached_clipped_ratio() -> None:
    student, teacher, labels = _logits(9, batch=64)
    student.requires_grad_(True)
    ratio = _p_target(teacher, labels, 4.0) / _p_target(student.detach(), labels, 4.0)
    weight = aekt_weight(student, teacher, labels, temperature=4.0, w_min=0.5, w_max=2.0)
    assert not weight.requires_grad and weight.grad_fn is None
    assert torch.allclose(weight, ratio.clamp(0.5, 2.0), rtol=1e-5)
    assert (weight == 0.5).any() and (weight == 2.0).any()  # both bounds are active here
    squared = aekt_weight(student, teacher, labels, temperature=4.0, w_min=0.5, w_max=2.0, power=2)
    assert torch.allclose(squared, weight**2)


def test_aekt_adaptive_weight_gets_no_gradient() -> None:
    # The gradient must be that of the loss with the weight frozen at its current value.
    student, teacher, labels = _logits(10)
    bounds = {"w_min": 0.1, "w_max": 10.0, "temperature": 4.0}
    adaptive = student.clone().requires_grad_(True)
    aekt_loss(adaptive, teacher, labels, **bounds).backward()
    frozen = student.clone().requires_grad_(True)
    weight = aekt_weight(student, teacher, labels, **bounds)
    aekt_loss(frozen, teacher, labels, weight=weight, **bounds).backward()
    assert adaptive.grad is not None and frozen.grad is not None
    assert torch.allclose(adaptive.grad, frozen.grad, atol=1e-7)


# ---- FitNets / RKD -------------------------------------------------------------------------


def test_hint_and_normalized_mse() -> None:
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    assert hint_loss(pred, target).item() == pytest.approx(2.0)  # (0 + 4 + 0 + 4) / 4
    assert normalized_mse(pred, target).item() == pytest.approx(2.0 / 3.5)  # mean(t^2) = 14/4
    assert normalized_mse(10 * pred, 10 * target).item() == pytest.approx(2.0 / 3.5)
    target.requires_grad_(True)
    normalized_mse(pred.requires_grad_(True), target).backward()
    assert target.grad is None


# ---- IE-KD ---------------------------------------------------------------------------------


def test_factor_distance_zero_scale_invariant_and_hand_value() -> None:
    a = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(11))
    b = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(12))
    assert factor_distance(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert factor_distance(5.0 * a, b).item() == pytest.approx(factor_distance(a, b).item())
    per_sample_scale = torch.tensor([0.1, 1.0, 7.0, 30.0]).view(4, 1, 1, 1)
    assert factor_distance(a * per_sample_scale, b).item() == pytest.approx(
        factor_distance(a, b).item()
    )
    # phi([3, 0]) = [1, 0], phi([0, 2]) = [0, 1]: mean |difference| = 1.
    assert factor_distance(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 2.0]])).item() == 1.0


def test_iekd_exploration_term_has_opposite_sign() -> None:
    teacher = torch.tensor([[1.0, 0.0]])
    near, far = torch.tensor([[1.0, 0.1]]), torch.tensor([[0.0, 1.0]])
    weights = {"lambda_inherit": 100.0, "lambda_explore": 10.0}
    # Moving the exploring factor away from the teacher lowers the loss ...
    assert iekd_loss(near, far, teacher, **weights) < iekd_loss(near, near, teacher, **weights)
    # ... moving the inheriting factor away raises it.
    assert iekd_loss(far, near, teacher, **weights) > iekd_loss(near, near, teacher, **weights)
    expected = 100.0 * factor_distance(near, teacher) - 10.0 * factor_distance(far, teacher)
    assert iekd_loss(near, far, teacher, **weights).item() == pytest.approx(expected.item())


# ---- ERA -----------------------------------------------------------------------------------


def test_era_targets_are_progressive_residuals_and_detached() -> None:
    gen = torch.Generator().manual_seed(13)
    feat_teacher = torch.randn(4, 6, generator=gen).requires_grad_(True)
    projected = torch.randn(4, 6, generator=gen).requires_grad_(True)
    deltas = [torch.randn(4, 6, generator=gen).requires_grad_(True) for _ in range(3)]
    targets = era_targets(feat_teacher, projected, deltas)
    assert len(targets) == 3
    assert all(not r.requires_grad and r.grad_fn is None for r in targets)
    assert torch.allclose(targets[0], feat_teacher - projected)
    for i in range(2):
        assert torch.allclose(targets[i + 1], targets[i] - deltas[i])


def test_era_residual_loss_hand_value() -> None:
    zeros = torch.zeros(2, 3)
    deltas = [torch.full((2, 3), 1.0), torch.full((2, 3), 2.0), torch.full((2, 3), 4.0)]
    # MSEs are 1, 4, 16; weights 1, 0.5, 0.25 -> (1 + 2 + 4) / 3.
    loss = era_residual_loss(deltas, [zeros] * 3, gamma=0.5)
    assert loss.item() == pytest.approx(7.0 / 3.0)
    with pytest.raises(ValueError):
        era_residual_loss(deltas, [zeros] * 2)


# ---- ResKD ---------------------------------------------------------------------------------


def test_reskd_residual_target_is_detached() -> None:
    logits_res, logits_teacher, _ = _logits(14)
    logits_prev = torch.ones_like(logits_teacher)
    for logits in (logits_res, logits_teacher, logits_prev):
        logits.requires_grad_(True)
    loss = reskd_residual_mse(logits_res, logits_teacher, logits_prev)
    expected = F.mse_loss(logits_res, logits_teacher - logits_prev)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logits_teacher.grad is None and logits_prev.grad is None
    assert logits_res.grad is not None and logits_res.grad.abs().sum() > 0
