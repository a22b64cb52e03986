"""TensorFlow on Ray Train: MultiWorkerMirroredStrategy with one and two workers, reports, checkpoints, resume.

TensorFlow never loads in this (torch-importing) process: training runs in Ray
workers and predictions in a Ray task, each a process of TensorFlow alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.config import TrainLoopConfig
from cluster.errors import UserError
from cluster.execution.predict import StoredCheckpoint, predict
from cluster.execution.trainer import Resources, fit
from tests.cluster.test_launch import in_place

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                reason="tensorflow is not installed: pip install 'trainflow[tensorflow]'")
ROOT = Path(__file__).resolve().parents[2]


def state(checkpoint: str) -> dict:
    return json.loads((Path(checkpoint) / "state.json").read_text())


@pytest.mark.slow  # ~50 s each on two cores, like the torch ones in test_launch.py
@pytest.mark.parametrize("workers", [1, 2])
def test_tensorflow_trains_on_ray_reports_every_epoch_and_resumes(ray_local, prepared, tmp_path, workers):
    data = in_place(*prepared)
    reports: list[dict] = []
    cfg = TrainLoopConfig(data_dir="", framework="tensorflow", epochs=5, lr=0.01, batch_size=16)
    final = fit(cfg, Resources(num_workers=workers, max_failures=0), data=data, run_name=f"tf{workers}",
                storage_path=str(tmp_path), on_report=reports.append)

    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5]  # once per epoch, not once per worker
    assert reports[-1]["train_loss"] < 0.5 * reports[0]["train_loss"], reports
    saved = state(final)
    assert saved["framework"] == "tensorflow" and saved["epoch"] == 5
    assert saved["model_files"] == ["model.keras"] and (Path(final) / "model.keras").is_file()
    assert saved["loaded_frameworks"] == ["tensorflow"]  # the worker that wrote it never loaded torch
    assert set(saved["versions"]) == {"tensorflow", "keras"}
    assert [w["rank"] for w in saved["workers"]] == list(range(workers))
    # precision auto (the default) never fails for TensorFlow: fp32, and the checkpoint says so
    assert saved["precision"] == {"requested": "auto", "dtype": "fp32", "channels_last": False,
                                  "reason": "framework tensorflow trains in fp32 only"}
    y_true, y_pred = predict("tensorflow", StoredCheckpoint(filesystem=None, path=final), data)
    assert "tensorflow" not in sys.modules  # predictions came from a Ray task, not from this process
    assert len(y_true) == prepared[1].counts["test"]
    assert float(np.mean(y_true == y_pred)) > 0.8

    if workers == 1:  # the published file: a fresh process loads it with safe_mode and predicts from raw pixels
        _load_keras_in_fresh_process(Path(final) / "model.keras")
        return
    # the same run name, one more epoch: weights and optimizer state come back from the last checkpoint
    more: list[dict] = []
    resumed = fit(TrainLoopConfig(**{**cfg.to_dict(), "epochs": 6}), Resources(num_workers=workers), data=data,
                  run_name=f"tf{workers}", storage_path=str(tmp_path), on_report=more.append)
    assert [r["epoch"] for r in more] == [6]
    assert state(resumed)["history"][:5] == saved["history"]  # the first five epochs were not trained again
    assert more[0]["train_loss"] < 1.5 * reports[-1]["train_loss"]  # restored weights: no jump back to epoch 1


def _load_keras_in_fresh_process(path: Path) -> None:
    code = ("import sys, keras, numpy as np; "
            "m = keras.models.load_model(sys.argv[1], safe_mode=True); "
            "x = np.zeros((2, 16, 16, 3), np.float32); print(m(x).shape, 'torch' in sys.modules)")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["(2,", "3)", "False"]


def test_tensorflow_only_options_are_refused():
    with pytest.raises(UserError, match="precision=bf16 is not implemented for framework='tensorflow'"):
        TrainLoopConfig(data_dir="", framework="tensorflow", precision="bf16")
    with pytest.raises(UserError, match="framework='jax' is unknown; choose one of torch, tensorflow"):
        TrainLoopConfig(data_dir="", framework="jax")


@pytest.mark.slow
def test_tensorflow_streams_a_sharded_split_and_learns(tmp_path):
    """The loop without Ray, in a process of TensorFlow alone, streaming the training split from its shards: encoded
    ones, decoded with random-resized crops as they are read (the stream is the torch loop's, tested there on
    pixels too)."""
    import cluster.data
    from tasks.ingest import ingest
    from tasks.preprocess import PreprocessConfig, preprocess
    from tests.conftest import write_class_folders
    from tests.cluster.test_torch_loop import data_dir

    write_class_folders(tmp_path / "images", classes=3, per_class=80, size=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.data, "SHARD_BYTES", 16 * 16 * 3 * 40)  # 40 images a shard
        ref = preprocess(ingest(f"folder:{tmp_path / 'images'}", tmp_path / "cache"),
                         PreprocessConfig(image_size=16, stored_as="encoded"), str(tmp_path / "store"))
    out = subprocess.run([sys.executable, "-m", "cluster.tf.loop", "--data", data_dir((str(tmp_path / "store"), ref)),
                          "--epochs", "6", "--lr", "0.01", "--batch-size", "16",
                          "--checkpoints", str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "streamed from their shards" in out.stdout
    history = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [m["epoch"] for m in history] == list(range(1, 7))
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"] and history[-1]["val_accuracy"] > 0.9
