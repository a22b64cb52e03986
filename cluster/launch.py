"""Build and run Ray Train trainers; the only module that imports ``ray.train``.

Per-epoch reports travel from the workers to the driver through a Ray queue
fed by a controller callback, so the caller sees progress while ``fit()`` runs
(and can log it, or update a Prefect artifact) without any per-step cost.
"""

from __future__ import annotations

import os
import queue as stdlib_queue
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cluster.config import TrainLoopConfig
from cluster.nodecache import StoredData, materialize
from cluster.placement import (LOG_EVERY_S, Resources, ResourcesUnavailable, check_placement, free_resources,
                               pending_placement, wait_for_placement)

__all__ = ["Resources", "check_placement", "fit_torch"]


class _RayWorkerContext:
    """Adapts Ray Train's worker API to ``cluster.torch_loop.WorkerContext``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

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


def _torch_worker(config: dict) -> None:
    """A Ray Train worker's first lines: rebuild the typed config, fetch the data onto this node, train."""
    from cluster.torch_loop import train_loop

    cfg = replace(TrainLoopConfig.from_dict(config["loop"]), data_dir=str(materialize(config["data"])))
    train_loop(cfg, _RayWorkerContext())


def _report_callback(report_queue):
    """Runs in Ray Train's controller: forwards each epoch's report, and each worker failure, to the driver."""
    from ray.train.v2.api.callback import UserCallback

    class _ForwardReports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            report_queue.put(("report", metrics[0]))  # already summed over ranks; rank 0's copy suffices

        def after_exception(self, run_context, worker_exceptions):
            report_queue.put(("failure", {rank: " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                                          for rank, exc in worker_exceptions.items()}))

    return _ForwardReports()


def fit_torch(cfg: TrainLoopConfig, resources: Resources, *, data: StoredData, run_name: str, storage_path: str,
              storage_filesystem=None, on_report: Callable[[dict], None] = lambda m: None,
              on_failure: Callable[[dict[int, str]], None] = lambda e: None,
              on_wait: Callable[[str], None] = lambda m: None) -> str:
    """Train with a TorchTrainer (DDP over gloo on CPU, NCCL on GPU) and wait for it.

    Each worker fetches ``data`` onto its own node. Re-running with the same
    ``run_name`` and ``storage_path`` resumes from the last checkpoint that run
    reported; ``on_report`` is called on the calling thread with each epoch's
    metrics as they arrive, ``on_failure`` with {rank: error} when workers fail
    (Ray then restarts the group from the last checkpoint, up to
    ``resources.max_failures`` times), and ``on_wait`` every 30 s while the
    group waits for resources. Returns the path of the final checkpoint in storage.

    Raises:
        UserError: the batch does not split, or no set of live nodes can hold the group.
        ResourcesUnavailable: the cluster did not free room within ``resources.wait_for_resources``.
    """
    cfg.local_batch_size(resources.num_workers)  # raises before any worker starts
    check_placement(resources)
    wait_for_placement(resources, on_wait)
    trainer, reports = _trainer(cfg, resources, data, run_name, storage_path, storage_filesystem)
    outcome: dict = {}

    def _fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=_fit, name="ray-fit", daemon=True)
    thread.start()
    _pump(thread, reports, on_report, on_failure, on_wait)
    if "error" in outcome:
        raise _explain(outcome["error"], resources)
    result = outcome["result"]
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    return result.checkpoint.path


def _trainer(cfg: TrainLoopConfig, resources: Resources, data: StoredData, run_name: str, storage_path: str,
             storage_filesystem):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Ray Train passes this to its controller: how long one start of a worker group may wait for its placement.
    # Failed starts count against controller_failure_limit (unlimited by default: a lost node with no
    # replacement was retried forever). With the same budget as worker failures and wait_for_resources shared
    # among those tries, a group that cannot be placed ends the run after about wait_for_resources seconds;
    # a start that fails for a moment (a lost node not yet known dead) is tried again.
    tries = resources.max_failures + 1
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{resources.wait_for_resources / tries:g}"
    # On the driver's node, as Train's controller is: a queue actor on another node would die with that node
    # and take the run's report channel (and so the train task) with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    reports = Queue(actor_options={"scheduling_strategy": here})
    trainer = TorchTrainer(
        _torch_worker,
        train_loop_config={"loop": cfg.to_dict(), "data": data},
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker},
                                     placement_strategy=resources.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             callbacks=[_report_callback(reports)],
                             failure_config=FailureConfig(max_failures=resources.max_failures,
                                                          controller_failure_limit=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Train's INFO lines (each report, each checkpoint) repeat what the flow logs
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    return trainer, reports


def _pump(thread: threading.Thread, reports, on_report, on_failure, on_wait) -> None:
    """Deliver reports on this thread until fit() ends; after 30 s of silence, say what the group waits for."""
    quiet_since = time.monotonic()
    while thread.is_alive() or not reports.empty():
        try:
            kind, payload = reports.get(timeout=0.5)
        except stdlib_queue.Empty:
            if time.monotonic() - quiet_since >= LOG_EVERY_S:
                quiet_since = time.monotonic()
                waiting = pending_placement()
                if waiting:
                    on_wait(waiting)
            continue
        quiet_since = time.monotonic()
        (on_report if kind == "report" else on_failure)(payload)
    reports.shutdown()


def _explain(error: BaseException, resources: Resources) -> BaseException:
    """A worker group that could not be placed in time becomes one sentence; anything else stays as it is."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    if isinstance(error, ControllerError) and isinstance(error.controller_failure, WorkerGroupStartupTimeoutError):
        return ResourcesUnavailable(
            f"Ray Train could not place {resources.describe()} within wait_for_resources="
            f"{resources.wait_for_resources:g} s ({free_resources()}); a node was lost or is busy: add nodes, "
            "free resources or raise wait_for_resources, then re-run to resume from the last checkpoint.")
    return error
