"""Ranks stepping 1/W of the parameters each train the model exactly as averaging every gradient would."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch

from cluster import torch_allreduce, torch_sharded
from tests.cluster._ranks import run_ranks

STEPS = 4


def _model() -> torch.nn.Module:
    """Convolution weights in channels_last (strided unlike their shape), linear ones plain; no buffers."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
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
          momentum: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch_allreduce.SHM_DIR = Path(shm_dirs[rank])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = _model()
    optimizer = _optimizer(model, momentum)
    stepper = torch_sharded.attach(model, optimizer, rank, world_size, counters=counters)
    if stepper is None:
        dist.destroy_process_group()
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"sharded": False}))
        return
    # the reference: one model stepped on the average of every rank's gradients, computed here
    reference = _model()
    ref_optimizer = _optimizer(reference, momentum)
    for step in range(STEPS):
        if step == 2:  # a schedule moves the rate: the ranks' shares must follow
            for opt in (optimizer, ref_optimizer):
                opt.param_groups[0]["lr"] = 0.02
        stepper.zero_grad()
        _loss(model, rank, step).backward()
        stepper.step()
        ref_optimizer.zero_grad()
        for other in range(world_size):
            (_loss(reference, other, step) / world_size).backward()
        ref_optimizer.step()
    params = max((p - r).abs().max().item() for p, r in zip(model.parameters(), reference.parameters()))
    # what rank 0 would checkpoint: the loop's own optimizer, whole and current
    ours, theirs = optimizer.state_dict(), ref_optimizer.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    state = max(((ours["state"][i][k] - theirs["state"][i][k]).abs().max().item()
                 for i in theirs["state"] for k in theirs["state"][i]), default=0.0)
    result = {"sharded": stepper.twin is not None, "param_error": params,
              "state_error": state,
              "groups": ours["param_groups"] == theirs["param_groups"]}
    dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def _run(tmp_path: Path, world_size: int, shared: bool = True, counters: bool = True,
         momentum: float = 0.9) -> list[dict]:
    return run_ranks(_rank, tmp_path, world_size, shared, counters, momentum)  # both segments' files are gone


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
