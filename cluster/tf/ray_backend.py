"""Ray Train's side of TensorFlow: a backend that gives each worker its ``TF_CONFIG``.

Ray's own ``TensorflowTrainer`` would do this too, but importing
``ray.train.tensorflow`` imports TensorFlow in the process that builds the
trainer, and its backend sets ``TF_USE_LEGACY_KERAS=1``, which sends
``tf.keras`` to the Keras 2 package. This module imports no TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig

from cluster.ports import free_port


def free_address() -> tuple[str, int]:
    """This node's address and a port free on it, for the group's rendezvous."""
    return ray.util.get_node_ip_address(), free_port()


__all__ = ["TensorflowConfig", "backend_config"]


@dataclass
class TensorflowConfig(BackendConfig):
    """One tf.distribute worker per Ray Train worker, task index = world rank."""

    @property
    def backend_cls(self):
        return _TensorflowBackend


def _set_tf_config(addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def _address() -> str:
    host, port = free_address()
    return f"{host}:{port}"


class _TensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config: TensorflowConfig) -> None:
        # every worker picks a free port on its own node; each then learns the whole list and its place in it
        addresses = worker_group.execute(_address)
        ray.get([worker_group.execute_single_async(rank, _set_tf_config, addresses, rank)
                 for rank in range(len(worker_group))])


def backend_config(use_gpu: bool) -> TensorflowConfig:
    """The registry's entry point (``cluster.frameworks``); GPUs need nothing more than Ray's CUDA_VISIBLE_DEVICES."""
    return TensorflowConfig()
