"""What every framework's worker loop shares, none of it framework code.

The context a loop gets (rank, world size, reporting, checkpoint restore),
a Ray-free context for one process or ``torchrun``, the model's spec, the
epoch's shard of the training set, and the checkpoint's ``state.json``: the
file that says which framework wrote a checkpoint, which of its files are the
model, and how far training got.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from cluster.data import Meta, load_split
from cluster.precision import Precision

STATE_FILE = "state.json"
PREDICTIONS_FILE = "predictions.npz"  # the final checkpoint's test-split predictions (y_true, y_pred)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have this process's C allocator keep the memory a training step frees, for the next step.

    glibc serves every large allocation (over 128 KiB, a threshold that rises to at most 32 MiB) with a
    mapping of its own and unmaps it on free, so each step's activations, gradients and temporaries come
    back as fresh pages that the kernel faults in and zeroes, page by page, every step. Measured on the
    2-core reference machine, one process, the seed CNN at batch 64 in fp32: 8 300 page faults and 16 ms
    of system time in a 119 ms step; with large blocks taken from the heap and the heap never trimmed, 120
    faults and 106 ms (fast_cifar_muon, bf16, batch 500: 1 080 -> 980 ms a step, peak memory +4 %).
    The process keeps its peak footprint instead of returning it, which a training worker reaches every
    step anyway. On threads other than the main one, glibc's per-thread arenas still unmap each heap that
    falls empty: Ray Train runs the loop on such a thread, so torch's Ray processes start with one arena
    (``MALLOC_ARENA_MAX=1``, in the framework's environment, ``cluster.frameworks``). (TensorFlow's loop
    does not call it: its allocator keeps its own blocks, and its step time did not change.) Returns
    whether the allocator took the settings (False where it is not glibc's).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: object  # the framework's own device object (or its name); the framework's loop sets it

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Called by every rank once per epoch; only rank 0 passes a checkpoint."""

    def restore(self, into: Path) -> bool:
        """Copy the latest checkpoint into ``into``; False when there is none."""

    def placement(self) -> dict:
        """Where this rank runs: rank, node_id, node_ip, hostname, device."""

    def progress(self, epoch: int, done: int, total: int, seconds: float) -> None:
        """Called after every step: ``done`` of ``total`` images of the epoch (all ranks), ``seconds`` into it."""

    def say(self, text: str) -> None:
        """Something the person running this should read (rank 0's is shown)."""


@dataclass
class LocalContext:
    """Rank and world from torchrun's environment (or 0/1), checkpoints in a folder."""

    checkpoint_root: Path
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", 0)))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", 1)))
    device: object = "cpu"
    reports: list[dict] = field(default_factory=list)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            target = self.checkpoint_root / f"epoch_{metrics['epoch']:04d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
        if self.rank == 0:
            print(json.dumps(metrics), flush=True)

    def progress(self, epoch: int, done: int, total: int, seconds: float) -> None:
        pass  # the per-epoch report line says it

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def placement(self) -> dict:
        return {"rank": self.rank, "node_id": None, "node_ip": None, "hostname": socket.gethostname(),
                "device": str(self.device)}

    def restore(self, into: Path) -> bool:
        done = sorted(self.checkpoint_root.glob("epoch_*")) if self.checkpoint_root.is_dir() else []
        if not done:
            return False
        shutil.copytree(done[-1], into, dirs_exist_ok=True)
        return True


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
    eval_views: str = "plain"  # the test-time augmentation its predictions average over (torch_backend.VIEWS)

    @classmethod
    def from_meta(cls, name: str, meta: Meta, eval_views: str = "plain") -> ModelSpec:
        return cls(name=name, in_channels=meta.channels, num_classes=len(meta.classes), image_size=meta.image_size,
                   mean=meta.mean, std=meta.std, classes=meta.classes, eval_views=eval_views)


def epoch_shard(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's equal-length shard of a permutation of ``range(n)`` that every rank draws identically.

    A function of (seed, epoch): a resumed epoch draws what the interrupted one would have.
    """
    perm = np.random.default_rng(seed * 100_003 + epoch).permutation(n)
    return perm[rank::world_size][: n // world_size]


def epoch_metrics(epoch: int, seconds: float, sums: list[float]) -> dict:
    """An epoch's report from sums over all ranks: train loss, train images, val loss, val correct, val images."""
    total_loss, total_seen, v_loss, v_correct, v_seen = sums
    return {
        "epoch": epoch,
        "train_loss": total_loss / total_seen,
        "val_loss": v_loss / v_seen if v_seen else None,
        "val_accuracy": v_correct / v_seen if v_seen else None,
        "epoch_seconds": seconds,
        "train_images_per_s": total_seen / seconds,
    }


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


def write_predictions(directory: Path, data_dir: Path, predict: Callable[[Path, np.ndarray], np.ndarray]) -> None:
    """Store the test split's predictions in a checkpoint, made by ``predict`` from the checkpoint's own files.

    The loops call it for the final epoch's checkpoint only: evaluation then reads them, with the
    same numbers its own prediction task would have made, instead of starting a process to make them.
    """
    x, y = load_split(data_dir, "test", mmap=True)
    np.savez(directory / PREDICTIONS_FILE, y_true=np.asarray(y), y_pred=np.asarray(predict(directory, x)))


def read_state(directory: Path) -> tuple[ModelSpec, int, list[dict]]:
    """The spec, last finished epoch and metric history stored in a checkpoint."""
    state = json.loads((directory / STATE_FILE).read_text())
    raw = state["spec"]
    spec = ModelSpec(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"]), "classes": tuple(raw["classes"])})
    return spec, state["epoch"], state["history"]
