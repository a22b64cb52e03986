"""Ray Train's side of PyTorch: a backend that joins each worker to one process group, without importing torch.

Ray's own ``TorchConfig`` does the same, but its module imports torch in every
process that builds or unpickles it: the caller that builds the trainer (the
Prefect process, which loads no framework) and Train's controller (which then
spends seconds importing torch before it starts a worker). Here torch is
imported only on the workers, where the loop needs it anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import ray
from ray.train.backend import Backend, BackendConfig

from cluster.ports import free_port


def free_address() -> tuple[str, int]:
    """This node's address and a port free on it, for the group's rendezvous."""
    return ray.util.get_node_ip_address(), free_port()


__all__ = ["ProcessGroupConfig", "backend_config"]

SHUTDOWN_TIMEOUT_S = 30


@dataclass
class ProcessGroupConfig(BackendConfig):
    """One ``torch.distributed`` process group over the worker group, rank = Train's world rank."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _ProcessGroupBackend


def _join(master_addr: str, master_port: int, backend: str, timeout_s: int) -> None:
    """Join the group through torch.distributed's ``env://`` rendezvous, with the variables torchrun would set."""
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(context.get_world_rank()),
                      WORLD_SIZE=str(context.get_world_size()), LOCAL_RANK=str(context.get_local_rank()),
                      LOCAL_WORLD_SIZE=str(context.get_local_world_size()), NODE_RANK=str(context.get_node_rank()))
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a hung collective fails instead of waiting
    dist.init_process_group(backend, init_method="env://", rank=context.get_world_rank(),
                            world_size=context.get_world_size(), timeout=timedelta(seconds=timeout_s))


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class _ProcessGroupBackend(Backend):
    share_cuda_visible_devices = True  # GPU workers on one node see each other's devices (NCCL needs it)

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        master_addr, master_port = worker_group.execute_single(0, free_address)
        worker_group.execute(_join, master_addr, master_port, backend_config.backend, backend_config.timeout_s)

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        try:
            ray.get(worker_group.execute_async(_leave), timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            pass  # the workers are about to be stopped; a group that does not close in time goes with them


def backend_config(use_gpu: bool) -> ProcessGroupConfig:
    """The registry's entry point (``cluster.frameworks``): NCCL between GPUs, gloo between CPUs."""
    return ProcessGroupConfig(backend="nccl" if use_gpu else "gloo")
