"""The sweep's search stage: trials of training runs on Ray Tune, and the best trial's run for evaluate and publish.

A sweep has a stable identity, like a training run: the prepared data, the loop
config it starts from and the search itself (spaces, trial count, scheduler,
seed). Tune keeps its state under ``sweeps/<identity>`` in the store, so a re-run
after the driver died goes on where it stopped; each trial trains a run named by
its values' identity and the trial, under ``checkpoints/`` as any run.

The best trial is the one with the highest validation accuracy at its last epoch
among those that ran every epoch (a trial the scheduler stopped early lost to the
others at that point by its rule).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from cluster.config import TrainLoopConfig, run_identity
from cluster.execution.placement import live_nodes
from cluster.execution.session import ray_session
from cluster.execution.sweep import SweepSpec, TrialPlan, check_spaces, concurrency, tune_sweep
from cluster.execution.trainer import Resources
from cluster.execution.nodecache import StoredFile
from tasks.common import in_prefect_run, retry_unless_user_error
from tasks.events import emit
from tasks.refs import EpochMetrics, Evaluation, PreparedData, Release, SweepResult, Trial
from tasks.store import Store, open_store
from tasks.train import latest_checkpoint, stored_data, to_trained_model
from tasks.tracking import SweepTracking, Tracking
from tasks.weights import resolve_weights

__all__ = ["search", "sweep_identity", "sweep_task", "track_sweep_task", "trial_table"]


def sweep_identity(fingerprint: str, cfg: TrainLoopConfig, spec: SweepSpec) -> str:
    """A name for the sweep that is the same whenever its trials would be (not its concurrency)."""
    blob = json.dumps({"data": fingerprint, "base": run_identity(fingerprint, cfg),
                       "spaces": [str(s) for s in spec.spaces], "trials": spec.trials, "scheduler": spec.scheduler,
                       "seed": spec.seed}, sort_keys=True)
    return f"sweep-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def reported_history(store: Store, run_id: str, epochs: int) -> list[dict]:
    """The first ``epochs`` epochs of run ``run_id`` in the store: those its trial reported to Tune (a run that
    Tune stopped can have trained on for a moment, until its workers were stopped)."""
    found = latest_checkpoint(store, f"checkpoints/{run_id}")
    return (found[1]["history"] if found else [])[:epochs]


def trial_of(store: Store, plan: TrialPlan, row: dict) -> Trial:
    """A trial as the scheduler saw it (:func:`reported_history`)."""
    run_id = plan.run_name(row["values"], row["trial_id"])
    history = reported_history(store, run_id, row["epochs"])
    accuracies = [m["val_accuracy"] for m in history if m.get("val_accuracy") is not None]
    return Trial(trial_id=row["trial_id"], run_id=run_id, values=row["values"], epochs=len(history),
                 best_val_accuracy=max(accuracies, default=None),
                 last_val_accuracy=accuracies[-1] if accuracies else None,
                 stopped_early=row["error"] is None and len(history) < plan.base.epochs, error=row["error"])


def best_trial(trials: list[Trial], epochs: int) -> Trial:
    """The trial with the highest last validation accuracy among those that ran all ``epochs``.

    Raises:
        RuntimeError: no trial ran every epoch (each failed, or was stopped).
    """
    complete = [t for t in trials if t.error is None and t.epochs >= epochs and t.last_val_accuracy is not None]
    if not complete:
        errors = [f"{t.trial_id}: {t.error}" for t in trials if t.error]
        raise RuntimeError(f"no trial of the sweep ran all {epochs} epochs" + (f"; {errors[0]}" if errors else ""))
    return max(complete, key=lambda t: (t.last_val_accuracy, -trials.index(t)))


def search(prepared: PreparedData, cfg: TrainLoopConfig, resources: Resources, store_uri: str, spec: SweepSpec,
           on_result: Callable[[str, dict, dict], None] = lambda trial, values, metrics: None,
           on_change: Callable[[list[dict]], None] = lambda rows: None,
           on_identified: Callable[[str], None] = lambda sweep_id: None) -> SweepResult:
    """Run (or resume, or find finished) the sweep that ``prepared``, ``cfg`` and ``spec`` identify.

    ``on_identified(sweep_id)`` is called once the sweep is known, before any trial; ``on_result`` and
    ``on_change`` hear the trials as they go (:func:`cluster.execution.sweep.tune_sweep`).
    """
    store = open_store(store_uri)
    staged = resolve_weights(cfg.weights, store, cfg.framework, cfg.model) if cfg.weights else None
    if staged:
        cfg = replace(cfg, weights_sha256=staged.sha256)
    check_spaces(cfg, resources.num_workers, spec.spaces, prepared.counts.get("train", 0))
    sweep_id = sweep_identity(prepared.fingerprint, cfg, spec)
    on_identified(sweep_id)
    plan = TrialPlan(base=replace(cfg, use_gpu=resources.use_gpu), resources=resources,
                     data=stored_data(store, prepared, resources.node_cache_gb), fingerprint=prepared.fingerprint,
                     storage_path=store.ray_storage_path("checkpoints"), storage_filesystem=store.ray_filesystem(),
                     weights=staged and StoredFile(filesystem=store.ray_filesystem(),
                                                   path=store.ray_storage_path(staged.key), sha256=staged.sha256))
    started: list[str] = []  # trials that ran in this call

    def changed(rows: list[dict]) -> None:
        started.extend(row["trial_id"] for row in rows if row["status"] == "RUNNING")
        on_change(rows)

    with ray_session(resources.ray_address):
        spec = replace(spec, max_concurrent=concurrency(resources, spec.max_concurrent, live_nodes()))
        rows = tune_sweep(plan, spec, name=sweep_id, storage_path=store.ray_storage_path("sweeps"),
                          storage_filesystem=store.ray_filesystem(), on_result=on_result, on_change=changed)
    trials = [trial_of(store, plan, row) for row in sorted(rows, key=lambda r: r["trial_id"])]
    best = best_trial(trials, cfg.epochs)
    key, state = latest_checkpoint(store, f"checkpoints/{best.run_id}")
    model = to_trained_model(store, key, state, best.run_id, resources.num_workers, 0, not started)
    if staged:
        model = model.model_copy(update={"weights_origin": staged.origin, "weights_sha256": staged.sha256})
    return SweepResult(sweep_id=sweep_id, trials=tuple(trials), best_trial_id=best.trial_id, model=model,
                       reused=not started)


def trial_table(rows: list[dict], epochs: int) -> list[dict]:
    """The trials as the Prefect UI's table shows them, one row each, in the order Tune made them."""
    status = {"TERMINATED": "finished", "ERROR": "failed", "RUNNING": "running"}  # else waiting (pending, paused)
    table = []
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        table.append({"trial": row["trial_id"], **{k: row["values"][k] for k in sorted(row["values"])},
                      "status": status.get(row["status"], "waiting"),
                      "best val accuracy": None if row["best_val_accuracy"] is None
                      else round(row["best_val_accuracy"], 4),
                      "epochs run": row["epochs"],
                      "stopped early": row["status"] == "TERMINATED" and row["epochs"] < epochs})
    return table


@task(name="sweep", task_run_name="sweep of {spec.trials} trials", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error)
def sweep_task(prepared: PreparedData, cfg: TrainLoopConfig, resources: Resources, store: str, spec: SweepSpec,
               tracking: Tracking | None = None) -> SweepResult:
    """Prefect task: the sweep on Ray Tune, its trials' table as an artifact that grows as they end.

    Each trial's epochs go to the run's log and, with ``tracking``, to the trial's MLflow run, nested in the
    sweep's. A retry of this task resumes the sweep.
    """
    log = get_run_logger()
    log.info("sweep: %d trials over %s, %s scheduler, %d worker(s) each", spec.trials,
             ", ".join(map(str, spec.spaces)), spec.scheduler, resources.num_workers)
    tracked: list[SweepTracking] = []
    key: list[str] = []

    def on_identified(sweep_id: str) -> None:
        key.append(f"{sweep_id}-trials")
        if tracking is not None:
            tracked.append(SweepTracking(tracking, store, sweep_id, prepared.fingerprint))

    def on_result(trial_id: str, values: dict, metrics: dict) -> None:
        drawn = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items()))
        line = (f"trial {trial_id} ({drawn}) epoch {metrics['epoch']}/{cfg.epochs}: "
                f"val_acc {metrics.get('val_accuracy', float('nan')):.4f}")
        log.info(line)
        emit("note", text=line)
        for sweep in tracked:  # the track task logs what is missed here: MLflow must not stop the sweep
            try:
                sweep.log_epoch(trial_id, values, metrics)
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow did not take trial %s's epoch %d (%s); the sweep's end logs it", trial_id,
                            metrics["epoch"], exc)

    def on_change(rows: list[dict]) -> None:
        if in_prefect_run():
            create_table_artifact(trial_table(rows, cfg.epochs), key=key[0],
                                  description=f"Trials of the sweep ({spec.trials}), as they start and end")

    result = search(prepared, cfg, resources, store, spec, on_result, on_change, on_identified)
    best = result.best
    log.info("best trial %s: %s, val accuracy %.4f after %d epochs (run %s)", best.trial_id, best.values,
             best.last_val_accuracy, best.epochs, best.run_id)
    return result


@task(name="track", task_run_name="track the sweep in MLflow", retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error)
def track_sweep_task(tracking: Tracking, result: SweepResult, prepared: PreparedData, evaluation: Evaluation,
                     release: Release, store: str) -> str:
    """Prefect task: the sweep's results into its MLflow run and its trials' (the sweep logged their epochs as
    they came); returns the sweep's MLflow run id."""
    opened = open_store(store)
    histories = {trial.run_id: tuple(EpochMetrics(**m) for m in reported_history(opened, trial.run_id, trial.epochs))
                 for trial in result.trials}
    return SweepTracking(tracking, store, result.sweep_id, prepared.fingerprint).finish(result, evaluation, release,
                                                                                       histories)
