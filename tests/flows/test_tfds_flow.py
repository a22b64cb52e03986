"""The whole flow on a TFDS dataset that the tests build (tests/tfds_build.py), under Prefect's test harness."""

from __future__ import annotations

import json
import sys

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.params import build_params
from flows.pipeline import train_pipeline
from tests.conftest import needs_tfds


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@needs_tfds
@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch"])  # "tensorflow" joins once framework=tensorflow lands (issue 9)
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
