"""Start a local Ray or connect to one, and shut down only what we started.

Ray start-up costs seconds, so a caller can begin it in the background
(:func:`prestart`) while other start-up work (Prefect's server) runs, and the
training code later waits for it (:func:`ray_session`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cluster.errors import UserError
from cluster.execution import ray_internals

Connection = Literal["started", "joined", "already"]  # a Ray started here, a running one joined, or one in use


@dataclass
class _Starter:
    """Starts Ray on its own thread and keeps that thread alive until shutdown.

    Ray's node processes die with the *thread* that spawned them (Linux's
    parent-death signal is per thread), so the starting thread must outlive
    every use of Ray.
    """

    address: str | None
    connection: Connection = "already"
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    trainer_loaded: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            self.connection = connect(self.address)
        except BaseException as exc:  # surfaced to the waiter, not lost in a thread
            self.error = exc
        finally:
            self.ready.set()
        # Ray Train's modules load while the flow ingests and preprocesses, not when its train stage needs them
        # (not for a cluster: a refused placement ends the run at once, and a process joins this thread before
        # it exits)
        try:
            if self.error is None and self.address is None:
                import ray.train.v2.api.data_parallel_trainer  # noqa: F401
        except Exception:
            pass  # the train stage imports it again, and raises there
        finally:
            self.trainer_loaded.set()
        self.release.wait()
        if self.connection != "already":
            # Ray's exit handler would disconnect too, after a 0.5 s sleep; a Ray started here stops with it
            _stop_ray()


_pending: _Starter | None = None
_worker_logs = True
_local_head: str | None = None  # `trainflow up`'s Ray head, used instead of starting one
_own_machine = False  # the Ray in use is this machine's alone: started here, or `trainflow up`'s head


def use_local_head(address: str, token_file: str) -> None:
    """Let "start Ray locally" connect to the long-running one-machine head at ``address`` instead.

    That head runs this machine's packages (as a Ray started here would), so no code is shipped and
    it is never shut down by this process. Its token is read from ``token_file``. Once this process has
    started or joined a Ray, it keeps that one and this does nothing.
    """
    global _local_head
    if _pending is not None:
        return
    _local_head = address
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = token_file


def show_worker_logs(shown: bool) -> None:
    """Whether the output of Ray's workers and helper processes reaches this process's console.

    For the next Ray this process starts or connects to. The CLI turns it off unless asked to be
    verbose: what a person needs from the workers (progress, a resume) reaches it as events.
    """
    global _worker_logs
    _worker_logs = shown


# This project's packages, shipped to the nodes of a cluster in the run's runtime_env; nodes need only the
# dependencies. They sit beside this package (see pyproject's [tool.setuptools] packages).
_PACKAGES = ("flows", "tasks", "cluster")
_NOT_SHIPPED = ["__pycache__", "*.pyc", ".venv", ".git", "artifacts", ".pytest_cache"]


_plugins: tuple[str, ...] = ()  # the user's own modules that travel with the code (cluster.models.driver_only_modules)


def ship_with_code(paths: list[str]) -> None:
    """Send these folders or files (the user's modules, from ``cluster.models.driver_only_modules``) to every
    node with this project's code, from the next connection to a cluster on; a node that lacks them imports
    them from there."""
    global _plugins
    _plugins = tuple(paths)


def resolve_address(address: str | None) -> str | None:
    """The cluster to use: the given address, else ``RAY_ADDRESS`` when set, else None (start Ray locally)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def project_runtime_env() -> dict:
    """A runtime_env that carries this project's code, and the user's modules it was given, to every node of a
    cluster.

    Empty inside a Ray job: the job's own runtime_env (``trainflow submit``) already carries it, and Ray
    refuses a driver's runtime_env that conflicts with its job's.
    """
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray's job supervisor for the entrypoint
        return {}
    root = Path(__file__).resolve().parents[2]  # the repository: cluster/execution/session.py
    return {"py_modules": [str(root / name) for name in _PACKAGES if (root / name / "__init__.py").is_file()]
            + list(_plugins), "excludes": _NOT_SHIPPED}


TOKEN_FIX = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a "
             "file holding it.")


def _no_token(address: str) -> UserError:
    return UserError(f"ray_address={address!r}: this driver has no authentication token for the Ray cluster; "
                     f"{TOKEN_FIX}")


def _check_token(address: str) -> None:
    """Ask the cluster's GCS one cheap question with this process's token, and fail in one sentence if refused."""
    import grpc
    from ray.exceptions import AuthenticationError

    try:
        ray_internals.ask_gcs_cluster_id(address)
    except AuthenticationError:  # token mode on here, but no token to send
        raise _no_token(address) from None
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise UserError(f"ray_address={address!r}: the Ray cluster refused this driver's authentication "
                            f"token (missing or wrong); {TOKEN_FIX}") from None
        # anything else (unreachable, not a GCS): ray.init below says it in its own words


def _init_cluster(address: str) -> None:
    """Connect to a cluster this process did not start, shipping the code; its errors as one sentence."""
    import ray
    from ray.exceptions import AuthenticationError

    if ":" in address and not address.startswith("ray://"):  # host:port of a GCS ('auto' finds it itself)
        _check_token(address)
    try:
        _init_with_retry(address)
    except AuthenticationError:
        raise _no_token(address) from None
    except ConnectionError as exc:
        # Ray Client gives no sign of a refused token but a timeout: name both causes
        token = f"; if it is right, the server may have refused this driver's token: {TOKEN_FIX}" \
            if address.startswith("ray://") else ", or leave it empty to start Ray locally."
        raise UserError(f"ray_address={address!r}: cannot reach the Ray cluster ({' '.join(str(exc).split())[:200]}); "
                        f"check the address{token}") from None


# The head's Ray Client proxy forks a server for each client, and that server dies at its start now and then
# (ray-project/ray#63202, a few percent of connections); a second try gets a fresh one.
RAY_CLIENT_START_FAILED = "Initialization failure from server"


def _init_with_retry(address: str) -> None:
    import ray

    for attempt in (1, 2):
        try:
            ray.init(address=address, runtime_env=project_runtime_env(), log_to_driver=_worker_logs,
                     logging_config=ray.LoggingConfig(log_level="ERROR"))
            return
        except ConnectionError as exc:
            if attempt == 2 or not address.startswith("ray://") or RAY_CLIENT_START_FAILED not in str(exc):
                raise
            ray.shutdown()  # whatever the failed start left behind


def connect(address: str | None) -> Connection:
    """Initialise Ray in this process, and say how: "started" here, "joined" a running one, or "already" in use.

    ``address=None`` starts a fresh single-node Ray on loopback (never joining
    some other Ray that happens to run on the machine); otherwise connects to
    the cluster at ``address`` (``host:port``, ``auto`` or ``ray://…``) and
    ships this project's code in the job's runtime_env.
    """
    if address is None:
        # Must be set before ray is first imported: keeps a local Ray on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    global _own_machine
    if ray.is_initialized():
        return "already"
    _own_machine = address is None
    if address is not None:
        _init_cluster(address)
        return "joined"
    # ERROR: without the dashboard, Ray Train's helper actors warn every few seconds that the
    # state API is unavailable; our workers print what matters (batch split, resume epoch).
    if _local_head is not None:
        ray.init(address=_local_head, log_to_driver=_worker_logs, logging_config=ray.LoggingConfig(log_level="ERROR"))
        return "joined"
    ray.init(address="local", include_dashboard=False, log_to_driver=_worker_logs,
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    return "started"


def on_one_machine() -> bool:
    """Whether the Ray this process connected to is one machine's alone (started here, or `trainflow up`'s
    head), which no node can join or leave; False for a cluster reached by address, or before any connection."""
    return _own_machine


def _stop_ray() -> None:
    """Shut down the Ray this process started, or disconnect from the one it joined."""
    import ray

    ray.shutdown()


def prestart(address: str | None) -> bool:
    """Begin starting/connecting Ray in a background thread; returns at once.

    True when this call began it (the caller then owns :func:`shutdown`);
    False when an earlier call already had.
    """
    global _pending
    if _pending is not None:
        return False
    _pending = _Starter(address)
    _pending.thread = threading.Thread(target=_pending.run, name="ray-owner", daemon=True)
    _pending.thread.start()
    return True


POLL_S = 0.05


def wait_ready(ref, timeout: float | None = None) -> bool:
    """Whether the Ray object ``ref`` is ready within ``timeout`` seconds (None: wait until it is).

    Waits in ``time.sleep`` between looks, never inside Ray: a signal's exception (Ctrl-C, Prefect's
    TerminationSignal on SIGTERM) raised while ``ray.wait`` or ``ray.get`` waits reaches the caller as a
    SystemError instead (measured with Ray 2.60: with a timeout, or from a wait of a second or more), which a
    task's retry condition takes for a failure to retry.
    """
    import ray

    deadline = None if timeout is None else time.monotonic() + timeout
    while not ray.wait([ref], timeout=0)[0]:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def wait_for_train_modules() -> None:
    """Returns once the start thread has loaded Ray Train's modules (at once if none runs).

    Importing them here at the same time could meet that thread's import half-way (a module taken from
    ``sys.modules`` before it finished loading).
    """
    if _pending is not None:
        _pending.trainer_loaded.wait()


def shutdown() -> None:
    """Stop the Ray :func:`prestart` started, or disconnect from the one it joined."""
    global _pending
    if _pending is not None:
        _pending.release.set()
        _pending.thread.join()
        _pending = None


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray is up for the duration of the block.

    Reuses a prestarted or already-initialised Ray (left running for its
    owner); otherwise starts or connects here and shuts down on exit.
    """
    if _pending is not None:
        _pending.ready.wait()
        if _pending.error is not None:
            raise _pending.error
        yield
        return
    started = connect(address) == "started"
    try:
        yield
    finally:
        if started:
            _stop_ray()
