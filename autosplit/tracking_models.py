"""Exported students as MLflow models (``autosplit export``): ``mlflow.pytorch.log_model`` with
a signature and an input example, the best one registered under the study's name.

``MlflowTracker.log_students`` opens the ``export-…`` run and turns the store's failures into
one line; this module logs the models into that run. Like ``tracking.py`` it imports MLflow
lazily, and it uses MLflow's public API only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# What MLflow's process-wide URIs are also kept in (set_tracking_uri and set_registry_uri
# write them, for subprocesses to inherit).
_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@dataclass(frozen=True)
class StudentModel:
    """One exported student to log as an MLflow model: ``module`` in eval mode on the CPU,
    ``example`` a float32 batch (1, C, H, W) of normalised images it takes."""

    name: str  # the logged model's name, e.g. "trial-0003"
    module: Any  # torch.nn.Module
    example: Any  # numpy.ndarray
    tags: dict[str, str]
    metrics: dict[str, float]
    register: bool = False  # a new version of the registered model named after the study


def log_models(
    tracking_uri: str,
    run_id: str,
    study_name: str,
    students: Sequence[StudentModel],
    *,
    logged: Callable[[StudentModel], None],
) -> str | None:
    """Log each student into run ``run_id`` of the store at ``tracking_uri``, calling
    ``logged`` after each; the registered one's ``models:/<study_name>/<version>``.

    Pickled, not MLflow's default "pt2" graph: ``torch.export`` traces one path through the
    code, and ResKD's exit gate is data-dependent control flow; a pickled module keeps its own
    ``forward``, gate and threshold (loading it needs autosplit importable).
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from autosplit import __version__

    requirements = [f"autosplit=={__version__}", f"torch=={torch.__version__.split('+')[0]}"]
    quiet = logging.getLogger("mlflow.pytorch")  # its pickle warning, once per model
    level = quiet.level
    registered = None
    quiet.setLevel(logging.ERROR)
    try:
        with _process_uris(tracking_uri), mlflow.start_run(run_id=run_id):
            for student in students:
                with torch.no_grad():
                    logits = student.module(torch.from_numpy(student.example)).numpy()
                info = mlflow.pytorch.log_model(
                    student.module,
                    name=student.name,
                    signature=infer_signature(student.example, logits),  # (-1, C, H, W)
                    input_example=student.example,
                    registered_model_name=study_name if student.register else None,
                    serialization_format="pickle",
                    pip_requirements=requirements,  # no inference subprocess
                    tags=student.tags,
                )
                if student.register:
                    registered = f"models:/{study_name}/{info.registered_model_version}"
                logged(student)
    finally:
        quiet.setLevel(level)
    return registered


@contextlib.contextmanager
def _process_uris(uri: str) -> Iterator[None]:
    """``mlflow.pytorch.log_model`` has no client or URI argument: it logs through MLflow's
    process-wide tracking and registry URIs. Point both at ``uri`` for the block
    (``mlflow.set_tracking_uri``, ``mlflow.set_registry_uri``), then put back what was in
    effect, so that no later client in this process follows them.

    Whatever the process had set, MLflow also wrote to ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_REGISTRY_URI``; putting those variables back and clearing the in-process values
    (``None``) restores it, and a URI the user gave only by those variables is theirs again.
    """
    import mlflow

    env = {name: os.environ.get(name) for name in _URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unsets MLFLOW_TRACKING_URI too: put back below
        mlflow.set_registry_uri(None)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
