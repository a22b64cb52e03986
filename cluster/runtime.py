"""Start a local Ray or connect to one, and shut down only what we started.

Ray start-up costs seconds, so a caller can begin it in the background
(:func:`prestart`) while other start-up work (Prefect's server) runs, and the
training code later waits for it (:func:`ray_session`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from cluster.errors import UserError


@dataclass
class _Starter:
    """Starts Ray on its own thread and keeps that thread alive until shutdown.

    Ray's node processes die with the *thread* that spawned them (Linux's
    parent-death signal is per thread), so the starting thread must outlive
    every use of Ray.
    """

    address: str | None
    started_here: bool = False
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            self.started_here = connect(self.address)
        except BaseException as exc:  # surfaced to the waiter, not lost in a thread
            self.error = exc
        finally:
            self.ready.set()
        self.release.wait()
        if self.started_here:
            import ray

            ray.shutdown()


_pending: _Starter | None = None


def connect(address: str | None) -> bool:
    """Initialise Ray in this process; True when this call started it.

    ``address=None`` starts a fresh single-node Ray on loopback (never joining
    some other Ray that happens to run on the machine); otherwise connects to
    the cluster at ``address`` (``ray://…``, ``host:port`` or ``auto``).
    """
    if address is None:
        # Must be set before ray is first imported: keeps a local Ray on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Inherited by the local Ray's processes. Ray Train's controller collects reports (and so registers
        # checkpoints) when it polls the workers: every 2 s by default. At 0.5 s the driver hears of an
        # epoch sooner, and a crash right after a checkpoint was written is less likely to predate its
        # registration (which would repeat that epoch too). A cluster's operators set it for theirs.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Train V2 also routes workers' print() through a logger, so each line reached the driver twice.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    if ray.is_initialized():
        return False
    try:
        # ERROR: without the dashboard, Ray Train's helper actors warn every few seconds that the
        # state API is unavailable; our workers print what matters (batch split, resume epoch).
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=True,
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
    except ConnectionError as exc:
        raise UserError(f"ray_address={address!r}: cannot reach the Ray cluster ({exc}); "
                        "check the address or leave it empty to start Ray locally.") from None
    return address is None


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


def shutdown() -> None:
    """Shut Ray down if :func:`prestart` started it in this process."""
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
    started = connect(address)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
