"""The fast recipe's tricks, each on its own, on tiny tensors; then the recipe through the loop, resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cluster.pytorch import model as tb
from cluster.config import TrainLoopConfig
from cluster.recipes import RECIPES, fast_cifar as fc, get_recipe
from cluster.recipes.schedules import constant, warmup_linear_decay
from cluster.pytorch.loop import LocalContext, train_loop
from tests.cluster.test_torch_loop import data_dir
from tests.conftest import needs_native_bf16


def spec(size: int = 32, channels: int = 3, classes: int = 10) -> tb.ModelSpec:
    return tb.ModelSpec(name="fast_net", in_channels=channels, num_classes=classes, image_size=size,
                        mean=(0.5,) * channels, std=(0.25,) * channels, classes=tuple(map(str, range(classes))))


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference for a reflected shift, one image at a time by explicit index arithmetic."""
    h, w = x.shape[-2:]
    reflect = lambda i, n: -i if i < 0 else 2 * (n - 1) - i if i >= n else i  # noqa: E731
    rows = torch.tensor([reflect(i - dy, h) for i in range(h)])
    cols = torch.tensor([reflect(j - dx, w) for j in range(w)])
    return x[..., rows[:, None], cols[None, :]]


def test_registry_names_parts_for_each_framework_and_a_known_network():
    from cluster.recipes import MODELS

    for recipe in RECIPES.values():
        assert recipe.model in MODELS and recipe.parts and recipe.checkpoint_every >= 1
        assert set(recipe.parts) <= set(MODELS[recipe.model])
    assert get_recipe("fast_cifar").checkpoints_after(2, 5) and get_recipe("fast_cifar").checkpoints_after(5, 5)
    assert not get_recipe("fast_cifar").checkpoints_after(3, 5)


@pytest.mark.parametrize("size", [16, 32])
def test_fast_net_shapes_and_frozen_layers(size: int):
    torch.manual_seed(0)
    model = fc.FastNet(spec(size))
    out = model(torch.randn(4, 3, size, size))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert model.whiten.out_channels == 2 * 3 * 4 and not model.whiten.weight.requires_grad
    assert torch.equal(model.whiten.bias, torch.zeros(24))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not n.weight.requires_grad and n.bias.requires_grad for n in norms)
    # identity-initialised convs: the first input channels pass straight through the first filters
    conv = model.groups[0][0]
    x = torch.randn(1, conv.in_channels, 8, 8)
    assert torch.allclose(conv(x)[:, :conv.in_channels], x, atol=1e-6)


def test_patch_whitening_decorrelates_patches_to_unit_variance():
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.2], [0.0, 0.6, 0.5], [0.0, 0.0, 0.3]])
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(300, 3, 12, 12))
    images = images + 0.7 * images.roll(1, dims=3)  # neighbouring pixels correlate too
    eigenvalues, filters = fc.patch_whitening(images, eps=0.0)
    assert filters.shape == (12, 3, 2, 2)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])  # strongest direction first
    whitened = F.conv2d(images, filters).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = whitened.T @ whitened / len(whitened)
    assert torch.allclose(covariance, torch.eye(12), atol=1e-3)


def test_init_whitening_sets_the_filters_and_their_negatives():
    torch.manual_seed(0)
    model, sample = fc.FastNet(spec(16)), torch.randn(50, 3, 16, 16)
    fc.init_whitening(model, sample)
    _, filters = fc.patch_whitening(sample)
    assert torch.equal(model.whiten.weight[:12], filters) and torch.equal(model.whiten.weight[12:], -filters)


def test_flip_and_translate_moves_each_image_whole_and_is_seeded():
    torch.manual_seed(3)
    x = torch.randn(64, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    indices = torch.randperm(1000)[:64]
    torch.manual_seed(7)
    out = fc.flip_and_translate(x, indices, epoch=1)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    seen = set()
    for image, moved, flip in zip(x, out, fc.mirrored(indices, 1)):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(shifted(image.flip(-1) if flip else image, dy, dx), moved)]
        assert matches, "every output is its input, mirrored as `mirrored` says, moved by at most 2 pixels"
        seen.add(matches[0])
    assert len(seen) > 15  # the shift is drawn per image, not once for the batch
    torch.manual_seed(7)
    assert torch.equal(fc.flip_and_translate(x, indices, epoch=1), out)
    torch.manual_seed(8)
    assert not torch.equal(fc.flip_and_translate(x, indices, epoch=1), out)


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    indices = torch.arange(10_000)
    odd, even = fc.mirrored(indices, 1), fc.mirrored(indices, 2)
    assert torch.equal(odd, ~even) and torch.equal(fc.mirrored(indices, 3), odd)
    assert 0.48 < odd.float().mean().item() < 0.52  # half of the images each epoch
    assert 0.4 < odd[:100].float().mean().item() < 0.6  # and mixed: not whole runs of neighbours


def test_label_smoothing_is_cross_entropy_against_softened_targets():
    logits, labels = torch.randn(5, 10), torch.tensor([0, 3, 9, 3, 1])
    targets = torch.full((5, 10), fc.LABEL_SMOOTHING / 10).scatter(1, labels[:, None], 1 - fc.LABEL_SMOOTHING * 0.9)
    expected = -(targets * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(fc.label_smoothed_loss(logits, labels), expected, atol=1e-6)


def test_optimizer_speeds_up_norm_biases_and_decays_every_group_alike():
    model = fc.FastNet(spec(16))
    optimizer = fc.optimizer(model, lr=1.5, momentum=0.85, batch_size=1024)
    biases, others = optimizer.param_groups
    assert biases["lr"] == 1.5 * fc.BIAS_LR_SCALE and others["lr"] == 1.5 and others["nesterov"]
    shrink = 0.0153 / (1 + 1 / 0.15)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(shrink)
    assert others["lr"] * others["weight_decay"] == pytest.approx(shrink)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trained
    assert len(biases["params"]) == 6


def test_schedules_are_pure_functions_of_the_step():
    schedule = warmup_linear_decay(start=0.2, peak_at=0.25)
    assert [schedule(s, 100) for s in (0, 25, 50, 100)] == pytest.approx([0.2, 1.0, 2 / 3, 0.0])
    assert schedule(10, 100) == pytest.approx(0.2 + 0.8 * 10 / 25)
    to_floor = warmup_linear_decay(start=0.2, peak_at=0.25, end=0.1)
    assert [to_floor(s, 100) for s in (0, 25, 100)] == pytest.approx([0.2, 1.0, 0.1])
    assert constant(7, 10) == 1.0
    with pytest.raises(ValueError, match="peak_at"):
        warmup_linear_decay(start=0.2, peak_at=1.0)


def test_lookahead_pulls_back_every_few_steps_and_hands_over_at_the_end():
    model = torch.nn.Linear(2, 1)
    averager = fc.Lookahead(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    averager.update(4, 10)  # not a multiple of LOOKAHEAD_EVERY: nothing happens
    assert torch.equal(model.weight, start + 1)
    averager.update(5, 10)
    keep = 0.95 ** 5 * 0.5 ** 3
    assert torch.allclose(model.weight, start + (1 - keep)) and torch.equal(averager.slow[0], model.weight)
    restored = fc.Lookahead(torch.nn.Linear(2, 1))
    restored.load_state_dict(averager.state_dict())
    assert torch.equal(restored.slow[0], averager.slow[0])
    with torch.no_grad():
        model.weight.add_(5.0)
    averager.update(10, 10)  # the last step: the model becomes the slow weights
    assert torch.equal(model.weight, averager.slow[0]) and torch.allclose(model.weight, start + (1 - keep))


def test_test_time_views_average_the_weighted_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    assert torch.equal(tb.view_logits(model, x, "plain"), model(x))
    views = [model(x), model(x.flip(-1)), model(shifted(x, -1, -1)), model(shifted(x, -1, -1).flip(-1)),
             model(shifted(x, 1, 1)), model(shifted(x, 1, 1).flip(-1))]
    expected = 0.25 * (views[0] + views[1]) + 0.125 * sum(views[2:])
    assert torch.allclose(tb.view_logits(model, x, "flip_shift"), expected, atol=1e-6)
    assert sum(w for w, *_ in tb.VIEWS["flip_shift"]) == 1.0


FAST = {"fast_cifar": dict(recipe="fast_cifar", batch_size=32, lr=0.4, momentum=0.85, precision="fp32"),
        "fast_cifar_muon": dict(recipe="fast_cifar_muon", batch_size=32, lr=0.24, momentum=0.85, precision="fp32")}


def final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    last = sorted(ckpt.glob("epoch_*"))[-1]
    return torch.load(last / tb.MODEL_FILE, weights_only=True)


class Crash(RuntimeError):
    pass


class CrashingContext(LocalContext):
    """Stops the run as it reports ``epoch``, like a worker lost mid-run."""

    def __init__(self, root: Path, epoch: int) -> None:
        super().__init__(root)
        self.crash_at = epoch

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if metrics["epoch"] == self.crash_at:
            raise Crash(metrics["epoch"])
        super().report(metrics, checkpoint_dir)


# Muon orthogonalises its filters' updates in bf16 (as airbench94_muon does), whatever the run trains in
NO_NATIVE_BF16 = needs_native_bf16("fast_cifar_muon orthogonalises in bf16, and its pieces are tested in "
                                   "tests/cluster/test_fast_cifar_muon.py on any CPU")


@pytest.mark.parametrize("recipe", [pytest.param(name, marks=NO_NATIVE_BF16) if name == "fast_cifar_muon" else name
                                    for name in sorted(FAST)])
def test_the_recipe_learns_and_resumes_to_the_same_weights(prepared, tmp_path, recipe):
    cfg = TrainLoopConfig(data_dir=data_dir(prepared), epochs=4, **FAST[recipe])
    whole = LocalContext(tmp_path / "whole")
    history = train_loop(cfg, whole)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["val_accuracy"] > 0.8
    # every second epoch checkpoints (and the last): the run's reports say which
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == ["epoch_0002", "epoch_0004"]
    state = json.loads((tmp_path / "whole" / "epoch_0004" / "state.json").read_text())
    assert state["spec"]["name"] == "fast_net" and state["spec"]["eval_views"] == "flip_shift"

    with pytest.raises(Crash):
        train_loop(cfg, CrashingContext(tmp_path / "resumed", epoch=3))
    resumed = LocalContext(tmp_path / "resumed")
    train_loop(cfg, resumed)
    assert [m["epoch"] for m in resumed.reports] == [3, 4]  # from epoch 2's checkpoint
    expected, got = final_weights(tmp_path / "whole"), final_weights(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ"
