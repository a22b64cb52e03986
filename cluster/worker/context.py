"""The context a worker loop gets (rank, world size, reporting, checkpoint restore), and a Ray-free one.

Ray supplies its own (``cluster.execution.worker_entry``); :class:`LocalContext`
serves one process or each rank under ``torchrun``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from cluster.data import Shard, load_shard


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

    def open_shard(self, directory: Path, shard: Shard, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """A training shard's (images, labels) as memory maps: from ``directory``, or fetched onto this node."""

    def started(self, epoch: int) -> None:
        """Called once per start of the worker group, after restoring, with the last epoch done (0: none)."""


@dataclass
class LocalContext:
    """Rank and world from torchrun's environment (or 0/1), checkpoints in a folder."""

    checkpoint_root: Path
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", 0)))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", 1)))
    device: object = "cpu"
    reports: list[dict] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

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

    def open_shard(self, directory: Path, shard: Shard, channels: int) -> tuple[np.ndarray, np.ndarray]:
        return load_shard(directory, shard, channels, mmap=True)

    def started(self, epoch: int) -> None:
        self.starts.append(epoch)

    def restore(self, into: Path) -> bool:
        done = sorted(self.checkpoint_root.glob("epoch_*")) if self.checkpoint_root.is_dir() else []
        if not done:
            return False
        shutil.copytree(done[-1], into, dirs_exist_ok=True)
        return True


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


