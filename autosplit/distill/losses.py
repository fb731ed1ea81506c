"""Pure distillation loss functions: tensors in, scalar (batch-mean) tensor out.

No module state, no warm-up and no cross-entropy: method classes add those. Hyper-parameters are
keyword-only. Whatever plays the role of a target (teacher logits or features, residual targets)
is detached here, so a loss never sends gradient into the teacher. The softmax losses (KD,
DKD, AEKT) take logits to fp32 first: CPU bf16 autocast runs ``log_softmax`` and ``logsumexp``
in bf16 (CUDA autocast runs them in fp32), and a bf16 log-probability is off by up to ~0.02 at
-5, which DKD's tau^2 * beta = 128 multiplies. Notation follows
``docs/methods.md``: ``p_tau(z) = softmax(z / tau)``, ``sg()`` stop-gradient, B batch, C classes.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) summed over the last dim, from log-probabilities; shape (...,)."""
    # kl_div(input=log q, target=log p, log_target=True) = exp(log p) * (log p - log q): no log(0).
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def _target_split(logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Log-probabilities at temperature ``temperature`` split at the target class.

    Returns ``log_binary`` (B, 2) = log [p_target, 1 - p_target] and ``log_nontarget`` (B, C-1) =
    log-softmax over the non-target classes only (renormalised). The target column is removed by
    indexing rather than masked with a large negative number: exact and free of log(0).
    """
    batch, n_classes = logits.shape
    scaled = logits.float() / temperature  # (B, C), fp32: see the module's docstring
    log_norm = torch.logsumexp(scaled, dim=1)  # (B,)
    is_target = F.one_hot(labels, n_classes).bool()  # (B, C)
    target = scaled[is_target]  # (B,)
    nontarget = scaled[~is_target].view(batch, n_classes - 1)  # (B, C-1), class order kept
    log_rest = torch.logsumexp(nontarget, dim=1)  # (B,) unnormalised log(1 - p_target)
    log_binary = torch.stack([target - log_norm, log_rest - log_norm], dim=1)  # (B, 2)
    return log_binary, nontarget - log_rest[:, None]


def kd_loss(logits_student: Tensor, logits_teacher: Tensor, *, temperature: float = 4.0) -> Tensor:
    """Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS-W 2015.

    ``tau^2 * KL(p_tau(z_T) || p_tau(z_S))``, KL summed over classes, mean over the batch. The
    tau^2 keeps the soft-target gradients on the scale of cross-entropy's. Logits: (B, C).
    """
    log_p_teacher = F.log_softmax(logits_teacher.detach().float() / temperature, dim=1)
    log_p_student = F.log_softmax(logits_student.float() / temperature, dim=1)
    return temperature**2 * _kl_from_log_probs(log_p_teacher, log_p_student).mean()


def tckd_nckd(
    logits_student: Tensor, logits_teacher: Tensor, labels: Tensor, *, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """Per-sample TCKD and NCKD of Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

    TCKD = binary KL over [p_target, 1 - p_target]; NCKD = KL over the non-target classes,
    renormalised. Both (B,), without tau^2, so that per sample
    ``KL(p_tau(z_T) || p_tau(z_S)) = TCKD + (1 - p^T_target) * NCKD``.
    Logits (B, C) with C >= 2, labels (B,) int64.
    """
    log_bin_student, log_nt_student = _target_split(logits_student, labels, temperature)
    log_bin_teacher, log_nt_teacher = _target_split(logits_teacher.detach(), labels, temperature)
    tckd = _kl_from_log_probs(log_bin_teacher, log_bin_student)
    nckd = _kl_from_log_probs(log_nt_teacher, log_nt_student)
    return tckd, nckd


def dkd_loss(
    logits_student: Tensor,
    logits_teacher: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float | Tensor = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022: ``tau^2 * (a*TCKD + b*NCKD)``.

    Batch mean; no CE, no warm-up. ``beta`` is a float or a per-sample (B,) tensor: with
    ``alpha=1, beta=1 - p^T_target`` (at the same temperature) this equals :func:`kd_loss`.
    """
    tckd, nckd = tckd_nckd(logits_student, logits_teacher, labels, temperature=temperature)
    return temperature**2 * (alpha * tckd + beta * nckd).mean()


def aekt_weight(
    logits_dist: Tensor,
    logits_teacher: Tensor,
    labels: Tensor,
    *,
    temperature: float = 4.0,
    w_min: float,
    w_max: float,
    power: float = 1.0,
) -> Tensor:
    """Adaptive TCKD weight ``clip(sg(p^T_target / p^S_target), w_min, w_max) ** power``, (B,).

    A reading of Park & Lee (arXiv 2409.01679), whose exact weight function is not public: a
    student less sure of the target than the teacher gets more explicit-knowledge transfer.
    Probabilities at ``temperature``; the ratio is formed in log space. Always detached.
    """
    log_bin_student, _ = _target_split(logits_dist.detach(), labels, temperature)
    log_bin_teacher, _ = _target_split(logits_teacher.detach(), labels, temperature)
    ratio = torch.exp(log_bin_teacher[:, 0] - log_bin_student[:, 0])  # (B,)
    return ratio.clamp(min=w_min, max=w_max) ** power


def aekt_loss(
    logits_dist: Tensor,
    logits_teacher: Tensor,
    labels: Tensor,
    *,
    beta: float = 8.0,
    temperature: float = 4.0,
    w_min: float,
    w_max: float,
    power: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Park & Lee, "Adaptive Explicit Knowledge Transfer for KD", arXiv 2409.01679 (2024).

    ``tau^2 * mean(beta * NCKD + w * TCKD)`` on the distillation logits z_dist (B, C): NCKD
    carries the implicit knowledge, TCKD the explicit (target confidence). ``w`` defaults to
    :func:`aekt_weight`, a reading since the paper's weight function is not public; pass
    ``weight`` (B,) to plug in another (it is detached). ``w_min``, ``w_max`` have no published
    values and so no defaults; ``beta`` and ``temperature`` default to DKD's.
    """
    if weight is None:
        weight = aekt_weight(
            logits_dist,
            logits_teacher,
            labels,
            temperature=temperature,
            w_min=w_min,
            w_max=w_max,
            power=power,
        )
    tckd, nckd = tckd_nckd(logits_dist, logits_teacher, labels, temperature=temperature)
    return temperature**2 * (beta * nckd + weight.detach() * tckd).mean()


def hint_loss(feat_student_adapted: Tensor, feat_teacher: Tensor) -> Tensor:
    """Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015: plain MSE to the teacher.

    ``feat_student_adapted`` is the adapter's output, same shape as ``feat_teacher`` (B, C, H, W).
    """
    return F.mse_loss(feat_student_adapted, feat_teacher.detach())


def normalized_mse(pred: Tensor, target: Tensor, *, eps: float = 1e-8) -> Tensor:
    """``MSE(pred, sg(target)) / mean(target^2)``: MSE relative to the target's mean square.

    Scale-free feature mimicry, the reading of Gao et al.'s RKD (arXiv 2002.09168) used here.
    """
    target = target.detach()
    return F.mse_loss(pred, target) / target.pow(2).mean().clamp_min(eps)


def _factor(x: Tensor) -> Tensor:
    """IE-KD's phi: flatten (B, ...) to (B, D) and L2-normalise each sample."""
    return F.normalize(x.flatten(start_dim=1), dim=1)


def factor_distance(a: Tensor, b: Tensor) -> Tensor:
    """IE-KD's ``D(a, b) = mean |phi(a) - phi(b)|``; a, b (B, k, H, W) or any (B, ...).

    Zero for identical inputs, invariant to a positive per-sample scaling of either input.
    """
    return F.l1_loss(_factor(a), _factor(b))


def iekd_loss(
    factor_inherit: Tensor,
    factor_explore: Tensor,
    factor_teacher: Tensor,
    *,
    lambda_inherit: float,
    lambda_explore: float,
) -> Tensor:
    """Huang et al., "Revisiting KD: An Inheritance and Exploration Framework", CVPR 2021.

    ``lambda_inherit * D(inherit, T) - lambda_explore * D(explore, T)``: the inheriting part is
    pulled towards the teacher factor, the exploring part pushed away (note the minus). Factors
    are encoder outputs (B, k, H, W); the teacher factor is detached. The paper gives no values
    this code can rely on, so the weights have no defaults (docs/methods.md, IE-KD: search them
    on a log scale).
    """
    factor_teacher = factor_teacher.detach()
    inherit = factor_distance(factor_inherit, factor_teacher)
    explore = factor_distance(factor_explore, factor_teacher)
    return lambda_inherit * inherit - lambda_explore * explore


def era_targets(
    feat_teacher: Tensor, projected_student: Tensor, deltas: Sequence[Tensor]
) -> list[Tensor]:
    """ERA's progressive residual targets (Yan et al., arXiv 2508.16050), all detached.

    ``r_1 = sg(f_T - P f_S)``, ``r_{i+1} = sg(r_i - Delta_i)``: one target per branch, so the
    result has ``len(deltas)`` tensors, each (B, C_t) like ``feat_teacher``.
    """
    targets = [(feat_teacher - projected_student).detach()]
    for delta in deltas[:-1]:
        targets.append((targets[-1] - delta).detach())
    return targets[: len(deltas)]


def era_residual_loss(
    deltas: Sequence[Tensor], targets: Sequence[Tensor], *, gamma: float = 0.5
) -> Tensor:
    """ERA's residual term ``(1/M) * sum_i gamma^(i-1) * MSE(Delta_i, r_i)``, i = 1..M.

    ``targets`` from :func:`era_targets`; gamma 0.5 as in the paper. The lambda_g weight and
    the teacher-head CE on the reconstructions belong to the method class.
    """
    if len(deltas) != len(targets) or not deltas:
        raise ValueError(
            f"need as many deltas as targets (>= 1); got {len(deltas)}, {len(targets)}"
        )
    terms = [
        gamma**i * F.mse_loss(delta, target.detach())
        for i, (delta, target) in enumerate(zip(deltas, targets, strict=True))
    ]
    return torch.stack(terms).sum() / len(deltas)


def reskd_residual_mse(logits_res: Tensor, logits_teacher: Tensor, logits_prev: Tensor) -> Tensor:
    """Li et al., "ResKD: Residual-Guided Knowledge Distillation", IEEE TIP 2021.

    ``MSE(z_R, sg(z_T - z_prev))``: res-student k learns the gap between the teacher and the
    combined student z^(k-1) before it. All logits (B, C).
    """
    return F.mse_loss(logits_res, (logits_teacher - logits_prev).detach())
