"""Export the best configurations of a study so they retrain and deploy as they are.

``export_study`` picks the members (the final stage's front, else the search's), writes each
one's document (``export_document``), weights and ONNX files (``export_artifacts``) into a staged
folder, evaluating on test with ``evaluation.EvalContext``, and puts the folder in place whole.

Files first, then MLflow: the export folder is staged and moved into place whole; only then are
the students logged as MLflow models (and best.yaml's registered under the study's name). A
store failing there leaves the files complete and says so in one line (non-zero exit); a
re-run logs them again, as a new registered version.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from autosplit.checkpoint import sha256_file
from autosplit.config import atomic_write_text, dump_yaml
from autosplit.errors import UserError
from autosplit.evaluation import EvalContext
from autosplit.export_artifacts import copy_onnx, replace_dir, staging_parent, write_onnx
from autosplit.export_document import Member, member_document
from autosplit.paths import naming
from autosplit.search.attrs import BEST_TAG, EXIT_THRESHOLD_TAG, STUDY_TAG, TRIAL_TAG, TrialAttrs


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
            Member(m.number, m.label, m.baseline, m.val_mean, [trials[n] for n in m.trials])
            for m in front
        ]
    else:
        search_front = pareto_front(search_records(records), budget, cost=cost)
        entries = [
            Member(r.number, r.label, r.baseline, float(r.val_acc or 0.0), [trials[r.number]])
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
    context = EvalContext(
        TrialAttrs.read(best.runs[0]).candidate,
        runtime,
        runs_dir,
        teacher_path=teacher_path,
        tracking_uri=info.tracking_uri,
    )
    teacher_sha = info.teacher_sha256 or sha256_file(info.teacher_path)
    teacher_latency = context.teacher_latency(latency_runs, onnx) if latency_runs else None
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=staging_parent(out_dir)))
    written: list[Path] = []
    models: list[Any] = []  # StudentModel, logged once the files are in place
    try:
        confirm_for = {e.number for e in sorted(entries, key=lambda e: -e.val_acc)[:confirm_top]}
        for entry in entries:
            document, weights = member_document(
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
            onnx_files = (
                write_onnx(student, context.splits.info.input_shape, staging, out_dir, stem)
                if onnx
                else []
            )
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
                    document["provenance"]["onnx"] = copy_onnx(
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
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if tracker is not None:
        _log_models(tracker, study.study_name, models, out_dir, say)
    return written


def _student_model(
    stem: str, student: Any, document: dict[str, Any], context: EvalContext, is_best: bool
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


def _pm(result: dict[str, Any], which: str) -> str:
    if f"{which}_acc_mean" in result:
        if len(result.get(f"{which}_accs") or result.get("seeds") or ()) == 1:
            return f"{result[f'{which}_acc_mean']:.2f}% (1 seed)"  # no spread, not "± 0.00"
        return f"{result[f'{which}_acc_mean']:.2f} ± {result[f'{which}_acc_sd']:.2f}%"
    return f"{result[f'{which}_acc']:.2f}%"
