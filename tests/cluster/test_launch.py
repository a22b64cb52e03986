"""Ray Train on a local Ray: torch DDP with one and two workers, reporting and checkpoints."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from cluster.config import TrainLoopConfig
from cluster.data import load_split
from cluster.errors import UserError
from cluster.execution.trainer import Resources, fit
from cluster.execution.nodecache import StoredData
from cluster.pytorch.model import predict, read_state
from tasks.store import open_store
from tasks.train import stored_data
from tests.conftest import descendants, title


def in_place(store_uri: str, ref) -> StoredData:
    """The prepared data as workers of a local Ray find it: read in place from the folder store."""
    data = stored_data(open_store(store_uri), ref)
    assert data.in_place
    return data


def ray_titles() -> set[str]:
    """The titles of the Ray processes this test process started (``ray::TrainController``, ...): the session's
    Ray, not another on the machine."""
    titles = (title(pid) for pid in descendants(os.getpid()))
    return {name.split()[0].split(".")[0] for name in titles if name.startswith("ray::")}


# Each fit starts a Ray Train worker group (~20 s on two cores): slow. `make test-fast` still trains through Ray
# once, in the real `trainflow run --preset smoke` of tests/flows/test_bad_input.py.
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_trains_on_ray_reports_every_epoch_checkpoints_and_resumes(ray_local, prepared, tmp_path, workers):
    store_uri, ref = prepared
    store = open_store(store_uri)
    data = store.local_dir(store.key_of(ref.uri), tmp_path)
    reports: list[dict] = []
    titles: set[str] = set()  # the Ray processes alive as each epoch's report arrives

    def on_report(metrics: dict) -> None:
        reports.append(metrics)
        titles.update(ray_titles())

    cfg = TrainLoopConfig(data_dir="", epochs=6, lr=0.01, batch_size=16)
    stored = in_place(store_uri, ref)
    final = fit(cfg, Resources(num_workers=workers, max_failures=0), data=stored,
                run_name=f"w{workers}", storage_path=str(tmp_path / "ray"), on_report=on_report)

    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5, 6]  # once per epoch, not once per worker
    # a one-machine Ray has no node to drain: Train's preemption watcher is not started beside the run
    assert "ray::TrainController" in titles and "ray::PreemptionWatcher" not in titles, titles
    assert reports[-1]["train_loss"] < 0.5 * reports[0]["train_loss"]
    spec, epoch, history = read_state(Path(final))
    assert epoch == 6 and [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert Path(final).parent == tmp_path / "ray" / f"w{workers}"
    x_test, y_test = load_split(data, "test")
    accuracy = float(np.mean(predict(Path(final), x_test) == y_test))
    assert accuracy > 0.8, accuracy

    if workers == 2:
        return
    # the same run name, one more epoch: it resumes from its last checkpoint and trains that epoch alone
    more: list[dict] = []
    resumed = fit(TrainLoopConfig(**{**cfg.to_dict(), "epochs": 7}), Resources(num_workers=workers, max_failures=0),
                  data=stored, run_name=f"w{workers}", storage_path=str(tmp_path / "ray"), on_report=more.append)
    assert [r["epoch"] for r in more] == [7]
    _, epoch, history = read_state(Path(resumed))
    assert epoch == 7 and [h["epoch"] for h in history] == list(range(1, 8))


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
    back: its controller is killed, which ends the workers and frees their placement group, so a re-run in the
    same process places its two workers and resumes."""
    from ray.util.placement_group import placement_group_table

    def stop(report: dict) -> None:
        raise _Stop

    data = in_place(*prepared)
    cfg = TrainLoopConfig(data_dir="", epochs=3, lr=0.01, batch_size=16)
    with pytest.raises(_Stop):
        fit(cfg, Resources(num_workers=2, max_failures=0), data=data, run_name="stopped",
            storage_path=str(tmp_path / "ray"), on_report=stop)
    deadline = time.monotonic() + 20
    while {group["state"] for group in placement_group_table().values()} - {"REMOVED"}:
        assert time.monotonic() < deadline, placement_group_table()
        time.sleep(0.2)
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
    from cluster.execution.session import wait_ready

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


def test_events_are_taken_in_order_and_a_take_waits_for_the_next_one(ray_local):
    """The run's event actor: each put comes back once, in the order of puts that waited for their answer (as
    the Train callback's reports do; an async actor may run puts sent at once in any order); a take with nothing
    there returns as soon as an event is put (here from another thread), and with nothing once its wait is over."""
    from cluster.execution.events import start_events

    events = start_events()
    try:
        for n in (1, 2):
            ray.get(events.put.remote("progress", {"done": n}))
        assert ray.get(events.take.remote(0)) == [("progress", {"done": 1}), ("progress", {"done": 2})]
        threading.Timer(0.5, events.put.remote, ("message", "resumed")).start()
        start = time.monotonic()
        assert ray.get(events.take.remote(30.0)) == [("message", "resumed")]
        assert 0.3 < time.monotonic() - start < 10
        start = time.monotonic()
        assert ray.get(events.take.remote(0.3)) == []
        assert time.monotonic() - start >= 0.3
    finally:
        ray.kill(events)
