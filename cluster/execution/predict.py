"""Evaluation's predictions as a Ray task, in a fresh process of the model's framework alone.

TensorFlow after torch works in one process, the other order has segfaulted,
and the caller (the Prefect process) loads no framework: so the checkpoint's
model predicts in a task of its own, which fetches the checkpoint and the data
on whichever node it lands.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.data import predict_split
from cluster.execution.nodecache import StoredData, materialize
from cluster.frameworks import get_framework, load

__all__ = ["StoredCheckpoint", "predict"]


@dataclass(frozen=True, kw_only=True)
class StoredCheckpoint:
    """A checkpoint folder in the store, as any node reaches it (no filesystem: a folder every node sees)."""

    filesystem: Any  # a pyarrow.fs.FileSystem, or None
    path: str


def predict(framework: str, checkpoint: StoredCheckpoint, data: StoredData, *, split: str = "test",
            cpus: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) of ``data``'s ``split`` by the checkpoint's model."""
    import ray

    spec = get_framework(framework)
    task = ray.remote(max_calls=1)(predict_on_node).options(num_cpus=cpus, runtime_env={"env_vars": spec.env})
    return ray.get(task.remote(framework, checkpoint, data, split))


def predict_on_node(framework: str, checkpoint: StoredCheckpoint, data: StoredData, split: str):
    """The task's body: fetch the checkpoint and the split here, predict with the framework's own code."""
    from ray.train import Checkpoint

    directory = materialize(data)
    with tempfile.TemporaryDirectory() as tmp:
        Checkpoint(checkpoint.path, filesystem=checkpoint.filesystem).to_directory(tmp)
        framework_predict = load(get_framework(framework).predict)
        return predict_split(directory, split, lambda images: framework_predict(Path(tmp), images))
