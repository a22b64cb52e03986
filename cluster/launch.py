"""Run any registered framework on Ray Train, and its predictions as a Ray task; the one place that drives Ray Train.

Framework code never runs in the calling (Prefect) process: the trainer is
built and watched here with a backend config that imports no framework
(``cluster.trainer``), its workers run the framework's loop, and evaluation's
predictions run in a task of their own, each in a process of that framework
alone (TensorFlow after torch works in one process, the other order has
segfaulted). Per-epoch reports travel from the workers to the caller through
Train's controller (see ``cluster.trainer``), which a callback of ours feeds and
the caller polls, so the caller sees progress while the run goes on, without any
per-step cost.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cluster import runtime
from cluster.config import TrainLoopConfig
from cluster.data import load_split
from cluster.errors import UserError
from cluster.frameworks import Framework, get_framework, load
from cluster.nodecache import StoredData, materialize
from cluster.placement import (LOG_EVERY_S, Resources, ResourcesUnavailable, check_placement, free_resources,
                               pending_placement, wait_for_placement)

PROGRESS_EVERY_S = 0.5
EVENTS_WAIT_S = 1.0  # how long one ask for the run's events waits in its controller for one to come

__all__ = ["Resources", "RayWorkerContext", "StoredCheckpoint", "check_framework", "check_placement", "fit",
           "predict"]


class RayWorkerContext:
    """Ray Train's worker API as the framework loops' ``WorkerContext`` (rank, world, report, restore).

    ``device`` is the framework's business: its Ray entry point sets it before training. Rank 0's
    progress and messages go to the caller through the run's controller, sent without waiting for an
    answer, progress at most every :data:`PROGRESS_EVERY_S`.
    """

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device: object = "cpu"
        self._progress_at = 0.0

    def _send(self, kind: str, payload) -> None:
        if self.rank == 0:
            from cluster.trainer import send_event

            send_event(kind, payload)

    def progress(self, epoch: int, done: int, total: int, seconds: float) -> None:
        now = time.monotonic()
        if now - self._progress_at >= PROGRESS_EVERY_S or done >= total:
            self._progress_at = now
            self._send("progress", {"epoch": epoch, "done": done, "total": total, "seconds": seconds})

    def say(self, text: str) -> None:
        self._send("message", text)

    def placement(self) -> dict:
        import ray

        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "device": str(self.device)}

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def restore(self, into: Path) -> bool:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            shutil.copytree(directory, into, dirs_exist_ok=True)
        return True


def _worker(config: dict) -> None:
    """A Ray Train worker's first lines: rebuild the typed config, fetch the data onto this node, train."""
    cfg = TrainLoopConfig.from_dict(config["loop"])
    cfg = replace(cfg, data_dir=str(materialize(config["data"])))
    load(get_framework(cfg.framework).train)(cfg, RayWorkerContext())


def _report_callback():
    """Runs in Ray Train's controller: forwards each epoch's report, and each worker failure, to the driver."""
    from ray.train.v2.api.callback import UserCallback

    class _ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            from cluster.trainer import post_event

            post_event("report", metrics[0])  # already summed over ranks; rank 0's copy suffices

        def after_exception(self, run_context, worker_exceptions):
            from cluster.trainer import post_event

            post_event("failure", {rank: " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                                   for rank, exc in worker_exceptions.items()})

    return _ForwardReports()


def fit(cfg: TrainLoopConfig, resources: Resources, *, data: StoredData, run_name: str, storage_path: str,
        storage_filesystem=None, on_report: Callable[[dict], None] = lambda m: None,
        on_failure: Callable[[dict[int, str]], None] = lambda e: None,
        on_wait: Callable[[str], None] = lambda m: None, on_progress: Callable[[dict], None] = lambda p: None,
        on_message: Callable[[str], None] = lambda m: None) -> str:
    """Train ``cfg.framework``'s loop on a Ray Train worker group and wait for it.

    Each worker fetches ``data`` onto its own node. Re-running with the same
    ``run_name`` and ``storage_path`` resumes from the last checkpoint that run
    reported; ``on_report`` is called on the calling thread with each epoch's
    metrics as they arrive, ``on_failure`` with {rank: error} when workers fail
    (Ray then restarts the group from the last checkpoint, up to
    ``resources.max_failures`` times), ``on_wait`` every 30 s while the
    group waits for resources, ``on_progress`` with {epoch, done, total, seconds}
    (images of the epoch done so far, over all ranks) a few times a second, and
    ``on_message`` with what the workers say (a resume). Returns the path of the
    final checkpoint in storage.

    Raises:
        UserError: the batch does not split, or no set of live nodes can hold the group.
        ResourcesUnavailable: the cluster did not free room within ``resources.wait_for_resources``.
    """
    cfg.local_batch_size(resources.num_workers)  # raises before any worker starts
    check_placement(resources)
    wait_for_placement(resources, on_wait)
    framework = get_framework(cfg.framework)
    handlers = {"report": on_report, "failure": on_failure, "progress": on_progress, "message": on_message}
    trainer = _trainer(cfg, framework, resources, data, run_name, storage_path, storage_filesystem,
                       watch=lambda take_events: _pump(take_events, handlers, on_wait))
    try:
        result = trainer.fit()
    except Exception as error:
        if _start_timed_out(error):
            raise ResourcesUnavailable(
                f"Ray Train could not place {resources.describe()} within wait_for_resources="
                f"{resources.wait_for_resources:g} s ({free_resources()}); a node was lost or is busy: add nodes, "
                "free resources or raise wait_for_resources, then re-run to resume from the last checkpoint."
            ) from error
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    return result.checkpoint.path


def check_framework(name: str) -> None:
    """Raises UserError when the nodes of the connected Ray cluster lack framework ``name``.

    Asks one node (any node may host a worker; the project's image gives them all the same packages).
    """
    import ray

    missing = ray.get(ray.remote(num_cpus=0)(_missing_modules).remote(name))
    if missing:
        spec = get_framework(name)
        raise UserError(f"framework={name!r} needs {', '.join(missing)}, which the Ray cluster's nodes lack; "
                        f"install it in their image: {spec.install}")


def _missing_modules(name: str) -> list[str]:
    return get_framework(name).missing_modules()


def _controller_env(framework: Framework, resources: Resources) -> dict[str, str]:
    """What Train's controller reads from its environment, for this run."""
    # How long one start of a worker group may wait for its placement. Failed starts count against
    # controller_failure_limit (unlimited by default: a lost node with no replacement was retried forever).
    # With the same budget as worker failures and wait_for_resources shared among those tries, a group that
    # cannot be placed ends the run after about wait_for_resources seconds; a start that fails for a moment
    # (a lost node not yet known dead) is tried again.
    timeout = resources.wait_for_resources / (resources.max_failures + 1)
    settings = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{timeout:g}"}
    if runtime.one_machine() and "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ:
        # Train's preemption watcher (an actor polling for nodes being drained) has nothing to watch on a
        # one-machine Ray of our own: one process fewer to start, and no warning line at its start
        settings["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return {**framework.env, **settings}


def _trainer(cfg: TrainLoopConfig, framework: Framework, resources: Resources, data: StoredData, run_name: str,
             storage_path: str, storage_filesystem, watch: Callable):
    """The framework's Train trainer, built here: no framework loads in this process (see ``cluster.trainer``)."""
    runtime.wait_for_train_modules()
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from cluster.trainer import WatchedTrainer

    return WatchedTrainer(
        _worker,
        train_loop_config={"loop": cfg.to_dict(), "data": data},
        backend_config=load(framework.backend_config)(resources.use_gpu),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker},
                                     placement_strategy=resources.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             callbacks=[_report_callback()], worker_runtime_env={"env_vars": framework.env},
                             failure_config=FailureConfig(max_failures=resources.max_failures,
                                                          controller_failure_limit=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Train's INFO lines (each report, each checkpoint) repeat what the flow logs
                             logging_config=LoggingConfig(log_level="WARNING")),
        controller_env=_controller_env(framework, resources), watch=watch, autoscaler=not runtime.one_machine())


@dataclass(frozen=True, kw_only=True)
class StoredCheckpoint:
    """A checkpoint folder in the store, as any node reaches it (no filesystem: a folder every node sees)."""

    filesystem: Any  # a pyarrow.fs.FileSystem, or None
    path: str


def predict(framework: str, checkpoint: StoredCheckpoint, data: StoredData, *, split: str = "test",
            cpus: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) of ``data``'s ``split`` by the checkpoint's model.

    Runs as a Ray task in a fresh process of the framework's own, which fetches the
    checkpoint and the data on whichever node it lands.
    """
    import ray

    spec = get_framework(framework)
    task = ray.remote(max_calls=1)(_predict).options(num_cpus=cpus, runtime_env={"env_vars": spec.env})
    return ray.get(task.remote(framework, checkpoint, data, split))


def _predict(framework: str, checkpoint: StoredCheckpoint, data: StoredData, split: str):
    from ray.train import Checkpoint

    x, y = load_split(materialize(data), split)
    with tempfile.TemporaryDirectory() as tmp:
        Checkpoint(checkpoint.path, filesystem=checkpoint.filesystem).to_directory(tmp)
        predicted = load(get_framework(framework).predict)(Path(tmp), x)
    return np.asarray(y), np.asarray(predicted)


def _pump(take_events: Callable[[float], list], handlers: dict[str, Callable], on_wait) -> None:
    """Deliver the run's events on this thread until the run ends; after 30 s of silence, say what the group
    waits for. ``take_events(wait_s)`` returns the events not taken yet, waiting up to ``wait_s`` for one."""
    quiet_since = time.monotonic()
    while True:
        events = take_events(EVENTS_WAIT_S)
        for kind, payload in events:
            if kind == "ended":
                return
            handlers[kind](payload)
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= LOG_EVERY_S:
            quiet_since = time.monotonic()
            waiting = pending_placement()
            if waiting:
                on_wait(waiting)


def _start_timed_out(error: BaseException) -> bool:
    """Whether the run ended because its worker group could not be placed in time."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(error, ControllerError) and isinstance(error.controller_failure, WorkerGroupStartupTimeoutError)
