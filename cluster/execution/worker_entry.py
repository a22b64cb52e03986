"""What runs first on each Ray Train worker: Ray's worker API as the loops' context, and the entry function.

Ray supplies rank, world size, reporting and checkpoints; the framework's loop
(looked up in the registry by name) does the rest. Rank 0's progress and
messages go to the caller's :class:`~cluster.execution.events.RunEvents` actor,
put without waiting for an answer, progress at most every :data:`PROGRESS_EVERY_S`.
"""

from __future__ import annotations

import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

import ray
import ray.train

from cluster.config import TrainLoopConfig
from cluster.data import Shard, load_shard, read_manifest
from cluster.execution.nodecache import ShardCache, StoredData, StoredFile, fetch_file, fits, materialize
from cluster.frameworks import get_framework, load

PROGRESS_EVERY_S = 0.5

__all__ = ["PROGRESS_EVERY_S", "RayWorkerContext", "run_worker"]


class RayWorkerContext:
    """Ray Train's worker API as the framework loops' ``WorkerContext`` (rank, world, report, restore).

    ``device`` is the framework's business: its Ray entry point sets it before training.
    """

    def __init__(self, events, shards: ShardCache | None = None) -> None:
        context = ray.train.get_context()
        self.shards = shards
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device: object = "cpu"
        self.events = events
        self.progress_at = 0.0
        self.put("placement_group", ray.util.get_current_placement_group())  # the caller removes it to stop a run

    def put(self, kind: str, payload) -> None:
        if self.rank == 0:
            self.events.put.remote(kind, payload)

    def progress(self, epoch: int, done: int, total: int, seconds: float) -> None:
        now = time.monotonic()
        if now - self.progress_at >= PROGRESS_EVERY_S or done >= total:
            self.progress_at = now
            self.put("progress", {"epoch": epoch, "done": done, "total": total, "seconds": seconds})

    def say(self, text: str) -> None:
        self.put("message", text)

    def started(self, epoch: int) -> None:
        self.put("start", epoch)

    def placement(self) -> dict:
        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "device": str(self.device)}

    def open_shard(self, directory: Path, shard: Shard, channels: int):
        if self.shards is None:
            return load_shard(directory, shard, channels, mmap=True)
        return self.shards.open(shard, channels)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def restore(self, into: Path) -> bool:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            shutil.copytree(directory, into, dirs_exist_ok=True)
        return True


def run_worker(config: dict) -> None:
    """A Ray Train worker's first lines: rebuild the typed config, fetch the data onto this node, train."""
    cfg = TrainLoopConfig.from_dict(config["loop"])
    data: StoredData = config["data"]
    directory = materialize(data)
    streamed = not data.in_place and not fits(data, read_manifest(directory))  # training shards fetched as read
    cfg = replace(cfg, data_dir=str(directory))
    weights: StoredFile | None = config.get("weights")
    if weights is not None:  # the run's starting weights, onto this node once
        cfg = replace(cfg, weights=str(fetch_file(weights)))
    load(get_framework(cfg.framework).train)(cfg, RayWorkerContext(config["events"], ShardCache(data) if streamed
                                                                    else None))
