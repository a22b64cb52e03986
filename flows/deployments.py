"""Deployments of the training pipeline, and the process that serves them.

``trainflow serve`` registers them with the Prefect server at
``PREFECT_API_URL`` and executes their runs until stopped:

* ``train-pipeline/nightly``: retrains on a cron schedule (explicit time zone);
* ``train-pipeline/on-demand``: no schedule; started from the UI or the API;
* ``prepare-data/prepare``: ingest and preprocess only, into the store that later runs read;
* ``sweep/sweep``: a Ray Tune search over training parameters; its best trial is published.

All default to the ``digits-quickstart`` preset, so they run anywhere with
no data to fetch; every parameter can be changed per run in the UI's form.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta, timezone

from cluster.errors import UserError
from flows.params import SweepParams, build_params, prepare_params
from flows.pipeline import prepare_data, train_pipeline
from flows.sweep import sweep_pipeline

NIGHTLY_CRON = "0 3 * * *"
TIMEZONE = "UTC"
TAGS = ["trainflow"]


def deployments(every_seconds: float | None = None, store: str | None = None) -> list:
    """The pipeline's deployments.

    ``every_seconds`` adds an interval-scheduled one with the ``smoke`` preset
    (for checking a server end to end); ``store`` changes the default store.
    """
    from prefect.schedules import Cron, Interval

    publish = {"publish": {"store": store}} if store else {}
    quickstart = build_params("digits-quickstart", publish)
    defaults = {"params": quickstart.model_dump(mode="json")}
    made = [
        train_pipeline.to_deployment(
            name="nightly", schedule=Cron(NIGHTLY_CRON, timezone=TIMEZONE), parameters=defaults, tags=TAGS,
            description=f"Retrain every night at {NIGHTLY_CRON} ({TIMEZONE}) and publish through the gate."),
        train_pipeline.to_deployment(
            name="on-demand", parameters=defaults, tags=TAGS,
            description="Train, evaluate and publish once, with the parameters you set in the run form."),
        prepare_data.to_deployment(
            name="prepare", parameters={"params": prepare_params(quickstart).model_dump(mode="json")}, tags=TAGS,
            description="Ingest and preprocess only, into the store: runs with the same data options then reuse it."),
        sweep_pipeline.to_deployment(
            name="sweep", parameters={"params": build_params("digits-quickstart", publish, SweepParams).model_dump(
                mode="json")}, tags=TAGS,
            description="Search training parameters on Ray Tune (ASHA stops the trailing trials), then evaluate "
                        "and publish the best trial."),
    ]
    if every_seconds:
        made.append(train_pipeline.to_deployment(
            # anchored just ahead of now: the first run starts in seconds, not at the next aligned slot
            name="interval", tags=TAGS, schedule=Interval(timedelta(seconds=every_seconds), timezone=TIMEZONE,
                                                          anchor_date=datetime.now(timezone.utc) + timedelta(seconds=15)),
            parameters={"params": build_params("smoke", publish).model_dump(mode="json")},
            description=f"Retrain every {every_seconds:g} s."))
    return made


def serve_all(every_seconds: float | None = None, store: str | None = None) -> None:
    """Register the deployments and execute their runs until interrupted.

    Raises:
        UserError: when no Prefect server is configured.
    """
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise UserError("PREFECT_API_URL is not set; start a server (prefect server start) and export "
                            "PREFECT_API_URL=http://127.0.0.1:4200/api.")
    import asyncio

    from prefect.runner import Runner

    made = deployments(every_seconds, store)
    runner = Runner(pause_on_shutdown=True)  # what prefect.serve makes
    for deployment in made:
        runner.add_deployment(deployment)
    try:
        asyncio.run(_run_until_stopped(runner, [f"{d.flow_name}/{d.name}" for d in made]))
    except KeyboardInterrupt:
        print("trainflow: stopped serving; the deployments' schedules are paused until served again", flush=True)


async def _run_until_stopped(runner, names: list[str]) -> None:
    """The runner's loop; says the deployments are served once the runner has started, not before.

    ``prefect.serve`` prints that as the runner begins to start, and a Ctrl-C in the moments after,
    while the runner connects, is lost (the run goes on; only a second one stops it). On Ctrl-C
    (asyncio cancels this task) the runner stops as Prefect stops it, pausing the schedules; a
    watchdog ends the process if that takes more than :data:`STOP_GRACE_S` (a busy server).
    """
    import asyncio
    import contextlib

    loop = asyncio.create_task(runner.start())
    while not runner.started and not loop.done():
        await asyncio.sleep(0.05)
    if runner.started:
        print("Your deployments are being served and polling for scheduled runs:", *names, sep="\n  ", flush=True)
    try:
        await asyncio.shield(loop)  # a Ctrl-C reaches this task at once, not once the runner has stopped
    except asyncio.CancelledError:
        print("trainflow: stopping: pausing the deployments' schedules", flush=True)
        _exit_after(STOP_GRACE_S)
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        raise


STOP_GRACE_S = 20.0


def _exit_after(seconds: float) -> None:
    """End this process in ``seconds`` unless it has ended by then (a daemon timer dies with it)."""
    import threading

    def end() -> None:
        print(f"trainflow: the runner did not stop within {seconds:.0f} s; exiting without it (its schedules may "
              "still be active: pause them in the UI)", file=sys.stderr, flush=True)
        os._exit(130)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()
