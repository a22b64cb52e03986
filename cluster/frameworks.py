"""The training frameworks, by name: one frozen record each, registered once.

A record names its parts by import path (``"module:attribute"``) and never
imports them, so the flow, the Prefect form and the CLI can list and check
frameworks without loading any. The parts are loaded only where they run:
the worker loop in Ray Train's workers, the Ray backend config (which imports
no framework) where the trainer is built, ``predict`` in evaluation's Ray
task, ``probabilities`` in ``trainflow predict``. Adding a framework means one folder (model, loop,
checkpoint, predict, Ray Train backend) and one entry here.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import UserError, registered

__all__ = ["FRAMEWORKS", "Framework", "get_framework", "load"]


@dataclass(frozen=True, kw_only=True)
class Framework:
    """What training, evaluation and publishing need to know about one framework."""

    name: str
    summary: str  # one line for the form and the CLI's help
    modules: tuple[str, ...]  # importable where it trains; checked before anything starts
    install: str  # the one command that provides ``modules``
    train: str  # "module:function" (cfg: TrainLoopConfig, ctx: RayWorkerContext) -> history, on each Ray worker
    # "module:function" (use_gpu: bool) -> ray.train BackendConfig, built by the caller: neither it nor its
    # module may import the framework
    backend_config: str
    predict: str  # "module:function" (checkpoint_dir, uint8 NHWC images) -> class indices
    # "module:function" (checkpoint_dir or a published version's folder, uint8 NHWC images) -> (N, classes) softmax
    probabilities: str
    # "module:function" (checkpoint_dir, path) writing the checkpoint's model as ONNX (cluster.worker.checkpoint)
    export: str
    packages: tuple[str, ...]  # distributions whose versions a release's lineage records
    options: frozenset[str] = frozenset()  # which of TrainLoopConfig's optional speed-ups it implements
    # Environment of this framework's Ray processes. Also keeps them apart: Ray reuses a worker process only
    # for tasks with the same runtime_env, and the two frameworks must never load into one process.
    env: dict[str, str] = field(default_factory=dict)

    def missing_modules(self) -> list[str]:
        """Of ``modules``, those this process cannot import (found without importing them)."""
        missing = []
        for module in self.modules:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a parent package missing, or a module hidden in sys.modules
                found = False
            if not found:
                missing.append(module)
        return missing

    def check_installed(self) -> None:
        """Raises UserError naming the install command when this process lacks the framework."""
        missing = self.missing_modules()
        if missing:
            raise UserError(f"framework={self.name!r} needs {', '.join(missing)}, which is not installed here; "
                            f"run: {self.install}")


FRAMEWORKS: dict[str, Framework] = {
    spec.name: spec for spec in (
        Framework(
            name="torch", summary="PyTorch DDP through Ray Train's TorchTrainer (gloo on CPU, NCCL on GPU)",
            modules=("torch",), install="pip install trainflow",
            train="cluster.pytorch.loop:train_on_ray", backend_config="cluster.pytorch.ray_backend:backend_config",
            predict="cluster.pytorch.model:predict", probabilities="cluster.pytorch.model:probabilities",
            export="cluster.pytorch.export:export_onnx", packages=("torch",),
            options=frozenset({"precision=bf16", "channels_last"}),
            # Train runs the loop on a thread of its own, and glibc gives a thread a malloc arena of its own,
            # whose 64 MiB heaps are unmapped whenever one falls empty, whatever keep_freed_memory set, so a
            # step's buffers were faulted in afresh (see docs/performance.md). One arena (read by glibc as the
            # process starts) keeps them.
            env={"TRAINFLOW_FRAMEWORK": "torch", "MALLOC_ARENA_MAX": "1"}),
        Framework(
            name="tensorflow",
            summary="TensorFlow with tf.distribute.MultiWorkerMirroredStrategy, one Ray Train worker per TF worker",
            modules=("tensorflow", "keras"), install="pip install 'trainflow[tensorflow]'",
            train="cluster.tf.loop:train_on_ray", backend_config="cluster.tf.ray_backend:backend_config",
            predict="cluster.tf.model:predict", probabilities="cluster.tf.model:probabilities",
            export="cluster.tf.export:export_onnx", packages=("tensorflow", "keras"),
            # a user's global KERAS_BACKEND=torch would make `import keras` load torch into a TensorFlow worker
            env={"TRAINFLOW_FRAMEWORK": "tensorflow", "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}),
    )
}


def get_framework(name: str) -> Framework:
    """The registered framework called ``name``.

    Raises:
        UserError: for a name that is not registered.
    """
    return registered(FRAMEWORKS, "framework", name)


def load(target: str) -> Callable[..., Any]:
    """Import ``"module:attribute"`` and return the attribute."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
