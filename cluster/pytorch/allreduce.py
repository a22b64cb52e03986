"""DDP's gradient all-reduce through shared memory, for CPU workers on one machine.

Gloo sends every gradient bucket through loopback TCP. For the seed CNN's 19 MB
of fp32 gradients that was a large share of each step on a 2-core machine (see
docs/performance.md). Workers on one machine can instead meet in a memory
segment they all map (in ``/dev/shm``): each rank copies its bucket into its
slot, waits until every rank has, and averages all the slots straight into its
own gradients. So a bucket costs two passes over memory, no socket traffic and
one meeting of the ranks.

The meeting is where the time went next. Through a gloo barrier (a tiny
all-reduce, handed between threads and sockets) it cost milliseconds, twice a
step. On x86-64, whose stores reach other cores in program order, the ranks
meet on counters in the segment instead: each bumps its own and spins
(yielding the core) until every other has caught up. Under torchrun (2 ranks,
bf16) that halved the hook's share of a step and raised the group's
throughput (see docs/performance.md). Other machines keep the gloo barrier.

Two sets of slots take turns, bucket by bucket: a rank writes into a set again
only after every rank has come to the meeting of the bucket in between, which
each does only once it has finished reading that set.

:func:`attach` registers this as the DDP model's communication hook when every
rank can map the segment (same machine, enough room in ``/dev/shm``), and
leaves gloo's all-reduce in place otherwise. The segment's file is unlinked as
soon as every rank has mapped it, so nothing is left behind, however the run
ends.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
LINE = 64  # bytes: each rank's counter on a cache line of its own
SPINS = 1000  # looks at the counters before a rank starts yielding its core (a few ms)
TIMEOUT_S = 1800.0  # as gloo's default: a rank that never arrives ends the run instead of hanging it

__all__ = ["CounterBarrier", "SharedMemoryAllReduce", "attach", "shared_segment", "shared_slots"]


class CounterBarrier:
    """The ranks of one machine meet on counters in shared memory: one per rank, on its own cache line.

    Only where stores become visible to other cores in the order they were made (x86-64's total store
    order): a rank's gradients, written before its counter, are then in place when another rank sees it.
    """

    def __init__(self, counters: torch.Tensor, rank: int, timeout: float = TIMEOUT_S) -> None:
        self.counters = counters.numpy()  # int64, one per rank, in the segment
        self.rank, self.timeout, self.generation = rank, timeout, 0

    def wait(self) -> None:
        self.generation += 1
        self.counters[self.rank] = self.generation
        counters, generation = self.counters, self.generation
        for _ in range(SPINS):
            if counters.min() >= generation:
                return
        deadline = time.monotonic() + self.timeout
        while counters.min() < generation:
            if time.monotonic() > deadline:
                late = [r for r, seen in enumerate(counters) if seen < generation]
                raise TimeoutError(f"rank {self.rank}: ranks {late} did not reach the gradient average within "
                                   f"{self.timeout:.0f} s")
            os.sched_yield()


class GlooBarrier:
    """The ranks meet in the process group's barrier (any machine)."""

    @staticmethod
    def wait() -> None:
        dist.barrier()


def counters_are_ordered() -> bool:
    """Whether this CPU makes stores visible in program order, so that :class:`CounterBarrier` is safe here."""
    return platform.machine().lower() in ("x86_64", "amd64")


class SharedMemoryAllReduce:
    """Two sets of W slots of the model's gradient size, in a segment every rank maps."""

    def __init__(self, slots: torch.Tensor, rank: int, world_size: int, barrier) -> None:
        self.slots = slots  # (2, W, numel)
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.turn = 0

    def average(self, grads: torch.Tensor) -> None:
        """Replace ``grads`` (one bucket, laid out alike on every rank) by its average over the ranks."""
        slots = self.slots[self.turn, :, :grads.numel()]
        self.turn ^= 1
        slots[self.rank].copy_(grads)
        self.barrier.wait()  # every rank's gradients are in its slot
        # every rank computes the same sums in the same order: the averages agree to the bit
        if self.world_size == 2:
            torch.lerp(slots[0], slots[1], 0.5, out=grads)
        else:
            torch.sum(slots, dim=0, out=grads).div_(self.world_size)


def _hook(state: SharedMemoryAllReduce, bucket):  # unannotated: DDP rejects postponed (string) annotations
    """DDP's communication hook: average the bucket in place, then hand it back as a finished future.

    DDP calls it for the buckets in the same order on every rank, and each call returns only when its bucket
    is averaged.
    """
    grads = bucket.buffer()
    state.average(grads)
    done = torch.futures.Future()
    done.set_result(grads)
    return done


def attach(ddp_model: torch.nn.parallel.DistributedDataParallel, rank: int, world_size: int,
           counters: bool | None = None) -> bool:
    """Average ``ddp_model``'s gradients through shared memory when every rank can; True when it does.

    ``counters``: meet on counters in the segment (default: where :func:`counters_are_ordered`), else in
    gloo's barrier. A collective: every rank calls it, after wrapping the model in DDP and before the first
    backward pass.
    """
    params = [p for p in ddp_model.module.parameters() if p.requires_grad]
    if world_size < 2 or any(p.device.type != "cpu" or p.dtype != params[0].dtype for p in params):
        return False
    meeting = shared_slots((2, world_size, sum(p.numel() for p in params)), params[0].dtype, rank, world_size,
                           counters)
    if meeting is None:
        return False
    slots, barrier = meeting
    ddp_model.register_comm_hook(SharedMemoryAllReduce(slots, rank, world_size, barrier), _hook)
    return True


def shared_slots(shape: tuple[int, ...], dtype: torch.dtype, rank: int, world_size: int,
                 counters: bool | None = None) -> tuple[torch.Tensor, CounterBarrier | GlooBarrier] | None:
    """Slots of ``shape`` in a segment every rank maps, and the barrier the ranks meet at; None when some rank
    cannot map it. ``counters`` as in :func:`attach`. A collective."""
    header = world_size * LINE
    segment = shared_segment(header + math.prod(shape) * dtype.itemsize, rank, world_size)
    if segment is None:
        return None
    use_counters = counters_are_ordered() if counters is None else counters
    barrier = (CounterBarrier(segment[:header].view(torch.int64)[::LINE // 8], rank) if use_counters
               else GlooBarrier())
    return segment[header:].view(dtype).view(shape), barrier


def shared_segment(nbytes: int, rank: int, world_size: int) -> torch.Tensor | None:
    """A new, zeroed segment of ``nbytes`` that every rank maps (flat bytes), or None when some rank cannot.

    A collective. Its file is unlinked once every rank has mapped it (or failed to): the mappings outlive the
    name, so nothing is left in /dev/shm however the run ends.
    """
    name = [_create(nbytes) if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    segment = _map(name[0], nbytes)
    mapped: list = [None] * world_size
    dist.all_gather_object(mapped, segment is not None)
    if rank == 0 and name[0]:
        os.unlink(SHM_DIR / name[0])
    return segment if all(mapped) else None


def _create(nbytes: int) -> str | None:
    """The name of a new, zeroed segment of ``nbytes`` in /dev/shm, or None where there is none or it lacks room.

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


def _map(name: str | None, nbytes: int) -> torch.Tensor | None:
    """Segment ``name`` mapped shared as flat bytes; None where this rank cannot see it (another machine)."""
    if not name or not (SHM_DIR / name).exists():
        return None
    return torch.from_file(str(SHM_DIR / name), shared=True, size=nbytes, dtype=torch.uint8)
