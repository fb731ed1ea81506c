"""Distillation: candidates, the students they build, the loss parts, and training one of them.

The public API is re-exported here; the implementation modules are private or internal.
Importing this package is cheap: torch and autosplit's own modules, no MLflow, Optuna or fvcore
(fvcore is imported only when FLOPs are counted).
"""

from autosplit.distill import parts, structures  # noqa: F401  (they register themselves)
from autosplit.distill._base import Distiller, Part, PartContext, Stage, build_distiller
from autosplit.distill.candidate import (
    Candidate,
    PartSpec,
    SplitSpec,
    StudentSpec,
    load_candidate,
)
from autosplit.distill.exit import (
    ExitChoice,
    ExitProfile,
    calibrate_threshold,
    exit_profile,
    measure_exit,
)
from autosplit.distill.recipes import METHODS, recipe_candidate
from autosplit.distill.registry import FEATURE_LOSSES, LOGIT_LOSSES, STRUCTURES
from autosplit.distill.run import CandidateResult, build_and_count, train_candidate
from autosplit.distill.student import (
    Student,
    StudentFlops,
    build_student,
    expected_flops,
    student_flops,
)

__all__ = [
    "FEATURE_LOSSES",
    "LOGIT_LOSSES",
    "METHODS",
    "STRUCTURES",
    "Candidate",
    "CandidateResult",
    "Distiller",
    "ExitChoice",
    "ExitProfile",
    "Part",
    "PartContext",
    "PartSpec",
    "SplitSpec",
    "Stage",
    "Student",
    "StudentFlops",
    "StudentSpec",
    "build_and_count",
    "build_distiller",
    "build_student",
    "calibrate_threshold",
    "exit_profile",
    "expected_flops",
    "load_candidate",
    "measure_exit",
    "recipe_candidate",
    "student_flops",
    "train_candidate",
]
