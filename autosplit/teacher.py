"""The teacher: trained once by autosplit (or loaded from the user's weights) and cached.

Cached under ``runs/teachers/<key>/teacher.pt`` where the key hashes the teacher config and the
data fingerprint, so a second call with the same space returns at once and any change to the
teacher's recipe or the data trains a new one.

The package ships the default space's teacher (``autosplit/pretrained/``: the checkpoint and a
manifest with the command and commit that made it, its accuracies and its SHA-256). A teacher
whose key matches a shipped one is loaded from there instead of trained, after its SHA-256 is
checked; ``retrain=True`` (``--retrain-teacher``) trains a fresh one anyway.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from autosplit.checkpoint import (
    UnreadableCheckpoint,
    load_checkpoint,
    load_state_dict_file,
    save_checkpoint,
    sha256_file,
)
from autosplit.config import DataConfig, TeacherConfig, config_hash, from_dict, to_dict
from autosplit.data import Splits
from autosplit.device import Runtime
from autosplit.errors import UserError
from autosplit.loader import TensorLoader, eval_loader
from autosplit.models import ZooModel, create_model
from autosplit.modules import freeze
from autosplit.train import Classifier, evaluate, fit, seed_everything

log = logging.getLogger(__name__)
PRETRAINED_DIR = Path(__file__).parent / "pretrained"  # <name>.pt + <name>.json manifests


@dataclass
class Teacher:
    model: ZooModel
    config: TeacherConfig
    key: str
    path: Path
    val_acc: float
    test_acc: float
    train_seconds: float
    from_cache: bool


def teacher_key(config: TeacherConfig, data_fingerprint: str) -> str:
    return config_hash({"teacher": config, "data": data_fingerprint})


def build_teacher_model(config: TeacherConfig, splits: Splits) -> ZooModel:
    return create_model(
        config.model,
        num_classes=splits.info.num_classes,
        in_channels=splits.info.in_channels,
        width=config.width,
        depth=config.depth,
    )


def load_teacher(path: str | Path, splits: Splits) -> Teacher:
    """Load a cached teacher checkpoint and check it was made for this data."""
    payload = load_checkpoint(path, kind="teacher")
    config = from_dict(TeacherConfig, payload["config"]["teacher"], "teacher")
    extra = payload["extra"]
    if extra.get("data_fingerprint") != splits.fingerprint:
        raise UserError(
            f"{path}: teacher was trained on other data "
            f"({extra.get('data_fingerprint')} != {splits.fingerprint})"
        )
    model = build_teacher_model(config, splits)
    _load_into(model, payload["state_dict"], Path(path))
    return Teacher(
        freeze(model),
        config,
        teacher_key(config, splits.fingerprint),
        Path(path),
        float(extra["val_acc"]),
        float(extra["test_acc"]),
        float(extra["train_seconds"]),
        from_cache=True,
    )


def is_cached(
    config: TeacherConfig, splits: Splits, runs_dir: str | Path, *, retrain: bool = False
) -> bool:
    """Whether ``get_teacher`` would load this teacher rather than train or import it."""
    if retrain:
        return False
    key = teacher_key(config, splits.fingerprint)
    return (Path(runs_dir) / "teachers" / key / "teacher.pt").is_file() or (
        config.checkpoint is None and shipped_teacher(key) is not None
    )


def shipped_teacher(key: str) -> Path | None:
    """The checkpoint the package ships for teacher ``key``, if any and intact (its SHA-256 is
    the manifest's); a damaged one is passed over with one warning."""
    for manifest_path in sorted(PRETRAINED_DIR.glob("*.json")):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("shipped teacher manifest %s unreadable (%s); ignored", manifest_path, exc)
            continue
        if manifest.get("teacher_key") != key:
            continue
        path = manifest_path.with_suffix(".pt")
        digest = sha256_file(path) if path.is_file() else "missing"
        if digest != manifest.get("sha256"):
            log.warning(
                "shipped teacher %s: SHA-256 %s, the manifest says %s; training the teacher instead",
                path,
                digest[:12],
                str(manifest.get("sha256"))[:12],
            )
            return None
        return path
    return None


def get_teacher(
    config: TeacherConfig,
    data: DataConfig,
    splits: Splits,
    runtime: Runtime,
    *,
    runs_dir: str | Path = "runs",
    progress: bool = True,
    retrain: bool = False,
) -> Teacher:
    """Return the cached teacher for (config, data): from ``runs_dir``, else the one the package
    ships for it, else trained (or imported from ``config.checkpoint``) and cached.
    ``retrain`` trains a fresh one whatever is cached or shipped."""
    key = teacher_key(config, splits.fingerprint)
    folder = Path(runs_dir) / "teachers" / key
    path = folder / "teacher.pt"
    shipped = shipped_teacher(key) if config.checkpoint is None and not retrain else None
    if retrain:
        log.info("teacher %s: training a fresh one (--retrain-teacher)", config.model)
    elif not path.is_file() and shipped is not None:
        teacher = load_teacher(shipped, splits)
        teacher.model = runtime.prepare(teacher.model)
        log.info(
            "teacher %s from the shipped checkpoint %s (val %.2f%%, test %.2f%%)",
            config.model,
            shipped,
            teacher.val_acc,
            teacher.test_acc,
        )
        return teacher
    if path.is_file() and not retrain:
        try:
            teacher = load_teacher(path, splits)
        except UserError as exc:  # autosplit's own file: rebuilt, as the output cache is
            log.warning(
                "teacher cache %s unusable (%s); training the teacher again", path, _reason(exc)
            )
        else:
            teacher.model = runtime.prepare(teacher.model)
            log.info(
                "teacher %s from cache %s (val %.2f%%, test %.2f%%)",
                config.model,
                path,
                teacher.val_acc,
                teacher.test_acc,
            )
            return teacher

    model = build_teacher_model(config, splits)
    started = time.perf_counter()
    if config.checkpoint is not None:
        _load_into(model, load_state_dict_file(config.checkpoint), Path(config.checkpoint))
        model = runtime.prepare(model)
    else:
        seed_everything(config.train.seed)
        model = runtime.prepare(model)
        task = Classifier(model, label_smoothing=config.train.label_smoothing)
        train_loader = TensorLoader(
            splits.train,
            splits.info,
            batch_size=config.train.batch_size,
            shuffle=True,
            augment=data.augment,
            seed=config.train.seed,
            device=runtime.device,
            drop_last=True,
        )
        fit_state = folder / "fit-state.pt"
        fit_config = {"teacher": to_dict(config), "data": splits.fingerprint}
        _drop_unusable_fit_state(fit_state, fit_config)
        try:
            fit(
                task,
                train_loader,
                _eval_loader(splits, "val", runtime),
                config.train,
                runtime,
                progress=progress,
                desc=f"teacher {config.model}",
                checkpoint=fit_state,
                checkpoint_config=fit_config,
            )
        except FloatingPointError as exc:
            raise UserError(
                f"{exc} (teacher.train.lr, now {config.train.lr:g}) or set "
                "teacher.train.grad_clip_norm"
            ) from None
    train_seconds = time.perf_counter() - started
    model = freeze(model)
    val_acc = evaluate(model, _eval_loader(splits, "val", runtime), runtime)
    test_acc = evaluate(model, _eval_loader(splits, "test", runtime), runtime)
    save_checkpoint(
        path,
        kind="teacher",
        config={"teacher": to_dict(config), "data": to_dict(data)},
        state_dict={k: v.cpu() for k, v in model.state_dict().items()},
        extra={
            "val_acc": val_acc,
            "test_acc": test_acc,
            "train_seconds": train_seconds,
            "data_fingerprint": splits.fingerprint,
        },
    )
    (folder / "fit-state.pt").unlink(missing_ok=True)
    log.info(
        "teacher %s trained in %.0fs: val %.2f%%, test %.2f%% -> %s",
        config.model,
        train_seconds,
        val_acc,
        test_acc,
        path,
    )
    return Teacher(model, config, key, path, val_acc, test_acc, train_seconds, from_cache=False)


def _drop_unusable_fit_state(path: Path, config: dict) -> None:
    """Delete a teacher's fit-state that ``fit`` could not resume from (damaged, foreign, or
    written for another config), with one warning: training then starts from epoch 0."""
    if not path.is_file():
        return
    try:
        payload = load_checkpoint(path, kind="fit-state")
        extra = payload["extra"]
        usable = (
            payload["config"] == config
            and isinstance(extra, dict)
            and {"epoch", "optimizer", "history"} <= set(extra)
        )
        reason = "written for another configuration or incomplete"
    except UserError as exc:
        usable, reason = False, _reason(exc)
    if not usable:
        log.warning(
            "teacher fit-state %s unusable (%s); training the teacher from epoch 0", path, reason
        )
        path.unlink(missing_ok=True)


def _reason(exc: UserError) -> str:
    return exc.reason if isinstance(exc, UnreadableCheckpoint) else str(exc)


def _eval_loader(splits: Splits, which: str, runtime: Runtime) -> TensorLoader:
    return eval_loader(getattr(splits, which), splits.info, runtime.device)


def _load_into(model: nn.Module, state_dict: dict, path: Path) -> None:
    missing, unexpected = [], []
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", shapes),
            )
            if keys
        )
        raise UserError(
            f"{path}: weights do not fit {type(model).__name__} ({detail}); "
            "check teacher.model, width and depth"
        )
    model.load_state_dict(state_dict)
