"""Ray Train on a local Ray: torch DDP with one and two workers, reporting and checkpoints."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from cluster import controller_host
from cluster.config import TrainLoopConfig
from cluster.data import load_split
from cluster.errors import UserError
from cluster.launch import Resources, _pump, fit
from cluster.nodecache import StoredData
from cluster.torch_backend import predict, read_state
from tasks.store import open_store
from tasks.train import stored_data


def in_place(store_uri: str, ref) -> StoredData:
    """The prepared data as workers of a local Ray find it: read in place from the folder store."""
    data = stored_data(open_store(store_uri), ref)
    assert data.in_place
    return data


# Each fit starts a Ray Train worker group (~20 s on two cores): slow. `make test-fast` still trains through Ray
# once, in the real `trainflow run --preset smoke` of tests/flows/test_bad_input.py.
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_trains_on_ray_reports_every_epoch_and_checkpoints(ray_local, prepared, tmp_path, workers):
    store_uri, ref = prepared
    store = open_store(store_uri)
    data = store.local_dir(store.key_of(ref.uri), tmp_path)
    reports: list[dict] = []
    cfg = TrainLoopConfig(data_dir="", epochs=6, lr=0.01, batch_size=16)
    final = fit(cfg, Resources(num_workers=workers, max_failures=0), data=in_place(store_uri, ref),
                run_name=f"w{workers}", storage_path=str(tmp_path / "ray"), on_report=reports.append)

    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5, 6]  # once per epoch, not once per worker
    assert reports[-1]["train_loss"] < 0.5 * reports[0]["train_loss"]
    spec, epoch, history = read_state(Path(final))
    assert epoch == 6 and [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert Path(final).parent == tmp_path / "ray" / f"w{workers}"
    x_test, y_test = load_split(data, "test")
    accuracy = float(np.mean(predict(Path(final), x_test) == y_test))
    assert accuracy > 0.8, accuracy
    # a one-machine Ray has no autoscaler: Train's requests to one (through a detached actor) are left out
    with pytest.raises(ValueError, match="Failed to look up actor"):
        ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")


@pytest.mark.slow
def test_rerun_with_same_name_resumes_from_its_last_checkpoint(ray_local, prepared, tmp_path):
    data = in_place(*prepared)
    cfg = TrainLoopConfig(data_dir="", epochs=2, lr=0.01, batch_size=16)
    fit(cfg, Resources(num_workers=1), data=data, run_name="resume", storage_path=str(tmp_path / "ray"))
    reports: list[dict] = []
    final = fit(TrainLoopConfig(**{**cfg.to_dict(), "epochs": 3}), Resources(num_workers=1), data=data,
                run_name="resume", storage_path=str(tmp_path / "ray"), on_report=reports.append)
    assert [r["epoch"] for r in reports] == [3]
    assert read_state(Path(final))[1] == 3


def test_more_workers_than_the_cluster_has_fails_fast(ray_local, prepared, tmp_path):
    cfg = TrainLoopConfig(data_dir="unused", epochs=1)
    data = in_place(*prepared)
    with pytest.raises(UserError, match="lower num_workers"):
        fit(cfg, Resources(num_workers=64), data=data, run_name="too-big", storage_path=str(tmp_path))
    with pytest.raises(UserError, match="1 GPU"):
        fit(cfg, Resources(num_workers=1, use_gpu=True), data=data, run_name="no-gpu",
            storage_path=str(tmp_path))


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_a_stopped_run_frees_its_workers_for_the_next_one(ray_local, prepared, tmp_path):
    """A caller that stops a run (here its report handler raises, as Ctrl-C does in the CLI) gets the run's CPUs
    back at once, though no cleaner actor watches the run: the controller aborts and frees its workers'
    placement group, so a re-run in the same process places its two workers and resumes."""
    from ray.util.placement_group import placement_group_table

    def stop(report: dict) -> None:
        raise _Stop

    data = in_place(*prepared)
    cfg = TrainLoopConfig(data_dir="", epochs=3, lr=0.01, batch_size=16)
    with pytest.raises(_Stop):
        fit(cfg, Resources(num_workers=2, max_failures=0), data=data, run_name="stopped",
            storage_path=str(tmp_path / "ray"), on_report=stop)
    assert {group["state"] for group in placement_group_table().values()} <= {"REMOVED"}
    reports: list[dict] = []
    fit(cfg, Resources(num_workers=2, max_failures=0, wait_for_resources=30), data=data, run_name="stopped",
        storage_path=str(tmp_path / "ray"), on_report=reports.append)
    assert [r["epoch"] for r in reports] == [2, 3]


class _Signalled(BaseException):
    pass


def test_a_signal_while_waiting_on_ray_raises_its_own_exception(ray_local):
    """Ctrl-C or SIGTERM while a caller waits on Ray (for a run's events, for room to place it): the handler's
    exception, which Prefect takes for a stop, and not the SystemError Ray's own waits turn it into (with a
    timeout, or after a second), which Prefect retries as a failure."""
    from cluster.runtime import wait_ready

    def raise_signalled(signum, frame):
        raise _Signalled

    never = ray.remote(resources={"no-such-resource": 1})(lambda: None).remote()  # pending: no node has one
    previous = signal.signal(signal.SIGUSR1, raise_signalled)
    try:
        assert not wait_ready(never, timeout=0.2)
        threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        with pytest.raises(_Signalled):
            wait_ready(never, timeout=30)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        ray.cancel(never)


def host_processes() -> set[int]:
    """The processes of this test's local Ray (all descend from this process) that host a Train controller."""
    hosts = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("ControllerHost" in part for part in proc.cmdline()):
                hosts.add(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return hosts


def standby_pid() -> int:
    """The process of the host stand_by() started."""
    return ray.get(controller_host._standby[0].__ray_call__.remote(lambda host: os.getpid()))


@pytest.mark.slow
def test_a_run_takes_the_controller_host_started_ahead_of_it(ray_local, prepared, tmp_path):
    """The host stand_by() started (as Ray's start thread does) runs the next run's controller: no other host
    starts, and the run trains and reports as ever."""
    controller_host.stand_by()
    standby = standby_pid()
    earlier = host_processes() - {standby}  # earlier tests' runs' hosts, if one is still ending: not this run's
    hosts_during_run: list[set[int]] = []

    def report(metrics: dict) -> None:
        hosts_during_run.append(host_processes() - earlier)

    fit(TrainLoopConfig(data_dir="", epochs=2, lr=0.01, batch_size=16), Resources(num_workers=1, max_failures=0),
        data=in_place(*prepared), run_name="standby", storage_path=str(tmp_path / "ray"), on_report=report)
    assert hosts_during_run == [{standby}, {standby}]
    assert controller_host.take_standby() is None


def test_a_controller_host_no_run_took_is_stopped(ray_local):
    controller_host.stand_by()
    standby = standby_pid()
    assert standby in host_processes()
    process = psutil.Process(standby)
    controller_host.release_standby()
    process.wait(timeout=15)  # raises if it is still running then
    assert controller_host.take_standby() is None


@pytest.mark.slow
def test_a_loop_asking_train_for_its_reported_checkpoints_is_answered_through_the_host(ray_local, tmp_path):
    """Train's own API in a worker (``ray.train.get_all_reported_checkpoints``) calls the controller's handle,
    which is the host's: the host forwards it."""
    from ray.train import RunConfig, ScalingConfig

    from cluster.trainer import WatchedTrainer

    def loop():
        import tempfile

        import ray.train

        for _ in range(2):  # the run's result carries the last checkpoint's metrics
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "weights").write_text("1")
                seen = len(ray.train.get_all_reported_checkpoints())
                ray.train.report({"seen": seen}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    trainer = WatchedTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                             run_config=RunConfig(name="asks", storage_path=str(tmp_path)), controller_env={},
                             watch=lambda take_events: _pump(take_events, handlers={}, on_wait=print))
    assert trainer.fit().metrics == {"seen": 1}


def test_an_ask_for_events_returns_when_one_is_posted_and_empty_after_its_wait():
    """The caller's ask waits in the controller: it returns as soon as an event is posted (here from another
    thread), and with nothing once its wait is over."""
    import asyncio
    import time

    from cluster import trainer

    async def ask_while_one_is_posted():
        threading.Timer(0.2, trainer.post_event, ("progress", {"done": 1})).start()
        start = time.monotonic()
        return await trainer.take_posted(30.0), time.monotonic() - start

    events, waited = asyncio.run(ask_while_one_is_posted())
    assert events == [("progress", {"done": 1})] and 0.15 < waited < 10, waited
    start = time.monotonic()
    assert asyncio.run(trainer.take_posted(0.3)) == []
    assert time.monotonic() - start >= 0.3
