"""Ray Train's ``DataParallelTrainer``, built in the calling process and watched from its thread.

``fit()`` of Train's trainer starts a controller actor on the caller's node and
blocks until the run ends, and it gives the controller the ``RAY_TRAIN_*``
settings of the caller's environment. :class:`WatchedTrainer` changes only that
step: the controller runs in a ``ControllerHost`` actor (the one started ahead
of the run, if there is one: see ``cluster.controller_host``) and gets the
environment this run asks for (a process that runs many flows cannot set its
own per run); and instead of blocking, ``watch(take_events)`` is called, so the
caller delivers progress on its own thread while the run goes on. The
controller holds the run's events (its callbacks' reports and failures, rank
0's progress and messages) until the caller takes them: no actor of their own
starts beside the workers. The caller's ask waits in the controller until an
event comes (or a second passes), so a run between events costs no calls: on
two cores, each wake-up of a process beside the workers holds back both. If
``watch`` raises (Ctrl-C, SIGTERM, a cancelled task), the controller is asked
to abort, which stops its workers and frees their placement group, and is
then killed: a run never outlives its caller. On
a small machine every process started beside the workers delays them, so
Train's helper actors that a run does not need are left out:

- the dataset manager, for runs without Ray Datasets (this project's loops read
  their own data);
- the placement-group cleaner, a detached actor that polls the controller and
  frees the group if the controller dies. A controller that ends or aborts frees
  its group itself, and one that dies unasked has its group freed by Ray when
  the caller's job (the Prefect process) ends;
- on a Ray without an autoscaler (``autoscaler=False``), Ray Data's
  AutoscalingCoordinator, to which the fixed-size policy sends its requests for
  resources: a detached actor (a process importing Ray Data) that the controller
  creates and waits for before it starts any worker, and that lives on as long
  as Ray does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import ray
from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.constants import DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE, get_env_vars_to_propagate
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from cluster.controller_host import new_host, take_standby
from cluster.runtime import wait_ready

__all__ = ["WatchedTrainer"]

ABORT_TIMEOUT_S = 10  # for the controller to stop its workers and free their group when the caller stops a run

# In the controller's process: the run's events, (kind, payload) pairs, until the caller takes them
_events: list[tuple[str, object]] = []
_waiting: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # the caller's ask, waiting for an event


def post_event(kind: str, payload) -> None:
    """Queue an event for the caller; for Train callbacks, which run in the controller's process."""
    _events.append((kind, payload))
    if _waiting is not None:
        loop, arrived = _waiting
        loop.call_soon_threadsafe(arrived.set)  # from any thread: the actor's event loop runs the waiter


async def take_posted(wait_s: float = 0.0) -> list[tuple[str, object]]:
    """The events not taken yet; when there are none, waits up to ``wait_s`` seconds for one."""
    global _waiting
    if not _events and wait_s > 0:
        arrived = asyncio.Event()
        _waiting = (asyncio.get_running_loop(), arrived)
        if _events:  # posted from another thread meanwhile
            arrived.set()
        try:
            await asyncio.wait_for(arrived.wait(), wait_s)
        except TimeoutError:
            pass
        finally:
            _waiting = None
    taken = _events[:]
    del _events[:len(taken)]  # an event a callback adds meanwhile stays for the next take
    return taken


def send_event(kind: str, payload) -> None:
    """Queue an event for the caller from a Train worker, without waiting: never stalls a step."""
    from ray.train.v2._internal.execution.context import get_train_context

    get_train_context().controller_actor.put_event.remote(kind, payload)


class _Controller(TrainController):
    """Train's controller, holding the run's events for the caller; the last is ("ended", None).

    It runs inside a ``ControllerHost`` actor, which forwards these methods to it.
    """

    async def run(self):
        try:
            return await super().run()
        finally:
            post_event("ended", None)

    def put_event(self, kind: str, payload) -> None:
        post_event(kind, payload)

    async def take_events(self, wait_s: float = 0.0) -> list[tuple[str, object]]:
        return await take_posted(wait_s)


class WatchedTrainer(DataParallelTrainer):
    def __init__(self, *args, controller_env: dict[str, str], watch: Callable[[Callable[[float], list]], None],
                 autoscaler: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._controller_env = controller_env
        self._watch = watch
        self._autoscaler = autoscaler

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)
                and (self.datasets or not isinstance(c, DatasetsCallback))]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if not self._autoscaler and type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = _FixedWithoutAutoscaler(self.scaling_config)
        env_vars = {RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR: DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                    **get_env_vars_to_propagate(), **self._controller_env}
        controller = take_standby()
        if controller is None:
            controller = new_host()
        try:
            _get(controller.begin.remote(env_vars, controller_init_kwargs))
            run = controller.run.remote()
            self._watch(lambda wait_s: _get(controller.take_events.remote(wait_s)))
            ray.get(run)
            result = ray.get(controller.get_result.remote())
        except BaseException:
            _abort(controller)
            raise
        # its run is over: the host's process ends now, not whenever Ray collects the dropped handle (a process
        # of a finished run was seen still there during the next run's first epochs, on 2 busy cores)
        ray.kill(controller)
        return result


class _FixedWithoutAutoscaler(FixedScalingPolicy):
    """Train's fixed-size policy, less its requests to an autoscaler (see the module's docstring)."""

    def after_controller_start(self, train_run_context) -> None:
        pass  # no coordinator client: the policy's cancels are then no-ops

    def _maybe_send_resource_request(self) -> None:
        pass


def _get(ref):
    wait_ready(ref)  # where a signal (Ctrl-C, SIGTERM) raises its own exception
    return ray.get(ref)


def _abort(controller) -> None:
    """Stop a run: its controller stops the workers and frees their placement group (as on Ray's own Ctrl-C),
    then the controller is killed, also if it did not answer in time."""
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass  # it exits as it aborts (or was already gone, or is stuck): killed below either way
    ray.kill(controller)
