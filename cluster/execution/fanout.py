"""Fan a function out over a Ray cluster as plain Ray tasks (no Train): preprocessing's decode, shard by shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _on_node(fn: Callable[[Any], Any], item: Any) -> tuple[str, Any]:
    import ray

    return ray.get_runtime_context().get_node_id(), fn(item)


def map_on_cluster(fn: Callable[[Any], Any], items: list[Any]) -> list[tuple[str, Any]]:
    """``[fn(item) for item in items]``, each call a 1-CPU Ray task spread over the nodes.

    ``fn`` must be importable on every node (a module-level function of the
    shipped packages). Returns, in order, the id of the node that ran each call and its result.
    """
    import ray

    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD", max_retries=2)(_on_node)
    return ray.get([task.remote(fn, item) for item in items])
