"""Ranks stepping 1/W of the parameters each train the model exactly as averaging every gradient would."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch

from cluster.pytorch import allreduce as torch_allreduce
from cluster.pytorch import sharded as torch_sharded
from tests.cluster._ranks import run_ranks

STEPS = 4
CHUNK = 100  # elements a rank steps at a time: the model's 1 203 parameters make chunks that end inside parameters


def _model(layer_norm: bool = False) -> torch.nn.Module:
    """Convolution weights in channels_last (strided unlike their shape), linear ones plain; no buffers.

    ``layer_norm``: ends in a layer norm, whose parameters autocast keeps in fp32.
    """
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3),
                              *([torch.nn.LayerNorm(3)] if layer_norm else []))
    return net.to(memory_format=torch.channels_last)


def _optimizer(model: torch.nn.Module, momentum: float) -> torch.optim.SGD:
    """Two groups with their own rates, as a recipe's schedule and weight decay would make."""
    conv, *linears = [m for m in model if list(m.parameters())]
    return torch.optim.SGD([{"params": conv.parameters(), "lr": 0.1},
                            {"params": [p for m in linears for p in m.parameters()], "lr": 0.05,
                             "weight_decay": 0.01}], momentum=momentum, fused=True)


def _loss(model: torch.nn.Module, rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(5, 3, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    return torch.nn.functional.cross_entropy(model(x.to(memory_format=torch.channels_last)), y)


def _rank(rank: int, world_size: int, init_file: str, shm_dirs: list[str], out_dir: str, counters: bool,
          momentum: float, bf16: bool, layer_norm: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch_allreduce.SHM_DIR = Path(shm_dirs[rank])
    torch_sharded.CHUNK = CHUNK
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = _model(layer_norm)
    optimizer = _optimizer(model, momentum)
    stepper = torch_sharded.attach(model, optimizer, rank, world_size, counters=counters,
                                   low=torch.bfloat16 if bf16 else None)
    if stepper is None:
        dist.destroy_process_group()
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"sharded": False}))
        return
    # called as the loop calls it
    net = torch_sharded.LowPrecisionForward(model, stepper) if stepper.low is not None else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    # the reference: one model stepped on the average of every rank's gradients, computed here
    reference = _model(layer_norm)
    ref_optimizer = _optimizer(reference, momentum)
    for step in range(STEPS):
        if step == 2:  # a schedule moves the rate: the ranks' shares must follow
            for opt in (optimizer, ref_optimizer):
                opt.param_groups[0]["lr"] = 0.02
        stepper.zero_grad()
        with autocast:
            loss = _loss(net, rank, step)
        loss.backward()
        stepper.step()
        grads = []  # each rank's gradients, as it would compute them; then their average in fp32
        for other in range(world_size):
            ref_optimizer.zero_grad()
            with autocast:
                loss = _loss(reference, other, step)
            loss.backward()
            grads.append([p.grad for p in reference.parameters()])
        for p, *each in zip(reference.parameters(), *grads):
            p.grad = sum(each) / world_size
        ref_optimizer.step()
    # with bf16 weights kept, the last forward pass ran on them: the model's own weights got no gradient
    forward = [str(leaf.grad.dtype) for leaf in stepper.leaves] + [str(p.grad.dtype) for p in model.parameters()
                                                                    if p.grad is not None]
    params = max((p - r).abs().max().item() for p, r in zip(model.parameters(), reference.parameters()))
    # what rank 0 would checkpoint: the loop's own optimizer, whole and current
    ours, theirs = optimizer.state_dict(), ref_optimizer.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    state = max(((ours["state"][i][k] - theirs["state"][i][k]).abs().max().item()
                 for i in theirs["state"] for k in theirs["state"][i]), default=0.0)
    result = {"sharded": stepper.sharded, "param_error": params,
              "state_error": state,
              "groups": ours["param_groups"] == theirs["param_groups"], "gradients": sorted(set(forward))}
    dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def _run(tmp_path: Path, world_size: int, shared: bool = True, counters: bool = True,
         momentum: float = 0.9, bf16: bool = False, layer_norm: bool = False) -> list[dict]:
    # both segments' files are gone afterwards
    return run_ranks(_rank, tmp_path, world_size, shared, counters, momentum, bf16, layer_norm)


@pytest.mark.parametrize("counters", [True, False], ids=["meet-on-counters", "meet-in-gloo"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_stepping_their_shares_train_as_the_average_of_all_gradients(tmp_path, world_size, counters):
    if counters and not torch_allreduce.counters_are_ordered():
        pytest.skip(f"ranks meet on counters only where stores are ordered (x86-64), not on {platform.machine()}")
    results = _run(tmp_path, world_size, counters=counters)
    assert [r["sharded"] for r in results] == [True] * world_size
    assert max(r["param_error"] for r in results) < 1e-6
    assert max(r["state_error"] for r in results) < 1e-6  # every rank sees the whole state, rank 0 included
    assert all(r["groups"] for r in results)


@pytest.mark.parametrize("world_size", [2, 3])
def test_under_bf16_autocast_the_forward_runs_on_shared_bf16_weights_with_autocasts_results(tmp_path, world_size):
    """The reference runs under autocast on fp32 weights, casting them each step: the same numbers."""
    results = _run(tmp_path, world_size, bf16=True)
    assert [r["gradients"] for r in results] == [["torch.bfloat16"]] * world_size  # the copies' gradients only
    assert max(r["param_error"] for r in results) < 1e-6
    assert max(r["state_error"] for r in results) < 1e-6


def test_a_layer_autocast_keeps_in_fp32_keeps_the_model_on_its_fp32_weights(tmp_path):
    """A layer norm's weights would be rounded to bf16 on the copies: autocast casts every weight instead."""
    results = _run(tmp_path, 2, bf16=True, layer_norm=True)
    assert [r["sharded"] for r in results] == [True, True]
    assert [r["gradients"] for r in results] == [["torch.float32"]] * 2
    assert max(r["param_error"] for r in results) < 1e-6


def test_plain_sgd_without_momentum_is_stepped_in_shares(tmp_path):
    """No optimizer state at all: only the parameters move into shared memory."""
    results = _run(tmp_path, 2, momentum=0.0)
    assert [r["sharded"] for r in results] == [True, True]
    assert max(r["param_error"] for r in results) < 1e-6


def test_ranks_that_cannot_share_memory_are_not_sharded(tmp_path):
    """Each rank sees its own folder, as on separate machines: the loop keeps DDP."""
    assert [r["sharded"] for r in _run(tmp_path, 2, shared=False)] == [False, False]


@pytest.mark.parametrize("case", ["adam", "batch-norm", "one-rank"])
def test_models_and_optimizers_that_cannot_be_split_by_element_keep_ddp(case):
    """Decided before any collective, the same on every rank, so no process group is needed here."""
    model = _model()
    optimizer = _optimizer(model, 0.9)
    world_size = 1 if case == "one-rank" else 2
    if case == "adam":  # its step counts are one per parameter, not one per element
        optimizer = torch.optim.Adam(model.parameters())
    if case == "batch-norm":  # DDP broadcasts rank 0's running statistics; sharding would not
        model.append(torch.nn.BatchNorm1d(3))
    assert torch_sharded.attach(model, optimizer, 0, world_size) is None
