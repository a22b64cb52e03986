"""The actor that runs a training run's Ray Train controller, started before the run is known.

On a machine with few cores, a Train run's start is a chain of processes each
waiting for the one before: the controller's process (about 1.5 s to start and
import Ray Train), then the workers'. A :class:`ControllerHost` is a light actor
whose process starts and loads Ray Train on its own, before its run is known;
:meth:`ControllerHost.begin` then builds the run's controller inside it. So the
host for this process's next run can be started as soon as Ray is up
(:func:`stand_by`), and its start-up overlaps the flow's first stages instead of
delaying the train stage's. This module imports nothing but Ray, so creating a
host waits for no import of Ray Train in the caller either.

The host answers the controller's methods that anyone calls on its actor
handle: the caller (``run``, ``get_result``, ``abort``, ``take_events``), the
workers (``put_event``, and Train's ``get_all_reported_checkpoints``).
"""

from __future__ import annotations

import os
import threading

import ray

__all__ = ["ControllerHost", "new_host", "release_standby", "stand_by", "take_standby"]


class ControllerHost:
    def __init__(self) -> None:
        import cluster.trainer  # noqa: F401  Ray Train's modules load as the process starts, not as the run begins

        self._controller = None

    def begin(self, env_vars: dict[str, str], controller_init_kwargs: dict) -> None:
        """Build the run's controller, in the environment the run asks for: Train's controller and its
        workers read their settings from there."""
        from cluster.trainer import _Controller

        os.environ.update(env_vars)
        self._controller = _Controller(**controller_init_kwargs)

    async def run(self):
        return await self._controller.run()

    def get_result(self):
        return self._controller.get_result()

    async def abort(self) -> None:
        if self._controller is not None:  # a host whose begin failed has nothing to stop
            await self._controller.abort()

    async def take_events(self, wait_s: float = 0.0) -> list[tuple[str, object]]:
        return await self._controller.take_events(wait_s)

    def put_event(self, kind: str, payload) -> None:
        self._controller.put_event(kind, payload)

    async def get_all_reported_checkpoints(self, *args, **kwargs):
        return await self._controller.get_all_reported_checkpoints(*args, **kwargs)


def new_host():
    """A host on this process's node (where Train puts its controller), holding no resources."""
    here = ray.get_runtime_context().get_node_id()
    return ray.remote(num_cpus=0, label_selector={ray._raylet.RAY_NODE_ID_KEY: here})(ControllerHost).remote()


_standby: list = []  # at most one host, started by stand_by() for this process's next run
_standby_lock = threading.Lock()


def stand_by() -> None:
    """Start the host for this process's next run now (Ray must be initialised)."""
    with _standby_lock:
        if not _standby:
            _standby.append(new_host())


def take_standby():
    """The host :func:`stand_by` started, once; None when there is none (or it was taken)."""
    with _standby_lock:
        return _standby.pop() if _standby else None


def release_standby() -> None:
    """Stop the standby host if no run took it."""
    host = take_standby()
    if host is not None and ray.is_initialized():  # else it went with the Ray it ran on
        ray.kill(host)
