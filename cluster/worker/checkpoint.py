"""A checkpoint's framework-neutral parts: the model's spec and ``state.json``.

``state.json`` says which framework wrote a checkpoint, which of its files are
the model, and how far training got; the final checkpoint also holds the test
split's predictions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cluster.data import Manifest, predict_split
from cluster.precision import Precision

STATE_FILE = "state.json"
PREDICTIONS_FILE = "predictions.npz"  # the final checkpoint's test-split predictions (y_true, y_pred, y_onnx, ...)
ONNX_FILE = "model.onnx"  # the final checkpoint's model for any ONNX runtime: uint8 NHWC pixels → probabilities
PREPROCESSING_FILE = "preprocessing.json"  # what to do to an image file before ONNX_FILE


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What it takes to rebuild a model and feed it: shape, classes, normalisation."""

    name: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    eval_views: str = "plain"  # the test-time augmentation its predictions average over (cluster.pytorch.model.VIEWS)

    @classmethod
    def from_manifest(cls, name: str, meta: Manifest, eval_views: str = "plain") -> ModelSpec:
        return cls(name=name, in_channels=meta.channels, num_classes=len(meta.classes), image_size=meta.image_size,
                   mean=meta.mean, std=meta.std, classes=meta.classes, eval_views=eval_views)


def write_state(directory: Path, *, framework: str, versions: dict[str, str], model_files: list[str],
                spec: ModelSpec, epoch: int, history: list[dict], workers: list[dict] | None = None,
                precision: Precision | None = None) -> None:
    """The checkpoint's ``state.json``; ``workers`` records where each rank of the group that trained this epoch ran,
    ``precision`` what that group trained in (``auto`` as resolved on the workers).

    ``loaded_frameworks`` says which frameworks the writing process had loaded: one, or something leaked.
    """
    loaded = sorted(name for name in ("tensorflow", "torch") if name in sys.modules)
    state = {"framework": framework, "versions": versions, "model_files": model_files, "epoch": epoch,
             "history": history, "spec": asdict(spec), "workers": workers or [], "loaded_frameworks": loaded,
             "precision": precision.to_dict() if precision else None}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2))


def write_predictions(directory: Path, data_dir: Path, predict: Callable[[Path, np.ndarray], np.ndarray],
                      export: str = "", exact: Callable[[Path, np.ndarray], np.ndarray] | None = None) -> None:
    """Store the test split's predictions in a checkpoint, made by ``predict`` from the checkpoint's own files;
    with ``export`` (the framework's "module:function" writing ONNX), also the model as ONNX_FILE, its
    PREPROCESSING_FILE and onnxruntime's predictions of the same images (``y_onnx``), which publishing compares
    with ``predict``'s, or with ``exact``'s (``y_exact``) where given: the framework in fp32, for a ``predict``
    that rounds (bf16) where the graph does not.

    The loops call it for the final epoch's checkpoint only: evaluation then reads them, with the
    same numbers its own prediction task would have made, instead of starting a process to make them.
    """
    y_true, y_pred = predict_split(data_dir, "test", lambda images: predict(directory, images))
    arrays = {"y_true": y_true, "y_pred": y_pred}
    if export:
        arrays["y_onnx"] = _export_onnx(directory, data_dir, export)
        if exact is not None:
            arrays["y_exact"] = predict_split(data_dir, "test", lambda images: exact(directory, images))[1]
    np.savez(directory / PREDICTIONS_FILE, **arrays)


def _export_onnx(directory: Path, data_dir: Path, export: str) -> np.ndarray:
    """Write the checkpoint's model as ONNX and its preprocessing; onnxruntime's classes for the test split."""
    import onnxruntime

    from cluster.frameworks import load

    load(export)(directory, directory / ONNX_FILE)
    spec = read_state(directory)[0]
    (directory / PREPROCESSING_FILE).write_text(json.dumps(preprocessing(spec), indent=2))
    session = onnxruntime.InferenceSession(str(directory / ONNX_FILE), providers=["CPUExecutionProvider"])
    return predict_split(data_dir, "test", lambda images: session.run(None, {"pixels": images})[0].argmax(1))[1]


def preprocessing(spec: ModelSpec) -> dict:
    """What a runtime does to an image file before ONNX_FILE's graph: the contents of PREPROCESSING_FILE."""
    size, channels = spec.image_size, spec.in_channels
    return {"format": "trainflow-onnx/1",
            "input": {"name": "pixels", "dtype": "uint8", "layout": "NHWC", "shape": ["N", size, size, channels]},
            "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", len(spec.classes)]},
            "image_size": size, "channels": channels,
            "decode": "Pillow: Image.open(file).convert('RGB'), then resize((image_size, image_size), "
                      "Image.Resampling.BILINEAR) when its size differs"
                      + (", then its luma round(0.299 R + 0.587 G + 0.114 B)" if channels == 1 else ""),
            "resize": "BILINEAR", "color": "L" if channels == 1 else "RGB",
            "classes": list(spec.classes), "normalisation": "inside the graph", "test_time_views": spec.eval_views}


def read_state(directory: Path) -> tuple[ModelSpec, int, list[dict]]:
    """The spec, last finished epoch and metric history stored in a checkpoint."""
    state = json.loads((directory / STATE_FILE).read_text())
    raw = state["spec"]
    spec = ModelSpec(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"]), "classes": tuple(raw["classes"])})
    return spec, state["epoch"], state["history"]
