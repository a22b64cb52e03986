"""The per-worker PyTorch training loop, independent of Ray.

Ray (``cluster.execution.worker_entry``) supplies rank, world size, reporting and checkpoint
storage through a :class:`WorkerContext`; without Ray, :class:`LocalContext`
does the same for one process or for each process under ``torchrun``::

    python -m cluster.pytorch.loop --data DIR --epochs 2            # one process
    torchrun --nproc-per-node 2 -m cluster.pytorch.loop --data DIR  # 2 ranks, no Ray
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cluster.pytorch import allreduce as torch_allreduce
from cluster.pytorch import sharded as torch_sharded
from cluster.pytorch import model as tb
from cluster.config import TrainLoopConfig
from cluster.data import Manifest, Shard, load_split, read_manifest
from cluster.frameworks import get_framework, load
from cluster.precision import PRECISIONS, Precision, agree, describe
from cluster.recipes import RECIPES, get_recipe
from cluster.worker.checkpoint import ModelSpec, write_predictions
from cluster.worker.context import LocalContext, WorkerContext, epoch_metrics
from cluster.worker.memory import keep_freed_memory
from cluster.worker.stream import (Piece, Views, epoch_pieces, read_piece, read_whole, steps_per_epoch, stream_batches,
                                   streams)

__all__ = ["LocalContext", "RecipeSteps", "WorkerContext", "main", "run_epoch", "train_loop", "train_on_ray"]


def _all_sum(values: list[float], ctx: WorkerContext) -> list[float]:
    if ctx.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def _group(cfg: TrainLoopConfig, ctx: WorkerContext) -> tuple[list[dict], Precision]:
    """Every rank's placement, in rank order, and the precision the whole group trains in.

    One collective at start-up: each rank resolves ``cfg.precision`` on its own device, and the group
    agrees on one (rank 0 stores both with each checkpoint).
    """
    mine = (ctx.placement(), tb.resolve_precision(cfg.precision, cfg.channels_last, ctx.device))
    gathered: list = [mine]
    if ctx.world_size > 1:
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, mine)
    return [placement for placement, _ in gathered], agree([precision for _, precision in gathered])


def _epoch_indices(n: int, seed: int, epoch: int, ctx: WorkerContext) -> torch.Tensor:
    """This rank's equal-length shard of a permutation every rank draws identically."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[ctx.rank::ctx.world_size][: n // ctx.world_size]


def train_loop(cfg: TrainLoopConfig, ctx: WorkerContext) -> list[dict]:
    """Train for ``cfg.epochs`` with ``cfg.recipe``, resuming from the context's checkpoint; returns the history."""
    keep_freed_memory()
    torch.manual_seed(cfg.seed + ctx.rank)
    ctx.device = torch.device(ctx.device)
    data_dir = Path(cfg.data_dir)
    recipe = get_recipe(cfg.recipe)
    parts: tb.TorchParts = load(recipe.parts["torch"])(cfg)
    manifest = read_manifest(data_dir)
    spec = ModelSpec.from_manifest(cfg.network, manifest, eval_views=parts.eval_views)
    to_device = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(ctx.device)  # noqa: E731
    train = TrainSplit(data_dir, manifest, cfg, ctx)
    x_val, y_val = map(to_device, load_split(data_dir, "val", mmap=True))
    val_shard = slice(ctx.rank, None, ctx.world_size)
    x_val, y_val = x_val[val_shard], y_val[val_shard]
    workers, precision = _group(cfg, ctx)
    normalize = tb.Normalizer(spec, ctx.device, precision.channels_last)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = tb.build_model(spec)
    if parts.init is not None:  # from the same leading images on every rank
        parts.init(model, normalize(to_device(train.leading(tb.INIT_IMAGES))).float().cpu())
    if cfg.weights:  # a checkpoint restored below takes precedence: a resumed run continues its own weights
        fresh = tb.load_starting_weights(model, Path(cfg.weights), spec.num_classes)
        ctx.say(f"starting from {Path(cfg.weights).name}" + (f"; new head: {', '.join(fresh)}" if fresh else ""))
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    model = model.to(ctx.device, memory_format=memory_format)
    optimizer = parts.optimizer(model, ctx.device)
    averager = parts.averager(model) if parts.averager else None
    start_epoch, history = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        if ctx.restore(Path(tmp)):
            tb.load_weights(Path(tmp), model, optimizer, averager)
            _, start_epoch, history = tb.read_state(Path(tmp))
            ctx.say(f"resuming from the checkpoint of epoch {start_epoch}")
    ctx.started(start_epoch)
    net, stepper, all_reduce = model, optimizer, None
    bf16 = precision.dtype == "bf16"
    if ctx.world_size > 1:  # ranks sharing memory step a share of the model each; others run DDP
        sharded = torch_sharded.attach(model, optimizer, ctx.rank, ctx.world_size,
                                       low=torch.bfloat16 if bf16 else None)
        if sharded is not None:
            stepper, all_reduce = sharded, f"shared memory, each worker stepping 1/{ctx.world_size} of the parameters"
            if sharded.low is not None:  # the forward runs on the shared bf16 copies of the weights
                net = torch_sharded.LowPrecisionForward(model, sharded)
        else:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None, gradient_as_bucket_view=True)
            shared = torch_allreduce.attach(net, ctx.rank, ctx.world_size)
            all_reduce = "shared memory" if shared else dist.get_backend()
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    local_batch = cfg.local_batch_size(ctx.world_size)
    if ctx.rank == 0:
        print(f"recipe {recipe.name} ({cfg.network}); global batch {cfg.batch_size} = {ctx.world_size} workers x "
              f"{local_batch} per worker" + (f" (gradients averaged through {all_reduce})" if all_reduce else "")
              + f"; {train.count} training images{' streamed from their shards' if train.streamed else ''}; "
              + describe(precision), flush=True)

    steps = RecipeSteps(parts, stepper, averager, autocast, local_batch,
                        total=cfg.epochs * steps_per_epoch(train.shards, ctx.world_size, local_batch))
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        # Randomness is a function of (seed, epoch, rank): a resumed epoch draws exactly what the
        # interrupted one would have (shuffle, augmentation), so no RNG state needs saving.
        torch.manual_seed((cfg.seed * 100_003 + epoch) * 4_099 + ctx.rank)
        metrics = run_epoch(net, steps, train, (x_val, y_val), normalize, autocast, cfg, epoch, ctx)
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if ctx.rank == 0 and recipe.checkpoints_after(epoch, cfg.epochs):
                tb.save_checkpoint(Path(tmp), model, optimizer, spec, epoch, history, workers, precision,
                                   averager.state_dict() if averager else None)
                if epoch == cfg.epochs:
                    write_predictions(Path(tmp), data_dir, tb.predict, get_framework("torch").export,
                                      exact=tb.predict_exact if precision.dtype == "bf16" else None)
                ckpt = Path(tmp)
            ctx.report(metrics, ckpt)
    return history


@dataclass(frozen=True)
class RecipeSteps:
    """How the recipe takes one optimizer step, and where in its schedule it is."""

    parts: tb.TorchParts
    optimizer: torch.optim.Optimizer | torch_sharded.ShardedStep  # what steps: the optimizer, or each rank's share
    averager: tb.WeightAverager | None
    autocast: object
    local_batch: int
    total: int  # optimizer steps in the whole run

    def __post_init__(self) -> None:
        for group in self.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def take(self, net, x: torch.Tensor, y: torch.Tensor, step: int, indices: torch.Tensor,
             epoch: int) -> torch.Tensor:
        """Optimizer step ``step`` (0-based over the run) on normalised ``x``, the training set's images
        ``indices`` in ``epoch``; returns the summed loss."""
        factor = self.parts.schedule(step, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        if self.parts.augment is not None:
            x = self.parts.augment(x, indices, epoch)
        loss = tb.train_step(net, self.optimizer, x, y, self.autocast, self.parts.loss)
        if self.averager is not None:
            self.averager.update(step + 1, self.total)
        return loss


class TrainSplit:
    """The training split as the loop reads it: on the device whole when its pixels fit ``cfg.in_memory_mb``
    (indexed by a permutation per epoch), else, or when its shards are encoded, streamed from its shards batch by
    batch (``cluster.worker.stream``), each batch copied to the device as it is used."""

    def __init__(self, data_dir: Path, manifest: Manifest, cfg: TrainLoopConfig, ctx: WorkerContext) -> None:
        self.directory, self.manifest, self.seed, self.ctx = data_dir, manifest, cfg.seed, ctx
        self.shards = manifest.split_shards("train")
        self.count = manifest.counts["train"]
        self.streamed = streams(manifest, cfg.in_memory_mb)
        self.pinned = ctx.device.type == "cuda"
        if not self.streamed:
            x, y = read_whole(self.open, self.shards)
            self.x, self.y = (torch.from_numpy(np.ascontiguousarray(a)).to(ctx.device) for a in (x, y))

    def open(self, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
        return self.ctx.open_shard(self.directory, shard, self.manifest.channels)

    def read(self, piece: Piece, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A piece's images and labels; encoded images as ``epoch``'s random crops (None: whole)."""
        return read_piece(self.open, piece, Views(self.manifest.image_size, self.manifest.channels, self.seed, epoch))

    def leading(self, n: int) -> np.ndarray:
        """The split's first ``n`` images, in manifest order (the same on every rank)."""
        if not self.streamed:
            return self.x[:n].cpu().numpy()
        parts, left = [], n
        for shard in self.shards:
            if left <= 0:
                break
            parts.append(self.read(Piece(shard, 0, min(left, shard.count), 0))[0])
            left -= len(parts[-1])
        return np.concatenate(parts)

    def batches(self, epoch: int, batch: int):
        """This rank's ``(images, labels, indices)`` batches of ``epoch``, on the device."""
        ctx = self.ctx
        if not self.streamed:
            idx = _epoch_indices(self.count, self.seed, epoch, ctx).to(ctx.device)
            for i in range(0, len(idx), batch):
                j = idx[i:i + batch]
                yield self.x[j], self.y[j], j
            return
        pieces = epoch_pieces(self.shards, self.seed, epoch, ctx.rank, ctx.world_size)
        for x, y, idx in stream_batches(pieces, partial(self.read, epoch=epoch), batch, self.seed, epoch, ctx.rank):
            tensors = [torch.from_numpy(a) for a in (x, y, idx)]
            if self.pinned:  # page-locked: the copy to the GPU runs beside the step
                tensors = [t.pin_memory() for t in tensors]
            yield tuple(t.to(ctx.device, non_blocking=self.pinned) for t in tensors)


def run_epoch(net, steps: RecipeSteps, train: TrainSplit, val, normalize, autocast, cfg: TrainLoopConfig, epoch: int,
              ctx: WorkerContext) -> dict:
    """One pass over this rank's share of the training split, then validation; metrics are summed over all ranks."""
    t0 = time.perf_counter()
    per_rank = train.count // ctx.world_size
    per_epoch = -(-per_rank // steps.local_batch)
    loss_sum = torch.zeros((), device=ctx.device)
    seen = 0
    for k, (x, y, j) in enumerate(train.batches(epoch, steps.local_batch)):
        loss_sum += steps.take(net, normalize(x), y, (epoch - 1) * per_epoch + k, j, epoch)
        seen += len(y)
        ctx.progress(epoch, seen * ctx.world_size, per_rank * ctx.world_size, time.perf_counter() - t0)
    train_loss_sum = loss_sum.item()  # one host sync per epoch, not per step
    seconds = time.perf_counter() - t0
    model = net.module if hasattr(net, "module") else net
    val_loss, correct, seen_val = tb.eval_pass(model, *val, normalize, autocast)
    return epoch_metrics(epoch, seconds, _all_sum(
        [train_loss_sum, float(per_rank), val_loss, float(correct), float(seen_val)], ctx))


def train_on_ray(cfg: TrainLoopConfig, ctx: WorkerContext) -> list[dict]:
    """The loop on a Ray Train worker: the device is the one Ray assigned to this worker."""
    import ray.train.torch

    ctx.device = ray.train.torch.get_device()
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    return train_loop(cfg, ctx)


def main(argv: list[str] | None = None) -> None:
    """Run the loop without Ray: one process, or one per rank under torchrun."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared-data directory (see cluster.data)")
    ap.add_argument("--checkpoints", default=None, help="checkpoint folder (default: a temporary one)")
    for name, kind, default in (("epochs", int, 1), ("batch-size", int, 64), ("lr", float, 0.001),
                                ("seed", int, 0), ("in-memory-mb", int, 2048)):
        ap.add_argument(f"--{name}", type=kind, default=default)
    # fp32 unless asked: the benchmarks compare this default against their fp32 baselines
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--recipe", choices=RECIPES, default="article")
    ap.add_argument("--model", default="", help="a network of cluster.models instead of the recipe's own")
    ap.add_argument("--weights", default="", help="a state dict to start from (its head replaced for other classes)")
    ap.add_argument("--momentum", type=float, default=0.9)
    args = ap.parse_args(argv)
    cfg = TrainLoopConfig(data_dir=args.data, recipe=args.recipe, model=args.model, weights=args.weights,
                          epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, seed=args.seed, precision=args.precision,
                          channels_last=args.channels_last, use_gpu=torch.cuda.is_available(),
                          in_memory_mb=args.in_memory_mb)
    ctx = LocalContext(Path(args.checkpoints or tempfile.mkdtemp(prefix="trainflow-ckpt-")))
    if cfg.use_gpu:
        ctx.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(ctx.device)
    if ctx.world_size > 1:
        dist.init_process_group("nccl" if cfg.use_gpu else "gloo")
    try:
        train_loop(cfg, ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without the interpreter's teardown. A DDP model keeps its process group alive past
    # destroy_process_group (torch 2.14), so gloo's threads outlive it; one that touches Python while the
    # interpreter finalizes aborts the process ("terminate called without an active exception", exit -6)
    # after a run that succeeded. Everything the run writes is written and flushed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
