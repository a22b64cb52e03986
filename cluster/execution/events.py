"""A training run's events, from its workers and its Train controller to the caller, through one Ray actor.

The caller starts a :class:`RunEvents` actor beside each run. Rank 0 puts its
progress and messages there, a Train ``UserCallback`` in the controller
(:mod:`cluster.execution.callback`) puts each epoch's report and each worker
failure, and the caller takes them on its own thread while the run goes on.
Puts never wait for an answer, so a step is never held up; a take waits in the
actor until an event comes (or its wait is over), so a run between events costs
the caller no calls.

Ray Train gives the caller no handle to stop a run that it watches from
another thread. So the callback, as it is unpickled in each of the run's actors
(the controller first, then each worker), puts that actor's handle (an
``"actor"`` event), and rank 0 puts its placement group (``"placement_group"``):
the caller stops a run by killing its actors and removing the group. (Train's
own placement-group cleaner asks Ray's state API, which a Ray started without
its dashboard does not serve.)

This module imports Ray alone, so the actor's process does not load Ray Train
(and through it pandas and pyarrow) for a class that needs neither.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

__all__ = ["RunEvents", "start_events"]

# (kind, payload): "actor", "placement_group", "report", "failure", "progress", "message", "ended"
Event = tuple[str, Any]


class RunEvents:
    """The run's events until the caller takes them.

    An async actor may run calls that arrive together in any order: a put that waited for its answer comes
    before the same caller's next one (the callback's reports), one that did not may not (rank 0's progress).
    """

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._arrived = asyncio.Event()

    async def put(self, kind: str, payload: Any) -> None:
        self._events.append((kind, payload))
        self._arrived.set()

    async def take(self, wait_s: float = 0.0) -> list[Event]:
        """The events not taken yet; when there are none, waits up to ``wait_s`` seconds for one."""
        if not self._events and wait_s > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), wait_s)
            except TimeoutError:
                pass
        taken, self._events = self._events, []
        return taken


def start_events():
    """A :class:`RunEvents` actor on this process's node (it holds no resources)."""
    here = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(here, soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=strategy)(RunEvents).remote()
