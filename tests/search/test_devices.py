"""One worker per device: workers placed round-robin on the devices, and a trial that runs out
of GPU memory failed in one line while the search goes on. GPUs are faked (``FAKE_GPUS_ENV``:
``cuda:N`` names that run on the CPU) and the out-of-memory error is injected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from searchproc import single_space, verbose_worker

from autosplit.device import FAKE_GPUS_ENV, resolve_devices, resolve_runtime
from autosplit.errors import UserError
from autosplit.search import study as studies
from autosplit.search.attrs import State, TrialAttrs
from autosplit.search.budget import parse_budget
from autosplit.search.driver import run_search
from autosplit.search.setup import SearchOptions
from autosplit.search.space import SearchSpace


def test_devices_default_to_every_gpu_and_refuse_one_not_visible(monkeypatch):
    monkeypatch.delenv(FAKE_GPUS_ENV, raising=False)
    if not torch.cuda.is_available():
        assert resolve_devices("auto") == ["cpu"]
        with pytest.raises(UserError, match="no CUDA device is visible"):
            resolve_devices("cuda")
    monkeypatch.setenv(FAKE_GPUS_ENV, "3")
    assert resolve_devices("auto") == ["cuda:0", "cuda:1", "cuda:2"]
    assert resolve_devices("cuda:2, cpu") == ["cuda:2", "cpu"]
    with pytest.raises(UserError, match=r"'cuda:3' is not cpu or a visible GPU"):
        resolve_devices("cuda:0,cuda:3")
    runtime = resolve_runtime("cuda:1")
    assert runtime.where == "cuda:1" and runtime.device.type == "cpu"


def test_two_workers_spread_over_two_gpus_each_measuring_its_own(digits_runs, tmp_path):
    """No --workers: one per (fake) GPU; worker i on GPU i, each trial records its device."""
    space = single_space(tmp_path, final=False)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc = verbose_worker(
        digits_runs,
        "--space",
        space,
        "--devices",
        "auto",
        "--storage",
        storage,
        "--study-name",
        "fake-gpus",
        "--no-tracking",
        "--trials",
        "4",
        "--time-limit",
        "20m",
        env={FAKE_GPUS_ENV: "2"},
    )
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="fake-gpus", storage=storage).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) >= 4
    by_worker = {}
    for t in done:
        by_worker.setdefault(t.user_attrs[TrialAttrs.key("worker")], set()).add(
            t.user_attrs[TrialAttrs.key("device")]
        )
    # Each worker process trains every trial it takes on one GPU, and no two on the same one.
    # Which worker takes how many trials is the machine's timing: the cuda:1 worker measures
    # its device before its first trial, and a fast cuda:0 worker may take all of them. So its
    # own GPU is asserted from its log line, not from a trial it may not have run.
    assert all(len(d) == 1 for d in by_worker.values())
    devices = [next(iter(d)) for d in by_worker.values()]
    assert len(devices) == len(set(devices)) and set(devices) <= {"cuda:0", "cuda:1"}
    # The parent measured on cuda:0 for the plan; the cuda:1 worker measured its own device.
    assert "throughput here (cuda:0)" in err and "throughput here (cuda:1)" in err, err[-3000:]
    assert "worker 1" in err and "worker 0" in err, err[-3000:]  # both processes ran


def test_a_trial_out_of_gpu_memory_fails_in_one_line_and_is_not_rerun(
    digits_runs, tmp_path, monkeypatch, capsys
):
    from autosplit.search import trial as search_trial

    monkeypatch.setenv(FAKE_GPUS_ENV, "2")
    real = search_trial.train_candidate
    calls = []

    def second_runs_out(candidate, *args, **kwargs):
        calls.append(candidate)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(candidate, *args, **kwargs)

    monkeypatch.setattr(search_trial, "train_candidate", second_runs_out)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    options = SearchOptions(
        space=SearchSpace.from_yaml(Path(single_space(tmp_path, final=False))),
        budget=parse_budget("0.5x"),
        trials=4,
        study_name="oom",
        storage=storage,
        device="cuda:1",
        runs_dir=digits_runs,
        progress=False,
    )
    study, _ = run_search(dataclasses.replace(options), say=lambda _m: None)
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1
    oom = failed[0]
    label = oom.user_attrs[TrialAttrs.key("label")]
    line = f"out of GPU memory: {label} at batch 64 on cuda:1"
    assert oom.user_attrs[TrialAttrs.key("state")] == State.OUT_OF_MEMORY
    assert oom.user_attrs[TrialAttrs.key("error")] == line
    err = capsys.readouterr().err
    assert f"autosplit: trial {oom.number}: {line}; the search goes on" in err
    assert "Traceback" not in err and "OutOfMemoryError" not in err
    # The others finish (the failed one used its slot in this run, as a diverged trial does).
    assert len(trials) == 4 and len([t for t in trials if t.state == TrialState.COMPLETE]) == 3
    # A resume does not re-run it: the same settings would run out again.
    assert studies.requeue_interrupted(study) == []
    run_search(dataclasses.replace(options, trials=5), say=lambda _m: None)
    again = [t for t in study.get_trials() if t.params == oom.params and t.number != oom.number]
    assert again == []
