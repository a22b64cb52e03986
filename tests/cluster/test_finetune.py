"""The finetune recipe: its parameter groups, its schedule, and a network by name learning with it in the loop."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn as nn

from cluster.config import TrainLoopConfig
from cluster.errors import UserError
from cluster.pytorch.loop import LocalContext, train_loop
from cluster.recipes import finetune, get_recipe
from cluster.recipes.schedules import warmup_cosine
from tests.cluster.test_torch_loop import data_dir


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def rates(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, tuple[float, float]]:
    """(lr, weight decay) of each named parameter."""
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_from_starting_weights_the_backbone_learns_at_a_tenth_of_the_head():
    model = net()
    got = rates(finetune.optimizer(model, 1e-3, pretrained=True), model)
    assert got["5.weight"] == (1e-3, 0.05) and got["5.bias"] == (1e-3, 0.0)  # the last linear layer: the head
    assert got["3.weight"] == (1e-4, 0.05) and got["0.weight"] == (1e-4, 0.05)
    assert got["0.bias"] == got["1.weight"] == got["1.bias"] == (1e-4, 0.0)  # no decay on biases and norms


def test_from_scratch_every_parameter_learns_at_the_rate():
    model = net()
    assert {lr for lr, _ in rates(finetune.optimizer(model, 1e-3, pretrained=False), model).values()} == {1e-3}


def test_a_network_without_a_linear_layer_is_refused():
    with pytest.raises(ValueError, match="no linear layer"):
        finetune.head_parameters(nn.Conv2d(3, 3, 1))


def test_warmup_then_a_half_cosine_to_zero():
    schedule = warmup_cosine(start=0.1, warmup=0.1)
    assert schedule(0, 100) == pytest.approx(0.1) and schedule(5, 100) == pytest.approx(0.55)
    assert schedule(10, 100) == pytest.approx(1.0) and schedule(55, 100) == pytest.approx(0.5)
    assert schedule(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(schedule(s, 100) >= schedule(s + 1, 100) for s in range(10, 100))
    assert warmup_cosine(start=1.0, warmup=0.0)(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError):
        warmup_cosine(start=0.1, warmup=1.0)


def test_tensorflow_is_refused_before_any_work():
    with pytest.raises(UserError, match="recipe='finetune' is not implemented for framework='tensorflow'"):
        get_recipe("finetune").check("tensorflow")


@pytest.mark.slow
def test_a_torchvision_network_learns_with_it_and_resumes_exactly(prepared, tmp_path):
    """resnet18 by name, fresh, on the small RGB set: the loss falls, and a run resumed after epoch 2 of 3 ends
    with the uninterrupted run's weights (the schedule and the augmentation are functions of the step and epoch)."""
    cfg = TrainLoopConfig(data_dir=data_dir(prepared), recipe="finetune", model="torchvision:resnet18", epochs=3,
                          lr=2e-3, batch_size=16, precision="fp32")
    whole = LocalContext(tmp_path / "whole")
    history = train_loop(cfg, whole)
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], history
    assert history[-1]["val_accuracy"] > 0.6, history
    shutil.copytree(tmp_path / "whole" / "epoch_0002", tmp_path / "resumed" / "epoch_0002")  # as if stopped there
    resumed = LocalContext(tmp_path / "resumed")
    assert [m["epoch"] for m in train_loop(cfg, resumed)] == [1, 2, 3] and [m["epoch"] for m in resumed.reports] == [3]
    ours = torch.load(tmp_path / "resumed" / "epoch_0003" / "model.pt", weights_only=True)
    theirs = torch.load(tmp_path / "whole" / "epoch_0003" / "model.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
