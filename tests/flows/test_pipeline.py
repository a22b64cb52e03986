"""The whole flow under Prefect's test harness: the bundled digits, twice; a TFDS dataset the tests build."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.params import build_params
from flows.pipeline import train_pipeline
from tests.conftest import needs_tfds


def run_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_digits_flow_trains_publishes_and_skips_unchanged_stages_on_rerun(harness, ray_local, tmp_path):
    store = tmp_path / "artifacts"
    params = build_params("digits-quickstart", {"data": {"image_size": 16, "cache_dir": str(tmp_path / "cache")},
                                                "train": {"epochs": 10}, "publish": {"store": str(store)}})
    state = train_pipeline(params, return_state=True)
    first = state.result()
    artifacts = run_artifacts(state.state_details.flow_run_id)
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == 1 and progress[0].data == 100.0
    table = next(a for a in artifacts if a.type == "table")
    assert len(json.loads(table.data)) == 10 and {"class", "precision", "recall", "f1"} <= set(json.loads(table.data)[0])
    markdowns = [a.data for a in artifacts if a.type == "markdown"]
    assert any("data:image/png;base64," in m for m in markdowns)  # the confusion matrix, visible in the UI
    assert any("promoted to champion" in m for m in markdowns)

    assert [s.name for s in first.stages] == ["ingest", "preprocess", "train", "evaluate", "publish"]
    assert not any(s.skipped for s in first.stages)  # a fresh store holds no cached results
    assert first.accuracy >= 0.9, first.accuracy
    assert first.epochs_trained == 10 and first.training_seconds > 0
    assert (first.version, first.promoted) == (1, True)
    version = store / "models" / "seed-cnn" / "versions" / "1"
    manifest = json.loads((version / "manifest.json").read_text())
    assert {f["name"] for f in manifest["files"]} >= {"model.pt", "metrics.json", "lineage.json", "card.md"}
    lineage = json.loads((version / "lineage.json").read_text())
    assert lineage["parameters"]["train"]["epochs"] == 10
    assert json.loads((store / "models" / "seed-cnn" / "champion.json").read_text())["version"] == 1

    second = train_pipeline(params)
    skipped = {s.name: s.skipped for s in second.stages}
    assert skipped == {"ingest": True, "preprocess": True, "train": True, "evaluate": False, "publish": False}
    assert second.stages[1].note == second.stages[2].note == "reused: the store already holds it"
    assert second.stages[0].note == "cached: inputs unchanged"
    assert second.epochs_trained == 0  # the finished run is reused, not retrained
    assert second.accuracy == first.accuracy
    assert (second.version, second.promoted) == (2, False)
    assert "delta +0.0000" in second.reason


@pytest.mark.slow
def test_caches_follow_content_not_history(harness, ray_local, tmp_path):
    store, cache = tmp_path / "artifacts", tmp_path / "cache"
    base = {"train": {"epochs": 1}, "publish": {"store": str(store)}, "cluster": {"num_workers": 1}}
    data = {"cache_dir": str(cache)}
    train_pipeline(build_params("digits-quickstart", {**base, "data": {**data, "image_size": 8}}))

    changed = train_pipeline(build_params("digits-quickstart", {**base, "data": {**data, "image_size": 12}}))
    skipped = {s.name: s.skipped for s in changed.stages}
    assert skipped["ingest"] and not skipped["preprocess"]  # new preprocessing parameters, same raw data
    assert len(list((store / "prepared").iterdir())) == 2

    shutil.rmtree(cache)  # the local raw copy is gone: ingest must run again ...
    again = train_pipeline(build_params("digits-quickstart", {**base, "data": {**data, "image_size": 12}}))
    skipped = {s.name: s.skipped for s in again.stages}
    assert not skipped["ingest"] and skipped["preprocess"]  # ... and yields the same fingerprint
    assert (cache / "raw" / "digits").is_dir()
    assert skipped["train"] and again.epochs_trained == 0  # that run had finished before

    forced = train_pipeline(build_params("digits-quickstart", {**base, "data": {**data, "image_size": 12},
                                                               "train": {"epochs": 1, "force": True}}))
    skipped = {s.name: s.skipped for s in forced.stages}
    assert skipped["preprocess"] and not skipped["train"] and forced.epochs_trained == 1
    assert forced.run_id.startswith(again.run_id + "-retrain-")  # a fresh run beside the finished one


@needs_tfds
@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_tfds_dataset_through_the_whole_flow(harness, ray_local, tfds_data, tmp_path, framework):
    before = set(sys.modules)
    store = tmp_path / "artifacts"
    params = build_params("smoke", {
        "data": {"dataset": "tfds:toy_shapes/rgb16:1.0.0", "tfds_data_dir": str(tfds_data / "base"),
                 "image_size": 16, "cache_dir": str(tmp_path / "cache")},
        "train": {"framework": framework, "epochs": 2, "batch_size": 16, "lr": 0.01},
        "publish": {"store": str(store)}})
    assert params.data.label == "tfds:toy_shapes/rgb16:1.0.0"
    first = train_pipeline(params)
    assert [s.name for s in first.stages] == ["ingest", "preprocess", "train", "evaluate", "publish"]
    assert first.test_size == 60  # TFDS's test split, as it is
    assert first.accuracy >= 0.9, first.accuracy  # three stripe classes: easy once the labels are right
    assert (first.version, first.promoted) == (1, True)
    lineage = json.loads((store / "models" / "seed-cnn" / "versions" / "1" / "lineage.json").read_text())
    assert lineage["parameters"]["data"]["kind"] == "tfds"
    assert lineage["parameters"]["data"]["tfds_data_dir"] == str(tfds_data / "base")
    # TFDS was read in a child process: this (Prefect) process loaded no TensorFlow
    assert not {m.split(".")[0] for m in set(sys.modules) - before} & {"tensorflow", "tensorflow_datasets", "keras"}

    again = train_pipeline(params)  # unchanged TFDS files: ingest is a cache hit, the rest reused
    assert {s.name: s.skipped for s in again.stages}["ingest"]
    assert again.stages[1].skipped and again.stages[2].skipped
