"""Train any registered framework on Ray Train's ``DataParallelTrainer``, and watch the run from the caller.

No framework loads in the calling (Prefect) process: the trainer is built here
with the framework's Ray backend config (which imports no framework) and the
workers run the framework's loop (``cluster.execution.worker_entry``).
``fit()`` of Train's trainer blocks until the run ends, so it runs on a thread
of its own while the caller's thread takes the run's events
(``cluster.execution.events``) and hands them to the caller's handlers: each
epoch's report, worker failures, progress, messages. If a handler or a signal
raises on the caller's thread (Ctrl-C, SIGTERM, a cancelled task), the run's
controller is killed, which ends its workers and frees their resources: a run
never outlives its caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from typing import TYPE_CHECKING

from cluster.config import TrainLoopConfig
from cluster.errors import UserError
from cluster.execution import ray_internals, session
from cluster.execution.nodecache import StoredData, StoredFile
from cluster.execution.placement import (LOG_EVERY_S, Resources, ResourcesUnavailable, check_placement,
                                         free_resources, pending_placement, wait_for_placement)
from cluster.frameworks import Framework, get_framework, load

if TYPE_CHECKING:
    from ray.train import Result
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

# Ray and Ray Train are imported where they are used: the flow imports this module, and Ray Train's modules
# load on the start thread of cluster.execution.session while the flow's first stages run.

__all__ = ["Resources", "check_framework", "check_placement", "fit", "pump_events"]

EVENTS_WAIT_S = 1.0  # how long one ask for the run's events waits in the events actor for one to come
ABORT_WAIT_S = 10.0  # for a stopped run's controller to be known (it may still be starting) and then to end

# Train reads its settings from this process's environment as fit() starts a run: one run's start at a time
_starting = threading.Lock()

Handlers = dict[str, Callable]


def fit(cfg: TrainLoopConfig, resources: Resources, *, data: StoredData, run_name: str, storage_path: str,
        storage_filesystem=None, on_report: Callable[[dict], None] = lambda m: None,
        on_failure: Callable[[dict[int, str]], None] = lambda e: None,
        on_wait: Callable[[str], None] = lambda m: None, on_progress: Callable[[dict], None] = lambda p: None,
        on_message: Callable[[str], None] = lambda m: None, on_start: Callable[[int], None] = lambda e: None,
        weights: StoredFile | None = None) -> str:
    """Train ``cfg.framework``'s loop on a Ray Train worker group and wait for it; ``weights``, the run's starting
    weights, are fetched by each node like ``data``.

    Each worker fetches ``data`` onto its own node. Re-running with the same
    ``run_name`` and ``storage_path`` resumes from the last checkpoint that run
    reported; ``on_report`` is called on the calling thread with each epoch's
    metrics as they arrive, ``on_failure`` with {rank: error} when workers fail
    (Ray then restarts the group from the last checkpoint, up to
    ``resources.max_failures`` times), ``on_wait`` every 30 s while the
    group waits for resources, ``on_progress`` with {epoch, done, total, seconds}
    (images of the epoch done so far, over all ranks) a few times a second, and
    ``on_message`` with what the workers say (a resume), and ``on_start`` with the last
    epoch done (0: none) each time a worker group starts. Returns the path of the
    final checkpoint in storage.

    Raises:
        UserError: the batch does not split, or no set of live nodes can hold the group.
        ResourcesUnavailable: the cluster did not free room within ``resources.wait_for_resources``.
    """
    cfg.local_batch_size(resources.num_workers)  # raises before any worker starts
    check_placement(resources)
    wait_for_placement(resources, on_wait)
    handlers = {"report": on_report, "failure": on_failure, "progress": on_progress, "message": on_message,
                "start": on_start}
    session.wait_for_train_modules()
    import ray
    from ray.train import ControllerError

    from cluster.execution.events import start_events

    events = start_events()
    try:
        trainer = build_trainer(cfg, get_framework(cfg.framework), resources, data, events, run_name=run_name,
                                storage_path=storage_path, storage_filesystem=storage_filesystem, weights=weights)
        result = watch_fit(trainer, events, handlers, on_wait, start_timeout_s(resources))
    except ControllerError as error:
        if ray_internals.is_start_timeout(error):
            raise ResourcesUnavailable(
                f"Ray Train could not place {resources.describe()} within wait_for_resources="
                f"{resources.wait_for_resources:g} s ({free_resources()}); a node was lost or is busy: add nodes, "
                "free resources or raise wait_for_resources, then re-run to resume from the last checkpoint."
            ) from error
        raise
    finally:
        ray.kill(events)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name!r} finished without a checkpoint")
    return result.checkpoint.path


def start_timeout_s(resources: Resources) -> float:
    """How long one start of the worker group may wait for its placement.

    Failed starts count against the controller's failure limit, set to the same
    budget as worker failures, so ``wait_for_resources`` is shared among those
    tries: a group that cannot be placed ends the run after about that long,
    and a start that fails for a moment (a lost node not yet known dead) is tried again.
    """
    return resources.wait_for_resources / (resources.max_failures + 1)


def build_trainer(cfg: TrainLoopConfig, framework: Framework, resources: Resources, data: StoredData, events, *,
                  run_name: str, storage_path: str, storage_filesystem,
                  weights: StoredFile | None = None) -> DataParallelTrainer:
    """The run's trainer, named ``run_name``, its checkpoints under ``storage_path``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from cluster.execution.callback import ForwardToEvents
    from cluster.execution.worker_entry import run_worker

    return DataParallelTrainer(
        run_worker,
        train_loop_config={"loop": cfg.to_dict(), "data": data, "events": events, "weights": weights},
        backend_config=load(framework.backend_config)(resources.use_gpu),
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker},
                                     placement_strategy=resources.placement_strategy),
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             callbacks=[ForwardToEvents(events)], worker_runtime_env={"env_vars": framework.env},
                             failure_config=FailureConfig(max_failures=resources.max_failures,
                                                          controller_failure_limit=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # Train's INFO lines (each report, each checkpoint) repeat what the flow logs
                             logging_config=LoggingConfig(log_level="WARNING")))


def watch_fit(trainer: DataParallelTrainer, events, handlers: Handlers, on_wait: Callable[[str], None],
              start_timeout: float) -> Result:
    """``trainer.fit()`` on a thread of its own while this thread delivers the run's events; its result.

    If a handler or a signal raises here, the run is stopped before the exception goes on.
    """
    import ray

    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # raised on the caller's thread below
            outcome["error"] = error
        finally:
            events.put.remote("ended", None)

    run_actors: list = []  # the controller's handle first, then the workers'
    groups: list = []
    with ExitStack() as starting:
        starting.enter_context(_starting)
        starting.enter_context(ray_internals.train_settings(start_timeout, one_machine=session.on_one_machine()))
        settings = starting.pop_all()  # released once the controller is up (it has read them) or the run ended

    def on_actor(handle) -> None:
        run_actors.append(handle)
        settings.close()

    take = lambda wait_s: get(events.take.remote(wait_s))  # noqa: E731
    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    try:
        thread.start()
        pump_events(take, {**handlers, "actor": on_actor, "placement_group": groups.append}, on_wait)
    except BaseException:
        stop_run(take, run_actors, groups)
        raise
    finally:
        settings.close()
        thread.join(ABORT_WAIT_S)
        for handle in run_actors:  # its run is over: their processes end now, not when Ray collects the handles
            ray.kill(handle)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def stop_run(take: Callable[[float], list], run_actors: list, groups: list) -> None:
    """Kill the run's actors and remove its workers' placement group; waits a while for the controller to be
    known if the run is still starting."""
    import ray
    from ray.util.placement_group import remove_placement_group

    deadline = time.monotonic() + ABORT_WAIT_S
    while not run_actors and time.monotonic() < deadline:
        for kind, payload in take(0.2):
            if kind == "actor":
                run_actors.append(payload)
            elif kind == "ended":
                return
    for handle in run_actors:
        ray.kill(handle)
    for group in groups:
        try:
            remove_placement_group(group)
        except Exception:  # already removed, by Train as the run ended or by its cleaner
            pass


def get(ref):
    """``ray.get`` that lets a signal's own exception through (see :func:`cluster.execution.session.wait_ready`)."""
    import ray

    session.wait_ready(ref)
    return ray.get(ref)


def pump_events(take_events: Callable[[float], list], handlers: Handlers, on_wait: Callable[[str], None]) -> None:
    """Deliver the run's events on this thread until the run ends; after 30 s of silence, say what the group
    waits for. ``take_events(wait_s)`` returns the events not taken yet, waiting up to ``wait_s`` for one."""
    quiet_since = time.monotonic()
    while True:
        events = take_events(EVENTS_WAIT_S)
        for kind, payload in events:
            if kind == "ended":
                return
            handlers[kind](payload)
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= LOG_EVERY_S:
            quiet_since = time.monotonic()
            waiting = pending_placement()
            if waiting:
                on_wait(waiting)


def check_framework(name: str) -> None:
    """Raises UserError when the nodes of the connected Ray cluster lack framework ``name``.

    Asks one node (any node may host a worker; the project's image gives them all the same packages).
    """
    import ray

    missing = ray.get(ray.remote(num_cpus=0)(missing_modules).remote(name))
    if missing:
        spec = get_framework(name)
        raise UserError(f"framework={name!r} needs {', '.join(missing)}, which the Ray cluster's nodes lack; "
                        f"install it in their image: {spec.install}")


def missing_modules(name: str) -> list[str]:
    """Of framework ``name``'s modules, those this node cannot import."""
    return get_framework(name).missing_modules()
