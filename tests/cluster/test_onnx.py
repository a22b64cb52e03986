"""Each framework's final checkpoint holds its model as ONNX (raw uint8 pixels in, probabilities out) and
onnxruntime's predictions of the test split, which agree with the framework's own."""

from __future__ import annotations

import json
import os
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.config import TrainLoopConfig
from cluster.pytorch.loop import train_loop
from cluster.worker.checkpoint import ONNX_FILE, PREDICTIONS_FILE, PREPROCESSING_FILE
from cluster.worker.context import LocalContext
from tests.cluster.test_torch_loop import data_dir

ROOT = Path(__file__).resolve().parents[2]


def onnx_probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"pixels": images})[0]


def check_final_checkpoint(final: Path, classes: int, channels: int) -> None:
    """The checkpoint's ONNX files are there, and onnxruntime's predictions agree with the framework's."""
    assert (final / ONNX_FILE).is_file()
    described = json.loads((final / PREPROCESSING_FILE).read_text())
    assert (described["channels"], len(described["classes"]), described["resize"]) == (channels, classes, "BILINEAR")
    with np.load(final / PREDICTIONS_FILE) as stored:
        assert len(stored["y_onnx"]) == len(stored["y_pred"]) > 0
        assert np.mean(stored["y_onnx"] == stored["y_pred"]) >= 0.999


def test_a_torch_run_exports_onnx_that_predicts_as_torch_does(prepared, tmp_path):
    from cluster.data import load_split
    from cluster.pytorch.model import probabilities

    ctx = LocalContext(tmp_path / "ckpt")
    train_loop(TrainLoopConfig(data_dir=data_dir(prepared), epochs=1, lr=0.01, batch_size=16, precision="fp32"), ctx)
    final = tmp_path / "ckpt" / "epoch_0001"
    check_final_checkpoint(final, classes=len(prepared[1].classes), channels=prepared[1].channels)
    images, _ = load_split(Path(data_dir(prepared)), "test")
    np.testing.assert_allclose(onnx_probabilities(final / ONNX_FILE, images), probabilities(final, images),
                               atol=1e-5)


def test_the_test_time_views_are_in_the_graph(tmp_path):
    """fast_net with its six flip-and-shift views, on one-channel images: the graph averages them as torch does."""
    import torch

    from cluster.pytorch.export import export_onnx
    from cluster.pytorch.model import probabilities, save_checkpoint
    from cluster.recipes.fast_cifar import FastNet
    from tests.cluster.test_fast_cifar import spec

    torch.manual_seed(0)
    model_spec = replace(spec(16, channels=1, classes=4), eval_views="flip_shift")
    model = FastNet(model_spec)
    save_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), model_spec, 1, [])
    export_onnx(tmp_path, tmp_path / ONNX_FILE)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    np.testing.assert_allclose(onnx_probabilities(tmp_path / ONNX_FILE, images), probabilities(tmp_path, images),
                               atol=1e-5)


@pytest.mark.slow
def test_a_tensorflow_run_exports_onnx_that_predicts_as_keras_does(prepared, tmp_path):
    """The loop in a process of TensorFlow alone; then onnxruntime here against the saved model's own outputs,
    computed in another TensorFlow process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, "-m", "cluster.tf.loop", "--data", data_dir(prepared), "--epochs", "1",
                          "--lr", "0.01", "--batch-size", "16", "--checkpoints", str(tmp_path / "ckpt")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    final = tmp_path / "ckpt" / "epoch_0001"
    check_final_checkpoint(final, classes=len(prepared[1].classes), channels=prepared[1].channels)
    images = np.random.default_rng(0).integers(0, 256, (6, prepared[1].image_size, prepared[1].image_size,
                                                        prepared[1].channels), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    code = ("import sys, numpy as np; from pathlib import Path; from cluster.tf.model import probabilities; "
            "np.save(sys.argv[2], probabilities(Path(sys.argv[1]), np.load(sys.argv[3])))")
    keras_out = subprocess.run([sys.executable, "-c", code, str(final), str(tmp_path / "keras.npy"),
                                str(tmp_path / "images.npy")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env=env)
    assert keras_out.returncode == 0, keras_out.stderr[-3000:]
    np.testing.assert_allclose(onnx_probabilities(final / ONNX_FILE, images), np.load(tmp_path / "keras.npy"),
                               atol=1e-5)
