"""Data parallelism for CPU ranks on one machine: each rank averages and steps 1/W of the parameters.

Under DDP, even with :mod:`cluster.pytorch.allreduce`'s shared-memory hook, every
rank averages every gradient and then steps the whole model. For the seed CNN
(5.1 M fp32 parameters) that is, per step and rank: DDP copying the gradients
into its buckets, the hook copying the buckets into shared memory and averaging
all of it back, and the optimizer reading and writing the whole model. The same
work, W times over.

Ranks that share memory can split that work. The parameters and the
optimizer's state live in one segment that every rank maps. The flattened
parameters are cut into W equal ranges, and rank r owns range r. Per step, each
rank:

1. copies the gradients of the ranges it does not own into its slot;
2. meets the others: every slot is written;
3. averages its own range (its own gradients and the others' slots) and steps
   the optimizer on that range only, in place in the shared parameters;
4. meets the others again: every range is stepped before any rank's next
   forward pass.

No gradient passes through DDP's buckets, and each rank moves about a third of
the bytes it moved before. Only a range's owner ever writes it, so the ranks
cannot drift apart. Under torchrun (2 ranks, bf16, seed CNN) this trained
faster than DDP with the hook, about as fast as one process using both cores
(see docs/performance.md).

Step 3 runs chunk by chunk (:data:`CHUNK` elements), so that a chunk's
gradients, weights and momentum are still in the cache from its averaging
through its optimizer step (and its bf16 copy, below), instead of each pass
streaming the whole range from memory. In the same setting this shortened
each rank's whole step (steps 1 to 4) (see docs/performance.md).

The first step runs the plain way: every rank averages every gradient and
steps the whole optimizer, which makes its state there, shaped as the
parameters. Then the parameters and that state move into the segment, and each
rank steps its range from then on with SGD's functional form, on views of the
shared parameters and state. The optimizer the loop made still holds the whole
state, current after every step, so checkpoints are the same files as without
sharding.

Under bf16 autocast, every rank would also cast every weight to bf16 for its
forward pass and every weight's gradient back to fp32, each step: a noticeable
share of the seed CNN's step on one core (see docs/performance.md). So
the segment also holds a bf16 copy of the parameters, which each range's owner
writes after stepping it, and the forward pass runs on that copy
(:class:`LowPrecisionForward`); the gradients stay bf16 until their owner
averages them in fp32. The values are the ones autocast computes: it rounds
the same fp32 weights the same way, and its weight gradients are bf16 before
it widens them. Only for models whose parameters all belong to layers that
autocast runs in bf16 (linear and convolution layers); others keep autocast's
casts.

Only for an optimizer that updates each element from that element alone
(``torch.optim.SGD``, whose functional form steps each chunk) and a model
without buffers (which DDP would broadcast from rank 0): :func:`attach` returns
None otherwise, and the loop keeps DDP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.optim.sgd import sgd

from cluster.pytorch.allreduce import shared_segment, shared_slots

__all__ = ["CHUNK", "LOW_PRECISION_LAYERS", "LowPrecisionForward", "ShardedStep", "attach"]

# elements averaged and stepped at a time: about 4.5 MiB of gradients, weights, momentum and copies per rank,
# small enough for two ranks' chunks to stay in a server CPU's L3 cache (sizes measured: see docs/performance.md)
CHUNK = 1 << 18
# layers that autocast runs in its low precision, weights and bias alike (so their weights may be kept so)
LOW_PRECISION_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class _Chunk(NamedTuple):
    """Up to :data:`CHUNK` elements of one parameter that this rank owns, as views of the shared tables."""

    param: int  # the parameter's index
    start: int  # the elements' range in the parameter, flat
    end: int
    group: int  # the optimizer's group the parameter belongs to
    weights: torch.Tensor  # fp32, stepped in place
    momentum: torch.Tensor | None  # SGD's momentum buffer (None without momentum)
    others: list[torch.Tensor]  # the other ranks' slots: their gradients of these elements
    total: torch.Tensor | None  # with ``low``: where the gradients are summed in fp32 (every chunk's, in turn)
    low: torch.Tensor | None  # with ``low``: the forward's copy of the weights


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in memory order, as a 1-D view (``t`` dense, in any memory format)."""
    return t.as_strided((t.numel(),), (1,))


class ShardedStep:
    """Takes the optimizer's place in the loop: ``zero_grad``, ``step`` and ``param_groups`` as the optimizer's."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, rank: int,
                 world_size: int, slots: torch.Tensor, barrier, names: list[str] | None = None,
                 low: torch.dtype | None = None) -> None:
        self.params, self.optimizer = params, optimizer
        self.names, self.low = names, low  # the parameters' names in the model; the forward's dtype, if kept
        self.rank, self.world_size = rank, world_size
        self.slots, self.barrier = slots, barrier  # slots: (W, numel) in the shared segment
        self.offsets = [sum(p.numel() for p in params[:i]) for i in range(len(params))]
        numel = sum(p.numel() for p in params)
        lo, hi = numel * rank // world_size, numel * (rank + 1) // world_size
        # (parameter index, start, end) of the flat pieces this rank owns, and of those it hands to others
        self.mine, self.theirs = [], []
        for i, (p, off) in enumerate(zip(params, self.offsets)):
            for a, b, owned in ((0, lo - off, False), (lo - off, hi - off, True), (hi - off, p.numel(), False)):
                a, b = max(a, 0), min(b, p.numel())
                if a < b:
                    (self.mine if owned else self.theirs).append((i, a, b))
        self.sharded = False  # whether the state is shared, and each rank steps its share from now on
        # once it is: this rank's share, chunk by chunk; with ``low``, the forward's weights (shared, in ``low``)
        self.chunks: list[_Chunk] = []
        self.leaves: list[torch.Tensor] = []
        self.divisor = torch.tensor(float(world_size))  # a fused step's gradient scale: it divides the sums
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for leaf in self.leaves:
            leaf.grad = None

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("a sharded optimizer step takes no closure")
        grads = self._grads()
        if not self.sharded:
            self._step_whole(grads)
            return
        slot = self.slots[self.rank]
        for i, a, b in self.theirs:
            off = self.offsets[i]
            slot[off + a:off + b].copy_(grads[i][a:b])
        self.barrier.wait()  # every rank's slot holds what the others own
        for chunk in self.chunks:
            group = self.optimizer.param_groups[chunk.group]  # read each step: a schedule may move the rates
            grad = grads[chunk.param][chunk.start:chunk.end]
            if chunk.total is not None:
                grad = chunk.total.copy_(grad)  # averaged in fp32
            scale = None
            if self.world_size == 2 and chunk.total is None:  # in rank order, as DDP's hook averages
                torch.lerp(*((grad, chunk.others[0]) if self.rank == 0 else (chunk.others[0], grad)), 0.5, out=grad)
            else:  # (with two ranks, a sum of two is the same in either order)
                for other in chunk.others:
                    grad.add_(other)
                if group["fused"]:  # the fused step divides by its gradient scale, as div_ would, in its one pass
                    scale = self.divisor
                else:
                    grad.div_(self.world_size)
            sgd([chunk.weights], [grad], [chunk.momentum], foreach=group["foreach"], fused=group["fused"],
                grad_scale=scale, weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
            if chunk.low is not None:  # rounded as autocast rounds the weights it casts
                chunk.low.copy_(chunk.weights)
        self.barrier.wait()  # every range is stepped

    def _grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient, flat in the parameter's memory order."""
        flats = []
        for t in self.leaves or self.params:
            if t.grad is None:
                raise RuntimeError(f"a parameter of shape {tuple(t.shape)} got no gradient: with sharded steps "
                                   "every parameter must take part in the loss")
            if t.grad.stride() != t.stride():
                t.grad = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t.grad)
            flats.append(_flat(t.grad))
        return flats

    def _step_whole(self, grads: list[torch.Tensor]) -> None:
        """Every rank averages every gradient and steps the whole optimizer; after the first step, the state
        moves into shared memory, and later steps are sharded (unless the state cannot be split)."""
        slot = self.slots[self.rank]
        for g, off in zip(grads, self.offsets):
            slot[off:off + g.numel()].copy_(g)
        self.barrier.wait()
        for g, off in zip(grads, self.offsets):
            rows = self.slots[:, off:off + g.numel()]  # the same sums in the same order on every rank
            torch.lerp(rows[0], rows[1], 0.5, out=g) if self.world_size == 2 else torch.mean(rows, 0, out=g)
        self.optimizer.step()
        self.barrier.wait()  # no rank writes its slot again before every rank has read them all
        self.steps += 1
        if self.steps == 1:
            self._share()

    def _share(self) -> None:
        """Parameters and optimizer state into a new segment, then this rank's chunks.

        After the whole first step every rank holds the same values (the same sums in the same order, the same
        optimizer step), so each copies the ranges it owns, all at once.
        """
        state = self.optimizer.state
        keys = sorted(state.get(self.params[0], {}))
        if keys not in ([], ["momentum_buffer"]) or any(
                sorted(state.get(p, {})) != keys or any(not isinstance(state[p][k], torch.Tensor)
                                                        or state[p][k].shape != p.shape for k in keys)
                for p in self.params):
            return  # not SGD's one momentum per element: every rank keeps stepping the whole model
        numel, dtype = sum(p.numel() for p in self.params), self.params[0].dtype
        tables_size = (1 + len(keys)) * numel * self.params[0].element_size()
        low_size = numel * self.low.itemsize if self.low is not None else 0
        segment = shared_segment(tables_size + low_size, self.rank, self.world_size)
        if segment is None:
            return
        # row 0: parameters; then one row per key; after them, the parameters in ``low``
        tables = segment[:tables_size].view(dtype).view(1 + len(keys), numel)
        low = segment[tables_size:].view(self.low) if self.low is not None else None
        for i, a, b in self.mine:
            p, off = self.params[i], self.offsets[i]
            for table, t in zip(tables, [p] + [state[p][k] for k in keys]):
                table[off + a:off + b].copy_(_flat(t)[a:b])
            if low is not None:
                low[off + a:off + b].copy_(tables[0, off + a:off + b])
        self.barrier.wait()  # every range is in place
        for p, off in zip(self.params, self.offsets):
            shared = [table[off:off + p.numel()].as_strided(p.shape, p.stride()) for table in tables]
            p.data = shared[0]
            if keys:
                state[p].update(zip(keys, shared[1:]))
        if low is not None:
            self.leaves = [low[off:off + p.numel()].as_strided(p.shape, p.stride()).detach().requires_grad_()
                           for p, off in zip(self.params, self.offsets)]
            self.slots = self.slots.view(self.low)[:, :numel]  # the gradients are in ``low`` too from now on
        group_of = {p: g for g, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        momentum = tables[1] if keys else None
        total = torch.empty(CHUNK, dtype=dtype) if low is not None else None  # one for all chunks: stays cached
        for i, a, b in self.mine:
            for start in range(a, b, CHUNK):
                end = min(start + CHUNK, b)
                lo, hi = self.offsets[i] + start, self.offsets[i] + end
                self.chunks.append(_Chunk(
                    i, start, end, group_of[self.params[i]], tables[0, lo:hi],
                    momentum[lo:hi] if momentum is not None else None,
                    [self.slots[q, lo:hi] for q in range(self.world_size) if q != self.rank],
                    total[:end - start] if total is not None else None,
                    low[lo:hi] if low is not None else None))
        self.sharded = True


class LowPrecisionForward(torch.nn.Module):
    """``module`` called on its stepper's shared low-precision weights, once they exist; else on its own.

    ``.module`` is the model itself, as in DDP's wrapper.
    """

    def __init__(self, module: torch.nn.Module, stepper: ShardedStep) -> None:
        super().__init__()
        self.module, self.stepper = module, stepper

    def forward(self, *args, **kwargs):
        if not self.stepper.leaves:
            return self.module(*args, **kwargs)
        weights = dict(zip(self.stepper.names, self.stepper.leaves))
        return torch.func.functional_call(self.module, weights, args, kwargs)


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, world_size: int,
           counters: bool | None = None, low: torch.dtype | None = None) -> ShardedStep | None:
    """A :class:`ShardedStep` to use in ``optimizer``'s place, when the ranks can share ``model``; else None.

    ``counters`` as in :func:`cluster.pytorch.allreduce.attach`. ``low``: the dtype the loop's autocast runs
    linear and convolution layers in (None without autocast); when every parameter belongs to such a layer,
    the forward pass may run on shared copies of the weights in that dtype, through
    ``LowPrecisionForward(model, stepper)``. A collective: every rank calls it, with the same model and
    optimizer, before the first backward pass.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # SGD updates each element from that element and its momentum alone, so each rank can step its chunks
    shareable = (world_size > 1 and type(optimizer) is torch.optim.SGD and next(model.buffers(), None) is None
                 and {p for group in optimizer.param_groups for p in group["params"]} == set(params)
                 and all(p.device.type == "cpu" and p.dtype == params[0].dtype for p in params)
                 and all(p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last) for p in params))
    if not shareable:
        return None
    meeting = shared_slots((world_size, sum(p.numel() for p in params)), params[0].dtype, rank, world_size, counters)
    if meeting is None:
        return None
    slots, barrier = meeting
    slots[rank].zero_()  # its pages are taken now, not in the first step (see docs/performance.md)
    layers = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    if not all(isinstance(m, LOW_PRECISION_LAYERS) for m in layers):
        low = None
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return ShardedStep(params, optimizer, rank, world_size, slots, barrier, names, low)
