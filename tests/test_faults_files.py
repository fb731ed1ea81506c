"""Files and paths under real faults: read-only mounts, full disks (small tmpfs mounts), damaged
checkpoints, names that would leave runs/. Every fault gives one line on stderr, a non-zero
exit, no traceback, and leaves nothing half-written.

Mounting needs root (CI and the dev container run as root); elsewhere those tests skip.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from autosplit.cli import main
from autosplit.errors import UserError
from autosplit.paths import disk_fault

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "search_spaces" / "digits_tiny.yaml"
CPU = ("--device", "cpu")


def tiny_space_text(**teacher_train: str) -> str:
    """digits_tiny, cheaper still: a 1-epoch teacher, 1-epoch trials on 300 rows, no rungs and
    no final stage."""
    text = DIGITS.read_text()
    text = text.replace("    epochs: 12\n", "    epochs: 1\n").replace(
        "    epochs: 2\n    batch_size: 64\n    lr: 0.1\n    seed: 0\nparams:",
        "    epochs: 1\n    batch_size: 64\n    lr: 0.1\n    seed: 0\n    max_train_samples: 300\n"
        "params:",
    )
    for key, value in teacher_train.items():
        text = text.replace(
            "    weight_decay: 0.0005\n", f"    weight_decay: 0.0005\n    {key}: {value}\n"
        )
    head, _ = text.split("search:\n")
    return head + (
        "search:\n  trials: 2\n  sampler: random\n  fidelity: {rungs: [], final: null}\n"
        "  baselines: {}\n"
    )


def one_line(err: str) -> str:
    """The single stderr line of a failed command (and that there is exactly one)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("autosplit: "), err
    return lines[0]


@pytest.fixture(autouse=True, scope="module")
def _optuna_logs_through_logging():
    """Optuna's own handler keeps the stderr of the test that first logged, which capsys has
    closed since; through ``logging`` its lines reach pytest's capture instead."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    yield
    optuna.logging.disable_propagation()
    optuna.logging.enable_default_handler()


@pytest.fixture
def mount(tmp_path):
    """``mount(name, size="64k", full=False, read_only=False)``: a real tmpfs under tmp_path,
    filled to the last byte or remounted read-only; unmounted at teardown."""
    mounted: list[Path] = []

    def make(
        name: str,
        *,
        size: str = "64k",
        full: bool = False,
        read_only: bool = False,
        files: dict[str, bytes] | None = None,
    ) -> Path:
        point = tmp_path / name
        point.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}); the "
                "full-disk and read-only tests need root"
            )
        mounted.append(point)
        for rel, data in (files or {}).items():
            (point / rel).parent.mkdir(parents=True, exist_ok=True)
            (point / rel).write_bytes(data)
        if full:
            fd = os.open(point / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(tiny_space_text())
    return path


@pytest.fixture(scope="module")
def searched(tmp_path_factory, space_file):
    """A finished two-trial study (teacher cached), exported once to ``export/``."""
    tmp = tmp_path_factory.mktemp("searched")
    runs = tmp / "runs"
    assert (
        main(
            [
                "search",
                "--space",
                str(space_file),
                "--runs-dir",
                str(runs),
                "--study-name",
                "tiny",
                "--no-tracking",
                "--quiet",
                *CPU,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "export",
                "--study-name",
                "tiny",
                "--runs-dir",
                str(runs),
                "--out",
                str(tmp / "export"),
                *CPU,
            ]
        )
        == 0
    )
    return tmp, runs


def export_args(runs: Path, out: Path) -> list[str]:
    return ["export", "--study-name", "tiny", "--runs-dir", str(runs), "--out", str(out), *CPU]


# --- search: runs dir, study name, SQLite files: all refused before any work ------------------


@pytest.mark.parametrize(
    ("fault", "cause"),
    [("read_only", "read-only file system"), ("full", "no space left on device")],
)
def test_search_refuses_an_unwritable_runs_dir_before_work(mount, space_file, capsys, fault, cause):
    place = mount("disk", **{fault: True})
    code = main(["search", "--space", str(space_file), "--runs-dir", str(place / "runs"), *CPU])
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(
        f"autosplit: --runs-dir {place / 'runs'}: cannot write in {place} ({cause})"
    )
    assert not (place / "runs").exists()


def test_search_refuses_a_runs_dir_that_is_a_file(tmp_path, space_file, capsys):
    (tmp_path / "runs").write_text("not a folder")
    assert main(["search", "--space", str(space_file), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "is a file, not a folder" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["../../etc/x", "/tmp/x", ".hidden", "a/b", "..", "a\\b"])
def test_a_study_name_cannot_leave_runs(tmp_path, space_file, capsys, name):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(["search", "--space", str(space_file), "--study-name", name, *CPU])
    finally:
        os.chdir(cwd)
    assert code == 2
    assert one_line(capsys.readouterr().err).startswith(f"autosplit: --study-name {name!r}: ")
    assert list(tmp_path.iterdir()) == []  # not even runs/: refused before any work


@pytest.mark.parametrize("kind", ["read_only_dir", "folder", "not_sqlite", "read_only_db"])
def test_search_refuses_an_unusable_sqlite_storage_before_work(
    mount, tmp_path, space_file, capsys, kind
):
    if kind == "read_only_dir":
        db = mount("ro", read_only=True) / "optuna.db"
        expected = "(read-only file system)"
    elif kind == "read_only_db":
        # A real study database on a read-only disk: Optuna would open it, then fail at the first
        # write with "invalid data in the commit, e.g. exceeding max length".
        import optuna

        optuna.create_study(
            study_name="tiny",
            storage=f"sqlite:///{tmp_path}/made.db",
            directions=["maximize", "minimize"],
        )
        place = mount(
            "rodb",
            size="2m",
            read_only=True,
            files={"optuna.db": (tmp_path / "made.db").read_bytes()},
        )
        db, expected = place / "optuna.db", "(read-only file system)"
    elif kind == "folder":
        db = tmp_path / "db"
        db.mkdir()
        expected = "is a folder, not a database file"
    else:
        db = tmp_path / "notes.db"
        db.write_text("some notes\n")
        expected = "is not a SQLite database"
    runs = tmp_path / "runs"
    code = main(
        [
            "search",
            "--space",
            str(space_file),
            "--runs-dir",
            str(runs),
            "--storage",
            f"sqlite:///{db}",
            "--study-name",
            "tiny",
            *CPU,
        ]
    )
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"autosplit: --storage sqlite:///{db}: ") and expected in line
    assert "max length" not in line
    assert not runs.exists()  # no teacher trained, nothing written


def test_a_full_disk_during_a_trial_names_the_file(mount, searched, space_file, capsys):
    _tmp, runs = searched
    # The study database and teacher are fine; the trial's weights land on a full disk.
    full = mount("full", full=True)
    (runs / "studies" / "on-full").symlink_to(full, target_is_directory=True)
    code = main(
        [
            "search",
            "--space",
            str(space_file),
            "--runs-dir",
            str(runs),
            "--study-name",
            "on-full",
            "--trials",
            "1",
            "--no-tracking",
            "--quiet",
            *CPU,
        ]
    )
    line = one_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith(f"autosplit: {runs / 'studies' / 'on-full' / 'trial-0000'}")
    assert line.endswith("no space left on device; free space or choose another folder")


# --- front and export ---------------------------------------------------------------------------


def test_front_on_a_missing_runs_dir_says_so(tmp_path, capsys):
    assert main(["front", "--study-name", "x", "--runs-dir", str(tmp_path / "nope")]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"autosplit: --runs-dir {tmp_path / 'nope'}: does not exist (no optuna.db there); run "
        "`autosplit search` first, or pass --runs-dir or --storage"
    )


def test_front_reads_a_study_on_a_read_only_disk(mount, searched, capsys):
    _tmp, runs = searched
    place = mount("ro", size="4m", files={"optuna.db": (runs / "optuna.db").read_bytes()})
    subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True)
    assert main(["front", "--study-name", "tiny", "--storage", f"sqlite:///{place}/optuna.db"]) == 0
    assert "FLOPs" in capsys.readouterr().out


def test_export_into_a_read_only_dir_is_refused(mount, searched, capsys):
    _tmp, runs = searched
    place = mount("ro", read_only=True)
    assert main(export_args(runs, place / "export")) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(
        f"autosplit: --out {place / 'export'}: cannot write in {place} (read-only file system)"
    )


def test_a_disk_filling_during_export_leaves_no_export(mount, searched, capsys):
    _tmp, runs = searched
    place = mount("small", size="64k")  # room for the probe, not for the weights
    assert max(p.stat().st_size for p in (runs / "studies" / "tiny").rglob("*.pt")) > 64 * 1024
    assert main(export_args(runs, place / "export")) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"autosplit: {place / 'export'}")
    assert line.endswith(".pt: no space left on device; free space or choose another folder")
    assert list(place.iterdir()) == []  # neither the folder nor its staging copy


def test_a_corrupt_trial_file_leaves_no_export(searched, tmp_path, capsys):
    tmp, runs = searched
    weights = sorted((runs / "studies" / "tiny").rglob("student.pt"))
    saved = {w: w.read_bytes() for w in weights}
    try:
        for w in weights:
            w.write_bytes(saved[w][: len(saved[w]) // 2])
        out = tmp_path / "export"
        assert main(export_args(runs, out)) == 2
    finally:
        for w, data in saved.items():
            w.write_bytes(data)
    line = one_line(capsys.readouterr().err)
    assert (
        "student.pt: not a readable checkpoint: the file is empty, truncated or corrupt; "
        "nothing was exported" in line
    )
    assert list(tmp_path.iterdir()) == []
    assert (tmp / "export" / "best.yaml").is_file()  # an earlier export is untouched


# --- train --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        ("read_only", "(read-only file system)"),
        ("full", "(no space left on device)"),
        ("folder", "is a folder; give a file path"),
    ],
)
def test_train_out_is_checked_before_training(mount, searched, tmp_path, capsys, fault, cause):
    tmp, _runs = searched
    if fault == "folder":
        out = tmp_path / "weights"
        out.mkdir()
    else:
        out = mount("disk", **{fault: True}) / "student.pt"
    fresh = tmp_path / "runs"  # no teacher here: a check after the work would train one first
    code = main(
        [
            "train",
            "--config",
            str(tmp / "export" / "best.yaml"),
            "--out",
            str(out),
            "--runs-dir",
            str(fresh),
            "--quiet",
            *CPU,
        ]
    )
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"autosplit: --out {out}: ") and cause in line
    assert not fresh.exists()


def test_train_keeps_the_weights_when_out_fills_up(mount, searched, capsys):
    tmp, runs = searched
    out = mount("small", size="64k") / "student.pt"  # the probe fits, the weights do not
    code = main(
        [
            "train",
            "--config",
            str(tmp / "export" / "best.yaml"),
            "--out",
            str(out),
            "--runs-dir",
            str(runs),
            "--quiet",
            *CPU,
        ]
    )
    line = one_line(capsys.readouterr().err)
    rescued = runs / "rescued" / "student.pt"
    assert code == 2
    assert line == (
        f"autosplit: --out {out}: could not write the weights ({out}: no space left "
        f"on device; free space or choose another folder); saved them to {rescued} "
        "instead"
    )
    from autosplit.checkpoint import load_checkpoint

    assert load_checkpoint(rescued, kind="student")["extra"]["test_acc"] > 0
    assert list(out.parent.iterdir()) == []


def test_train_refuses_widths_over_the_configs_own_budget(searched, tmp_path, capsys):
    tmp, _runs = searched
    config = yaml.safe_load((tmp / "export" / "best.yaml").read_text())
    config["candidate"]["split"]["base_width"] *= 4
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    fresh = tmp_path / "runs"
    assert main(["train", "--config", str(edited), "--runs-dir", str(fresh), *CPU]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"autosplit: {edited}: the student's widths give ")
    assert "over its max_flops" in line and line.endswith("or raise max_flops")
    assert not (fresh / "teachers").exists()  # refused before the teacher, let alone training


def test_train_config_given_a_checkpoint(searched, capsys):
    tmp, _runs = searched
    assert main(["train", "--config", str(tmp / "export" / "best.pt")]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"autosplit: {tmp / 'export' / 'best.pt'}: is binary, not a YAML text file (a .pt "
        "checkpoint?); pass a YAML file, e.g. the best.yaml written by `autosplit export`"
    )


# --- teacher ------------------------------------------------------------------------------------


def _teacher(space: Path, runs: Path) -> int:
    return main(["teacher", "--space", str(space), "--runs-dir", str(runs), "--quiet", *CPU])


def test_a_corrupt_teacher_cache_or_fit_state_is_rebuilt_with_one_warning(
    space_file, tmp_path, caplog, capsys
):
    runs = tmp_path / "runs"
    assert _teacher(space_file, runs) == 0
    [cached] = (runs / "teachers").glob("*/teacher.pt")
    cached.write_bytes(cached.read_bytes()[:100])
    fit_state = cached.with_name("fit-state.pt")
    fit_state.write_bytes(b"half a file")
    caplog.clear()
    assert _teacher(space_file, runs) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"teacher cache {cached} unusable (the file is empty, truncated or corrupt); training "
        "the teacher again",
        f"teacher fit-state {fit_state} unusable (the file is not a PyTorch file); training the "
        "teacher from epoch 0",
    ]
    assert "trained in" in capsys.readouterr().out
    from autosplit.checkpoint import load_checkpoint

    assert load_checkpoint(cached, kind="teacher")["extra"]["val_acc"] > 0
    assert not fit_state.exists()


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("truncated", "the file is empty, truncated or corrupt"),
        (
            "object",
            "it holds Python objects besides tensors, which autosplit does not unpickle "
            "(torch.load weights_only=True)",
        ),
        (
            "pickle",
            "it holds Python objects besides tensors, which autosplit does not unpickle "
            "(torch.load weights_only=True)",
        ),
    ],
)
def test_a_users_teacher_checkpoint_is_refused_in_one_sentence(
    tmp_path, capsys, recwarn, content, why
):
    import argparse
    import pickle

    import torch

    weights = tmp_path / "mine.pt"
    if content == "truncated":
        torch.save({"w": torch.zeros(1000)}, weights)
        weights.write_bytes(weights.read_bytes()[:300])
    elif content == "object":
        torch.save({"w": argparse.Namespace(a=1)}, weights)
    else:  # a bare pickle (protocol 5), on which torch also warns before refusing
        weights.write_bytes(pickle.dumps(_RunsCode(), protocol=5))
    space = tmp_path / "space.yaml"
    space.write_text(
        tiny_space_text().replace("  width: 1.0\n", f"  width: 1.0\n  checkpoint: {weights}\n")
    )
    assert _teacher(space, tmp_path / "runs") == 2
    assert one_line(capsys.readouterr().err) == (
        f"autosplit: {weights}: not a readable weights file: {why}; point teacher.checkpoint to "
        "another file"
    )
    assert [str(w.message) for w in recwarn] == []  # a warning would be a second stderr line


def test_a_diverging_teacher_is_one_line(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(
        tiny_space_text().replace(
            "    lr: 0.1\n    weight_decay", "    lr: 1.0e+6\n    weight_decay"
        )
    )
    assert _teacher(space, tmp_path / "runs") == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("autosplit: teacher resnet8: training loss became nan at epoch 1; ")
    assert line.endswith(
        "lower the learning rate (teacher.train.lr, now 1e+06) or set teacher.train.grad_clip_norm"
    )


# --- flops --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (
            ("--input", "3x100000x100000"),
            "autosplit: --input 3x100000x100000: 30,000,000,000 values",
        ),
        (
            ("--input", "100000000x32x32"),
            "autosplit: --input 100000000x32x32: 102,400,000,000 values",
        ),
        (("--input", "0x32x32"), "autosplit: --input '0x32x32': every size must be >= 1"),
        (
            ("--width", "100000"),
            "autosplit: --input 3x32x32: cannot run resnet8 (width 100000) on it "
            "(not enough memory)",
        ),
    ],
)
def test_flops_on_an_input_too_large_to_build(capsys, args, start):
    assert main(["flops", "--model", "resnet8", *args]) == 2
    assert one_line(capsys.readouterr().err).startswith(start)


# --- the CLI's last line of defence -------------------------------------------------------------


def test_disk_faults_anywhere_in_the_chain_are_one_line_and_bugs_still_raise(monkeypatch, capsys):
    import autosplit.cli as cli

    def failing(exc: BaseException):
        def command(_args):
            raise exc

        return command

    monkeypatch.setattr(
        cli, "cmd_flops", failing(OSError(errno.EDQUOT, "Disk quota exceeded", "/data/runs/x.pt"))
    )
    assert main(["flops", "--model", "m"]) == 1
    assert one_line(capsys.readouterr().err) == (
        "autosplit: /data/runs/x.pt: disk quota exceeded; free space or choose another folder"
    )
    # MLflow tracking wraps a full disk as its own failure: the disk is named, not tracking.
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/runs/mlflow.db")
        except OSError as cause:
            raise UserError(
                "MLflow tracking at sqlite:///data/runs/mlflow.db: could not log "
                "(check --tracking-uri, or pass --no-tracking)"
            ) from cause
    except UserError as wrapped:
        monkeypatch.setattr(cli, "cmd_flops", failing(wrapped))
    assert main(["flops", "--model", "m"]) == 1
    assert "tracking" not in one_line(capsys.readouterr().err)
    for bug in (OSError(errno.ENOENT, "No such file", "/x"), ValueError("a bug")):
        monkeypatch.setattr(cli, "cmd_flops", failing(bug))
        with pytest.raises(type(bug)):
            main(["flops", "--model", "m"])


def test_disk_fault_reads_sqlite_and_respects_from_none():
    sqlite = RuntimeError("(sqlite3.OperationalError) database or disk is full")
    assert disk_fault(sqlite) == (
        "a SQLite database: no space left on device (SQLite: database "
        "or disk is full); free space or choose another folder, e.g. "
        "another --runs-dir"
    )
    # What MLflow tracking raises on a full disk: the line names the store's file instead.
    tracking = UserError(
        "MLflow tracking at sqlite:////data/runs/mlflow.db: could not log "
        "metrics: (sqlite3.OperationalError) database or disk is full (check "
        "--tracking-uri, or pass --no-tracking)"
    )
    assert disk_fault(tracking).startswith("/data/runs/mlflow.db: no space left on device")
    readonly = RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database")
    assert "read-only file system (SQLite: readonly database)" in disk_fault(readonly)
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/x")
        except OSError:
            raise UserError("a clearer line of our own") from None
    except UserError as ours:
        assert disk_fault(ours) is None  # `from None` means: our own line already says it


def test_the_real_command_prints_one_line_too(tmp_path):
    """In-process tests cannot see warnings Python prints to stderr; the installed command can."""
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "autosplit.cli", "flops", "--model", "resnet8", "--width", "100000"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 2
    assert one_line(out.stderr).startswith("autosplit: --input 3x32x32: cannot run resnet8")
