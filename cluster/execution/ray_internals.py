"""Every Ray internal this project uses, each for something users see that no public API gives.

Nothing else in the project imports a private Ray module or reads a setting
Ray does not document. tests/cluster/test_ray_internals.py fails loudly when
one of these changes in a Ray upgrade (Ray is pinned to one minor version in
pyproject.toml).

1. Ray Train's settings read from the environment (``ray.train.v2._internal.constants``),
   which Train copies from the driver's environment to its controller and workers:

   - the worker group's start timeout: without it a group that cannot be placed
     (a lost node with no replacement) was retried for ever; with it, a run gives
     up after ``wait_for_resources`` seconds with one sentence saying why;
   - the controller's poll interval: the controller registers a reported
     checkpoint only when it polls the workers (every 2 s by default), so a crash
     right after an epoch's checkpoint more often repeats that epoch on resume;
   - Train's print patch, which routes workers' ``print`` through a logger: each
     line of a worker then reached the driver's console twice;
   - Train's preemption watcher, an actor per run that polls whether a node is
     being drained, off on a one-machine Ray (started by the run or by
     `trainflow up`), where there is no other node to drain: one process fewer
     starting Ray Train's modules beside the workers (docs/performance.md).

2. Whether a run ended because its worker group could not be placed in time
   (``WorkerGroupStartupTimeoutError``, which Train raises as the cause of a
   public ``ControllerError``): the run then ends with one sentence naming
   ``wait_for_resources`` and what to do, not Train's traceback.

3. A question to the GCS over gRPC with this process's token
   (``ray._private.grpc_utils``): ``ray.init`` retries a refused token for about
   20 s, a warning a second, and then says only that it could not connect; asked
   first, a missing or wrong token is one sentence at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TRAIN_SETTINGS", "ask_gcs_cluster_id", "is_start_timeout", "train_settings"]

# What each setting buys is in the module's docstring; values are strings, as in an environment
TRAIN_SETTINGS = {
    "start_timeout_s": "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
    "poll_interval_s": "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "print_patch": "RAY_TRAIN_ENABLE_PRINT_PATCH",
    "preemption_watcher": "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
}
DEFAULTS = {"poll_interval_s": "0.5", "print_patch": "0"}


@contextmanager
def train_settings(start_timeout_s: float, one_machine: bool = False) -> Iterator[None]:
    """Ray Train's environment settings for one run, in this process's environment while the block runs.

    Train reads them from the driver's environment when ``fit`` builds the run's
    controller; a user's own value of a setting is left as it is. ``one_machine``:
    the Ray in use is one machine's alone (no preemption watcher).
    """
    values = {**DEFAULTS, "start_timeout_s": f"{start_timeout_s:g}"}
    if one_machine:
        values["preemption_watcher"] = "0"
    saved = {name: os.environ.get(name) for name in TRAIN_SETTINGS.values()}
    for key, name in TRAIN_SETTINGS.items():
        if key == "start_timeout_s" or (key in values and name not in os.environ):
            os.environ[name] = values[key]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ask_gcs_cluster_id(address: str, timeout_s: float = 10) -> None:
    """Ask the GCS at ``address`` (host:port) for its cluster id, sending this process's token.

    Raises:
        ray.exceptions.AuthenticationError: token mode is on here, but there is no token to send.
        grpc.RpcError: the GCS refused the call (``UNAUTHENTICATED`` for a missing or wrong token) or
            could not be reached.
    """
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with init_grpc_channel(address) as channel:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)


def is_start_timeout(error: BaseException) -> bool:
    """Whether Train's ``ControllerError`` says the worker group could not be placed in time."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    return isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError)
