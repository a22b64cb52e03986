"""Real CIFAR-10 (JPEG class folders in train/test archives), through the CLI, on a fixed subset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.flows.test_cli import trainflow

CIFAR_ENV = "TRAINFLOW_CIFAR10_DIR"


@pytest.fixture
def cifar_dir() -> Path:
    location = os.environ.get(CIFAR_ENV)
    if not location:
        pytest.skip(f"{CIFAR_ENV} is not set: point it at a folder holding CIFAR-10's train.tar.gz and test.tar.gz "
                    "(.ci/run sets it to ../shared/datasets/cifar10-jpeg)")
    return Path(location)


@pytest.mark.slow
@pytest.mark.cifar
@pytest.mark.timeout(1200)  # two runs of about 2 minutes each on 2 cores
def test_cifar10_subset_two_epochs_well_above_chance_in_both_frameworks(cifar_dir, tmp_path):
    store = tmp_path / "store"
    # lr 0.01: the article's 0.001 needs more than two epochs to leave chance level on 5 000 images
    args = ["run", "--dataset", f"folder:{cifar_dir}", "--limit-train", "5000", "--limit-test", "1000", "--epochs",
            "2", "--lr", "0.01", "--workers", "2", "--store", str(store), "--json"]
    summaries = {}
    for framework in ("torch", "tensorflow"):  # the second run finds the prepared data in the store
        out = trainflow(*args, "--framework", framework, timeout=1200)
        assert out.returncode == 0, out.stderr[-4000:]
        summaries[framework] = summary = json.loads(out.stdout[out.stdout.index("{"):])
        assert summary["test_size"] == 1000
        assert summary["accuracy"] >= 0.2, summary  # chance is 0.1
    assert [s["skipped"] for s in summaries["tensorflow"]["stages"]][:2] == [True, True]
    meta = json.loads(next((store / "prepared").glob("*/meta.json")).read_text())
    assert meta["counts"]["train"] + meta["counts"]["val"] == 5000
    assert meta["channels"] == 3 and meta["image_size"] == 32
    assert len(meta["classes"]) == 10 and "airplane" in meta["classes"]
    for version in (1, 2):
        metrics = json.loads((store / "models" / "seed-cnn" / "versions" / str(version) / "metrics.json").read_text())
        assert len(metrics["per_class"]) == 10 and sum(c["support"] for c in metrics["per_class"]) == 1000
    print(json.dumps({framework: {"accuracy": s["accuracy"], "training_seconds": round(s["training_seconds"], 1)}
                      for framework, s in summaries.items()}))
