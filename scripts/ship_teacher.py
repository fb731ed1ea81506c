"""Put a teacher trained by `autosplit teacher` into the package, with its manifest.

    autosplit teacher --runs-dir DIR --quiet      # trains the default space's teacher
    python3 scripts/ship_teacher.py --runs-dir DIR --command "autosplit teacher --runs-dir DIR"

The manifest records what a user needs to trust the file: the command and the commit that
trained it, its val and test accuracy, its FLOPs, the teacher key (config + data fingerprint)
it stands for, and its SHA-256, which autosplit checks before loading it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autosplit.checkpoint import load_checkpoint, sha256_file  # noqa: E402
from autosplit.config import atomic_write_text  # noqa: E402
from autosplit.data import load_splits  # noqa: E402
from autosplit.flops import count_flops  # noqa: E402
from autosplit.search.space import find_space, load_space_sections  # noqa: E402
from autosplit.teacher import PRETRAINED_DIR, load_teacher, teacher_key  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", required=True, help="the --runs-dir `autosplit teacher` used")
    parser.add_argument("--space", default=None, help="the space it trained (default: the default)")
    parser.add_argument("--command", required=True, help="the command that trained it, verbatim")
    parser.add_argument("--commit", default=None, help="the commit it trained at (default: HEAD)")
    parser.add_argument("--name", default="fashion_mnist_resnet20")
    parser.add_argument("--note", default=None, help="what else a user should know of the run")
    args = parser.parse_args()

    space = find_space(args.space)
    data, teacher_cfg = load_space_sections(space)
    splits = load_splits(data)
    key = teacher_key(teacher_cfg, splits.fingerprint)
    source = Path(args.runs_dir) / "teachers" / key / "teacher.pt"
    if not source.is_file():
        print(f"{source}: no trained teacher for this space; run `autosplit teacher` first")
        return 2
    teacher = load_teacher(source, splits)  # checks the data fingerprint
    commit = (
        args.commit
        or subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    payload = load_checkpoint(source, kind="teacher")
    PRETRAINED_DIR.mkdir(exist_ok=True)
    target = PRETRAINED_DIR / f"{args.name}.pt"
    shutil.copyfile(source, target)
    manifest = {
        "teacher_key": key,
        "model": teacher_cfg.model,
        "data": splits.info.name,
        "data_fingerprint": splits.fingerprint,
        "command": args.command,
        "commit": commit,
        "val_acc": teacher.val_acc,
        "test_acc": teacher.test_acc,
        "train_seconds": round(teacher.train_seconds, 1),
        "flops": count_flops(teacher.model, splits.info.input_shape),
        "epochs": payload["config"]["teacher"]["train"]["epochs"],
        "sha256": sha256_file(target),
    }
    if args.note:
        manifest["note"] = args.note
    atomic_write_text(target.with_suffix(".json"), json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
