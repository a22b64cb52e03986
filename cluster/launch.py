"""Build and run Ray Train trainers; the only module that imports ``ray.train``.

Per-epoch reports travel from the workers to the driver through a Ray queue
fed by a controller callback, so the caller sees progress while ``fit()`` runs
(and can log it, or update a Prefect artifact) without any per-step cost.
"""

from __future__ import annotations

import queue as stdlib_queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.config import TrainLoopConfig
from cluster.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Where and how wide to train; passed straight into Ray's ScalingConfig."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    ray_address: str | None = None
    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise UserError("num_workers and cpus_per_worker must be at least 1.")
        if self.max_failures < 0:
            raise UserError(f"max_failures={self.max_failures} must be 0 or more.")


class _RayWorkerContext:
    """Adapts Ray Train's worker API to ``cluster.torch_loop.WorkerContext``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

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
    from cluster.torch_loop import train_loop

    train_loop(TrainLoopConfig.from_dict(config), _RayWorkerContext())


def check_capacity(resources: Resources) -> None:
    """Fail fast when the cluster can never host the worker group, instead of waiting forever."""
    import ray

    total = ray.cluster_resources()
    need_cpu = resources.num_workers * resources.cpus_per_worker
    need_gpu = resources.num_workers if resources.use_gpu else 0
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        raise UserError(
            f"{resources.num_workers} workers need {need_cpu} CPUs and {need_gpu} GPUs, but the Ray cluster has "
            f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs; lower num_workers or add nodes.")


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


def fit_torch(cfg: TrainLoopConfig, resources: Resources, *, run_name: str, storage_path: str,
              storage_filesystem=None, on_report: Callable[[dict], None] = lambda m: None,
              on_failure: Callable[[dict[int, str]], None] = lambda e: None) -> str:
    """Train with a TorchTrainer (DDP over gloo on CPU, NCCL on GPU) and wait for it.

    Re-running with the same ``run_name`` and ``storage_path`` resumes from the
    last checkpoint that run reported; ``on_report`` is called on the calling
    thread with each epoch's metrics as they arrive, and ``on_failure`` with
    {rank: error} when workers fail (Ray then restarts the group from the last
    checkpoint, up to ``resources.max_failures`` times). Returns the path of
    the final checkpoint in storage.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    cfg.local_batch_size(resources.num_workers)  # raises before any worker starts
    check_capacity(resources)
    reports = Queue()
    trainer = TorchTrainer(
        _torch_worker,
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if resources.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             callbacks=[_report_callback(reports)],
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Train's INFO lines (each report, each checkpoint) repeat what the flow logs
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    outcome: dict = {}

    def _fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=_fit, name="ray-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not reports.empty():
        try:
            kind, payload = reports.get(timeout=0.5)
        except stdlib_queue.Empty:
            continue
        (on_report if kind == "report" else on_failure)(payload)
    reports.shutdown()
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    return result.checkpoint.path
