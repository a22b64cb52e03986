"""DDP's gradients averaged through shared memory equal the average of each rank's own gradients."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pytest
import torch

from cluster.pytorch import allreduce as torch_allreduce
from tests.cluster._ranks import run_ranks


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(5, 8, generator=g), torch.randint(0, 3, (5,), generator=g)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 3))


def _rank(rank: int, world_size: int, init_file: str, shm_dirs: list[str], out_dir: str, counters: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch_allreduce.SHM_DIR = Path(shm_dirs[rank])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    # tiny buckets: several per backward pass, so the slots are reused within a step as well as across steps
    net = torch.nn.parallel.DistributedDataParallel(_model(), gradient_as_bucket_view=True, bucket_cap_mb=0.004)
    used = torch_allreduce.attach(net, rank, world_size, counters=counters)
    errors = []
    for step in range(3):  # DDP rebuilds its buckets after the first pass; the slot sets take turns
        net.zero_grad()
        x, y = _inputs(rank * 10 + step)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        expected = [torch.zeros_like(p) for p in net.module.parameters()]
        for other in range(world_size):  # each rank's gradient, computed here on a plain copy of the model
            plain = _model()
            plain.load_state_dict(net.module.state_dict())
            x, y = _inputs(other * 10 + step)
            torch.nn.functional.cross_entropy(plain(x), y).backward()
            for total, p in zip(expected, plain.parameters()):
                total += p.grad / world_size
        errors.append(max((p.grad - e).abs().max().item() for p, e in zip(net.module.parameters(), expected)))
    dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"used": used, "max_error": max(errors)}))


def _run(tmp_path: Path, world_size: int, shared: bool, counters: bool = True) -> list[dict]:
    return run_ranks(_rank, tmp_path, world_size, shared, counters)


@pytest.mark.parametrize("counters", [True, False], ids=["meet-on-counters", "meet-in-gloo"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_sharing_memory_average_their_gradients_there(tmp_path, world_size, counters):
    if counters and not torch_allreduce.counters_are_ordered():
        pytest.skip(f"ranks meet on counters only where stores are ordered (x86-64), not on {platform.machine()}")
    results = _run(tmp_path, world_size, shared=True, counters=counters)
    assert [r["used"] for r in results] == [True] * world_size
    assert max(r["max_error"] for r in results) < 1e-6


def test_ranks_that_cannot_share_memory_keep_gloo(tmp_path):
    """Each rank sees its own folder, as on separate machines: rank 1 cannot map rank 0's segment."""
    results = _run(tmp_path, 2, shared=False)
    assert [r["used"] for r in results] == [False, False]
    assert max(r["max_error"] for r in results) < 1e-6


def test_a_rank_that_never_arrives_ends_the_wait_with_an_error():
    counters = torch.zeros(2, dtype=torch.int64)  # rank 1's counter never moves
    barrier = torch_allreduce.CounterBarrier(counters, rank=0, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not reach"):
        barrier.wait()
    assert time.monotonic() - start < 5


def test_counters_let_each_rank_pass_once_all_have_arrived():
    counters = torch.zeros(2, dtype=torch.int64)
    first = torch_allreduce.CounterBarrier(counters, rank=0, timeout=0.2)
    counters[1] = 1  # rank 1 is already waiting at the first meeting
    first.wait()
    assert counters.tolist() == [1, 1]
    with pytest.raises(TimeoutError):  # the second meeting: rank 1 has not come
        first.wait()
