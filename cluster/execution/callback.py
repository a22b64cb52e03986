"""A run's Train ``UserCallback``: each epoch's report, each worker failure and the run's actors' handles to its
:class:`~cluster.execution.events.RunEvents` actor (that module says how the caller uses them)."""

from __future__ import annotations

import ray
from ray.train import UserCallback

__all__ = ["ForwardToEvents"]


class ForwardToEvents(UserCallback):
    """Runs in Ray Train's controller: puts each epoch's report and each failure (and the run's actors' handles)."""

    def __init__(self, events) -> None:
        self.events = events

    def __setstate__(self, state: dict) -> None:
        # Unpickled in each actor of the run, as Train builds its controller, then each worker, with the run's
        # configuration: the first "actor" event is the controller's
        self.__dict__.update(state)
        context = ray.get_runtime_context()
        if context.get_actor_id() is not None:
            self.events.put.remote("actor", context.current_actor)

    # These two wait for their put: the caller's "ended" then comes after the run's last report
    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        ray.get(self.events.put.remote("report", metrics[0]))  # already summed over ranks: rank 0's copy

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        ray.get(self.events.put.remote("failure", {rank: " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                                                   for rank, exc in worker_exceptions.items()}))
