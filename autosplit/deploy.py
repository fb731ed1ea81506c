"""The exported student in ONNX, and the few lines that run it with ONNX Runtime.

A student without an exit gate is one graph, ``<stem>.onnx``: normalised images float32
(B, C, H, W) in, logits (B, classes) out. A student with an exit gate (ResKD's chain, its
threshold set) is one graph per part it runs at deployment, ``<stem>.base.onnx``,
``<stem>.res1.onnx`` ..., each images -> that part's logits, and :class:`OnnxStudent` runs the
exit the way the torch student does: z^(0) = base(x), and while a sample's max softmax of
z^(k) is below the threshold, z^(k+1) = z^(k) + R_(k+1)(x) for the samples still going only. So
the ONNX path saves the FLOPs the gate is there to save (one graph holding every partial sum
would compute them all). In a deployment of your own, copy ``run_chain``: ten lines of numpy.

Needs the ``onnx`` extra (onnx, onnxruntime, onnxscript for torch's exporter); importing this
module does not: the runner imports numpy and ONNX Runtime, the exporter torch, when called.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autosplit.errors import UserError

ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
OPSET = 18


def require_onnx(flag: str = "--onnx") -> None:
    """One line naming the extra to install when a package ONNX export needs is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"{flag}: needs {', '.join(missing)} (not installed); install the extra: "
            "pip install 'autosplit[onnx]'"
        )


def gated(student: Any) -> bool:
    """Whether ``student`` exits early at deployment: it has a gate and its threshold is set."""
    return bool(getattr(student, "exit_gate", False)) and student.exit_threshold is not None


def export_onnx(student: Any, input_shape: Sequence[int], stem: Path) -> list[str]:
    """Write ``student`` (eval, CPU) as ONNX beside ``stem``; the file names written, in the
    order the runner takes them (one file, or one per part of a gated student)."""
    import torch

    if not gated(student):
        parts = [("", student)]
    else:
        parts = [(f".{name}", module) for name, module in student.inference_modules()]
    example = torch.zeros((2, *input_shape))  # batch 2: a batch of 1 would be specialised
    names = []
    for suffix, module in parts:
        path = stem.with_name(f"{stem.name}{suffix}.onnx")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        names.append(path.name)
    return names


def run_chain(parts: Sequence[Callable[[Any], Any]], images: Any, threshold: float | None) -> Any:
    """ResKD's exit, as the torch student runs it: ``parts[0]`` is the base, the rest the
    res-students, each images (b, C, H, W) -> logits (b, classes); a sample stops at z^(k)
    once its max softmax reaches ``threshold`` (None: every part runs for every sample)."""
    import numpy as np

    logits = parts[0](images)  # z^(0), (B, classes)
    out = logits.copy()
    index = np.arange(images.shape[0])  # samples still going
    for part in parts[1:]:
        going = _max_softmax(logits) < threshold if threshold is not None else index >= 0
        if not going.any():
            break
        index, logits = index[going], logits[going]
        logits = logits + part(images[index])  # z^(k) of the samples still going
        out[index] = logits
    return out


def _max_softmax(logits: Any) -> Any:
    import numpy as np

    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).max(axis=1)


class OnnxStudent:
    """An exported student on ONNX Runtime: ``OnnxStudent.from_export("best.yaml")(images)``
    gives the logits the torch student gives (its exit gate applied), images float32
    (B, C, H, W) normalised as the export's ``provenance.input`` says."""

    def __init__(
        self, paths: Sequence[str | Path], exit_threshold: float | None, *, threads: int = 1
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.sessions = [
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for path in paths
        ]
        self.exit_threshold = exit_threshold if len(self.sessions) > 1 else None

    @classmethod
    def from_export(cls, config: str | Path, *, threads: int = 1) -> OnnxStudent:
        from autosplit.config import load_yaml

        config = Path(config)
        onnx = (load_yaml(config).get("provenance") or {}).get("onnx")
        if not onnx:
            raise UserError(f"{config}: holds no ONNX files; export with autosplit export --onnx")
        paths = [config.parent / name for name in onnx["files"]]
        return cls(paths, onnx.get("exit_threshold"), threads=threads)

    def _part(self, session: Any) -> Callable[[Any], Any]:
        return lambda images: session.run(None, {"images": images})[0]

    def __call__(self, images: Any) -> Any:
        return run_chain([self._part(s) for s in self.sessions], images, self.exit_threshold)
