"""Helpers for tests that run `autosplit search` as real processes on the digits space."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[2]
SPACE = str(ROOT / "search_spaces" / "digits_tiny.yaml")


def _cmd(*args: str) -> list[str]:
    exe = shutil.which("autosplit")
    return [exe] if exe else [sys.executable, "-m", "autosplit.cli"], list(args)


def worker(
    runs: Path, *args: str, env: dict | None = None, verbose: bool = False
) -> subprocess.Popen:
    head, tail = _cmd(
        *(("-v",) if verbose else ()),
        "search",
        "--space",
        SPACE,
        "--runs-dir",
        str(runs),
        "--device",
        "cpu",
        "--quiet",
        *args,
    )
    return subprocess.Popen(
        [*head, *tail],
        cwd=runs,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "AUTOSPLIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **(env or {})},
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=500)


def _slow_top_rung_space(tmp_path):
    # A top rung of a few seconds, so the kill lands inside it on any machine.
    text = open(SPACE).read().replace("{epochs: 2, rows: null}]", "{epochs: 8, rows: null}]")
    assert "{epochs: 8, rows: null}]" in text
    path = tmp_path / "slow_top.yaml"
    path.write_text(text)
    return str(path)


def trials_now(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as a running search has them, [] while it is not created yet or its
    writer holds the lock (for polling; reads only)."""
    from autosplit.errors import UserError
    from autosplit.search import study as studies

    try:
        return optuna.load_study(
            study_name=name, storage=studies.open_storage(storage, write=False)
        ).get_trials()
    except (
        KeyError,
        UserError,
        sqlite3.OperationalError,
        optuna.exceptions.StorageInternalError,
    ):  # a database file still being created
        return []
    except Exception as exc:  # SQLAlchemy wraps "database is locked"
        if "locked" in str(exc):
            return []
        raise


def single_space(tmp_path: Path, *, final: bool = True) -> str:
    """digits_tiny with single students only (seconds a trial); ``final=False`` drops the
    rungs and the final stage too."""
    text = open(SPACE).read()
    old = "choices: [single, res_chain, branches, assistant]"
    assert old in text
    text = text.replace(old, "choices: [single]")
    if not final:
        head, _ = text.split("search:\n")
        text = (
            head + "search:\n  trials: 4\n  fidelity: {rungs: [], final: null}\n  baselines: {}\n"
        )
    path = tmp_path / ("single.yaml" if final else "single_flat.yaml")
    path.write_text(text)
    return str(path)


def verbose_worker(runs: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """``worker`` with ``autosplit -v``: its log lines on stderr."""
    return worker(runs, *args, env=env, verbose=True)
