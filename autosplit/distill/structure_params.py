"""The parameters of the four student structures: the candidate's ``structure.*`` keys.

Defaults are the papers' values. The structures (:mod:`autosplit.distill.structures`) build
from them and the structures' loss parts (:mod:`autosplit.distill.parts`) weight their terms
with them, so the names here are shared API: they appear in exported YAML, never rename one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autosplit.errors import UserError


def _at_least(path: str, **checks: tuple[float | None, float]) -> None:
    """Range checks ``key=(value, minimum)`` naming the dotted path at fault; None passes."""
    for key, (value, minimum) in checks.items():
        if value is not None and value < minimum:
            raise UserError(f"{path}.{key}: must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class SingleParams:
    """``single`` has no parameters."""


@dataclass(frozen=True)
class AssistantParams:
    """RKD: ``mimic_weight`` on L_S = normalized_mse(feat_base, F_T), ``residual_weight`` on
    L_A = normalized_mse(feat_assistant, sg(F_T - feat_base)); F_T = teacher's last stage."""

    mimic_weight: float = 1.0
    residual_weight: float = 1.0

    def validate(self, path: str = "structure") -> None:
        _at_least(
            path, mimic_weight=(self.mimic_weight, 0), residual_weight=(self.residual_weight, 0)
        )


@dataclass(frozen=True)
class ResChainParams:
    """ResKD: ``n_parts`` = K res-students; ``exit_threshold`` = gate theta on max softmax
    (None = no gate, > 1 never exits); ``residual`` = "kd" (KD through the partial sum z^(k),
    training R_k) or "mse" (MSE(z_Rk, sg(z_T - z^(k-1)))); ``residual_weight`` its weight."""

    n_parts: int = 2
    exit_threshold: float | None = None
    residual: Literal["kd", "mse"] = "kd"
    residual_weight: float = 1.0

    def validate(self, path: str = "structure") -> None:
        _at_least(
            path,
            n_parts=(self.n_parts, 1),
            exit_threshold=(self.exit_threshold, 0),
            residual_weight=(self.residual_weight, 0),
        )


@dataclass(frozen=True)
class BranchesParams:
    """ERA: ``n_parts`` = M branches; ``mix_alpha`` = alpha of z = (1-a) z_S + a W_T f^(M) (0 =
    branches training-only); ``lambda_f`` on MSE(P f_S, f_T), ``lambda_g`` on the branch MSEs,
    ``gamma`` their decay; ``hidden`` = branch hidden width (None = C_t). Paper: 4, -, 5, 1, 0.5."""

    n_parts: int = 4
    mix_alpha: float = 0.0
    lambda_f: float = 5.0
    lambda_g: float = 1.0
    gamma: float = 0.5
    hidden: int | None = None

    def validate(self, path: str = "structure") -> None:
        _at_least(
            path,
            n_parts=(self.n_parts, 1),
            mix_alpha=(self.mix_alpha, 0),
            lambda_f=(self.lambda_f, 0),
            lambda_g=(self.lambda_g, 0),
            hidden=(self.hidden, 1),
        )
        if self.mix_alpha > 1:
            raise UserError(f"{path}.mix_alpha: must be in [0, 1], got {self.mix_alpha}")
        if self.gamma <= 0:
            raise UserError(f"{path}.gamma: must be > 0, got {self.gamma}")
