"""Networks by name (cluster.models): the built-ins, torchvision's, keras.applications' and a user's builder."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import TrainLoopConfig
from cluster.errors import UserError
from cluster.models import builders, check_model
from cluster.worker.context import LocalContext
from tests.cluster.test_torch_loop import data_dir

ROOT = Path(__file__).resolve().parents[2]


def test_names_resolve_to_each_frameworks_builder():
    assert set(builders("seed_cnn")) == {"torch", "tensorflow"}
    assert set(builders("torchvision:resnet18")) == {"torch"}
    assert set(builders("timm:resnet18")) == {"torch"}
    assert set(builders("keras:MobileNetV2")) == {"tensorflow"}
    assert set(builders("my_pkg.models:build")) == {"torch", "tensorflow"}
    assert TrainLoopConfig(data_dir="", model="torchvision:resnet18").network == "torchvision:resnet18"
    assert TrainLoopConfig(data_dir="").network == "seed_cnn"  # the recipe's own


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": "resnet18"}, r"model='resnet18' is unknown; choose one of seed_cnn, fast_net, torchvision:<name>"),
    ({"model": "torchvision:resnet18", "framework": "tensorflow"},
     r"model='torchvision:resnet18' is not implemented for framework='tensorflow'; choose 'torch'"),
    ({"model": "keras:MobileNetV2"}, r"model='keras:MobileNetV2' is not implemented for framework='torch'"),
    ({"model": "torchvision:resnet18", "recipe": "fast_cifar"},
     r"recipe='fast_cifar' trains its own network \(fast_net\) only; leave model empty"),
])
def test_a_model_that_cannot_train_is_refused_before_anything_starts(kwargs, message):
    with pytest.raises(UserError, match=message):
        TrainLoopConfig(data_dir="", **kwargs)


def test_check_model_names_the_fix():
    with pytest.raises(UserError, match="or a builder as 'package.module:function'"):
        check_model("not a model", "torch")


@pytest.mark.parametrize("model", ["torchvision:resnet18", "timm:resnet18", "tests.cluster.plugin_models:tiny_net"])
def test_a_named_network_trains_in_the_loop_and_its_checkpoint_names_it(prepared, tmp_path, model):
    import torch

    from cluster.pytorch.loop import train_loop
    from cluster.pytorch.model import build_model
    from cluster.worker.checkpoint import read_state

    ctx = LocalContext(tmp_path / "ckpt")
    # lr 0.003: torchvision's resnet18 from scratch (no zero-initialised residual branches, unlike timm's) on 162
    # images of 16 px swung up at 0.01 (an AMX CPU, bf16: train loss 0.38, 0.96, 0.74 alone, NaN in a full suite run)
    history = train_loop(TrainLoopConfig(data_dir=data_dir(prepared), model=model, epochs=3, lr=0.003,
                                         batch_size=16), ctx)
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
    final = sorted((tmp_path / "ckpt").glob("epoch_*"))[-1]
    spec, epoch, _ = read_state(final)
    assert (spec.name, epoch) == (model, 3)
    rebuilt = build_model(spec)  # predict's way: from the checkpoint's own record
    rebuilt.load_state_dict(torch.load(final / "model.pt", map_location="cpu", weights_only=True))


def test_a_zoo_whose_package_is_missing_is_refused_with_the_extra_to_install(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else found(name, *a))
    with pytest.raises(UserError, match=r"model='timm:resnet18' needs timm, which is not installed; pip install "
                                        r"'trainflow\[timm\]'"):
        TrainLoopConfig(data_dir="", model="timm:resnet18")


def test_an_unknown_timm_name_says_where_the_names_are():
    from cluster.pytorch.zoo import timm_model
    from cluster.worker.checkpoint import ModelSpec

    spec = ModelSpec(name="timm:resnet7", in_channels=1, num_classes=3, image_size=16, mean=(0.5,), std=(0.5,),
                     classes=("a", "b", "c"))
    with pytest.raises(UserError, match="choose one of timm.list_models"):
        timm_model(spec)


def test_an_unknown_torchvision_name_says_where_the_names_are():
    from cluster.pytorch.zoo import torchvision_model
    from cluster.worker.checkpoint import ModelSpec

    spec = ModelSpec(name="torchvision:resnet7", in_channels=1, num_classes=3, image_size=16, mean=(0.5,),
                     std=(0.5,), classes=("a", "b", "c"))
    with pytest.raises(UserError, match="choose one of torchvision.models.list_models"):
        torchvision_model(spec)


@pytest.mark.slow
@pytest.mark.timeout(600)  # three TensorFlow processes, in the light lane of `make test` (tests/conftest.py)
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_a_keras_application_trains_on_grayscale_and_loads_safely(tmp_path):
    """keras:MobileNetV2 on one-channel images: the loop in a process of TensorFlow alone, then its checkpoint's
    model.keras in a fresh one with safe_mode=True, predicting from raw pixels."""
    from tasks.ingest import ingest
    from tasks.preprocess import PreprocessConfig, preprocess
    from tests.conftest import write_class_folders

    write_class_folders(tmp_path / "images", classes=3, per_class=40, size=32, channels=1)
    ref = preprocess(ingest(f"folder:{tmp_path / 'images'}", tmp_path / "cache"), PreprocessConfig(image_size=32),
                     str(tmp_path / "store"))
    assert ref.channels == 1
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, "-m", "cluster.tf.loop", "--data", data_dir((str(tmp_path / "store"), ref)),
                          "--model", "keras:MobileNetV2", "--epochs", "1", "--lr", "0.01", "--batch-size", "16",
                          "--checkpoints", str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    history = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [m["epoch"] for m in history] == [1]
    final = tmp_path / "ckpt" / "epoch_0001"
    assert json.loads((final / "state.json").read_text())["spec"]["name"] == "keras:MobileNetV2"
    again = subprocess.run([sys.executable, "-m", "cluster.tf.loop", "--data", data_dir((str(tmp_path / "store"), ref)),
                            "--model", "keras:MobileNetV2", "--epochs", "1", "--lr", "0.01", "--batch-size", "16",
                            "--weights", str(final / "model.keras"), "--checkpoints", str(tmp_path / "again")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting from model.keras\n" in again.stdout  # every layer came over: the same classes, no new head
    # Both checkpoints in a fresh process with safe_mode=True: the first predicts from raw pixels, and the second's
    # filters lie close to the first's (the epoch it trained from them moved them a little), where a network
    # started afresh would lie about sqrt(2) of their norm away. (A loss compared across the two runs said nothing
    # when one short epoch left the first at chance.)
    code = ("import sys, keras, numpy as np; first, second = (keras.models.load_model(p, safe_mode=True) "
            "for p in sys.argv[1:]); print(first(np.zeros((2, 32, 32, 1), np.float32)).shape); "
            "a, b = ([w.numpy() for w in m.trainable_weights if len(w.shape) == 4] for m in (first, second)); "
            "print(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b)) ** 0.5 / sum(float(np.sum(x ** 2)) "
            "for x in a) ** 0.5)")
    loaded = subprocess.run([sys.executable, "-c", code, str(final / "model.keras"),
                             str(tmp_path / "again" / "epoch_0001" / "model.keras")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    shape, distance = loaded.stdout.splitlines()[-2:]
    assert shape.split()[-2:] == ["(2,", "3)"], loaded.stdout
    assert float(distance) < 0.5, distance


def test_starting_weights_load_but_for_a_head_of_another_class_count(tmp_path):
    import torch

    from cluster.pytorch.model import build_model, load_starting_weights
    from cluster.worker.checkpoint import ModelSpec

    def spec(classes: int, name: str = "torchvision:resnet18") -> ModelSpec:
        return ModelSpec(name=name, in_channels=1, num_classes=classes, image_size=16, mean=(0.5,), std=(0.5,),
                         classes=tuple(map(str, range(classes))))

    source = build_model(spec(10))
    torch.save(source.state_dict(), tmp_path / "ten.pt")
    target = build_model(spec(3))
    assert load_starting_weights(target, tmp_path / "ten.pt", 3) == ["fc.weight", "fc.bias"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)  # the backbone came over
    assert target.fc.weight.shape == (3, 512)  # the head stayed fresh
    assert target(torch.zeros(2, 1, 16, 16)).shape == (2, 3)  # grayscale repeated, names as a colour run's
    with pytest.raises(UserError, match=r"weights ten.pt do not fit the network: \d+ of its tensors missing"):
        load_starting_weights(build_model(spec(3, "seed_cnn")), tmp_path / "ten.pt", 3)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot be read as a state dict"):
        load_starting_weights(target, tmp_path / "junk.pt", 3)


def test_starting_weights_load_from_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from cluster.pytorch.model import build_model, load_starting_weights
    from cluster.worker.checkpoint import ModelSpec

    spec = ModelSpec(name="seed_cnn", in_channels=1, num_classes=4, image_size=16, mean=(0.5,), std=(0.5,),
                     classes=tuple("abcd"))
    source = build_model(spec)
    save_file(source.state_dict(), tmp_path / "four.safetensors")
    target = build_model(spec)
    assert load_starting_weights(target, tmp_path / "four.safetensors", 4) == []  # same classes: nothing fresh
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match="cannot be read as a state dict|do not fit the network"):
        load_starting_weights(target, tmp_path / "junk.safetensors", 4)
