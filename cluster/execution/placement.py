"""Where the worker group goes: the request, checked per node, and the wait for busy resources.

A request that no set of live nodes can ever hold fails at once, naming what
the nodes have; one that fits but finds the resources taken waits, saying so
after 5 s and every 30 s after that, and gives up after ``wait_for_resources`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.errors import UserError
from cluster.execution.session import wait_ready

STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")
FIRST_LOG_S = 5.0  # a wait longer than a start-up's is worth saying early
LOG_EVERY_S = 30.0


class ResourcesUnavailable(UserError):
    """The cluster could hold the worker group but did not free the resources in time."""


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Where and how wide to train; passed straight into Ray's ScalingConfig."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    ray_address: str | None = None
    max_failures: int = 2
    placement_strategy: str = "PACK"
    wait_for_resources: float = 300.0
    node_cache_gb: float = 100.0  # training shards a node keeps of one dataset; past it they stream from the store

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise UserError("num_workers and cpus_per_worker must be at least 1.")
        if self.max_failures < 0:
            raise UserError(f"max_failures={self.max_failures} must be 0 or more.")
        if self.placement_strategy not in STRATEGIES:
            raise UserError(f"placement_strategy={self.placement_strategy!r} is unknown; "
                            f"choose one of {', '.join(STRATEGIES)}.")
        if self.node_cache_gb <= 0:
            raise UserError(f"node_cache_gb={self.node_cache_gb} must be more than 0.")
        if self.wait_for_resources <= 0:
            raise UserError(f"wait_for_resources={self.wait_for_resources} must be more than 0 seconds.")

    @property
    def bundle(self) -> dict[str, float]:
        """What one worker takes from its node."""
        return {"CPU": float(self.cpus_per_worker), **({"GPU": 1.0} if self.use_gpu else {})}

    def describe(self) -> str:
        gpu = " + 1 GPU" if self.use_gpu else ""
        workers = "worker" if self.num_workers == 1 else "workers"
        return f"{self.num_workers} {workers} x ({self.cpus_per_worker} CPU{gpu}) placed {self.placement_strategy}"


def _slots(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many workers of ``bundle`` one node can hold."""
    return int(min(node.get(name, 0.0) // amount for name, amount in bundle.items()))


def describe_nodes(nodes: list[dict[str, float]]) -> str:
    shapes = [f"{node.get('CPU', 0):g} CPU + {node.get('GPU', 0):g} GPU" for node in nodes]
    return f"{len(nodes)} live node(s): {', '.join(shapes) or 'none'}"


def placement_problem(nodes: list[dict[str, float]], resources: Resources) -> str | None:
    """Why no set of ``nodes`` (their total resources) can ever hold the worker group, or None when one can."""
    slots = [_slots(node, resources.bundle) for node in nodes]
    if not any(slots):
        return (f"no node can hold one worker of {resources.cpus_per_worker} CPU"
                + (" + 1 GPU" if resources.use_gpu else "") + f" ({describe_nodes(nodes)}); lower "
                "cpus_per_worker" + (", turn off use_gpu" if resources.use_gpu else "") + " or add bigger nodes.")
    if resources.placement_strategy == "STRICT_SPREAD":
        usable = sum(1 for s in slots if s)
        if usable < resources.num_workers:
            return (f"STRICT_SPREAD puts each of {resources.num_workers} workers on its own node, but only {usable} "
                    f"node(s) can hold one ({describe_nodes(nodes)}); lower num_workers, use SPREAD or add nodes.")
    elif sum(slots) < resources.num_workers:
        return (f"the nodes hold at most {sum(slots)} such workers ({describe_nodes(nodes)}); lower num_workers "
                "or cpus_per_worker, or add nodes.")
    return None


def live_nodes() -> list[dict[str, float]]:
    """Total resources of each live node of the connected cluster."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_placement(resources: Resources) -> None:
    """Raise at once when no set of live nodes can ever hold the worker group.

    Raises:
        UserError: naming what the nodes have and what to change.
    """
    problem = placement_problem(live_nodes(), resources)
    if problem:
        raise UserError(f"the Ray cluster cannot place {resources.describe()}: {problem}")


def free_resources() -> str:
    import ray

    free = ray.available_resources()
    return f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free in the cluster"


def wait_for_placement(resources: Resources, log: Callable[[str], None]) -> None:
    """Block until the cluster can place the worker group now, logging after 5 s and then every 30 s while it waits.

    The placement group reserved here is released at once: Ray Train makes its own.

    Raises:
        ResourcesUnavailable: after ``resources.wait_for_resources`` seconds without room.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([resources.bundle] * resources.num_workers, strategy=resources.placement_strategy)
    deadline = time.monotonic() + resources.wait_for_resources
    step = FIRST_LOG_S
    try:
        while True:
            left = deadline - time.monotonic()
            if wait_ready(group.ready(), max(0.0, min(step, left))):
                return
            if time.monotonic() >= deadline:
                raise ResourcesUnavailable(
                    f"the Ray cluster had no room for {resources.describe()} within wait_for_resources="
                    f"{resources.wait_for_resources:g} s ({free_resources()}); free resources, add nodes or raise "
                    "wait_for_resources.")
            log(f"waiting for resources: {resources.describe()}; {free_resources()}")
            step = LOG_EVERY_S
    finally:
        remove_placement_group(group)


def pending_placement() -> str | None:
    """What this job's pending placement groups wait for (a worker group restarting after node loss), or None."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    waiting = [pg for pg_id, pg in ray.util.placement_group_table().items()
               if pg_id.endswith(job) and pg["state"] in ("PENDING", "RESCHEDULING")]
    if not waiting:
        return None
    bundles = [bundle for pg in waiting for bundle in pg["bundles"].values()]
    return f"waiting for resources: {len(bundles)} worker(s) x {bundles[0]}; {free_resources()}"
