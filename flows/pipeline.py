"""The training pipeline flow: ingest → preprocess → train → evaluate → publish.

Wiring only: the flow calls the five tasks in order, notes which were skipped,
and leaves artifacts. Ingest is cached by Prefect in the local cache;
preprocess and train find their earlier output in the store; so a re-run over
unchanged data skips the first three stages. Every user mistake that can be
seen before training is checked before preprocess writes to the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prefect import flow
from pydantic import BaseModel

from cluster.execution import session as runtime
from flows import services
from flows.artifacts import evaluation_artifacts, release_artifact
from flows.params import PipelineParams, PrepareParams, preflight, preflight_prepare
from tasks.common import result_storage
from tasks.evaluate import evaluate_task, preload as preload_evaluation
from tasks.events import emit
from tasks.ingest import ingest_task
from tasks.preprocess import count_train_images, preprocess_task
from tasks.publish import publish_task
from tasks.refs import Evaluation, PreparedData, RawData, Release, TrainedModel
from tasks.store import open_store
from tasks.tracking import track_task
from tasks.train import Resources, TrainLoopConfig, check_trainable, train_task


class StageTime(BaseModel):
    name: str
    seconds: float
    skipped: bool
    note: str = ""


class RunSummary(BaseModel):
    stages: list[StageTime]
    accuracy: float
    f1_macro: float
    test_size: int
    ignored_files: int  # non-image files in the dataset's folders
    skipped_images: int  # undecodable images left out (skip_bad_images)
    resumed_from_epoch: int
    restarts: list[int] = []  # each restart of the worker group by Ray in this run: the epoch it resumed after (0: none)
    epochs_trained: int
    training_seconds: float
    nodes: int  # Ray nodes the final worker group spanned (0 for a reused run that predates the record)
    run_id: str
    precision: str  # what the final epoch trained in, e.g. 'bf16 + channels_last' ('unrecorded' for old runs)
    model_name: str
    version: int
    promoted: bool
    reason: str
    release_uri: str
    already_published: bool = False  # the model already was that version: publish wrote nothing
    mlflow_run_id: str | None = None  # the MLflow run that tracked it, when tracking was on

    @classmethod
    def build(cls, stages: list[StageTime], raw: RawData, prepared: PreparedData, model: TrainedModel,
              evaluation: Evaluation, release: Release, mlflow_run_id: str | None = None) -> RunSummary:
        trained = [] if model.reused else model.history[model.resumed_from_epoch:]
        return cls(stages=stages, accuracy=evaluation.accuracy, f1_macro=evaluation.f1_macro,
                   test_size=evaluation.test_size, ignored_files=raw.ignored_files,
                   skipped_images=prepared.skipped_images,
                   resumed_from_epoch=0 if model.reused else model.resumed_from_epoch, epochs_trained=len(trained),
                   restarts=[] if model.reused else list(model.restarts),
                   training_seconds=sum(m.epoch_seconds for m in trained), nodes=model.node_count,
                   run_id=model.run_id, precision=model.precision.label if model.precision else "unrecorded",
                   model_name=release.name, version=release.version, promoted=release.promoted,
                   reason=release.reason, release_uri=release.uri, already_published=release.reused,
                   mlflow_run_id=mlflow_run_id)


def run_stage(stages: list[StageTime], name: str, call, *args, **kwargs):
    """Call a task, recording its wall time and whether Prefect served it from cache."""
    emit("stage_started", name=name)
    start = time.perf_counter()
    state = call(*args, return_state=True, **kwargs)
    result = state.result()
    cached = state.name == "Cached"
    reused = getattr(result, "reused", False)  # the store already held this stage's output
    note = "cached: inputs unchanged" if cached else "reused: the store already holds it" if reused else ""
    stages.append(StageTime(name=name, seconds=time.perf_counter() - start, skipped=cached or reused, note=note))
    emit("stage_finished", **stages[-1].model_dump())
    return result


Train = Callable[[list[StageTime], PreparedData, TrainLoopConfig, Resources, str], TrainedModel]


def train_and_evaluate(params: PipelineParams, stages: list[StageTime], train: Train, store: str
                       ) -> tuple[RawData, PreparedData, TrainedModel, Evaluation]:
    """Ingest, preprocess, ``train`` (a stage that records itself in ``stages``) and evaluate into the store at
    URI ``store``, with Ray started beside ingest and stopped after evaluate if started here."""
    data_cfg, train_cfg, resources = params.data.to_config(), params.train.to_config(), params.cluster.to_resources()
    if resources.ray_address is None:  # `trainflow up`'s head, for the runs `trainflow serve` starts too
        services.use_ray_head()
    owns_ray = runtime.prestart(resources.ray_address)  # Ray starts while ingest runs
    try:
        ingest = ingest_task.with_options(result_storage=result_storage(params.data.cache_dir))
        raw = run_stage(stages, "ingest", ingest, params.data.dataset, params.data.cache_dir)
        check_trainable(count_train_images(raw, data_cfg), train_cfg, resources)
        prepared = run_stage(stages, "preprocess", preprocess_task, raw, data_cfg, store, resources.ray_address)
        threading.Thread(target=preload_evaluation, name="preload-evaluation", daemon=True).start()
        model = train(stages, prepared, train_cfg, resources, store)
        # one worker's CPUs: a share that some node is known to hold
        evaluation = run_stage(stages, "evaluate", evaluate_task, model, prepared, store, resources.ray_address,
                               resources.cpus_per_worker)
    finally:
        if owns_ray:
            runtime.shutdown()
    evaluation_artifacts(params.publish.model_name, model, evaluation)
    return raw, prepared, model, evaluation


def publish(params: PipelineParams, stages: list[StageTime], model: TrainedModel, evaluation: Evaluation,
            prepared: PreparedData, lineage_params: dict, store: str) -> Release:
    """The publish stage into the store at URI ``store``, with ``lineage_params`` as the parameters the
    version's lineage records."""
    release = run_stage(stages, "publish", publish_task, model, evaluation, prepared, lineage_params, store,
                        params.publish.model_name, params.publish.min_improvement)
    release_artifact(release)
    return release


@flow(name="train-pipeline", flow_run_name="{params.data.label} · {params.train.framework} · "
      "{params.train.epochs} epochs", log_prints=True)
def train_pipeline(params: PipelineParams = PipelineParams()) -> RunSummary:
    """Ingest, preprocess, train on Ray, evaluate and publish one image classifier."""
    tracking = preflight(params)
    store = open_store(params.publish.store).uri
    stages: list[StageTime] = []

    def train(stages, prepared, cfg, resources, store):
        return run_stage(stages, "train", train_task, prepared, cfg, resources, store, params.train.force, tracking)

    raw, prepared, model, evaluation = train_and_evaluate(params, stages, train, store)
    release = publish(params, stages, model, evaluation, prepared, params.model_dump(mode="json"), store)
    tracked = track_task(tracking, model, prepared, evaluation, release, store) if tracking else None
    return RunSummary.build(stages, raw, prepared, model, evaluation, release, tracked)


@flow(name="prepare-data", flow_run_name="{params.data.label} · {params.data.image_size} px", log_prints=True)
def prepare_data(params: PrepareParams = PrepareParams()) -> PreparedData:
    """Ingest and preprocess only: the prepared data in the store, where every training run with the same
    store and data options finds it (its preprocess stage is then skipped)."""
    preflight_prepare(params)
    store = open_store(params.store)
    stages: list[StageTime] = []
    ingest = ingest_task.with_options(result_storage=result_storage(params.data.cache_dir))
    raw = run_stage(stages, "ingest", ingest, params.data.dataset, params.data.cache_dir)
    return run_stage(stages, "preprocess", preprocess_task, raw, params.data.to_config(), store.uri,
                     runtime.resolve_address(params.ray_address))
