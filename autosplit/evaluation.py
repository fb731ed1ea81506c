"""Evaluating and retraining a trial's student, as ``autosplit export`` and ``autosplit train``
both do: the data and teacher loaded once (``EvalContext``), a saved student rebuilt from its
pinned candidate, its test accuracy, and a candidate retrained through the search's own code
path (``retrain``).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any

from autosplit.errors import UserError
from autosplit.search.attrs import TrialAttrs


class EvalContext:
    """Data and teacher loaded once for evaluating and retraining exported candidates."""

    def __init__(
        self,
        candidate_plain: dict[str, Any],
        runtime: Any,
        runs_dir: Path,
        *,
        teacher_path: Path | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        from autosplit.data import load_splits
        from autosplit.distill.candidate import Candidate
        from autosplit.teacher import get_teacher, load_teacher

        candidate = Candidate.from_dict(candidate_plain)
        self.runtime, self.runs_dir, self.tracking_uri = runtime, runs_dir, tracking_uri
        self.splits = load_splits(candidate.data)
        if teacher_path is not None:  # the study's own teacher (see ``export_study``)
            self.teacher = load_teacher(teacher_path, self.splits)
            self.teacher.model = runtime.prepare(self.teacher.model)
        else:
            self.teacher = get_teacher(
                candidate.teacher,
                candidate.data,
                self.splits,
                runtime,
                runs_dir=runs_dir,
                progress=False,
            )

    def here(self, attrs: TrialAttrs) -> TrialAttrs:
        """``attrs`` with weights on this host: a trial another host of the study trained
        has them in its run's MLflow artifacts (``weights_uri``), fetched once under
        ``runs/fetched``."""
        if attrs.weights is None or Path(attrs.weights).is_file() or attrs.weights_uri is None:
            return attrs
        from autosplit.search.shared_teacher import fetch_file

        run_id = attrs.weights_uri.removeprefix("runs:/").split("/")[0]
        folder = self.runs_dir / "fetched" / run_id
        local = folder / Path(attrs.weights_uri).name
        if not local.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                fetch_file(attrs.weights_uri, Path(tmp), tracking_uri=self.tracking_uri).replace(
                    local
                )
        return dataclasses.replace(attrs, weights=str(local))

    def test_accuracy(self, candidate_plain: dict[str, Any], weights: str) -> float:
        return trained_test_accuracy(
            candidate_plain, weights, self.teacher.model, self.splits, self.runtime
        )

    def student(self, candidate_plain: dict[str, Any], weights: str | Path) -> Any:
        """The trained student in eval mode on the CPU, its exit gate set (deployment)."""
        return load_trained_student(candidate_plain, weights, self.teacher.model, self.splits)

    def example(self, n: int) -> Any:
        """The first ``n`` test images as the student takes them: float32 (n, C, H, W),
        normalised, on the CPU."""
        from autosplit.loader import normalize

        return normalize(self.splits.test.images[:n], self.splits.info)

    def latency(
        self, module: Any, runs: int, onnx_paths: list[Path] | None = None
    ) -> dict[str, Any]:
        """``module``'s CPU latency on test images: torch, and onnxruntime on ``onnx_paths``
        (the files ``deploy.export_onnx`` wrote for it), as an export YAML records it."""
        from autosplit import latency
        from autosplit.deploy import OnnxStudent, gated

        images = self.example(128)
        torch_ms = latency.torch_latency(module, images, runs=runs)
        onnx_ms = None
        if onnx_paths:
            threshold = module.exit_threshold if gated(module) else None
            runner = OnnxStudent(onnx_paths, threshold, threads=1)
            onnx_ms = latency.onnx_latency(runner, images, runs=runs)
        return latency.record(torch_ms, onnx_ms, runs)

    def teacher_latency(self, runs: int, onnx: bool) -> dict[str, Any]:
        """The teacher's, measured the same way (its ONNX graph written to a temporary
        folder, not shipped)."""
        import copy

        from autosplit.deploy import export_onnx

        teacher = copy.deepcopy(self.teacher.model).cpu().eval()
        if not onnx:
            return self.latency(teacher, runs)
        with tempfile.TemporaryDirectory(prefix="autosplit-teacher-") as folder:
            files = export_onnx(teacher, self.splits.info.input_shape, Path(folder) / "teacher")
            return self.latency(teacher, runs, [Path(folder) / name for name in files])

    def input_description(self) -> dict[str, Any]:
        info = self.splits.info
        return {
            "shape": list(info.input_shape),
            "dtype": "float32",
            "normalise": "(x / 255 - mean) / std, per channel",
            "mean": list(info.mean),
            "std": list(info.std),
        }

    def confirm(self, candidate_plain: dict[str, Any], seeds: int, views: int) -> dict[str, Any]:
        """Retrain with ``seeds`` further seeds: mean ± sd of val and test accuracy."""
        from autosplit.distill.candidate import Candidate

        candidate = Candidate.from_dict(candidate_plain)
        vals, tests = [], []
        for offset in range(1, seeds + 1):
            seeded = candidate.with_values({"train.seed": candidate.train.seed + offset})
            outcome = retrain(
                seeded, self.splits, self.teacher, self.runtime, self.runs_dir, teacher_views=views
            )
            vals.append(outcome["val_acc"])
            tests.append(outcome["test_acc"])
        return {
            "seeds": seeds,
            "val_acc_mean": statistics.fmean(vals),
            "val_acc_sd": statistics.stdev(vals) if seeds > 1 else 0.0,
            "test_acc_mean": statistics.fmean(tests),
            "test_acc_sd": statistics.stdev(tests) if seeds > 1 else 0.0,
        }


def trained_test_accuracy(
    candidate_plain: dict[str, Any], weights: str | Path, teacher: Any, splits: Any, runtime: Any
) -> float:
    """Test accuracy of a trial's saved student (its exit gate applied), rebuilt from its
    pinned candidate."""
    from autosplit.train import evaluate

    student = load_trained_student(candidate_plain, weights, teacher, splits)
    student = runtime.prepare(student)
    return evaluate(student, test_loader(splits, runtime), runtime)


def load_trained_student(
    candidate_plain: dict[str, Any], weights: str | Path, teacher: Any, splits: Any
) -> Any:
    """A trial's saved student rebuilt from its pinned candidate, in eval mode on the CPU."""
    from autosplit.checkpoint import load_checkpoint
    from autosplit.distill import build_student
    from autosplit.distill.candidate import Candidate

    info = splits.info
    # The student alone: its weights are all the file holds (no loss parts, no FLOPs count).
    student = build_student(
        Candidate.from_dict(candidate_plain),
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_shape=info.input_shape,
        teacher=teacher,
    )
    if not Path(weights).is_file():
        raise UserError(
            f"{weights}: a trial's weights are missing; nothing was exported; "
            "restore the file (the search wrote it)"
        )
    payload = load_checkpoint(
        weights, kind="student", fix="nothing was exported; restore the file (the search wrote it)"
    )
    student.load_state_dict(payload["state_dict"])  # build_student set its exit threshold
    return student.cpu().eval()


def test_loader(splits: Any, runtime: Any) -> Any:
    from autosplit.loader import eval_loader

    return eval_loader(splits.test, splits.info, runtime.device)


def retrain(
    candidate: Any,
    splits: Any,
    teacher: Any,
    runtime: Any,
    runs_dir: Path,
    *,
    teacher_views: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a candidate through the search's own code path, then evaluate on test."""
    from autosplit.cache import teacher_cache_for
    from autosplit.distill.run import build_and_count, train_candidate
    from autosplit.train import evaluate

    distiller, _ = build_and_count(candidate, teacher.model, splits)
    source = teacher_cache_for(
        candidate,
        teacher,
        splits,
        runtime,
        runs_dir,
        taps=set(distiller.teacher_taps),
        views=teacher_views,
    )
    result = train_candidate(
        candidate, splits, teacher.model, runtime, teacher_source=source, progress=progress
    )
    test_acc = evaluate(result.student, test_loader(splits, runtime), runtime)
    return {"val_acc": result.val_acc, "test_acc": test_acc, "result": result}
