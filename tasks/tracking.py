"""Runs tracked in MLflow: each training run is one MLflow run, which its resumptions continue.

Tracking is on when the flow's ``mlflow_uri`` parameter, or else ``MLFLOW_TRACKING_URI``, names a
tracking server; otherwise nothing is logged and nothing here imports MLflow. The driver logs, as rank 0's
reports reach it: the form's parameters, the run's identity and data fingerprint as tags, the metrics of
every epoch (step = epoch), then the test metrics, the confusion matrix image, the per-class table and the
published version.

An MLflow run is found again by where its training run keeps its checkpoints (the store's
``checkpoints/<identity>``): a worker group that Ray restarted, a retried train task and a flow re-run after
the driver died all continue it, and an epoch already logged is not logged again. A run whose MLflow run
finished (a training run reused unchanged) adds nothing to it.

Credentials never go in: a URI holding a user name or password is refused (MLflow takes them from
``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``/``_TOKEN``), and the form holds none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from prefect import task
from pydantic import BaseModel, ConfigDict

from cluster.errors import UserError
from tasks.common import retry_unless_user_error
from tasks.refs import EpochMetrics, Evaluation, PreparedData, Release, SweepResult, TrainedModel
from tasks.store import open_store

__all__ = ["SweepTracking", "TrackedRun", "Tracking", "check_reachable", "track", "track_task", "tracking_for"]

ENV = "MLFLOW_TRACKING_URI"
RUN_KEY_TAG = "trainflow.run_key"  # sha256 of the checkpoints' URI: a value MLflow's filter syntax takes as is
EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "epoch_seconds", "train_images_per_s")
BATCH = 100  # MLflow takes at most 100 parameters in one request


class Tracking(BaseModel):
    """Where a flow run is tracked, and the form's parameters to record (flattened: ``train.lr``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    experiment: str
    params: dict[str, str]


def tracking_for(uri: str | None, experiment: str, form: Mapping) -> Tracking | None:
    """The tracking of a flow run: ``uri``, else ``MLFLOW_TRACKING_URI``; None when neither names a server.

    Raises:
        UserError: the URI holds credentials, or MLflow's client is not installed.
    """
    uri = os.environ.get(ENV, "") if uri is None else uri
    if not uri:
        return None
    if importlib.util.find_spec("mlflow") is None:
        raise UserError(f"tracking in MLflow ({uri}) needs its client, which is not installed; "
                        "pip install 'trainflow[mlflow]', or unset MLFLOW_TRACKING_URI.")
    parts = urlsplit(uri)
    if parts.username or parts.password:
        raise UserError("mlflow_uri holds a user name or password; give the URI without them and set "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                        "in the environment.")
    return Tracking(uri=uri, experiment=experiment, params=_flatten(form))


def check_reachable(tracking: Tracking, timeout: float = 10.0) -> None:
    """An HTTP tracking server must answer before the run starts (MLflow's own client retries for minutes).

    Raises:
        UserError: it does not answer.
    """
    if urlsplit(tracking.uri).scheme not in ("http", "https"):
        return
    import httpx

    try:  # any answer will do (a proxy in front may want credentials for /health): MLflow's own calls tell more
        httpx.get(f"{tracking.uri.rstrip('/')}/health", timeout=timeout)
    except httpx.TransportError as exc:
        raise UserError(f"the MLflow server at {tracking.uri} does not answer ({type(exc).__name__}); start it, "
                        f"or fix --mlflow-uri / {ENV}.") from None


def _flatten(form: Mapping, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in form.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = "" if value is None else str(value)
    return flat


class TrackedRun:
    """The MLflow run of one training run, found or created by :meth:`open`."""

    def __init__(self, client, run_id: str, finished: bool, logged: set[int]) -> None:
        self.client, self.run_id, self.finished, self.logged = client, run_id, finished, logged

    @classmethod
    def open(cls, tracking: Tracking, checkpoints_uri: str, identity: str, fingerprint: str,
             parent: str | None = None) -> TrackedRun:
        """The MLflow run of the training run whose checkpoints are at ``checkpoints_uri``; created, with the
        form's parameters (nested in MLflow run ``parent`` if given), when there is none yet."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking.uri)
        experiment = client.get_experiment_by_name(tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(tracking.experiment)
        key = hashlib.sha256(checkpoints_uri.encode()).hexdigest()
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                   order_by=["attributes.start_time ASC"], max_results=1)
        if found:
            run = found[0]
            if run.info.status == "FINISHED":
                return cls(client, run.info.run_id, True, set())
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
            logged = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
        else:
            run = client.create_run(experiment_id, run_name=identity, tags={
                RUN_KEY_TAG: key, "trainflow.checkpoints": checkpoints_uri, "trainflow.run_id": identity,
                "trainflow.data_fingerprint": fingerprint, **({"mlflow.parentRunId": parent} if parent else {})})
            logged = set()
        # MLflow creates a run and logs its parameters in separate calls: a driver killed between them left a run
        # without parameters, which its re-run continues, so what is missing is logged whenever a run is opened
        params = [Param(k, v) for k, v in sorted(tracking.params.items()) if k not in run.data.params]
        for start in range(0, len(params), BATCH):
            client.log_batch(run.info.run_id, params=params[start:start + BATCH])
        return cls(client, run.info.run_id, False, logged)

    def log_epoch(self, metrics: Mapping) -> None:
        """One epoch's report (``cluster.worker.context.epoch_metrics``), at step = epoch; once."""
        from mlflow.entities import Metric

        epoch = int(metrics["epoch"])
        if self.finished or epoch in self.logged:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, float(metrics[name]), now, epoch)
                                                    for name in EPOCH_METRICS if metrics.get(name) is not None])
        self.logged.add(epoch)

    def log_history(self, history: tuple[EpochMetrics, ...]) -> None:
        """The epochs of a finished training run not logged yet (tracking turned on later, a lost report)."""
        for metrics in history:
            self.log_epoch(metrics.model_dump())

    def end(self, tags: Mapping[str, object]) -> None:
        """Set ``tags`` and mark the run finished (a run with no test results: a sweep's trial that lost)."""
        if self.finished:
            return
        for name, value in tags.items():
            self.client.set_tag(self.run_id, name, str(value))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def finish(self, evaluation: Evaluation, confusion_png: bytes, release: Release,
               tags: Mapping[str, object] | None = None) -> None:
        """The test metrics, the confusion matrix, the per-class table and the published version; then done."""
        from mlflow.entities import Metric

        if self.finished:
            return
        now = int(time.time() * 1000)
        scores = {"test_accuracy": evaluation.accuracy, "test_precision_macro": evaluation.precision_macro,
                  "test_recall_macro": evaluation.recall_macro, "test_f1_macro": evaluation.f1_macro,
                  "test_size": evaluation.test_size}
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in scores.items()])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "confusion.png").write_bytes(confusion_png)
            self.client.log_artifact(self.run_id, str(Path(tmp) / "confusion.png"))
        self.client.log_dict(self.run_id, {
            "columns": ["class", "precision", "recall", "f1", "support"],
            "data": [[c.name, c.precision, c.recall, c.f1, c.support] for c in evaluation.per_class]},
            "per_class.json")
        self.end({"trainflow.release_uri": release.uri, "trainflow.model_name": release.name,
                  "trainflow.version": release.version, "trainflow.promoted": release.promoted, **(tags or {})})


class SweepTracking:
    """The MLflow runs of a sweep: one for the sweep, and one per trial nested in it (``mlflow.parentRunId``).

    Each is found again as a training run's is, so a resumed sweep continues them. The trials' epochs are
    logged as the sweep's driver hears them; :meth:`finish` (after publish) adds what it missed, the test
    results to the best trial's run and the sweep's, and closes them all.
    """

    def __init__(self, tracking: Tracking, store_uri: str, sweep_id: str, fingerprint: str) -> None:
        self.tracking, self.store, self.fingerprint = tracking, open_store(store_uri), fingerprint
        self.sweep = TrackedRun.open(tracking, self.store.child_uri(f"sweeps/{sweep_id}"), sweep_id, fingerprint)
        self.trials: dict[str, TrackedRun] = {}

    def trial(self, trial_id: str, run_id: str, values: Mapping[str, object]) -> TrackedRun:
        """The nested run of trial ``trial_id``, which trains run ``run_id`` with ``values``."""
        if trial_id not in self.trials:
            params = {**self.tracking.params, **{f"train.{k}": str(v) for k, v in values.items()},
                      "sweep.trial_id": trial_id}
            self.trials[trial_id] = TrackedRun.open(self.tracking.model_copy(update={"params": params}),
                                                    self.store.child_uri(f"checkpoints/{run_id}"), run_id,
                                                    self.fingerprint, parent=self.sweep.run_id)
        return self.trials[trial_id]

    def log_epoch(self, trial_id: str, values: Mapping[str, object], metrics: Mapping) -> None:
        self.trial(trial_id, metrics["run_id"], values).log_epoch(metrics)

    def finish(self, result: SweepResult, evaluation: Evaluation, release: Release,
               histories: Mapping[str, tuple[EpochMetrics, ...]]) -> str:
        """Close every trial's run and the sweep's (``histories``: each trial's epochs, by run id, for those
        the driver missed); returns the sweep's MLflow run id."""
        png = self.store.get_bytes(self.store.key_of(evaluation.confusion_png_uri))
        for trial in result.trials:
            run = self.trial(trial.trial_id, trial.run_id, trial.values)
            run.log_history(histories.get(trial.run_id, ()))
            outcome = {"trainflow.stopped_early": trial.stopped_early, "trainflow.error": trial.error or ""}
            if trial.trial_id == result.best_trial_id:
                run.finish(evaluation, png, release, {**outcome, "trainflow.best_trial": True})
            else:
                run.end(outcome)
        best = result.best
        self.sweep.finish(evaluation, png, release, {"trainflow.best_trial": best.trial_id,
                                                     **{f"trainflow.best.{k}": v for k, v in best.values.items()}})
        return self.sweep.run_id


def track(tracking: Tracking, model: TrainedModel, prepared: PreparedData, evaluation: Evaluation,
          release: Release, store_uri: str) -> str:
    """Complete a run's MLflow run: epochs it missed, the test results, the release. Returns its run id."""
    store = open_store(store_uri)
    checkpoints_uri = model.checkpoint_uri.rsplit("/", 1)[0]  # the run's folder of checkpoints
    run = TrackedRun.open(tracking, checkpoints_uri, model.run_id, prepared.fingerprint)
    run.log_history(model.history)
    run.finish(evaluation, store.get_bytes(store.key_of(evaluation.confusion_png_uri)), release)
    return run.run_id


@task(name="track", task_run_name="track {model.run_id} in MLflow", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error)
def track_task(tracking: Tracking, model: TrainedModel, prepared: PreparedData, evaluation: Evaluation,
               release: Release, store: str) -> str:
    """Prefect task: the run's results into its MLflow run (the train task logged its epochs)."""
    return track(tracking, model, prepared, evaluation, release, store)

