"""Export the best configurations of a study so they retrain and deploy as they are.

Each YAML is self-contained: the candidate (widths and exit gate pinned), the result measured in
the search (plus test accuracy, measured here: the search never saw test), and provenance:
package versions, FLOPs convention, data and teacher checksums, study, trial and run id, and the
input the student takes (shape, normalisation).

Files first, then MLflow: the export folder is staged and moved into place whole; only then are
the students logged as MLflow models (and best.yaml's registered under the study's name). A
store failing there leaves the files complete and says so in one line (non-zero exit); a
re-run logs them again, as a new registered version.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from autosplit.checkpoint import sha256_file
from autosplit.config import atomic_write_text, dump_yaml, load_yaml
from autosplit.errors import UserError, redact_url
from autosplit.paths import naming
from autosplit.search.attrs import (
    BEST_TAG,
    EXIT_THRESHOLD_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    StudyAttrs,
    TrialAttrs,
)
from autosplit.search.front import FLOPS_CONVENTION

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


def export_study(
    study: Any,
    out_dir: Path,
    *,
    storage_url: str,
    runtime: Any,
    runs_dir: Path,
    confirm_seeds: int = 0,
    confirm_top: int = 3,
    tracker: Any = None,
    onnx: bool = False,
    latency_runs: int = 0,
    say: Any = print,
) -> list[Path]:
    """Write ``best.yaml`` + ``front/trial-N.yaml`` (+ ``.pt`` weights); return the YAML paths.

    With a final stage, the front is the final one: each member's result holds the final
    fidelity, its seeds, val and test accuracy as mean ± sd (test read here, never in the
    search), and the weights of the seed whose val accuracy is closest to the mean. Without one,
    the search's own front is exported. All or nothing: the files are written into a fresh
    folder that replaces ``out_dir`` only once every file is there.
    """
    from autosplit.search import study as studies
    from autosplit.search.front import final_front, final_members, pareto_front, search_records
    from autosplit.search.space import SearchSpace

    if onnx:
        from autosplit.deploy import require_onnx

        require_onnx()
    info = studies.study_info(study)
    budget = int(info.budget_flops)
    cost = info.cost
    records = studies.records(study)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    members = final_members(records, info.final_members)
    if members:
        front = final_front(members, budget, cost=cost)
        entries = [
            _Entry(m.number, m.label, m.baseline, m.val_mean, [trials[n] for n in m.trials])
            for m in front
        ]
    else:
        search_front = pareto_front(search_records(records), budget, cost=cost)
        entries = [
            _Entry(r.number, r.label, r.baseline, float(r.val_acc or 0.0), [trials[r.number]])
            for r in search_front
        ]
    if not entries:
        raise UserError(
            f"study {study.study_name!r} has no finished feasible trial yet; run "
            "`autosplit search` first"
        )
    best = max(entries, key=lambda e: (e.val_acc, -e.number))
    space_path = Path(info.space)
    views = SearchSpace.from_yaml(space_path).settings.teacher_views if space_path.is_file() else 1
    teacher_path = None
    if info.teacher_sha256 is not None:
        # The study's one teacher, on any host: this host's copy, or fetched where published.
        from autosplit.search.shared_teacher import local_copy

        teacher_path = local_copy(info, study.study_name, runs_dir, say=say)
    context = _EvalContext(
        TrialAttrs.read(best.runs[0]).candidate,
        runtime,
        runs_dir,
        teacher_path=teacher_path,
        tracking_uri=info.tracking_uri,
    )
    teacher_sha = info.teacher_sha256 or sha256_file(info.teacher_path)
    teacher_latency = context.teacher_latency(latency_runs, onnx) if latency_runs else None
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=_parent_dir(out_dir)))
    written: list[Path] = []
    models: list[Any] = []  # StudentModel, logged once the files are in place
    try:
        confirm_for = {e.number for e in sorted(entries, key=lambda e: -e.val_acc)[:confirm_top]}
        for entry in entries:
            document, weights = _document(
                entry, context, info, study, storage_url, budget, teacher_sha, views
            )
            if confirm_seeds and entry.number in confirm_for:
                document["result"]["confirm"] = context.confirm(
                    document["candidate"], confirm_seeds, views
                )
            stem = f"trial-{entry.number:04d}"
            document["provenance"]["input"] = context.input_description()
            student = context.student(document["candidate"], weights)
            (staging / "front").mkdir(exist_ok=True)
            onnx_files = _write_onnx(student, context, staging, out_dir, stem) if onnx else []
            if latency_runs:
                onnx_paths = [staging / "front" / name for name in onnx_files]
                document["result"]["latency_ms"] = context.latency(
                    student, latency_runs, onnx_paths
                )
                document["provenance"]["teacher_latency_ms"] = teacher_latency
            if tracker is not None:
                models.append(_student_model(stem, student, document, context, entry is best))
            targets = [Path("front") / stem] + ([Path("best")] if entry is best else [])
            for target in targets:
                (staging / target).parent.mkdir(parents=True, exist_ok=True)
                # A failed write names the file it would have become, not the staging copy.
                if weights.is_file():
                    with naming(out_dir / target.with_suffix(".pt"), always=True):
                        shutil.copyfile(weights, staging / target.with_suffix(".pt"))
                    document["provenance"]["weights"] = target.with_suffix(".pt").name
                if onnx_files:
                    document["provenance"]["onnx"] = _copy_onnx(
                        onnx_files, stem, target, staging, out_dir, student
                    )
                with naming(out_dir / target.with_suffix(".yaml"), always=True):
                    atomic_write_text(staging / target.with_suffix(".yaml"), dump_yaml(document))
                written.append(out_dir / target.with_suffix(".yaml"))
            result = document["result"]
            say(
                f"trial {entry.number:>4}  val {_pm(result, 'val')}  test {_pm(result, 'test')}"
                f"  {entry.label}"
            )
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if tracker is not None:
        _log_models(tracker, study.study_name, models, out_dir, say)
    return written


def _write_onnx(
    student: Any, context: _EvalContext, staging: Path, out_dir: Path, stem: str
) -> list[str]:
    from autosplit.deploy import export_onnx

    with naming(out_dir / "front" / f"{stem}.onnx", always=True):
        return export_onnx(student, context.splits.info.input_shape, staging / "front" / stem)


def _copy_onnx(
    files: list[str], stem: str, target: Path, staging: Path, out_dir: Path, student: Any
) -> dict[str, Any]:
    """The ONNX files of ``target`` (written for ``front/<stem>``, copied for ``best``) and
    what runs them: ``autosplit.deploy.OnnxStudent.from_export(<this yaml>)``."""
    from autosplit.deploy import gated

    names = [target.name + name.removeprefix(stem) for name in files]
    for source, name in zip(files, names, strict=True):
        if target.parent != Path("front"):
            with naming(out_dir / target.parent / name, always=True):
                shutil.copyfile(staging / "front" / source, staging / target.parent / name)
    return {
        "files": names,
        "exit_threshold": student.exit_threshold if gated(student) else None,
        "run": "autosplit.deploy.OnnxStudent.from_export(<this file>)",
    }


def _student_model(
    stem: str, student: Any, document: dict[str, Any], context: _EvalContext, is_best: bool
) -> Any:
    from autosplit.tracking_models import StudentModel

    result, provenance = document["result"], document["provenance"]
    return StudentModel(
        name=stem,
        module=student,
        example=context.example(1).numpy(),
        tags={
            STUDY_TAG: provenance["study"],
            TRIAL_TAG: str(provenance["trial"]),
            TrialAttrs.key("label"): provenance["label"],
            BEST_TAG: str(is_best).lower(),
            EXIT_THRESHOLD_TAG: str(student.exit_threshold),
        },
        metrics={
            k: float(result[k])
            for k in ("val_acc", "test_acc", "flops_worst_case", "flops_expected", "params")
            if result.get(k) is not None
        },
        register=is_best,
    )


def _log_models(tracker: Any, study_name: str, models: list[Any], out_dir: Path, say: Any) -> None:
    try:
        logged = tracker.log_students(study_name, models)
    except UserError as exc:
        raise UserError(
            f"{out_dir}: the export is written in full, but {exc}; re-run the export to log "
            "its models"
        ) from None
    say(
        f"MLflow: logged {len(models)} model(s) in run {logged.run_id} of experiment "
        f"{study_name!r}; registered best as {logged.registered}"
    )


@dataclass
class _Entry:
    """One exported front member: its search trial and the runs that measured it (the final
    stage's seeds, or the search trial itself)."""

    number: int
    label: str
    baseline: str | None
    val_acc: float
    runs: list[Any]  # FrozenTrial


def _pm(result: dict[str, Any], which: str) -> str:
    if f"{which}_acc_mean" in result:
        if len(result.get(f"{which}_accs") or result.get("seeds") or ()) == 1:
            return f"{result[f'{which}_acc_mean']:.2f}% (1 seed)"  # no spread, not "± 0.00"
        return f"{result[f'{which}_acc_mean']:.2f} ± {result[f'{which}_acc_sd']:.2f}%"
    return f"{result[f'{which}_acc']:.2f}%"


def _document(
    entry: _Entry,
    context: _EvalContext,
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
    if attrs.stage == "final":
        train = attrs.candidate["train"]
        result.update(
            {
                "stage": "final",
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


def _parent_dir(out_dir: Path) -> Path:
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--out {out_dir}: cannot create {parent} ({exc.strerror}); choose a writable folder"
        ) from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out_dir}: {parent} is not writable; choose a writable folder")
    return parent


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Put the finished ``staging`` folder where ``out_dir`` is; an older export is removed only
    after the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _EvalContext:
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
        from autosplit.data import normalize

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
    from autosplit.data import eval_loader

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
