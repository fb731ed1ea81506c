"""The command line as a user meets it: real subprocesses of the installed ``autosplit``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("autosplit")
    cmd = [exe] if exe else [sys.executable, "-m", "autosplit.cli"]
    return subprocess.run(
        [*cmd, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "AUTOSPLIT_NO_PROGRESS": "1"},
    )


def test_flops_prints_the_count_and_the_convention(tmp_path):
    out = run(
        "flops", "--model", "resnet8x4", "--input", "3x32x32", "--classes", "100", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "177." in out.stdout and "M FLOPs" in out.stdout
    assert "one multiply-add = one FLOP" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("flops", "--model", "resnet9000"), "unknown model 'resnet9000'; known: "),
        (("flops", "--model", "resnet20", "--input", "32x32"), "--input '32x32': expected CxHxW"),
        (("teacher", "--space", "missing.yaml"), "--space missing.yaml: file not found"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(tmp_path, args, message):
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_teacher_space_with_a_typo_names_file_and_key(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        (ROOT / "search_spaces" / "digits_tiny.yaml").read_text().replace("epochs:", "epoch:")
    )
    out = run("teacher", "--space", str(space), cwd=tmp_path)
    assert out.returncode == 2
    assert "space.yaml: teacher.train.epoch: unknown key" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_teacher_trains_then_returns_from_cache(tmp_path):
    space = str(ROOT / "search_spaces" / "digits_tiny.yaml")
    first = run("teacher", "--space", space, "--device", "cpu", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "trained in" in first.stdout and "test " in first.stdout
    second = run("teacher", "--space", space, "--device", "cpu", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(cached)" in second.stdout
    assert list((tmp_path / "runs" / "teachers").glob("*/teacher.pt"))
