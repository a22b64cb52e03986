"""The whole flow under Prefect's test harness: the bundled digits, twice, and `trainflow predict` with the model it
published; a TFDS dataset the tests build."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from flows.cli import format_summary
from flows.params import PipelineParams, build_params
from flows.pipeline import train_pipeline
from tests.conftest import needs_tfds
from tests.flows.test_cli import ROOT


def run_artifacts(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def predict_cli(*args: str) -> tuple[dict, list[str]]:
    """``trainflow predict ... --json`` in a fresh process: its output, and which frameworks that process loaded."""
    code = ("import sys; from flows.cli import main; code = main(sys.argv[1:]); "
            "print('loaded:', sorted(m for m in ('tensorflow', 'torch') if m in sys.modules), file=sys.stderr); "
            "sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", code, "predict", *args, "--json"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout), json.loads(out.stderr.rsplit("loaded: ", 1)[1].replace("'", '"'))


def registry_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted((store / "models").rglob("*")) if p.is_file()}


def auto_on_this_cpu() -> str:
    """What precision auto trains torch in on this machine's CPU (cluster.precision's choice)."""
    from cluster.precision import BF16_CPU_FLAGS, cpu_flags

    return "bf16 + channels_last" if BF16_CPU_FLAGS & cpu_flags() else "fp32"


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass(frozen=True)
class DigitsRun:
    params: PipelineParams
    state: object  # the first run's final Prefect state
    store: Path


@pytest.fixture(scope="module")
def digits_run(harness, ray_local, tmp_path_factory) -> DigitsRun:
    """The digits flow, once, into a fresh store: the rerun test and the predict test share its published model."""
    root = tmp_path_factory.mktemp("digits")
    params = build_params("digits-quickstart", {"data": {"image_size": 16, "cache_dir": str(root / "cache")},
                                                "train": {"epochs": 10}, "publish": {"store": str(root / "artifacts")}})
    return DigitsRun(params=params, state=train_pipeline(params, return_state=True), store=root / "artifacts")


@pytest.mark.slow
def test_digits_flow_trains_publishes_and_skips_unchanged_stages_on_rerun(digits_run):
    store, params, state = digits_run.store, digits_run.params, digits_run.state
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
    # precision auto, the default, as the workers resolved it on this machine: the lineage and the summary say so
    assert lineage["parameters"]["train"]["precision"] == lineage["precision"]["requested"] == "auto"
    assert first.precision == auto_on_this_cpu() == lineage["precision"]["dtype"] + (
        " + channels_last" if lineage["precision"]["channels_last"] else "")
    assert f"in {first.precision})" in format_summary(first, 1.0)
    assert json.loads((store / "models" / "seed-cnn" / "champion.json").read_text())["version"] == 1

    registry = registry_files(store)
    second = train_pipeline(params)
    skipped = {s.name: s.skipped for s in second.stages}
    assert skipped == {"ingest": True, "preprocess": True, "train": True, "evaluate": False, "publish": True}
    assert second.stages[1].note == second.stages[2].note == "reused: the store already holds it"
    assert second.stages[4].note == "reused: the store already holds it"
    assert second.stages[0].note == "cached: inputs unchanged"
    assert second.epochs_trained == 0  # the finished run is reused, not retrained
    assert second.accuracy == first.accuracy
    # ... and not published again: the same run and checkpoint already are v1
    assert (second.version, second.promoted, second.already_published) == (1, False, True)
    assert second.reason.startswith("already published as v1 (training run ") and second.run_id in second.reason
    assert registry_files(store) == registry  # no v2, no claim, the champion unmoved
    summary = format_summary(second, 1.0)
    assert "published       seed-cnn v1: already published, nothing written" in summary
    assert "the champion stays v1" in summary


@pytest.mark.slow
def test_predict_agrees_with_the_evaluation_of_the_published_model(digits_run, tmp_path):
    """`trainflow predict` on test-split digits (the raw 8x8 PNGs) gives the classes evaluation predicted."""
    from cluster.data import load_split
    from cluster.execution.predict import StoredCheckpoint, predict
    from cluster.execution.session import ray_session
    from tasks import predict as predicting
    from tasks.ingest import ingest
    from tasks.preprocess import plan_splits, preprocess
    from tasks.store import open_store
    from tasks.train import stored_data

    params, first = digits_run.params, digits_run.state.result()
    store = open_store(str(digits_run.store))
    raw = ingest(params.data.dataset, Path(params.data.cache_dir) / "raw")
    prepared = preprocess(raw, params.data.to_config(), store.uri)
    assert prepared.reused  # the run's own prepared data
    lineage = json.loads(store.get_bytes("models/seed-cnn/versions/1/lineage.json"))
    checkpoint = StoredCheckpoint(filesystem=store.ray_filesystem(),
                                  path=store.ray_storage_path(store.key_of(lineage["checkpoint_uri"])))
    with ray_session(None):  # as evaluate predicts: a Ray task of the model's framework
        y_test, y_pred = predict("torch", checkpoint, stored_data(store, prepared))
    assert float(np.mean(y_test == y_pred)) == pytest.approx(first.accuracy)  # the evaluation's predictions

    picked = list(range(0, len(y_test), 5))
    test_files = [Path(p) for p, _ in plan_splits(raw, params.data.to_config())["test"]]
    folder = tmp_path / "digits"
    for i in picked:  # nested folders, and a file that is not an image
        target = folder / str(i % 3) / f"{i:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(test_files[i], target)
    (folder / "0" / "notes.txt").write_text("not an image")

    out, loaded = predict_cli(str(folder), "--store", str(digits_run.store))
    assert (out["model"], out["version"], out["champion"], out["framework"]) == ("seed-cnn", 1, True, "torch")
    assert out["ignored_files"] == 1 and loaded == ["torch"]
    got = {Path(p["path"]).name: p for p in out["predictions"]}
    assert sorted(got) == sorted(f"{i:04d}.png" for i in picked)
    assert [got[f"{i:04d}.png"]["index"] for i in picked] == [int(y_pred[i]) for i in picked]
    assert all(got[f"{i:04d}.png"]["class"] == prepared.classes[y_pred[i]] for i in picked)
    assert all(1 / len(prepared.classes) < p["probability"] <= 1.0 for p in out["predictions"])
    # the version's model.onnx in onnxruntime, in a process with neither framework, on the whole test split:
    # onnxruntime's class is the framework's for at least 99.9 % of it (here: for all of them)
    every = tmp_path / "every"
    every.mkdir()
    for i, file in enumerate(test_files):
        shutil.copy(file, every / f"{i:04d}.png")
    by_framework, _ = predict_cli(str(every), "--store", str(digits_run.store))
    by_onnx, loaded = predict_cli(str(every), "--store", str(digits_run.store), "--runtime", "onnx")
    assert (by_onnx["runtime"], loaded) == ("onnx", []) and len(by_onnx["predictions"]) == len(y_test)
    framework_class = {p["path"]: p["index"] for p in by_framework["predictions"]}
    agree = np.mean([p["index"] == framework_class[p["path"]] for p in by_onnx["predictions"]])
    assert agree >= 0.999, agree
    # the same pixels as training saw: the 8x8 PNGs decoded and resized to 16x16 grayscale by preprocess's code
    chosen = predicting.choose_version(store, "seed-cnn", None)
    x_test, _ = load_split(store.root / store.key_of(prepared.uri), "test")
    assert np.array_equal(predicting.load_images([test_files[i] for i in picked], chosen), x_test[picked])


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
    assert (again.version, again.already_published) == (changed.version, True)  # and was published then

    forced = train_pipeline(build_params("digits-quickstart", {**base, "data": {**data, "image_size": 12},
                                                               "train": {"epochs": 1, "force": True}}))
    skipped = {s.name: s.skipped for s in forced.stages}
    assert skipped["preprocess"] and not skipped["train"] and forced.epochs_trained == 1
    assert forced.run_id.startswith(again.run_id + "-retrain-")  # a fresh run beside the finished one
    assert (forced.version, forced.already_published) == (again.version + 1, False)  # published anew


@needs_tfds
@pytest.mark.slow
# TensorFlow only: torch's way through the flow is the digits tests'; this one adds TFDS and, for TensorFlow,
# `trainflow predict` of the published .keras file (a torch run here cost 29 s of the suite and added neither)
@pytest.mark.parametrize("framework", ["tensorflow"])
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
    # auto never fails for TensorFlow: it trains in fp32, and says so
    assert first.precision == ("fp32" if framework == "tensorflow" else auto_on_this_cpu())
    assert lineage["precision"]["dtype"] == first.precision.split(" ")[0]
    # TFDS was read in a child process: this (Prefect) process loaded no TensorFlow
    assert not {m.split(".")[0] for m in set(sys.modules) - before} & {"tensorflow", "tensorflow_datasets", "keras"}

    again = train_pipeline(params)  # unchanged TFDS files: ingest is a cache hit, the rest reused
    assert {s.name: s.skipped for s in again.stages}["ingest"]
    assert again.stages[1].skipped and again.stages[2].skipped
    assert again.already_published and again.version == 1

    if framework == "tensorflow":  # the published .keras file classifies images in a process of TensorFlow alone
        from cluster.data import load_split
        from tasks.store import open_store

        opened = open_store(str(store))
        x_test, y_test = load_split(opened.root / opened.key_of(lineage["prepared_uri"]), "test")
        folder = tmp_path / "shapes"
        folder.mkdir()
        for i, image in enumerate(x_test[:30]):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:02d}.png")
        out, loaded = predict_cli(str(folder), "--store", str(store))
        assert (out["framework"], loaded) == ("tensorflow", ["tensorflow"])
        predicted = [p["index"] for p in sorted(out["predictions"], key=lambda p: p["path"])]
        assert np.mean(np.array(predicted) == y_test[:30]) >= 0.9
        # the version's model.onnx in onnxruntime, in a process with neither framework: the same classes
        out, loaded = predict_cli(str(folder), "--store", str(store), "--runtime", "onnx")
        assert (out["runtime"], loaded) == ("onnx", [])
        assert [p["index"] for p in sorted(out["predictions"], key=lambda p: p["path"])] == predicted
