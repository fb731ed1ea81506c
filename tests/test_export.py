"""The student shipped: MLflow models (registered under the study's name), ONNX files beside the
weights (ResKD's gate run part by part), and latency measured against the teacher.

One tiny study (digits, a 1-epoch teacher, one 1-epoch res_chain trial with an exit gate), one
export of it; real MLflow on SQLite, real onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from autosplit.cli import main
from autosplit.search.attrs import ROLE_TAG, RunRole

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "search_spaces" / "digits_tiny.yaml"
CPU = ("--device", "cpu")
STUDY = "ship"
RUNS = 5  # latency runs: few, to stay fast (the CLI's default is 100)


def chain_space_text() -> str:
    """digits_tiny, cheaper: a 1-epoch teacher; one 1-epoch trial on 300 rows, a ResKD
    chain of two res-students (the exit gate calibrated on val); no rungs, no final stage."""
    text = DIGITS.read_text()
    text = text.replace("    epochs: 12\n", "    epochs: 1\n").replace(
        "    epochs: 2\n    batch_size: 64\n    lr: 0.1\n    seed: 0\nparams:",
        "    epochs: 1\n    batch_size: 64\n    lr: 0.1\n    seed: 0\n    max_train_samples: 300\n"
        "params:",
    )
    text = text.replace("choices: [single, res_chain, branches, assistant]", "choices: [res_chain]")
    text = text.replace("{type: int, low: 1, high: 2, when", "{choices: [2], when")
    head, _ = text.split("search:\n")
    return head + (
        "search:\n  trials: 1\n  sampler: random\n  fidelity: {rungs: [], final: null}\n"
        "  baselines: {}\n"
    )


def export_args(tmp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "export",
        "--study-name",
        STUDY,
        "--runs-dir",
        str(tmp / "runs"),
        "--out",
        str(out),
        "--tracking-uri",
        f"sqlite:///{tmp}/mlflow.db",
        *CPU,
        *extra,
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The study searched (no tracking) and exported once, with MLflow models and ONNX."""
    tmp = tmp_path_factory.mktemp("ship")
    space = tmp / "chains.yaml"
    space.write_text(chain_space_text())
    search = ["search", "--space", str(space), "--runs-dir", str(tmp / "runs")]
    assert main([*search, "--study-name", STUDY, "--no-tracking", "--quiet", *CPU]) == 0
    threads = torch.get_num_threads()
    assert main(export_args(tmp, tmp / "export", "--onnx", "--latency-runs", str(RUNS))) == 0
    assert torch.get_num_threads() == threads  # latency ran on one thread, then put it back
    return tmp, tmp / "export"


@pytest.fixture
def deployer(exported, monkeypatch) -> str:
    """The store's URI, set as a deployer's shell would (MLflow's own loaders read it)."""
    tmp, _ = exported
    uri = f"sqlite:///{tmp}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return uri


def _context(tmp: Path, out: Path):
    """The export's own loading code: data, teacher, and each exported student."""
    from autosplit.device import resolve_runtime
    from autosplit.evaluation import EvalContext

    best = yaml.safe_load((out / "best.yaml").read_text())
    return EvalContext(best["candidate"], resolve_runtime("cpu"), tmp / "runs"), best


def test_the_best_student_is_a_registered_mlflow_model_with_the_exported_gate(exported, deployer):
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    tmp, out = exported
    context, best = _context(tmp, out)
    student = context.student(best["candidate"], out / "best.pt")
    threshold = best["candidate"]["structure"]["exit_threshold"]
    assert student.exit_threshold == threshold is not None

    versions = MlflowClient(deployer).search_model_versions(f"name = '{STUDY}'")
    assert [int(v.version) for v in versions] == [1]
    loaded = mlflow.pytorch.load_model(f"models:/{STUDY}/1")
    assert not loaded.training and loaded.exit_threshold == threshold

    images = context.example(256)
    with torch.no_grad():
        expected = student(images)
        got = loaded(images)
        student.exit_threshold = None
        ungated = student(images)
    assert torch.equal(got, expected)
    # The gate is what made them equal: some samples exit before the last part.
    assert not torch.equal(expected, ungated)


def test_every_exported_student_is_logged_with_a_signature(exported, deployer):
    from mlflow.models import get_model_info
    from mlflow.tracking import MlflowClient

    tmp, out = exported
    client = MlflowClient(deployer)
    experiment = client.get_experiment_by_name(STUDY)
    logged = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    stems = {p.stem for p in (out / "front").glob("trial-*.yaml")}
    assert {m.name for m in logged} == stems
    run = client.get_run(logged[0].source_run_id)
    assert run.data.tags[ROLE_TAG] == RunRole.EXPORT and run.info.status == "FINISHED"
    info = get_model_info(logged[0].model_uri)
    [spec] = info.signature.inputs.inputs
    assert list(spec.shape) == [-1, 1, 8, 8] and str(spec.type) == "float32"
    assert info.saved_input_example_info is not None


def test_an_unreachable_store_is_one_line_before_any_work(exported, tmp_path, capsys):
    tmp, _ = exported
    out = tmp_path / "export"
    args = export_args(tmp, out)
    args[args.index("--tracking-uri") + 1] = f"sqlite:///{tmp_path}"  # a folder
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("autosplit: --tracking-uri sqlite:///") and "folder" in err
    assert "\n" not in err and not out.exists()


def test_a_negative_latency_run_count_is_one_line(exported, tmp_path, capsys):
    tmp, _ = exported
    assert main(export_args(tmp, tmp_path / "export", "--latency-runs", "-1")) == 2
    assert capsys.readouterr().err.strip() == (
        "autosplit: --latency-runs -1: must be >= 0 (0: not measured)"
    )
    assert not (tmp_path / "export").exists()


def test_a_store_failing_during_the_export_keeps_the_files(exported, tmp_path):
    from autosplit.device import resolve_runtime
    from autosplit.errors import UserError
    from autosplit.export import export_study
    from autosplit.search import study as studies
    from autosplit.tracking import MlflowTracker

    tmp, _ = exported
    db = tmp_path / "mlflow.db"
    tracker = MlflowTracker(f"sqlite:///{db}")  # opens, then the file is ruined under it
    db.write_bytes(b"not a database" * 100)
    url = studies.default_storage(tmp / "runs", 1)
    study = studies.open_study(STUDY, studies.open_storage(url, write=False), create=False)
    out = tmp_path / "export"
    with pytest.raises(UserError) as caught:
        export_study(
            study,
            out,
            storage_url=url,
            runtime=resolve_runtime("cpu"),
            runs_dir=tmp / "runs",
            tracker=tracker,
            say=lambda _m: None,
        )
    message = str(caught.value)
    assert message.startswith(f"{out}: the export is written in full, but MLflow tracking at")
    assert "\n" not in message
    assert (out / "best.yaml").is_file() and (out / "best.pt").is_file()


# --- ONNX -------------------------------------------------------------------------------------


def test_onnx_gives_the_torch_logits_on_256_test_images(exported):
    import numpy as np

    from autosplit.deploy import OnnxStudent

    tmp, out = exported
    context, _ = _context(tmp, out)
    images = context.example(256)
    configs = [out / "best.yaml", *sorted((out / "front").glob("trial-*.yaml"))]
    assert len(configs) >= 2
    for config in configs:
        document = yaml.safe_load(config.read_text())
        onnx = document["provenance"]["onnx"]
        student = context.student(document["candidate"], config.with_suffix(".pt"))
        # A gated chain ships one graph per part, beside the weights, named after them.
        assert onnx["files"] == [f"{config.stem}.{p}.onnx" for p in ("base", "res1", "res2")]
        assert all((config.parent / name).is_file() for name in onnx["files"])
        assert onnx["exit_threshold"] == student.exit_threshold is not None
        with torch.no_grad():
            expected = student(images).numpy()
        got = OnnxStudent.from_export(config)(images.numpy())
        assert got.shape == expected.shape == (256, 10)
        assert float(np.abs(got - expected).max()) <= 1e-4, config
        assert (got.argmax(1) == expected.argmax(1)).all(), config


def test_the_onnx_chain_runs_a_part_only_for_the_samples_still_going(exported):
    import numpy as np
    import onnxruntime as ort

    from autosplit.deploy import run_chain

    tmp, out = exported
    context, best = _context(tmp, out)
    student = context.student(best["candidate"], out / "best.pt")
    images = context.example(256)
    with torch.no_grad():
        confidence = torch.softmax(student.base(images), dim=1).amax(dim=1).sort().values
    # A threshold halfway between two neighbouring confidences near the median, so that
    # about half the samples exit at the base and no decision sits on the edge.
    middle = int(torch.argmax(confidence[100:156].diff())) + 100
    threshold = float(confidence[middle] + confidence[middle + 1]) / 2
    student.exit_threshold = threshold
    with torch.no_grad():
        expected = student(images).numpy()

    seen: list[int] = []

    def part(name: str):
        session = ort.InferenceSession(str(out / f"best.{name}.onnx"))

        def run(batch):
            seen.append(len(batch))
            return session.run(None, {"images": batch})[0]

        return run

    parts = [part(name) for name in ("base", "res1", "res2")]
    got = run_chain(parts, images.numpy(), threshold)
    assert float(np.abs(got - expected).max()) <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert seen[0] == 256 and seen[1] == middle + 1  # res1 ran on the samples below theta only
    assert len(seen) == 2 or seen[2] <= seen[1]
    # No threshold: every part runs on every sample, the plain sum.
    seen.clear()
    student.exit_threshold = None
    with torch.no_grad():
        total = student(images).numpy()
    assert float(np.abs(run_chain(parts, images.numpy(), None) - total).max()) <= 1e-4
    assert seen == [256, 256, 256]


def test_onnx_without_its_packages_is_one_line_before_any_work(
    exported, tmp_path, monkeypatch, capsys
):
    import sys

    tmp, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # how Python blocks an import
    out = tmp_path / "export"
    assert main(export_args(tmp, out, "--onnx")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "autosplit: --onnx: needs onnxruntime (not installed); install the extra: "
        "pip install 'autosplit[onnx]'"
    )
    assert not out.exists()


# --- latency -------------------------------------------------------------------------------------


def test_median_ms_is_the_median_of_single_timed_calls_cycling_the_inputs():
    from autosplit.latency import median_ms

    # A clock that only the calls move: input 0 takes 1 ms, input 1 5 ms, input 2 2 ms.
    now, seen = [0.0], []
    cost = {0: 0.001, 1: 0.005, 2: 0.002}

    def call(x: int) -> None:
        seen.append(x)
        now[0] += cost[x]

    ms = median_ms(call, [0, 1, 2], runs=7, clock=lambda: now[0])
    # Timed calls see 0, 1, 2, 0, 1, 2, 0: 1, 5, 2, 1, 5, 2, 1 ms, whose median is 2 ms (a mean
    # would be 2.43, a median over the warm-up too would differ as well).
    assert ms == pytest.approx(2.0)
    # Warm-up: Timer.timeit(3) runs 2 calls of its own, then 3, cycling the inputs; then each
    # timed call is Timer.timeit(1): 2 untimed calls and 1 timed on the same input.
    warm_up = [0, 1, 2, 0, 1]
    timed = [x for i in range(7) for x in [i % 3] * 3]
    assert seen == warm_up + timed


def test_torch_latency_runs_on_one_thread_and_puts_the_count_back():
    from autosplit.latency import torch_latency

    class Threads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[tuple[int, int]] = set()

        def forward(self, images):
            self.seen.add((torch.get_num_threads(), len(images)))
            return images.flatten(1)

    before = torch.get_num_threads()
    module = Threads()
    latency = torch_latency(module, torch.zeros(10, 1, 8, 8), runs=4)
    assert set(latency) == {"b1", "b64"} and all(v > 0 for v in latency.values())
    assert module.seen == {(1, 1), (1, 64)}  # 10 images repeated up to a batch of 64
    assert torch.get_num_threads() == before


def test_the_export_records_latency_of_each_student_and_the_teacher(exported):
    _tmp, out = exported
    configs = [out / "best.yaml", *sorted((out / "front").glob("trial-*.yaml"))]
    teachers = []
    for config in configs:
        document = yaml.safe_load(config.read_text())
        teacher = document["provenance"]["teacher_latency_ms"]
        teachers.append(teacher)
        for latency in (document["result"]["latency_ms"], teacher):
            assert latency["measured"].startswith(f"median of {RUNS} runs after warm-up, 1 thread")
            for backend in ("torch", "onnx"):
                assert set(latency[backend]) == {"b1", "b64"}
                assert all(ms > 0 for ms in latency[backend].values())
    assert all(t == teachers[0] for t in teachers)  # the teacher measured once, for all


def test_front_latency_shows_flops_and_latency_shares_of_the_teacher(exported, capsys):
    tmp, out = exported
    runs = str(tmp / "runs")
    assert (
        main(
            ["front", "--study-name", STUDY, "--runs-dir", runs, "--latency", "--export", str(out)]
        )
        == 0
    )
    shown = capsys.readouterr().out.splitlines()
    header = next(line for line in shown if line.startswith("rank"))
    assert "%teacher" in header.split()  # FLOPs share, beside the latency shares
    for name in ("lat torch b1", "lat torch b64", "lat onnx b1", "lat onnx b64"):
        assert name in header
    best = yaml.safe_load((out / "best.yaml").read_text())
    student = best["result"]["latency_ms"]
    teacher = best["provenance"]["teacher_latency_ms"]
    row = next(
        line for line in shown if line.split()[:2] == ["1", str(best["provenance"]["trial"])]
    )
    shares = [
        f"{100 * student[b][n] / teacher[b][n]:.0f}%"
        for b in ("torch", "onnx")
        for n in ("b1", "b64")
    ]
    cells = row.split()
    label_at = cells.index("res_chain")
    assert cells[label_at - 4 : label_at] == shares
    assert any(line.startswith("%teacher: FLOPs as a share") for line in shown)


def test_front_latency_without_an_export_is_one_line(exported, tmp_path, capsys):
    tmp, _ = exported
    args = ["front", "--study-name", STUDY, "--runs-dir", str(tmp / "runs"), "--latency"]
    assert main([*args, "--export", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"autosplit: --latency: no export of study 'ship' at {tmp_path / 'none'}; run autosplit "
        "export --study-name ship first, or pass --export DIR"
    )
    # An export that measured nothing says so, and how to get it.
    out = tmp_path / "export"
    assert main([*export_args(tmp, out, "--no-tracking", "--latency-runs", "0")]) == 0
    capsys.readouterr()
    assert main([*args, "--export", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"autosplit: --latency: the export at {out} recorded no latency")
    assert "\n" not in err


def test_export_sync_and_front_default_to_the_store_the_search_recorded(tmp_path, capsys):
    """One MLflow store per study: a search with --tracking-uri X records X in the study, and a
    plain export registers the model in X (no runs/mlflow.db made); a differing --tracking-uri
    is used with one warning."""
    from mlflow.tracking import MlflowClient

    space = tmp_path / "single.yaml"
    space.write_text(chain_space_text().replace("choices: [res_chain]", "choices: [single]"))
    runs = tmp_path / "runs"
    store = f"sqlite:///{tmp_path}/chosen.db"
    search = ["search", "--space", str(space), "--runs-dir", str(runs), "--study-name", STUDY]
    assert main([*search, "--tracking-uri", store, "--quiet", *CPU]) == 0
    common = ["--study-name", STUDY, "--runs-dir", str(runs)]
    export = ["export", *common, "--out", str(tmp_path / "out"), "--latency-runs", "0", *CPU]
    capsys.readouterr()
    assert main(export) == 0
    assert not (runs / "mlflow.db").exists()
    versions = MlflowClient(store).search_model_versions(f"name = '{STUDY}'")
    assert [int(v.version) for v in versions] == [1]
    assert "warning" not in capsys.readouterr().err

    assert main(["front", *common]) == 0
    assert f"--backend-store-uri {store}" in capsys.readouterr().out
    assert main(["sync", *common]) == 0
    assert f"({store})" in capsys.readouterr().out

    other = f"sqlite:///{tmp_path}/other.db"
    assert main(["sync", *common, "--tracking-uri", other]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"autosplit: warning: --tracking-uri {other} differs from the study")
    assert "\n" not in err
