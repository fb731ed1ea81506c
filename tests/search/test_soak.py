"""Soak: 200 trials of the digits space in one `autosplit search`, with MLflow tracking on,
watching the process's memory and open files. Marked slow (56 minutes on a shared 2-core box):
``python3 -m pytest -m slow tests/search/test_soak.py -s`` prints the figures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from searchproc import _mlflow_runs, trials_now, worker

from autosplit.search import study as studies
from autosplit.search.attrs import Stage, TrialAttrs

TRIALS = 200
WARM = 20  # trials after which memory should level off (imports, caches, first plots)
# Bounds, from the measured run (2026-12-01, a 2-core machine shared with two CI runs: 200
# trials in 3355 s; RSS 1061 MB at trial 20, at most 1080 MB later (+18 MB); open files 11 ->
# at most 13): about 3x the growth seen.
RSS_GROWTH_MB = 60
FD_GROWTH = 8


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ProcessLookupError(pid)  # exited, not yet reaped: a zombie has no memory


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _done(storage: str) -> int:
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials_now(storage, "soak")
    )


@pytest.mark.slow
def test_two_hundred_trials_in_a_row_keep_memory_and_open_files_bounded(digits_runs, tmp_path):
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    proc = worker(
        digits_runs,
        "--study-name",
        "soak",
        "--storage",
        storage,
        "--tracking-uri",
        tracking,
        "--trials",
        str(TRIALS),
    )
    started = time.monotonic()
    samples: list[tuple[int, float, int]] = []  # (trials done, RSS MB, open files)
    while proc.poll() is None:
        done = _done(storage)
        try:
            sample = (done, _rss_mb(proc.pid), _fds(proc.pid))
        except (FileNotFoundError, ProcessLookupError):
            break  # it just exited
        samples.append(sample)
        if len(samples) % 30 == 0:
            print(f"soak sample: {sample}", flush=True)
        time.sleep(2.0)  # a sampling period, not a wait for something to happen
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    wall = time.monotonic() - started

    trials = optuna.load_study(
        study_name="soak", storage=studies.open_storage(storage)
    ).get_trials()
    search = [t for t in trials if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.SEARCH]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in search) == TRIALS
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert "RUNNING" not in {r.info.status for r in _mlflow_runs(tracking, "soak")}
    warm = [s for s in samples if s[0] >= WARM]
    assert warm, samples
    rss_growth = max(s[1] for s in warm) - warm[0][1]
    fd_growth = max(s[2] for s in warm) - warm[0][2]
    print(
        f"\nsoak: {TRIALS} trials in {wall:.0f} s; RSS {warm[0][1]:.0f} MB at trial "
        f"{warm[0][0]} -> max {max(s[1] for s in warm):.0f} MB (+{rss_growth:.0f}); open files "
        f"{warm[0][2]} -> max {max(s[2] for s in warm)} (+{fd_growth})"
    )
    assert rss_growth < RSS_GROWTH_MB
    assert fd_growth < FD_GROWTH
