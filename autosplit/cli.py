"""The ``autosplit`` command line. It decides what the user sees: one line per error, progress
bars on long work, tables at the end. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from autosplit.errors import UserError

DEFAULT_SPACE = "fashion_mnist.yaml"


def find_space(name: str | None) -> Path:
    """``--space`` as given, else the default space from ./search_spaces or the source tree."""
    if name is not None:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--space {name}: file not found; see search_spaces/ for examples")
        return path
    for folder in (Path.cwd() / "search_spaces", Path(__file__).resolve().parent.parent / "search_spaces"):
        if (folder / DEFAULT_SPACE).is_file():
            return folder / DEFAULT_SPACE
    raise UserError(f"no --space given and search_spaces/{DEFAULT_SPACE} not found; pass --space FILE")


def load_space_sections(path: Path) -> tuple[Any, Any]:
    """The ``data`` and ``teacher`` sections of a search-space file, strictly validated."""
    from autosplit.config import DataConfig, TeacherConfig, from_dict, load_yaml

    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    for section in ("data", "teacher"):
        if section not in raw:
            raise UserError(f"{path}: missing section {section!r}")
    try:
        data = from_dict(DataConfig, raw["data"], "data")
        teacher = from_dict(TeacherConfig, raw["teacher"], "teacher")
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    return data, teacher


def cmd_teacher(args: argparse.Namespace) -> int:
    import dataclasses

    from autosplit.data import load_splits
    from autosplit.device import resolve_runtime
    from autosplit.teacher import get_teacher

    space = find_space(args.space)
    data, teacher_cfg = load_space_sections(space)
    if args.data_dir:
        data = dataclasses.replace(data, data_dir=args.data_dir)
    runtime = resolve_runtime(args.device)
    splits = load_splits(data)
    print(f"data: {splits.info.name} train {len(splits.train.labels)} / val "
          f"{len(splits.val.labels)} / test {len(splits.test.labels)}; device {runtime.device}")
    teacher = get_teacher(teacher_cfg, data, splits, runtime, runs_dir=args.runs_dir,
                          progress=not args.quiet)
    from autosplit.flops import count_flops, format_flops

    flops = count_flops(teacher.model.cpu(), splits.info.input_shape)
    state = "cached" if teacher.from_cache else f"trained in {teacher.train_seconds:.0f}s"
    print(f"teacher {teacher_cfg.model} ({state}): val {teacher.val_acc:.2f}%  "
          f"test {teacher.test_acc:.2f}%  FLOPs {format_flops(flops)} "
          f"(fvcore: 1 multiply-add = 1 FLOP)  -> {teacher.path}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from autosplit.flops import count_flops_report, format_flops
    from autosplit.models import create_model

    shape = _parse_shape(args.input)
    model = create_model(args.model, num_classes=args.classes, in_channels=shape[0],
                         width=args.width, depth=args.depth)
    report = count_flops_report(model, shape)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} width {args.width:g} input {args.input} classes {args.classes}: "
          f"{format_flops(report.total)} FLOPs ({report.total:,}), {params:,} params")
    print("convention: fvcore, one multiply-add = one FLOP (what papers call MACs/FLOPs for CNNs)")
    if report.unsupported:
        print("not counted (unsupported operators): "
              + ", ".join(f"{k}×{v}" for k, v in sorted(report.unsupported.items())))
    return 0


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--input {text!r}: expected CxHxW, e.g. 3x32x32") from None
    return c, h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autosplit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    teacher = sub.add_parser("teacher", help="train or reuse the cached teacher of a space")
    teacher.add_argument("--space", help="search-space YAML (default: search_spaces/fashion_mnist.yaml)")
    teacher.add_argument("--data-dir", help="where the dataset files are")
    teacher.add_argument("--device", default="auto", help="auto | cpu | cuda")
    teacher.add_argument("--runs-dir", default="runs", help="outputs folder (default: runs)")
    teacher.add_argument("--quiet", action="store_true", help="no progress bar")
    teacher.set_defaults(func=cmd_teacher)

    flops = sub.add_parser("flops", help="count a zoo model's FLOPs with fvcore")
    flops.add_argument("--model", required=True)
    flops.add_argument("--width", type=float, default=1.0)
    flops.add_argument("--depth", type=int, default=None)
    flops.add_argument("--input", default="3x32x32", help="CxHxW (default 3x32x32)")
    flops.add_argument("--classes", type=int, default=10)
    flops.set_defaults(func=cmd_flops)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"autosplit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autosplit: interrupted; finished work is kept, re-run to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
