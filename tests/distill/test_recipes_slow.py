"""Real training on Fashion-MNIST, behind ``-m slow``: every seed recipe at its paper's
procedure learns, a calibrated ResKD gate saves FLOPs, and a staged base trains its full schedule.

``python3 -m pytest -m slow tests/distill/test_recipes_slow.py`` (a few minutes on a 2-core CPU:
a half-width ResNet-20 teacher for 1 epoch over the 54k training rows, then each recipe for 2
epochs over 5k rows at a quarter of the teacher's FLOPs, its teacher outputs from the cache).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from autosplit.cache import teacher_cache_for
from autosplit.config import DataConfig, TeacherConfig, TrainConfig
from autosplit.data import load_splits
from autosplit.distill import METHODS, recipe_candidate, train_candidate
from autosplit.distill.candidate import Candidate
from autosplit.distill.run import build_and_count
from autosplit.flops import count_flops
from autosplit.teacher import get_teacher

pytestmark = pytest.mark.slow

FASHION = Path("/usr/share/datasets/fashion-mnist")
EPOCHS, ROWS = 2, 5000
CHANCE = 10.0  # ten classes


@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory, cpu):
    if not any(FASHION.glob("*.gz")):
        pytest.fail(f"{FASHION}: Fashion-MNIST is missing; run scripts/setup.sh")
    data = DataConfig(name="fashion-mnist", val_fraction=0.1, augment=False)
    splits = load_splits(data)
    runs = tmp_path_factory.mktemp("runs")
    config = TeacherConfig(
        model="resnet20",
        width=0.5,
        train=TrainConfig(epochs=1, batch_size=128, lr=0.1),
    )
    teacher = get_teacher(config, data, splits, cpu, runs_dir=runs, progress=False)
    assert teacher.val_acc > 70.0  # a teacher worth distilling
    return data, config, splits, teacher, runs


def _base(fashion) -> Candidate:
    data, config, splits, teacher, _ = fashion
    flops = count_flops(teacher.model, splits.info.input_shape)
    return Candidate.from_dict(
        {
            "data": {"name": data.name, "val_fraction": data.val_fraction, "augment": False},
            "teacher": {"model": config.model, "width": config.width},
            "max_flops": flops // 4,  # 1/8 of a half-width teacher leaves ResKD parts no width
            "student": {"family": "resnet20"},
            "train": {
                "epochs": EPOCHS,
                "batch_size": 128,
                "lr": 0.1,
                "max_train_samples": ROWS,
                "grad_clip_norm": 5.0,
            },
        }
    )


def _train(fashion, candidate: Candidate, cpu):
    _, _, splits, teacher, runs = fashion
    distiller, _ = build_and_count(candidate, teacher.model, splits)
    source = teacher_cache_for(
        candidate, teacher, splits, cpu, runs, taps=set(distiller.teacher_taps)
    )
    return train_candidate(
        candidate, splits, teacher.model, cpu, teacher_source=source, progress=False
    )


@pytest.fixture(scope="module")
def reskd(fashion, cpu):
    candidate = recipe_candidate("reskd", _base(fashion))
    return candidate, _train(fashion, candidate, cpu)


@pytest.mark.parametrize("method", [m for m in METHODS.names() if m != "reskd"])
def test_every_seed_recipe_learns_fashion_mnist(fashion, cpu, method: str) -> None:
    candidate = recipe_candidate(method, _base(fashion))
    result = _train(fashion, candidate, cpu)
    assert result.val_acc > 3 * CHANCE, f"{method}: {result.val_acc:.2f}% val"
    assert result.flops.worst_case <= candidate.max_flops


def test_reskd_learns_fashion_mnist(reskd) -> None:
    candidate, result = reskd
    assert result.val_acc > 3 * CHANCE, f"reskd: {result.val_acc:.2f}% val"
    assert result.flops.worst_case <= candidate.max_flops


def test_calibrated_reskd_gate_costs_less_than_its_worst_case(reskd) -> None:
    _, result = reskd
    assert result.calibration is not None and result.exit.threshold is not None
    assert result.expected_flops < result.flops.worst_case
    assert result.exit.reach_rates[0] < 1.0  # some validation samples stop at the base


def test_a_staged_base_trains_for_its_full_schedule(reskd) -> None:
    candidate, result = reskd
    n_parts = candidate.structure.get("n_parts")
    assert candidate.schedule == "staged"
    assert result.stages == [("base", EPOCHS)] + [
        (f"part{k}", EPOCHS) for k in range(1, n_parts + 1)
    ]
    base = result.history[:EPOCHS]
    assert [h.epoch for h in base] == list(range(1, EPOCHS + 1))
    # The base's cosine schedule runs its whole course inside its own stage (the lr logged is
    # the epoch's last step's): near zero by the stage's last epoch, then it restarts for each
    # part at the same point.
    assert base[-1].lr < 0.01 * candidate.train.lr < base[0].lr
    assert result.history[EPOCHS].lr == pytest.approx(base[0].lr)
    assert result.train_cost == pytest.approx(n_parts + 1)
