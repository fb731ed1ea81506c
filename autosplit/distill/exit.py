"""Sample-adaptive inference for a student with an exit gate: measure, then choose the threshold.

ResKD (Li et al., "ResKD: Residual-Guided Knowledge Distillation", IEEE TIP 2021) stops a sample
after the partial sum z^(k) once ``max softmax(z^(k)) >= theta`` and runs R_(k+1) only for the
samples still going; theta is tuned on validation data. Expected cost is then
``FLOPs(S) + sum_k q_k FLOPs(R_k)``, q_k the measured share of samples that reach R_k.

``exit_profile`` records, once, every validation sample's confidence and correctness at every
partial sum; any threshold's exit rates, accuracy and expected FLOPs then follow without running
the network again, so ``calibrate_threshold`` can try them all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from autosplit.device import Runtime
from autosplit.distill.student import Student, StudentFlops, expected_flops
from autosplit.modules import eval_mode


@dataclass(frozen=True)
class ExitProfile:
    """Per sample and per partial sum z^(0)..z^(K): max-softmax confidence and correctness."""

    confidence: Tensor  # (N, K+1) float, on the CPU
    correct: Tensor  # (N, K+1) bool

    @property
    def n_parts(self) -> int:
        return self.confidence.shape[1] - 1


@dataclass(frozen=True)
class ExitChoice:
    """A threshold (None = no gate, every sample runs the whole chain) and what it gives."""

    threshold: float | None
    reach_rates: list[float]  # q_1..q_K: share of samples that run R_k
    expected_flops: float
    accuracy: float  # top-1 %, with the gate


@torch.no_grad()
def exit_profile(student: Student, loader: Iterable[Any], runtime: Runtime) -> ExitProfile:
    """Confidence and correctness of every partial sum, over a loader of batches (eval mode)."""
    if not student.exit_gate:
        raise ValueError(f"early exit needs a structure with an exit gate, not {student.kind!r}")
    confidence, correct = [], []
    with eval_mode(student):
        for batch in loader:
            with runtime.autocast():
                outputs = student.forward_train(runtime.images(batch.images))
            logits = torch.stack(outputs["partial_logits"], dim=1).float()  # (B, K+1, C)
            confidence.append(F.softmax(logits, dim=2).amax(dim=2).cpu())  # (B, K+1)
            correct.append((logits.argmax(dim=2) == batch.labels[:, None]).cpu())
    return ExitProfile(torch.cat(confidence), torch.cat(correct))


def exit_points(profile: ExitProfile, threshold: float | None) -> Tensor:
    """(N,) index k of the partial sum each sample leaves with: the first k < K whose
    confidence reaches ``threshold``, else K."""
    n_samples, n_parts = profile.confidence.shape[0], profile.n_parts
    if threshold is None:
        return torch.full((n_samples,), n_parts, dtype=torch.long)
    gate = profile.confidence[:, :n_parts] >= threshold  # (N, K): may stop after z^(k)
    gate = torch.cat([gate, torch.ones(n_samples, 1, dtype=torch.bool)], dim=1)
    return gate.to(torch.uint8).argmax(dim=1)  # the first True


def measure_exit(profile: ExitProfile, flops: StudentFlops, threshold: float | None) -> ExitChoice:
    """Reach rates, expected FLOPs and accuracy of the gate at ``threshold``."""
    points = exit_points(profile, threshold)  # (N,)
    reach = [float((points >= k).float().mean()) for k in range(1, profile.n_parts + 1)]
    correct = profile.correct[torch.arange(points.numel()), points]
    return ExitChoice(
        threshold=threshold,
        reach_rates=reach,
        expected_flops=expected_flops(flops, reach),
        accuracy=100.0 * float(correct.float().mean()),
    )


def candidate_thresholds(profile: ExitProfile, max_count: int = 1024) -> list[float | None]:
    """0 (all exit at the base), midpoints between observed confidences, None (never exit).

    Midpoints rather than observed values keep a sample's decision away from the edge, where
    batch-dependent rounding could flip it at deployment.
    """
    observed = torch.unique(profile.confidence[:, : profile.n_parts].double())  # sorted
    midpoints = ((observed[1:] + observed[:-1]) / 2).tolist()
    if len(midpoints) > max_count:
        picks = torch.linspace(0, len(midpoints) - 1, max_count).round().long().unique()
        midpoints = [midpoints[i] for i in picks.tolist()]
    return [0.0, *midpoints, None]


def calibrate_threshold(
    profile: ExitProfile,
    flops: StudentFlops,
    *,
    target_expected_flops: float | None = None,
    target_accuracy: float | None = None,
) -> ExitChoice:
    """The gate threshold that best meets the targets, measured on ``profile``'s samples.

    - ``target_accuracy`` (%): the cheapest threshold that reaches it (or, if none does, the
      most accurate one within the FLOPs target, when given);
    - otherwise the most accurate threshold whose expected FLOPs are within
      ``target_expected_flops`` (or, if none is, the cheapest one) — with no target at all, the
      most accurate threshold. Ties go to the cheaper threshold.
    """
    choices = [measure_exit(profile, flops, theta) for theta in candidate_thresholds(profile)]
    within_flops = [
        c
        for c in choices
        if target_expected_flops is None or c.expected_flops <= target_expected_flops
    ]
    if target_accuracy is not None:
        reaching = [c for c in within_flops if c.accuracy >= target_accuracy]
        if reaching:
            return min(reaching, key=lambda c: (c.expected_flops, -c.accuracy))
    pool = within_flops or [min(choices, key=lambda c: c.expected_flops)]
    return max(pool, key=lambda c: (c.accuracy, -c.expected_flops))
