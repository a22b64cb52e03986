"""Stage 3, train: run distributed training on Ray and return the final checkpoint.

A training run has a stable identity derived from the prepared data's
fingerprint and the parameters that change the result (not the worker count,
which only changes speed). Its checkpoints live under that identity in the
store, so a retry of this task, or a re-run of the flow after a crash, resumes
from the last finished epoch, and a run that already finished is reused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from cluster.config import NOT_IDENTITY, TrainLoopConfig, run_identity
from cluster.errors import UserError
from cluster.execution.trainer import Resources, check_framework, check_placement, fit
from cluster.execution.nodecache import StoredData, StoredFile
from cluster.execution.session import ray_session
from tasks.common import in_prefect_run, retry_unless_user_error
from tasks.events import emit
from tasks.refs import EpochMetrics, PreparedData, TrainedModel, TrainingPrecision, WorkerPlacement
from tasks.store import Store, open_store
from tasks.tracking import TrackedRun, Tracking
from tasks.weights import resolve_weights

__all__ = ["NOT_IDENTITY", "Resources", "TrainLoopConfig", "run_identity", "train", "train_task"]

def check_trainable(train_images: int, cfg: TrainLoopConfig, resources: Resources) -> None:
    """Mistakes that show only once the data is known and Ray is up, caught before anything is written.

    (Whether the batch splits over the workers needs neither, so the flow's preflight checks it.)

    Raises:
        UserError: a batch larger than the training set, a worker group the Ray cluster cannot host, or
            a framework its nodes lack.
    """
    if cfg.batch_size > train_images:
        raise UserError(f"batch_size={cfg.batch_size} is larger than the training set ({train_images} images); "
                        "lower --batch-size or add images.")
    with ray_session(resources.ray_address):
        check_placement(resources)
        if resources.ray_address:  # a local Ray runs this machine's packages, which preflight checked
            check_framework(cfg.framework)


def latest_checkpoint(store: Store, run_prefix: str) -> tuple[str, dict] | None:
    """The most advanced checkpoint stored for a run: (key prefix, its state), or None."""
    best: tuple[str, dict] | None = None
    for key in store.list(run_prefix):
        if key.endswith("/state.json"):
            state = json.loads(store.get_bytes(key))
            if best is None or state["epoch"] > best[1]["epoch"]:
                best = (key.rsplit("/", 1)[0], state)
    return best


def to_trained_model(store: Store, checkpoint_key: str, state: dict, run_id: str, workers: int,
                     resumed_from: int, reused: bool, restarts: tuple[int, ...] = ()) -> TrainedModel:
    return TrainedModel(
        checkpoint_uri=store.child_uri(checkpoint_key), framework=state.get("framework", "torch"),
        model=state["spec"]["name"],
        run_id=run_id, history=tuple(EpochMetrics(**m) for m in state["history"]), num_workers=workers,
        resumed_from_epoch=resumed_from, reused=reused, restarts=restarts,
        workers=tuple(WorkerPlacement(**w) for w in state.get("workers", ())),
        precision=TrainingPrecision(**state["precision"]) if state.get("precision") else None)


def stored_data(store: Store, prepared: PreparedData, node_cache_gb: float | None = None) -> StoredData:
    """How a worker on any node finds ``prepared``: through the store's filesystem, never a driver path.

    A folder store is read in place (it is this machine's, or the user declared it shared by every
    node); from an object store each node fetches its own verified copy, of the training shards at
    most ``node_cache_gb`` (the rest stream from the store as the workers read them).
    """
    filesystem = store.ray_filesystem()
    return StoredData(filesystem=filesystem, path=store.ray_storage_path(store.key_of(prepared.uri)),
                      fingerprint=prepared.fingerprint,
                      cache_limit=None if node_cache_gb is None else int(node_cache_gb * 1e9))


def train(prepared: PreparedData, cfg: TrainLoopConfig, resources: Resources, store_uri: str,
          on_report: Callable[[dict], None] = lambda m: None, retrain: str | None = None,
          on_failure: Callable[[dict[int, str]], None] = lambda e: None,
          on_wait: Callable[[str], None] = lambda m: None,
          on_progress: Callable[[dict], None] = lambda p: None,
          on_message: Callable[[str], None] = lambda m: None,
          on_identified: Callable[[str, str], None] = lambda run_id, checkpoints_uri: None) -> TrainedModel:
    """Train (or resume, or reuse) the run that ``prepared`` and ``cfg`` identify.

    ``retrain`` names a fresh run beside the identified one (``<identity>-retrain-<retrain>``), which
    starts from epoch 0 even when the identified run finished; passing the same name again resumes it.
    ``on_identified(run_id, checkpoints_uri)`` is called once the run is known, before any training.
    """
    store = open_store(store_uri)
    staged = resolve_weights(cfg.weights, store, cfg.framework, cfg.model) if cfg.weights else None
    if staged:  # what the run starts from is part of its identity
        cfg = replace(cfg, weights_sha256=staged.sha256)
    started_from = {"weights_origin": staged.origin, "weights_sha256": staged.sha256} if staged else {}
    run_id = run_identity(prepared.fingerprint, cfg) + (f"-retrain-{retrain}" if retrain else "")
    run_prefix = f"checkpoints/{run_id}"
    on_identified(run_id, store.child_uri(run_prefix))
    found = latest_checkpoint(store, run_prefix)
    if found and found[1]["epoch"] >= cfg.epochs:
        return to_trained_model(store, found[0], found[1], run_id, resources.num_workers, found[1]["epoch"],
                                True).model_copy(update=started_from)
    cfg = replace(cfg, use_gpu=resources.use_gpu)
    reported: list[int] = []
    starts: list[int] = []  # the epoch each worker group started after: the first, then Ray's restarts

    def report(metrics: dict) -> None:
        reported.append(metrics["epoch"])
        on_report(metrics)

    with ray_session(resources.ray_address):
        final = fit(cfg, resources, data=stored_data(store, prepared, resources.node_cache_gb), run_name=run_id,
                    storage_path=store.ray_storage_path("checkpoints"), storage_filesystem=store.ray_filesystem(),
                    on_report=report, on_failure=on_failure, on_wait=on_wait, on_progress=on_progress,
                    on_message=on_message, on_start=starts.append, weights=staged and StoredFile(
                        filesystem=store.ray_filesystem(), path=store.ray_storage_path(staged.key),
                        sha256=staged.sha256))
    key = f"{run_prefix}/{Path(final).name}"
    state = json.loads(store.get_bytes(f"{key}/state.json"))
    # where Ray actually resumed: the epoch before the first one this call heard of
    resumed_from = reported[0] - 1 if reported else state["epoch"]
    return to_trained_model(store, key, state, run_id, resources.num_workers, resumed_from, False,
                            tuple(starts[1:])).model_copy(update=started_from)


def format_epoch(m: dict, epochs: int) -> str:
    val = f"val_loss {m['val_loss']:.4f} val_acc {m['val_accuracy']:.4f}" if m["val_loss"] is not None else "no val"
    return (f"epoch {m['epoch']}/{epochs}: train_loss {m['train_loss']:.4f} {val} "
            f"({m['epoch_seconds']:.1f}s, {m['train_images_per_s']:.0f} img/s)")


@task(name="train", task_run_name="train {cfg.network} ({cfg.framework}) x{resources.num_workers} workers, "
                                  "{cfg.epochs} epochs",
      retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def train_task(prepared: PreparedData, cfg: TrainLoopConfig, resources: Resources, store: str,
               force: bool = False, tracking: Tracking | None = None) -> TrainedModel:
    """Prefect task: distributed training on Ray.

    Per-epoch metrics go to the run's log, move a progress artifact and, with ``tracking``, go to the
    run's MLflow run, all from this (driver) process as Ray's reports arrive. A retry of this task
    resumes from the last checkpoint; with ``force`` the fresh run is named after this task run, so its
    retries resume it too.
    """
    log = get_run_logger()
    log.info("training on %d Ray workers, global batch %d (%d per worker)", resources.num_workers,
             cfg.batch_size, cfg.local_batch_size(resources.num_workers))
    emit("training_started", epochs=cfg.epochs, workers=resources.num_workers, batch_size=cfg.batch_size)
    progress = None
    if in_prefect_run():
        progress = create_progress_artifact(0.0, description=f"Training {cfg.network}: share of {cfg.epochs} epochs done")

    tracked: list[TrackedRun] = []

    def on_identified(run_id: str, checkpoints_uri: str) -> None:
        if tracking is not None:
            tracked.append(TrackedRun.open(tracking, checkpoints_uri, run_id, prepared.fingerprint))

    def on_report(metrics: dict) -> None:
        log.info(format_epoch(metrics, cfg.epochs))
        emit("epoch_finished", epochs=cfg.epochs, metrics=metrics)
        if progress is not None:
            update_progress_artifact(progress, 100.0 * metrics["epoch"] / cfg.epochs)
        for run in tracked:  # the track task logs what is missed here: a hiccup of MLflow's must not stop training
            try:
                run.log_epoch(metrics)
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow did not take epoch %d's metrics (%s); the run's end logs them", metrics["epoch"],
                            exc)

    context = TaskRunContext.get()
    retrain = (str(context.task_run.id)[:8] if context else uuid.uuid4().hex[:8]) if force else None

    def on_failure(errors: dict[int, str]) -> None:
        ranks = ", ".join(f"rank {rank} ({error})" for rank, error in sorted(errors.items()))
        log.warning("Ray training worker(s) failed: %s; Ray restarts the worker group from the last checkpoint "
                    "(at most %d restarts)", ranks, resources.max_failures)

    def on_message(text: str) -> None:  # for the person running this: a worker's word (rank 0's), a wait
        log.info(text)
        emit("note", text=text)

    model = train(prepared, cfg, resources, store, on_report, retrain, on_failure, on_wait=on_message,
                  on_progress=lambda fields: emit("epoch_progress", epochs=cfg.epochs, **fields),
                  on_message=on_message, on_identified=on_identified)
    if progress is not None:
        update_progress_artifact(progress, 100.0)  # a reused run reports no epochs
    if model.reused:
        on_message(f"reused finished run {model.run_id}: its inputs and parameters are unchanged")
    elif model.resumed_from_epoch:
        on_message(f"resumed run {model.run_id} after epoch {model.resumed_from_epoch}")
    for epoch in model.restarts:
        log.warning("Ray restarted the worker group %s", f"after epoch {epoch}" if epoch else "from scratch")
    if model.workers:
        log.info("the last worker group ran on %d node(s): %s", model.node_count,
                 ", ".join(f"rank {w.rank} on {w.node_ip or w.hostname} ({w.device})" for w in model.workers))
    return model
