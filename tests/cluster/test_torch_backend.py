"""The torch backend: model shapes, input normalisation, checkpoint files and prediction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.errors import UserError
from cluster.pytorch import model as tb


def spec_for(channels: int = 3, classes: int = 4, size: int = 16, mean=None, std=None) -> tb.ModelSpec:
    return tb.ModelSpec(name="seed_cnn", in_channels=channels, num_classes=classes, image_size=size,
                        mean=tuple(mean or [0.2, 0.5, 0.7][:channels]), std=tuple(std or [0.1, 0.25, 0.4][:channels]),
                        classes=tuple(f"c{i}" for i in range(classes)))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and steadiest on a busy machine) on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("size", [8, 28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_seed_cnn_output_shape(size: int, channels: int):
    torch.manual_seed(0)
    model = tb.SeedCNN(spec_for(channels=channels, classes=7, size=size))
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    side = size // 8
    assert model.fc1.in_features == 256 * side * side


def test_build_model():
    model = tb.build_model(spec_for(channels=1, classes=5, size=28))
    assert isinstance(model, tb.SeedCNN)
    assert model.conv1.in_channels == 1 and model.fc3.out_features == 5
    with pytest.raises(UserError, match="model=.resnet. is unknown; choose one of seed_cnn"):
        tb.build_model(tb.ModelSpec(**{**spec_for().__dict__, "name": "resnet"}))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalizer_matches_hand_computation(channels: int, channels_last: bool):
    spec = spec_for(channels=channels)
    rng = np.random.default_rng(channels)
    batch = rng.integers(0, 256, (5, 6, 7, channels), dtype=np.uint8)
    original = batch.copy()
    out = tb.Normalizer(spec, torch.device("cpu"), channels_last)(torch.from_numpy(batch))
    mean = np.array(spec.mean, np.float64)
    std = np.array(spec.std, np.float64)
    expected = ((batch.astype(np.float64) / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (5, channels, 6, 7)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(batch, original)  # the caller's batch is untouched
    if not channels_last:
        assert out.is_contiguous()
        assert out.stride() == torch.empty(5, channels, 6, 7).stride()  # standard NCHW strides, even for 1 channel
    else:
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_normalized_batch_feeds_the_model_in_both_layouts():
    spec = spec_for(channels=3, size=16)
    torch.manual_seed(0)
    model = tb.build_model(spec).eval()
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    with torch.no_grad():
        a = model(tb.Normalizer(spec, torch.device("cpu"), False)(batch))
        b = model.to(memory_format=torch.channels_last)(tb.Normalizer(spec, torch.device("cpu"), True)(batch))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _trained_a_little(spec: tb.ModelSpec) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = tb.build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(8, spec.in_channels, spec.image_size, spec.image_size)
    y = torch.randint(0, spec.num_classes, (8,))
    for _ in range(2):
        tb.train_step(model, optimizer, x, y, torch.autocast("cpu", enabled=False))
    return model, optimizer


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path: Path):
    spec = spec_for(channels=3, classes=4, size=16)
    model, optimizer = _trained_a_little(spec)
    history = [{"epoch": 1, "train_loss": 1.5}, {"epoch": 2, "train_loss": 1.2}]
    tb.save_checkpoint(tmp_path / "ckpt", model, optimizer, spec, 2, history)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {tb.MODEL_FILE, tb.OPTIM_FILE, tb.STATE_FILE}
    assert json.loads((tmp_path / "ckpt" / tb.STATE_FILE).read_text())["epoch"] == 2

    read_spec, epoch, read_history = tb.read_state(tmp_path / "ckpt")
    assert read_spec == spec
    assert (epoch, read_history) == (2, history)

    torch.manual_seed(99)  # different initial weights, so equality below comes from the checkpoint
    fresh = tb.build_model(read_spec)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(6, 3, 16, 16)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.equal(model(x), fresh(x))
    tb.load_weights(tmp_path / "ckpt", fresh, fresh_optimizer)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for key in saved["state"]:
        assert torch.equal(saved["state"][key]["momentum_buffer"], loaded["state"][key]["momentum_buffer"])

    images = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    normalize = tb.Normalizer(spec, torch.device("cpu"), channels_last=False)
    with torch.no_grad():
        expected = model(normalize(torch.from_numpy(images))).argmax(1).numpy()
    assert np.array_equal(tb.predict(tmp_path / "ckpt", images), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_predict_returns_class_indices(tmp_path: Path, channels: int):
    spec = spec_for(channels=channels, classes=5, size=8)
    model, optimizer = _trained_a_little(spec)
    tb.save_checkpoint(tmp_path, model, optimizer, spec, 1, [])
    images = np.random.default_rng(1).integers(0, 256, (23, 8, 8, channels), dtype=np.uint8)
    predictions = tb.predict(tmp_path, images)
    assert predictions.shape == (23,)
    assert predictions.dtype == np.int64
    assert predictions.min() >= 0 and predictions.max() < 5
    # batching does not change the answer; non-contiguous input is accepted
    assert np.array_equal(tb.predict(tmp_path, images, batch_size=4), predictions)
    assert np.array_equal(tb.predict(tmp_path, images[::-1])[::-1], predictions)
    assert tb.predict(tmp_path, images[:1]).shape == (1,)


class _RunsCodeWhenUnpickled:
    """What a tampered checkpoint could hold: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_holding_code_is_refused_not_run(tmp_path: Path):
    spec = spec_for()
    model, optimizer = _trained_a_little(spec)
    tb.save_checkpoint(tmp_path / "ckpt", model, optimizer, spec, 1, [])
    marker = tmp_path / "code-ran"
    torch.save({"weights": _RunsCodeWhenUnpickled(marker)}, tmp_path / "ckpt" / tb.MODEL_FILE)
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        tb.predict(tmp_path / "ckpt", images)  # the path evaluation takes for published weights
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        tb.load_weights(tmp_path / "ckpt", tb.build_model(spec), optimizer)  # the path a resume takes
    assert not marker.exists()
    torch.load(tmp_path / "ckpt" / tb.MODEL_FILE, weights_only=False)  # a plain load would have run it
    assert marker.exists()
