"""DDP's gradient all-reduce through shared memory, for CPU workers on one machine.

Gloo sends every gradient bucket through loopback TCP. On the 2-core reference
machine the seed CNN's 19 MB of fp32 gradients take about 21 ms per step that
way, a sixth of the step. Workers on one machine can instead add their
gradients in a memory segment they all map (in ``/dev/shm``): each rank copies
its bucket in, sums its 1/W slice of everyone's copies, and copies the whole
sum back. Two gloo barriers of a few bytes order the phases, so a bucket costs
three passes over memory and no socket traffic. Measured there under torchrun
(bf16, best of 3): two workers trained at 0.88 of one process using both cores
with gloo's all-reduce, at 1.02 with this one.

:func:`attach` registers this as the DDP model's communication hook when every
rank can map the segment (same machine, enough room in ``/dev/shm``), and
leaves gloo's all-reduce in place otherwise. The segment's file is unlinked as
soon as every rank has mapped it, so nothing is left behind, however the run
ends.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")

__all__ = ["SharedMemoryAllReduce", "attach"]


class SharedMemoryAllReduce:
    """W slots of the model's gradient size, plus one for the sum, in a segment every rank maps."""

    def __init__(self, segment: torch.Tensor, numel: int, rank: int, world_size: int) -> None:
        self.slots = segment[:world_size * numel]
        self.total = segment[world_size * numel:]
        self.rank, self.world_size = rank, world_size

    def average(self, grads: torch.Tensor) -> None:
        """Replace ``grads`` (one bucket, laid out alike on every rank) by its average over the ranks."""
        n = grads.numel()
        slots = self.slots[:self.world_size * n].view(self.world_size, n)
        slots[self.rank].copy_(grads)
        dist.barrier()  # every rank's gradients are in its slot
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        mine = self.total[lo:hi]
        torch.add(slots[0, lo:hi], slots[1, lo:hi], out=mine)
        for other in range(2, self.world_size):
            mine.add_(slots[other, lo:hi])
        mine.div_(self.world_size)
        dist.barrier()  # every slice of the average is written
        grads.copy_(self.total[:n])


def _hook(state: SharedMemoryAllReduce, bucket):  # unannotated: DDP rejects postponed (string) annotations
    """DDP's communication hook: average the bucket in place, then hand it back as a finished future.

    DDP calls it for the buckets in the same order on every rank, and each call returns only when its bucket
    is done, so one set of slots serves them all.
    """
    grads = bucket.buffer()
    state.average(grads)
    done = torch.futures.Future()
    done.set_result(grads)
    return done


def attach(ddp_model: torch.nn.parallel.DistributedDataParallel, rank: int, world_size: int) -> bool:
    """Average ``ddp_model``'s gradients through shared memory when every rank can; True when it does.

    A collective: every rank calls it, after wrapping the model in DDP and before the first backward pass.
    """
    params = [p for p in ddp_model.module.parameters() if p.requires_grad]
    if world_size < 2 or any(p.device.type != "cpu" or p.dtype != params[0].dtype for p in params):
        return False
    numel = sum(p.numel() for p in params)
    size = (world_size + 1) * numel  # elements: a slot per rank, and the sum
    name = [_create(size * params[0].element_size()) if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    segment = _map(name[0], size, params[0].dtype)
    mapped: list = [None] * world_size
    dist.all_gather_object(mapped, segment is not None)
    if rank == 0 and name[0]:
        os.unlink(SHM_DIR / name[0])  # every rank has mapped it (or failed to): the mappings outlive the name
    if not all(mapped):
        return False
    ddp_model.register_comm_hook(SharedMemoryAllReduce(segment, numel, rank, world_size), _hook)
    return True


def _create(nbytes: int) -> str | None:
    """The name of a new segment of ``nbytes`` in /dev/shm, or None where there is none or it lacks room.

    (Its pages are taken as they are written, and a write past a full tmpfs kills the process with SIGBUS:
    room is checked first.)
    """
    if not SHM_DIR.is_dir():
        return None
    room = os.statvfs(SHM_DIR)
    if room.f_bavail * room.f_frsize < 2 * nbytes:
        return None
    fd, path = tempfile.mkstemp(prefix="trainflow-grads-", dir=SHM_DIR)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    return os.path.basename(path)


def _map(name: str | None, numel: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Segment ``name`` mapped shared as a flat tensor; None where this rank cannot see it (another machine)."""
    if not name or not (SHM_DIR / name).exists():
        return None
    return torch.from_file(str(SHM_DIR / name), shared=True, size=numel, dtype=dtype)
