"""The document an export writes for each member (``best.yaml``, ``front/trial-N.yaml``), and
reading one back.

Each is self-contained: the candidate (widths and exit gate pinned), the result measured in the
search (plus test accuracy, measured here: the search never saw test), and provenance: package
versions, FLOPs convention, data and teacher checksums, study, trial and run id, and the input the
student takes (shape, normalisation). ``read_config`` reads it, or a bare candidate YAML, for
``autosplit train --config``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosplit.config import load_yaml
from autosplit.errors import UserError, redact_url
from autosplit.search.attrs import Stage, StudyAttrs, TrialAttrs
from autosplit.search.front import FLOPS_CONVENTION

if TYPE_CHECKING:
    from autosplit.evaluation import EvalContext

PACKAGES = ("autosplit", "torch", "torchvision", "optuna", "mlflow", "fvcore", "numpy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class ExportedConfig:
    """A parsed export YAML (or a bare candidate YAML, which has no result or provenance)."""

    candidate: Any
    result: dict[str, Any]
    provenance: dict[str, Any]
    teacher_views: int


def read_config(path: str | Path) -> ExportedConfig:
    from autosplit.distill.candidate import Candidate

    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping (an exported config or a candidate)")
    body = raw["candidate"] if "candidate" in raw else raw
    extra = (
        set(raw) - {"candidate", "result", "provenance", "training"}
        if "candidate" in raw
        else set()
    )
    if extra:
        raise UserError(
            f"{path}: {sorted(extra)[0]}: unknown key; known keys here: candidate, "
            "result, provenance, training"
        )
    try:
        candidate = Candidate.from_dict(body, "candidate" if "candidate" in raw else "")
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    training = raw.get("training") or {}
    return ExportedConfig(
        candidate,
        raw.get("result") or {},
        raw.get("provenance") or {},
        int(training.get("teacher_views", 1)),
    )


@dataclass
class Member:
    """One exported front member: its search trial and the runs that measured it (the final
    stage's seeds, or the search trial itself)."""

    number: int
    label: str
    baseline: str | None
    val_acc: float
    runs: list[Any]  # FrozenTrial


def member_document(
    entry: Member,
    context: EvalContext,
    info: StudyAttrs,
    study: Any,
    storage_url: str,
    budget: int,
    teacher_sha: str,
    views: int,
) -> tuple[dict[str, Any], Path]:
    """The export YAML of one member, and the weights file to ship with it."""

    runs = [context.here(TrialAttrs.read(t)) for t in entry.runs]
    tests = [context.test_accuracy(run.candidate, run.weights) for run in runs]
    vals = [float(run.val_acc) for run in runs]
    mean = statistics.fmean(vals)
    # The seed whose val accuracy is closest to the mean: its weights and candidate ship.
    shipped = min(range(len(vals)), key=lambda i: (abs(vals[i] - mean), i))
    attrs = runs[shipped]
    result: dict[str, Any] = {
        "val_acc": vals[shipped],
        "test_acc": tests[shipped],
        "flops_worst_case": attrs.flops,
        "flops_expected": attrs.expected_flops,
        "params": attrs.params,
        "train_seconds": attrs.train_seconds,
        "train_images": attrs.train_images,
        "train_flops": attrs.train_flops,
        "train_cost": attrs.train_cost,
    }
    if attrs.stage == Stage.FINAL:
        train = attrs.candidate["train"]
        result.update(
            {
                "stage": Stage.FINAL.value,  # plain: YAML's safe dump takes no enum
                "fidelity": {"epochs": train["epochs"], "rows": train.get("max_train_samples")},
                "seeds": [run.candidate["train"]["seed"] for run in runs],
                "seed_shipped": train["seed"],
                "val_accs": vals,
                "val_acc_mean": mean,
                "val_acc_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "test_accs": tests,
                "test_acc_mean": statistics.fmean(tests),
                "test_acc_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            }
        )
    provenance = {
        "packages": package_versions(),
        "flops_convention": f"{FLOPS_CONVENTION}, batch 1",
        "data_fingerprint": info.data_fingerprint,
        "teacher_key": info.teacher_key,
        "teacher_sha256": teacher_sha,
        "teacher_test_acc": info.teacher_test_acc,
        "budget": info.budget,
        "budget_flops": budget,
        "study": study.study_name,
        "storage": redact_url(storage_url),
        "trial": entry.number,
        "final_trials": [t.number for t in entry.runs],
        "mlflow_run_id": attrs.run_id,
        "label": entry.label,
        "baseline": entry.baseline,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    document = {
        "candidate": attrs.candidate,
        "result": result,
        "provenance": provenance,
        "training": {"teacher_views": views},
    }
    return document, Path(attrs.weights)
