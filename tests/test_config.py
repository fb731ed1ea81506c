from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from autosplit.config import (
    DataConfig,
    TeacherConfig,
    TrainConfig,
    atomic_write_bytes,
    config_hash,
    dump_yaml,
    from_dict,
    load_yaml,
)
from autosplit.errors import UserError


def test_round_trip_through_yaml_is_exact():
    cfg = TeacherConfig(
        model="resnet20",
        width=0.75,
        depth=14,
        train=TrainConfig(epochs=3, schedule="multistep", milestones=(1, 2)),
    )
    again = from_dict(TeacherConfig, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_unknown_key_names_its_dotted_path():
    with pytest.raises(UserError, match=r"teacher\.train\.epoch: unknown key.*epochs"):
        from_dict(TeacherConfig, {"model": "x", "train": {"epoch": 3}}, "teacher")


def test_missing_key_names_its_path():
    with pytest.raises(UserError, match=r"teacher\.model: missing key"):
        from_dict(TeacherConfig, {"width": 1.0}, "teacher")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"epochs": "ten"}, r"train\.epochs: expected an integer"),
        ({"epochs": True}, r"train\.epochs: expected an integer"),
        ({"schedule": "linear"}, r"train\.schedule: 'linear' is not one of"),
        ({"epochs": 0}, r"train\.epochs: must be >= 1"),
        ({"schedule": "multistep"}, r"train\.milestones: multistep needs milestones"),
        ({"milestones": 5}, r"train\.milestones: expected a list"),
    ],
)
def test_bad_values_are_refused_with_their_path(raw, message):
    with pytest.raises(UserError, match=message):
        from_dict(TrainConfig, raw, "train")


def test_ints_are_accepted_where_floats_are_expected():
    with pytest.raises(UserError, match=r"data\.val_fraction: must be in \(0, 1\)"):
        from_dict(DataConfig, {"val_fraction": 1}, "data")
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch):
    target = tmp_path / "a.yaml"
    atomic_write_bytes(target, b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.yaml"]  # no temp file left behind


def test_load_yaml_reports_file_and_line(tmp_path: Path):
    bad = tmp_path / "space.yaml"
    bad.write_text("data:\n  name: [unclosed\n")
    with pytest.raises(UserError, match=r"space\.yaml:\d+: not valid YAML"):
        load_yaml(bad)
    with pytest.raises(UserError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")
