"""Several machines, one study, one teacher: hosts with their own runs folders (host names
injected) on one PostgreSQL study. The first to claim the teacher trains and publishes it (MLflow
artifacts of its parent run); the other waits, fetches it and checks its SHA-256; a host with
another teacher in its cache is refused before any work."""

from __future__ import annotations

import os
import subprocess
import time

import optuna
import yaml
from searchproc import _cmd, finish, single_space, worker

from autosplit.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from autosplit.search.attrs import Stage, State, StudyAttrs, TrialAttrs
from autosplit.search.study import HOST_ENV

STUDY = "pg-one-teacher"


def _attrs(storage: str) -> dict:
    try:
        return optuna.load_study(study_name=STUDY, storage=storage).user_attrs
    except KeyError:
        return {}


def cli(cwd, *args: str) -> str:
    head, tail = _cmd(*args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*head, *tail], cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_hosts_of_one_study_share_one_teacher_and_a_different_one_is_refused(
    postgres_url, tmp_path
):
    space = single_space(tmp_path)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    runs = {host: tmp_path / host for host in ("host-a", "host-b", "host-c")}
    for folder in runs.values():
        folder.mkdir()

    def host(name: str, trials: int):
        args = ("--space", space, "--study-name", STUDY, "--storage", postgres_url)
        args += ("--tracking-uri", tracking, "--trials", str(trials))
        return worker(runs[name], *args, env={HOST_ENV: name})

    first = host("host-a", 4)
    deadline = time.monotonic() + 300
    while StudyAttrs.key("teacher_claim") not in _attrs(postgres_url):
        assert first.poll() is None and time.monotonic() < deadline, "host-a never claimed"
        time.sleep(0.2)
    second = host("host-b", 8)  # a larger total: host-b runs trials once it has the teacher
    out_a, out_b = finish(first), finish(second)

    attrs = _attrs(postgres_url)
    assert attrs[StudyAttrs.key("teacher_claim")].startswith("host-a:")
    sha = attrs[StudyAttrs.key("teacher_sha256")]
    assert attrs[StudyAttrs.key("teacher_uri")].startswith("runs:/")  # the parent run's artifacts
    # One teacher trained, by host-a; host-b fetched that file into its own cache.
    assert "(trained in" in out_a and "(trained in" not in out_b
    assert "fetched from runs:/" in out_b
    [fetched] = (runs["host-b"] / "teachers").glob("*/teacher.pt")
    assert sha256_file(fetched) == sha
    assert not list((runs["host-b"] / "teachers").glob("*/fit-state.pt"))

    trials = optuna.load_study(study_name=STUDY, storage=postgres_url).get_trials()
    ran = [t for t in trials if TrialAttrs.key("teacher_sha256") in t.user_attrs]
    hosts = {t.user_attrs[TrialAttrs.key("worker")].split(":")[0] for t in ran}
    assert hosts == {"host-a", "host-b"}
    assert {t.user_attrs[TrialAttrs.key("teacher_sha256")] for t in ran} == {sha}
    finals = [
        (t.user_attrs[TrialAttrs.key("member")], t.user_attrs[TrialAttrs.key("seed")])
        for t in trials
        if t.user_attrs.get(TrialAttrs.key("stage")) == Stage.FINAL
        and t.user_attrs.get(TrialAttrs.key("state")) == State.COMPLETE
    ]
    assert finals and len(finals) == len(set(finals))  # each (member, seed) once across hosts

    # front and export on a fresh host (no teacher, no weights of its own): the study's
    # teacher and the trials' weights come from the MLflow store the study names.
    fresh = tmp_path / "host-d"
    fresh.mkdir()
    for name in ("host-a", "host-b"):  # their weights files are on their machines only
        (runs[name] / "studies").rename(runs[name] / "elsewhere")
    common = ["--study-name", STUDY, "--storage", postgres_url, "--runs-dir", str(fresh)]
    front = cli(fresh, "front", *common)
    assert "review: mlflow ui --backend-store-uri " + tracking in front
    out = fresh / "export"
    cli(fresh, "export", *common, "--out", str(out), "--latency-runs", "0", "--device", "cpu")
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["provenance"]["teacher_sha256"] == sha
    assert (out / "best.pt").is_file()
    assert list(fresh.glob("fetched/*/student.pt"))  # from the trial runs' artifacts
    [copied] = (fresh / "teachers").glob("*/teacher.pt")
    assert sha256_file(copied) == sha and not list(fresh.glob("teachers/*/fit-state.pt"))

    # A third host whose cache holds another teacher under the same key: refused in one line.
    [trained] = (runs["host-a"] / "teachers").glob("*/teacher.pt")
    payload = load_checkpoint(trained, kind="teacher")
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name] + 1
    other = runs["host-c"] / "teachers" / trained.parent.name / "teacher.pt"
    save_checkpoint(
        other,
        kind="teacher",
        config=payload["config"],
        state_dict=payload["state_dict"],
        extra=payload["extra"],
    )
    third = host("host-c", 10)
    _out, err = third.communicate(timeout=300)
    assert third.returncode == 2
    line = err.strip()
    assert "\n" not in line and line.startswith(f"autosplit: --study-name {STUDY}: ")
    assert f"this host's teacher {other}" in line and f"not the study's ({sha[:12]})" in line
    after = optuna.load_study(study_name=STUDY, storage=postgres_url).get_trials()
    assert len(after) == len(trials)  # no work: no trial started
    assert sorted(p.name for p in runs["host-c"].rglob("*") if p.is_file()) == ["teacher.pt"]


def _fresh_study(url: str, name: str):
    from autosplit.search import study as studies

    storage = studies.open_storage(url)
    study = studies.open_study(name, storage, create=True)
    return storage, study, storage.get_study_id_from_name(name)


def test_of_hosts_claiming_at_once_exactly_one_wins(postgres_url):
    import threading

    from autosplit.search.shared_teacher import claim

    _fresh_study(postgres_url, "claim-race")
    owners: dict[str, str] = {}
    start = threading.Barrier(6)

    def host(i: int) -> None:
        from autosplit.search import study as studies

        storage = studies.open_storage(postgres_url)  # a connection of its own, like a host
        study_id = storage.get_study_id_from_name("claim-race")
        start.wait()
        owners[f"host-{i}:1"] = claim(storage, study_id, f"host-{i}:1")

    threads = [threading.Thread(target=host, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = {me for me, owner in owners.items() if owner == me}
    assert len(owners) == 6 and len(winners) == 1
    assert set(owners.values()) == winners  # the losers all see the winner


def test_a_dead_local_claim_is_taken_over_and_a_silent_owner_times_out(tmp_path, monkeypatch):
    import socket
    import sys

    import pytest

    from autosplit.errors import UserError
    from autosplit.search import study as studies
    from autosplit.search.shared_teacher import StudyTeacher, claim

    storage, study, study_id = _fresh_study(f"sqlite:///{tmp_path}/o.db", "s")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = f"{socket.gethostname()}:{dead.pid}"
    assert claim(storage, study_id, gone) == gone
    with monkeypatch.context() as elsewhere:
        elsewhere.setenv(HOST_ENV, "elsewhere")  # another host cannot tell the pid is gone
        assert claim(storage, study_id, "elsewhere:7") == gone
    me = studies.worker_id()
    assert claim(storage, study_id, me) == me  # this host sees its process is gone

    storage2, study2, id2 = _fresh_study(f"sqlite:///{tmp_path}/o2.db", "t")
    claim(storage2, id2, "elsewhere:7")
    waiting = StudyTeacher("t", storage2, lambda: study2, runs_dir=tmp_path, shared=True)
    waiting.wait_seconds = 0.0
    with pytest.raises(UserError) as refused:
        waiting.obtain(
            lambda: pytest.fail("trained"),
            lambda _p: pytest.fail("loaded"),
            data_fingerprint="d",
            own_key="k",
        )
    line = str(refused.value)
    assert "\n" not in line
    assert line.startswith("--study-name t: waited 0s for the teacher that elsewhere:7 claimed")
    assert waiting.owned is False


def test_a_study_on_the_shipped_teacher_finds_it_where_the_package_holds_it(tmp_path, monkeypatch):
    """A search on one host loads the shipped teacher from the package and copies it nowhere:
    export finds it there by its hash; another teacher's hash is still refused."""
    import json

    import pytest

    from autosplit import teacher as teachers
    from autosplit.errors import UserError
    from autosplit.search.shared_teacher import local_copy

    shipped = tmp_path / "pretrained"
    shipped.mkdir()
    checkpoint = shipped / "tiny.pt"
    checkpoint.write_bytes(b"the shipped teacher")
    sha = sha256_file(checkpoint)
    (shipped / "tiny.json").write_text(json.dumps({"teacher_key": "k1", "sha256": sha}))
    monkeypatch.setattr(teachers, "PRETRAINED_DIR", shipped)
    info = StudyAttrs(teacher_key="k1", teacher_sha256=sha, teacher_claim="vm:1")
    assert local_copy(info, "s", tmp_path / "runs", say=print) == checkpoint
    assert not (tmp_path / "runs").exists()  # nothing copied
    other = StudyAttrs(teacher_key="k1", teacher_sha256="0" * 64, teacher_claim="vm:1")
    with pytest.raises(UserError, match="was not published"):
        local_copy(other, "s", tmp_path / "runs", say=print)
