"""Export the best configurations of a study so they retrain and deploy as they are.

Each YAML is self-contained: the candidate (widths and exit gate pinned), the result measured in
the search (plus test accuracy, measured here: the search never saw test), and provenance:
package versions, FLOPs convention, data and teacher checksums, study, trial and run id.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from autosplit.config import atomic_write_text, dump_yaml, load_yaml
from autosplit.errors import UserError

FLOPS_CONVENTION = "fvcore: one multiply-add = one FLOP, batch 1"
PACKAGES = ("autosplit", "torch", "torchvision", "optuna", "mlflow", "fvcore", "numpy")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    extra = set(raw) - {"candidate", "result", "provenance", "training"} if "candidate" in raw else set()
    if extra:
        raise UserError(f"{path}: {sorted(extra)[0]}: unknown key; known keys here: candidate, "
                        "result, provenance, training")
    try:
        candidate = Candidate.from_dict(body, "candidate" if "candidate" in raw else "")
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    training = raw.get("training") or {}
    return ExportedConfig(candidate, raw.get("result") or {}, raw.get("provenance") or {},
                          int(training.get("teacher_views", 1)))


def export_study(study: Any, out_dir: Path, *, storage_url: str, runtime: Any,
                 runs_dir: Path, confirm_seeds: int = 0, confirm_top: int = 3,
                 say: Any = print) -> list[Path]:
    """Write ``best.yaml`` + ``front/trial-N.yaml`` (+ ``.pt`` weights); return the YAML paths."""
    from autosplit.search import study as studies
    from autosplit.search.front import pareto_front
    from autosplit.search.space import SearchSpace

    info = studies.study_info(study)
    budget = int(info["autosplit.budget_flops"])
    front = pareto_front(studies.records(study), budget)
    if not front:
        raise UserError(f"study {study.study_name!r} has no finished feasible trial yet; run "
                        "`autosplit search` first")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    best = max(front, key=lambda r: (r.val_acc, -(r.flops or 0)))
    space_path = Path(info["autosplit.space"])
    views = SearchSpace.from_yaml(space_path).settings.teacher_views if space_path.is_file() else 1

    context = _EvalContext(trials[best.number].user_attrs["autosplit.candidate"], runtime, runs_dir)
    teacher_sha = sha256_file(info["autosplit.teacher_path"])
    written = []
    out_dir = Path(out_dir)
    confirm_for = {r.number for r in sorted(front, key=lambda r: -r.val_acc)[:confirm_top]}
    for record in front:
        trial = trials[record.number]
        attrs = trial.user_attrs
        result = {"val_acc": attrs["autosplit.val_acc"], "flops_worst_case": attrs["autosplit.flops"],
                  "flops_expected": attrs["autosplit.expected_flops"],
                  "params": attrs["autosplit.params"], "train_seconds": attrs.get("autosplit.train_seconds"),
                  "test_acc": context.test_accuracy(attrs["autosplit.candidate"], attrs["autosplit.weights"])}
        if confirm_seeds and record.number in confirm_for:
            result["confirm"] = context.confirm(attrs["autosplit.candidate"], confirm_seeds, views)
        provenance = {
            "packages": package_versions(), "flops_convention": FLOPS_CONVENTION,
            "data_fingerprint": info["autosplit.data_fingerprint"],
            "teacher_key": info["autosplit.teacher_key"], "teacher_sha256": teacher_sha,
            "teacher_test_acc": info.get("autosplit.teacher_test_acc"),
            "budget": info.get("autosplit.budget"), "budget_flops": budget,
            "study": study.study_name, "storage": studies._redact(storage_url),
            "trial": record.number, "mlflow_run_id": attrs.get("autosplit.run_id"),
            "label": record.label, "baseline": record.baseline,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds")}
        document = {"candidate": attrs["autosplit.candidate"], "result": result,
                    "provenance": provenance, "training": {"teacher_views": views}}
        stem = f"trial-{record.number:04d}"
        weights = Path(attrs["autosplit.weights"])
        targets = [out_dir / "front" / stem]
        if record.number == best.number:
            targets.append(out_dir / "best")
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            if weights.is_file():
                tmp = target.with_suffix(".pt.tmp")
                shutil.copyfile(weights, tmp)
                tmp.replace(target.with_suffix(".pt"))
                document["provenance"]["weights"] = target.with_suffix(".pt").name
            atomic_write_text(target.with_suffix(".yaml"), dump_yaml(document))
            written.append(target.with_suffix(".yaml"))
        say(f"trial {record.number:>4}  val {result['val_acc']:.2f}%  test {result['test_acc']:.2f}%"
            f"  {record.label}")
    return written


class _EvalContext:
    """Data and teacher loaded once for evaluating and retraining exported candidates."""

    def __init__(self, candidate_plain: dict[str, Any], runtime: Any, runs_dir: Path) -> None:
        from autosplit.data import load_splits
        from autosplit.distill.candidate import Candidate
        from autosplit.teacher import get_teacher

        candidate = Candidate.from_dict(candidate_plain)
        self.runtime, self.runs_dir = runtime, runs_dir
        self.splits = load_splits(candidate.data)
        self.teacher = get_teacher(candidate.teacher, candidate.data, self.splits, runtime,
                                   runs_dir=runs_dir, progress=False)

    def test_accuracy(self, candidate_plain: dict[str, Any], weights: str) -> float:
        return trained_test_accuracy(candidate_plain, weights, self.teacher.model, self.splits,
                                     self.runtime)

    def confirm(self, candidate_plain: dict[str, Any], seeds: int, views: int) -> dict[str, Any]:
        """Retrain with ``seeds`` further seeds: mean ± sd of val and test accuracy."""
        from autosplit.distill.candidate import Candidate

        candidate = Candidate.from_dict(candidate_plain)
        vals, tests = [], []
        for offset in range(1, seeds + 1):
            seeded = candidate.with_values({"train.seed": candidate.train.seed + offset})
            outcome = retrain(seeded, self.splits, self.teacher, self.runtime, self.runs_dir,
                              teacher_views=views)
            vals.append(outcome["val_acc"])
            tests.append(outcome["test_acc"])
        return {"seeds": seeds, "val_acc_mean": statistics.fmean(vals),
                "val_acc_sd": statistics.stdev(vals) if seeds > 1 else 0.0,
                "test_acc_mean": statistics.fmean(tests),
                "test_acc_sd": statistics.stdev(tests) if seeds > 1 else 0.0}


def trained_test_accuracy(candidate_plain: dict[str, Any], weights: str | Path, teacher: Any,
                          splits: Any, runtime: Any) -> float:
    """Test accuracy of a trial's saved student (its exit gate applied), rebuilt from its
    pinned candidate."""
    from autosplit.checkpoint import load_checkpoint
    from autosplit.distill.candidate import Candidate
    from autosplit.distill.run import build_and_count
    from autosplit.train import evaluate

    candidate = Candidate.from_dict(candidate_plain)
    distiller, _ = build_and_count(candidate, teacher, splits)
    student = distiller.student
    student.load_state_dict(load_checkpoint(weights, kind="student")["state_dict"])
    student.exit_threshold = candidate.structure.get("exit_threshold")
    student = runtime.prepare(student).eval()
    return evaluate(student, test_loader(splits, runtime), runtime)


def test_loader(splits: Any, runtime: Any) -> Any:
    from autosplit.data import eval_loader

    return eval_loader(splits.test, splits.info, runtime.device)


def retrain(candidate: Any, splits: Any, teacher: Any, runtime: Any, runs_dir: Path, *,
            teacher_views: int = 1, progress: bool = False) -> dict[str, Any]:
    """Train a candidate through the search's own code path, then evaluate on test."""
    from autosplit.distill.run import train_candidate
    from autosplit.search.driver import teacher_cache_for
    from autosplit.train import evaluate

    source = teacher_cache_for(candidate, teacher, splits, runtime, runs_dir, views=teacher_views)
    result = train_candidate(candidate, splits, teacher.model, runtime, teacher_source=source,
                             progress=progress)
    test_acc = evaluate(result.student, test_loader(splits, runtime), runtime)
    return {"val_acc": result.val_acc, "test_acc": test_acc, "result": result}
