"""The ``autosplit`` command line. It decides what the user sees: one line per error, progress
bars on long work, tables at the end. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from autosplit.commands.train import cmd_train
from autosplit.errors import UserError

# --time-limit counts from here: the imports that follow (torch, optuna, MLflow) take seconds.
STARTED = time.monotonic()

# autosplit.device.PRECISIONS, spelt here: the parser must not import torch.
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_HELP = (
    "auto (default): bf16 autocast where the device has native bf16, else fp32 on CPU and fp16 "
    "AMP on CUDA | fp32 | bf16"
)


def cmd_teacher(args: argparse.Namespace) -> int:
    import dataclasses

    from autosplit.data import load_splits
    from autosplit.device import resolve_runtime
    from autosplit.paths import check_output_dir
    from autosplit.search.space import find_space, load_space_sections
    from autosplit.teacher import PRETRAINED_DIR, get_teacher

    space = find_space(args.space)
    data, teacher_cfg = load_space_sections(space)
    check_output_dir(args.runs_dir, "--runs-dir")
    if args.data_dir:
        data = dataclasses.replace(data, data_dir=args.data_dir)
    runtime = resolve_runtime(args.device, precision=args.precision)
    splits = load_splits(data)
    print(
        f"data: {splits.info.name} train {len(splits.train.labels)} / val "
        f"{len(splits.val.labels)} / test {len(splits.test.labels)}; device {runtime.device}"
    )
    teacher = get_teacher(
        teacher_cfg,
        data,
        splits,
        runtime,
        runs_dir=args.runs_dir,
        progress=not args.quiet,
        retrain=args.retrain_teacher,
    )
    from autosplit.flops import count_flops, format_flops
    from autosplit.search.front import FLOPS_CONVENTION

    flops = count_flops(teacher.model.cpu(), splits.info.input_shape)
    state = "cached" if teacher.from_cache else f"trained in {teacher.train_seconds:.0f}s"
    if teacher.path.parent == PRETRAINED_DIR:
        state = "shipped with autosplit"
    print(
        f"teacher {teacher_cfg.model} ({state}): val {teacher.val_acc:.2f}%  "
        f"test {teacher.test_acc:.2f}%  FLOPs {format_flops(flops)} "
        f"({FLOPS_CONVENTION})  -> {teacher.path}"
    )
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from autosplit.flops import count_flops_report, format_flops, parse_input_shape
    from autosplit.models import create_model
    from autosplit.search.front import FLOPS_CONVENTION

    shape = parse_input_shape(args.input)
    try:
        model = create_model(
            args.model,
            num_classes=args.classes,
            in_channels=shape[0],
            width=args.width,
            depth=args.depth,
        )
        report = count_flops_report(model, shape)
    except (RuntimeError, MemoryError) as exc:  # out of memory, or too small for the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = "not enough memory" if "alloc" in first or isinstance(exc, MemoryError) else first
        raise UserError(
            f"--input {args.input}: cannot run {args.model} (width {args.width:g}) "
            f"on it ({why[:160]}); try a smaller --input or --width"
        ) from None
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model} width {args.width:g} input {args.input} classes {args.classes}: "
        f"{format_flops(report.total)} FLOPs ({report.total:,}), {params:,} params"
    )
    print(f"convention: {FLOPS_CONVENTION} (what papers call MACs/FLOPs for CNNs)")
    if report.unsupported:
        print(
            "not counted (unsupported operators): "
            + ", ".join(f"{k}×{v}" for k, v in sorted(report.unsupported.items()))
        )
    return 0


def _space_and_budget(args: argparse.Namespace):
    from autosplit.search.budget import parse_budget
    from autosplit.search.space import SearchSpace, find_space

    space = SearchSpace.from_yaml(find_space(args.space))
    if args.data_dir:
        import dataclasses

        space.data = dataclasses.replace(space.data, data_dir=args.data_dir)
    text = args.budget or space.budget
    if text is None:
        raise UserError(
            f"--budget: not given and {space.path} sets no default budget; "
            "pass e.g. --budget 0.25x or --budget 5M"
        )
    return space, parse_budget(text)


def cmd_search(args: argparse.Namespace) -> int:
    from autosplit.search.attrs import TrialAttrs
    from autosplit.search.budget import parse_duration
    from autosplit.search.driver import run_search
    from autosplit.search.front_text import final_jobs_lines
    from autosplit.search.setup import SearchOptions
    from autosplit.tracking import NullTracker, check_tracking, default_tracking_uri
    from autosplit.tracking_store import chosen_tracking_uri

    _check_search_paths(args)
    from autosplit.device import resolve_devices

    space, budget = _space_and_budget(args)
    devices = resolve_devices(args.devices)
    # One worker per GPU when there are several; else one (--workers N: N on the CPU, or
    # several per GPU, placed round-robin).
    workers = args.workers if args.workers is not None else len(devices)
    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    trials = args.trials if args.trials is not None else space.settings.trials
    if trials < 0:
        raise UserError(f"--trials {trials}: must be >= 0 (the study's total number of trials)")
    if trials == 0:  # before the teacher trains: a total of 0 means no work at all
        print("--trials 0: nothing to run (the study's total is 0 trials)")
        return 0
    options = SearchOptions(
        space=space,
        budget=budget,
        trials=trials,
        time_limit=parse_duration(args.time_limit or space.settings.time_limit),
        study_name=args.study_name,
        storage=args.storage,
        sampler=args.sampler or space.settings.sampler,
        seed=args.seed,
        workers=workers,
        device=devices[0],
        devices=tuple(devices),
        precision=args.precision,
        runs_dir=Path(args.runs_dir),
        progress=not args.quiet,
        halving=not args.no_halving,
        retrain_teacher=args.retrain_teacher,
        started=STARTED,
        teacher_dir=Path(args.teacher_dir) if args.teacher_dir else None,
        teacher_wait=_teacher_wait(args.teacher_wait),
    )
    from autosplit.search.setup import default_study_name
    from autosplit.search.study import default_storage, recorded_tracking_uri

    storage_url = args.storage or default_storage(args.runs_dir, workers)
    recorded = recorded_tracking_uri(
        storage_url, args.study_name or default_study_name(space, budget)
    )
    uri = chosen_tracking_uri(args.tracking_uri, recorded, default_tracking_uri(args.runs_dir))
    options.tracking_uri = None if args.no_tracking else uri
    # An unreachable store fails now: before the teacher trains, before the study is touched.
    tracker = NullTracker() if args.no_tracking else check_tracking(uri)
    study, ctx = run_search(options, tracker=tracker)
    print()
    print(_front_text(study, rung=None))
    for line in _final_summary(study):
        print(line)
    for line in final_jobs_lines(
        (t.number, TrialAttrs.read(t)) for t in study.get_trials(deepcopy=False)
    ):
        print(line)
    print()
    print(f"review: mlflow ui --backend-store-uri {uri}   (experiment {study.study_name!r})")
    print(
        f"export: autosplit export --study-name {study.study_name}"
        + (f" --storage {args.storage}" if args.storage else "")
    )
    return 0


def _teacher_wait(text: str) -> float:
    from autosplit.search.budget import parse_duration

    seconds = parse_duration(text, "--teacher-wait")
    return float("inf") if seconds is None else seconds  # off: wait as long as it takes


def _check_search_paths(args: argparse.Namespace) -> None:
    """Before any work: the runs dir, study name and SQLite files the search will write."""
    from autosplit.paths import check_output_dir, check_sqlite_url, check_study_name

    check_output_dir(args.runs_dir, "--runs-dir")
    if args.study_name is not None:
        check_study_name(args.study_name)
    if args.storage is not None:
        check_sqlite_url(args.storage, "--storage")
    if args.tracking_uri is not None and not args.no_tracking:
        check_sqlite_url(args.tracking_uri, "--tracking-uri")


def _study_tracking_uri(args: argparse.Namespace, study: Any) -> str:
    from autosplit.search.attrs import StudyAttrs
    from autosplit.tracking import default_tracking_uri
    from autosplit.tracking_store import chosen_tracking_uri

    recorded = StudyAttrs.read(study).tracking_uri
    return chosen_tracking_uri(args.tracking_uri, recorded, default_tracking_uri(args.runs_dir))


def cmd_front(args: argparse.Namespace) -> int:
    from autosplit.latency import front_columns
    from autosplit.search.study import open_existing

    study, _ = open_existing(args.study_name, args.storage, args.runs_dir)
    extra = None
    if args.latency:
        name = study.study_name
        folder = Path(args.export) if args.export else Path(args.runs_dir) / "exports" / name
        fix = f"run autosplit export --study-name {name} first, or pass --export DIR"
        extra = front_columns(folder, name, fix=fix)
    print(_front_text(study, rung=args.rung, extra=extra))
    if args.rung is None:
        for line in _final_summary(study):
            print(line)
    uri = _study_tracking_uri(args, study)
    print(f"review: mlflow ui --backend-store-uri {uri}   (experiment {study.study_name!r})")
    return 0


def _final_summary(study: Any) -> list[str]:
    """Under the final front: the best member's margin over the best baseline at equal seeds,
    and each rung's Kendall τ against the final stage (or why there is none)."""
    from autosplit.search.final_stage import proxy_fidelity
    from autosplit.search.front import final_members
    from autosplit.search.front_text import margin_line, tau_lines
    from autosplit.search.study import records, study_info

    members = final_members(records(study), study_info(study).final_members)
    if not members:
        return []
    return [margin_line(members), *tau_lines(proxy_fidelity(study))]


def _front_text(study: Any, *, rung: int | None, extra: Any = None) -> str:
    from autosplit.search.front_text import front_text
    from autosplit.search.study import final_fidelity, records, study_info

    info = study_info(study)
    return front_text(
        records(study),
        info,
        study_name=study.study_name,
        rung=rung,
        fidelity=final_fidelity(study),
        extra=extra,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from autosplit.device import resolve_runtime
    from autosplit.export import export_study
    from autosplit.paths import check_output_dir, check_sqlite_url, check_study_name
    from autosplit.search.study import open_existing
    from autosplit.tracking import check_tracking

    if args.latency_runs < 0:
        raise UserError(f"--latency-runs {args.latency_runs}: must be >= 0 (0: not measured)")
    if args.onnx:  # a missing package is said now, not after the students are measured
        from autosplit.deploy import require_onnx

        require_onnx()
    study, url = open_existing(args.study_name, args.storage, args.runs_dir)
    if args.out is None:
        try:
            check_study_name(study.study_name)
        except UserError:
            raise UserError(
                f"--study-name {study.study_name!r}: cannot name a folder under "
                f"{args.runs_dir}/exports; pass --out DIR"
            ) from None
    out = Path(args.out) if args.out else Path(args.runs_dir) / "exports" / study.study_name
    check_output_dir(out, "--out")
    tracker = None
    if not args.no_tracking:  # an unreachable store fails now, before the students are measured
        if args.tracking_uri is not None:
            check_sqlite_url(args.tracking_uri, "--tracking-uri")
        tracker = check_tracking(_study_tracking_uri(args, study))
    written = export_study(
        study,
        out,
        storage_url=url,
        runtime=resolve_runtime(args.device),
        runs_dir=Path(args.runs_dir),
        confirm_seeds=args.confirm_seeds,
        tracker=tracker,
        onnx=args.onnx,
        latency_runs=args.latency_runs,
    )
    shipped = "best.pt, best*.onnx" if args.onnx else "best.pt"
    print(f"wrote {len(written)} file(s) under {out}: best.yaml (+ {shipped}) and front/")
    print(f"retrain: autosplit train --config {out / 'best.yaml'}")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Log to MLflow the finished trials of a study that have no run yet (the store was down
    during the search, or its process died); a second run logs nothing."""
    from autosplit.search.study import open_existing
    from autosplit.search.sync import sync_study
    from autosplit.tracking import check_tracking

    study, _ = open_existing(args.study_name, args.storage, args.runs_dir)
    uri = _study_tracking_uri(args, study)

    def stop(message: str) -> None:  # a store failing during sync: stop, say so, re-run later
        raise UserError(
            message.split("; the search goes on")[0] + "; re-run autosplit sync "
            f"--study-name {study.study_name} when the store is back"
        )

    logged, already = sync_study(study, check_tracking(uri, warn=stop))
    print(
        f"study {study.study_name}: logged {logged} trial(s) to MLflow, {already} already "
        f"there ({uri})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from autosplit.latency import DEFAULT_RUNS as DEFAULT_LATENCY_RUNS  # imports no torch

    parser = argparse.ArgumentParser(prog="autosplit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    teacher = sub.add_parser("teacher", help="train or reuse the cached teacher of a space")
    teacher.add_argument(
        "--space", help="search-space YAML (default: search_spaces/fashion_mnist.yaml)"
    )
    teacher.add_argument("--data-dir", help="where the dataset files are")
    teacher.add_argument("--device", default="auto", help="auto | cpu | cuda")
    teacher.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="train a fresh teacher even where one is cached or shipped with the package",
    )
    teacher.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    teacher.add_argument("--runs-dir", default="runs", help="outputs folder (default: runs)")
    teacher.add_argument("--quiet", action="store_true", help="no progress bar")
    teacher.set_defaults(func=cmd_teacher)

    search = sub.add_parser("search", help="search how to distil the teacher under a FLOPs budget")
    search.add_argument(
        "--space", help="search-space YAML (default: search_spaces/fashion_mnist.yaml)"
    )
    search.add_argument("--budget", help="FLOPs cap: 0.25x (of the teacher) or 5M, 1.2G")
    search.add_argument("--trials", type=int, help="the study's total number of trials")
    search.add_argument(
        "--time-limit",
        help="wall time of the whole job: teacher, search and "
        "final stage (e.g. 30m, 2h, off; default: the space's)",
    )
    search.add_argument("--study-name", help="default: <space>-<budget>")
    search.add_argument("--storage", help="Optuna storage URL (default sqlite under runs/)")
    search.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite under runs/)")
    search.add_argument("--sampler", choices=["tpe", "nsga2", "random"])
    search.add_argument("--seed", type=int, default=0)
    search.add_argument(
        "--workers",
        type=int,
        help="local worker processes, worker i on device i mod n (default: one per device)",
    )
    search.add_argument(
        "--devices",
        "--device",
        dest="devices",
        default="auto",
        help="auto (every visible GPU, else cpu) | cpu | cuda | a list, e.g. cuda:0,cuda:1",
    )
    search.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="train a fresh teacher even where one is cached or shipped with the package",
    )
    search.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    search.add_argument("--data-dir", help="where the dataset files are")
    search.add_argument("--runs-dir", default="runs")
    search.add_argument(
        "--no-halving",
        action="store_true",
        help="train every trial at the top rung (no successive halving)",
    )
    search.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    search.add_argument(
        "--teacher-dir",
        help="a folder every host reads (shared file system) to publish the study's teacher "
        "in (default: the MLflow artifacts of the search's parent run)",
    )
    search.add_argument(
        "--teacher-wait",
        default="2h",
        help="how long a host waits for the teacher another host of the study trains (default 2h)",
    )
    search.add_argument("--quiet", action="store_true", help="no progress bars")
    search.set_defaults(func=cmd_search)

    for name, func, text in (
        ("front", cmd_front, "print a study's Pareto front"),
        ("export", cmd_export, "write best.yaml and front/*.yaml with weights"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--study-name", required=True)
        cmd.add_argument("--storage", help="Optuna storage URL (default sqlite under runs/)")
        cmd.add_argument("--runs-dir", default="runs")
        if name == "front":
            cmd.add_argument(
                "--tracking-uri", help="MLflow store to name (default: the study's search's)"
            )
            cmd.add_argument("--rung", type=int, help="show rung N's front instead of the final")
            cmd.add_argument(
                "--latency",
                action="store_true",
                help="add each member's CPU latency as a share of the teacher's, as measured "
                "by autosplit export",
            )
            cmd.add_argument("--export", help="the export to read (default runs/exports/<study>)")
        if name == "export":
            cmd.add_argument("--out", help="folder (default runs/exports/<study>)")
            cmd.add_argument(
                "--confirm-seeds",
                type=int,
                default=0,
                help="retrain the top front members with N more seeds",
            )
            cmd.add_argument("--device", default="auto")
            cmd.add_argument(
                "--tracking-uri",
                help="MLflow tracking URI (default: the study's search's, else sqlite under runs/)",
            )
            cmd.add_argument(
                "--no-tracking",
                action="store_true",
                help="do not log the students as MLflow models (nor register best)",
            )
            cmd.add_argument(
                "--onnx",
                action="store_true",
                help="also write each student as ONNX beside its weights (extra: onnx)",
            )
            cmd.add_argument(
                "--latency-runs",
                type=int,
                default=DEFAULT_LATENCY_RUNS,
                help="CPU latency of each student and the teacher: median of N runs at batch 1 "
                f"and 64, 1 thread (default {DEFAULT_LATENCY_RUNS}; 0: not measured)",
            )
        cmd.set_defaults(func=func)

    sync = sub.add_parser("sync", help="log to MLflow the finished trials a search could not log")
    sync.add_argument("--study-name", required=True)
    sync.add_argument("--storage", help="Optuna storage URL (default sqlite under runs/)")
    sync.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: the study's search's, else sqlite under runs/)",
    )
    sync.add_argument("--runs-dir", default="runs")
    sync.set_defaults(func=cmd_sync)

    train = sub.add_parser("train", help="retrain an exported candidate; report test accuracy")
    train.add_argument("--config", required=True, help="best.yaml from export, or a candidate YAML")
    train.add_argument("--epochs", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--out", help="write the trained student's weights here")
    train.add_argument("--device", default="auto")
    train.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    train.add_argument("--data-dir")
    train.add_argument("--runs-dir", default="runs")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=cmd_train)

    flops = sub.add_parser("flops", help="count a zoo model's FLOPs with fvcore")
    flops.add_argument("--model", required=True)
    flops.add_argument("--width", type=float, default=1.0)
    flops.add_argument("--depth", type=int, default=None)
    flops.add_argument("--input", default="3x32x32", help="CxHxW (default 3x32x32)")
    flops.add_argument("--classes", type=int, default=10)
    flops.set_defaults(func=cmd_flops)
    return parser


def main(argv: list[str] | None = None) -> int:
    import shlex
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from autosplit import interrupts
    from autosplit.paths import disk_fault

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # SIGINT/SIGTERM: one way out
        handlers = interrupts.install(signal.SIGINT, signal.SIGTERM)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        # A store error caused by the disk (tracking wraps a full disk as its own) names the
        # disk: exit 1, a fault of the place written to, like the OSErrors below.
        fault = disk_fault(exc)
        print(f"autosplit: {fault or exc}", file=sys.stderr)
        return 1 if fault else 2
    except KeyboardInterrupt as exc:
        what = f" by {exc.args[0]}" if exc.args else ""
        again = "resume" if args.command == "search" else "run it again"
        print(
            f"autosplit: interrupted{what}; finished work is kept; to {again}: autosplit "
            f"{shlex.join(argv)}",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:
        # Full disk, quota, read-only or permission faults met during the work (found anywhere
        # in the exception's causes): one line naming the file. Everything else is a bug and
        # keeps its traceback.
        fault = disk_fault(exc)
        if fault is None:
            raise
        print(f"autosplit: {fault}", file=sys.stderr)
        return 1
    finally:
        interrupts.restore(handlers)


if __name__ == "__main__":
    sys.exit(main())
