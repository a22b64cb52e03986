"""The per-worker TensorFlow training loop, independent of Ray.

A hand-written loop under ``tf.distribute.MultiWorkerMirroredStrategy``:
Keras 3's ``model.fit`` fails under that strategy with more than one worker
(keras-team/keras#20585, ray-project/ray#47464). The strategy is created
before any other TensorFlow work, with one replica per worker (one device:
the first GPU it sees, or the CPU); each worker reads its own part of the
epoch as a plain ``tf.data`` pipeline and hands each batch to its replica;
model and optimizer are built in the strategy's scope; one ``tf.function``
step calls ``strategy.run`` and scales the loss by the global batch. Ray (``cluster.execution.worker_entry``) supplies rank, world
size, reporting, checkpoints and ``TF_CONFIG``; without Ray::

    python -m cluster.tf.loop --data DIR --epochs 2    # one process, one worker
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cluster.tf import model as tfb
from cluster.config import TrainLoopConfig
from cluster.data import load_split, read_manifest
from cluster.frameworks import get_framework, load
from cluster.precision import describe, resolve
from cluster import models
from cluster.recipes import get_recipe
from cluster.worker.checkpoint import ModelSpec, write_predictions
from cluster.worker.context import LocalContext, WorkerContext, epoch_metrics
from cluster.worker.shards import epoch_shard
from cluster.worker.stream import Views, epoch_pieces, read_piece, read_whole, stream_batches, streams

__all__ = ["main", "train_loop", "train_on_ray"]


def _start(ctx: WorkerContext) -> tf.distribute.Strategy:
    """Thread pools sized to this worker's CPUs, then the strategy: both must precede any other TensorFlow work."""
    # Ray sets OMP_NUM_THREADS to the worker's CPUs, which TensorFlow ignores: left alone, every worker
    # on a node would start one thread per core of the node.
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    # at least two: a collective all-reduce waits on one inter-op thread while another runs its peer's half
    # (with one, two CPU workers trained several times slower: see docs/performance.md)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, min(4, threads)))
    # one all-reduce per step for all gradients (packed), not one per variable: each costs a round trip
    options = tf.distribute.experimental.CommunicationOptions(bytes_per_pack=64 << 20)
    # one device per worker (Ray gives each worker one GPU; a plain process on a machine with several takes the
    # first), so that a worker's batch is its replica's batch, with no distributed input pipeline in between
    gpus = tf.config.list_physical_devices("GPU")
    tf.config.set_visible_devices(gpus[:1], "GPU")
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)  # no TF_CONFIG: alone
    ctx.device = tf.config.list_logical_devices("GPU")[0].name if gpus else "cpu"
    if strategy.num_replicas_in_sync != ctx.world_size:
        raise RuntimeError(f"TF_CONFIG names {strategy.num_replicas_in_sync} replicas, "
                           f"but the worker group has {ctx.world_size} workers")
    return strategy


def train_loop(cfg: TrainLoopConfig, ctx: WorkerContext) -> list[dict]:
    """Train for ``cfg.epochs``, resuming from the context's checkpoint; returns the metric history."""
    strategy = _start(ctx)
    data_dir = Path(cfg.data_dir)
    recipe = get_recipe(cfg.recipe)
    parts: tfb.TensorFlowParts = load(recipe.parts["tensorflow"])(cfg)
    manifest = read_manifest(data_dir)
    spec = ModelSpec.from_manifest(cfg.network, manifest)
    shards = manifest.split_shards("train")
    n_train = manifest.counts["train"]
    open_shard = lambda shard: ctx.open_shard(data_dir, shard, manifest.channels)  # noqa: E731
    streamed = streams(manifest, cfg.in_memory_mb)
    if not streamed:
        x_train, y_train = read_whole(open_shard, shards)
    x_val, y_val = (a[ctx.rank::ctx.world_size] for a in load_split(data_dir, "val", mmap=True))
    keras.utils.set_random_seed(cfg.seed)  # identical initial weights on every rank
    with strategy.scope():
        model = models.build(spec, "tensorflow")
        if cfg.weights:  # a checkpoint restored below takes precedence: a resumed run continues its own weights
            fresh = tfb.load_starting_weights(model, Path(cfg.weights))
            ctx.say(f"starting from {Path(cfg.weights).name}" + (f"; new head: {', '.join(fresh)}" if fresh else ""))
        optimizer = parts.optimizer()
        optimizer.build(model.trainable_variables)
    start_epoch, history = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        if ctx.restore(Path(tmp)):
            with strategy.scope():
                tfb.load_checkpoint(Path(tmp), model, optimizer)
            _, start_epoch, history = tfb.read_state(Path(tmp))
            ctx.say(f"resuming from the checkpoint of epoch {start_epoch}")
    ctx.started(start_epoch)
    local_batch = cfg.local_batch_size(ctx.world_size)
    steps = _Steps(strategy, model, optimizer, ctx.world_size)
    workers = steps.placements(ctx)
    # this framework implements fp32 only: auto always resolves to it, whatever the hardware
    precision = resolve(cfg.precision, cfg.channels_last, framework=cfg.framework,
                        device_type="cpu" if ctx.device == "cpu" else "cuda")
    if ctx.rank == 0:
        print(f"global batch {cfg.batch_size} = {ctx.world_size} workers x {local_batch} per worker; "
              f"{n_train} training images{' streamed from their shards' if streamed else ''}; "
              f"{describe(precision)}", flush=True)

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        keras.utils.set_random_seed((cfg.seed * 100_003 + epoch) * 4_099 + ctx.rank)
        if streamed:
            pieces = epoch_pieces(shards, cfg.seed, epoch, ctx.rank, ctx.world_size)
            batches = partial(_streamed, pieces, open_shard, local_batch, cfg.seed, epoch, ctx.rank, manifest)
        else:
            shard = epoch_shard(n_train, cfg.seed, epoch, ctx.rank, ctx.world_size)
            batches = partial(in_memory_batches, x_train[shard], y_train[shard], local_batch)
        metrics = run_epoch(steps, batches, n_train // ctx.world_size, (x_val, y_val), local_batch, epoch, ctx)
        history.append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if ctx.rank == 0 and recipe.checkpoints_after(epoch, cfg.epochs):
                tfb.save_checkpoint(Path(tmp), model, optimizer, spec, epoch, history, workers, precision)
                if epoch == cfg.epochs:
                    write_predictions(Path(tmp), data_dir, tfb.predict, get_framework("tensorflow").export)
                ckpt = Path(tmp)
            ctx.report(metrics, ckpt)
    return history


class _Steps:
    """The compiled train step, eval step and cross-worker sum for one model, optimizer and strategy."""

    def __init__(self, strategy: tf.distribute.Strategy, model, optimizer, world_size: int) -> None:
        self.strategy, self.model, self.optimizer, self.world_size = strategy, model, optimizer, world_size
        self.train = tf.function(self._train)
        self.evaluate = tf.function(self._evaluate)
        self.all_sum = tf.function(self._all_sum)

    def _train(self, batch) -> tf.Tensor:
        """One SGD step on every worker; returns this worker's summed loss (no cross-worker sync for it)."""
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = self.model(tf.cast(x, tf.float32), training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
                # the mean over the global batch: the gradient all-reduce then sums the workers' shares
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=tf.shape(y)[0] * self.world_size)
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            return tf.reduce_sum(per_example)

        return tf.add_n(self.strategy.experimental_local_results(self.strategy.run(step, args=batch)))

    def _evaluate(self, x, y) -> tuple[tf.Tensor, tf.Tensor]:
        """Summed loss and number correct of one local batch (no replicas involved)."""
        logits = self.model(tf.cast(x, tf.float32), training=False)
        loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), y), tf.float64))
        return tf.reduce_sum(tf.cast(loss, tf.float64)), correct

    def _all_sum(self, values: tf.Tensor) -> tf.Tensor:
        # tf.identity places the value on the replica's device: the all-reduce fails on one that has none
        summed = self.strategy.run(lambda v: tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.identity(v)), args=(values,))
        return self.strategy.experimental_local_results(summed)[0]

    def sum_over_workers(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        return self.all_sum(tf.constant(values, dtype=tf.float64)).numpy().tolist()

    def placements(self, ctx: WorkerContext) -> list[dict]:
        """Every rank's placement, in rank order; only rank 0 needs them (it writes the checkpoints)."""
        # TensorFlow's collectives carry numbers, not objects: rank 0 learns the others' placements
        # through one all-reduce of encoded bytes, padded to a common length.
        import json

        mine = json.dumps(ctx.placement()).encode()
        width = 512
        if len(mine) > width:
            raise ValueError(f"placement record longer than {width} bytes: {mine[:80]!r}")
        table = np.zeros((ctx.world_size, width), dtype=np.float64)
        table[ctx.rank, :len(mine)] = np.frombuffer(mine, dtype=np.uint8)
        summed = np.asarray(self.sum_over_workers(table.ravel().tolist())).reshape(table.shape).astype(np.uint8)
        return [json.loads(bytes(row).rstrip(b"\0")) for row in summed]


def _without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A fixed prefetch of two batches, without tf.data's autotuning.

    An autotuned pipeline's optimiser thread wakes at doubling intervals, and releasing an epoch's iterator waited
    for its next wake-up, so epochs lasted until one (docs/performance.md, TensorFlow).
    ``distribute_datasets_from_function`` adds a per-device prefetch of its own that no option reaches, which is
    why the loop feeds its replica from this pipeline directly.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(2).with_options(options)


def in_memory_batches(x: np.ndarray, y: np.ndarray, batch: int) -> tf.data.Dataset:
    return _without_autotune(tf.data.Dataset.from_tensor_slices((x, y)).batch(batch))


def _streamed(pieces, open_shard, batch: int, seed: int, epoch: int, rank: int, manifest) -> tf.data.Dataset:
    """This rank's batches of the epoch read from the shards as they are used (``cluster.worker.stream``)."""
    size, channels = manifest.image_size, manifest.channels
    read = partial(read_piece, open_shard, views=Views(size, channels, seed, epoch))
    signature = (tf.TensorSpec((None, size, size, channels), tf.uint8), tf.TensorSpec((None,), tf.int64))
    return _without_autotune(tf.data.Dataset.from_generator(
        lambda: ((x, y) for x, y, _ in stream_batches(pieces, read, batch, seed, epoch, rank)),
        output_signature=signature))


def run_epoch(steps: _Steps, batches, per_rank: int, val: tuple[np.ndarray, np.ndarray], local_batch: int,
              epoch: int, ctx: WorkerContext) -> dict:
    """One pass over this rank's ``per_rank`` images, batched by ``batches`` (a function returning this worker's
    dataset: rank = TF task index, so TensorFlow shards nothing), then validation; metrics are summed over all
    ranks."""
    t0 = time.perf_counter()
    loss_sum = tf.zeros((), tf.float32)
    total = per_rank * ctx.world_size
    for i, batch in enumerate(batches()):
        loss_sum += steps.train(batch)
        ctx.progress(epoch, min((i + 1) * local_batch, per_rank) * ctx.world_size, total,
                     time.perf_counter() - t0)
    train_loss_sum = float(loss_sum.numpy())  # one host sync per epoch, not per step
    seconds = time.perf_counter() - t0
    val_loss, correct = 0.0, 0.0
    x_val, y_val = val
    for i in range(0, len(y_val), 512):
        batch_loss, batch_correct = steps.evaluate(x_val[i:i + 512], y_val[i:i + 512])
        val_loss, correct = val_loss + float(batch_loss), correct + float(batch_correct)
    return epoch_metrics(epoch, seconds, steps.sum_over_workers(
        [train_loss_sum, float(per_rank), val_loss, correct, float(len(y_val))]))


def train_on_ray(cfg: TrainLoopConfig, ctx: WorkerContext) -> list[dict]:
    """The loop on a Ray Train worker: ``TF_CONFIG`` was set by ``cluster.tf.ray_backend``'s backend."""
    # TensorFlow's absl puts a handler on the root logger, which then prints every INFO record of Ray Train
    # (a line per report per rank) that the run's LoggingConfig(log_level="WARNING") meant to keep quiet
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    return train_loop(cfg, ctx)


def main(argv: list[str] | None = None) -> None:
    """Run the loop without Ray, in this process."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared-data directory (see cluster.data)")
    ap.add_argument("--checkpoints", default=None, help="checkpoint folder (default: a temporary one)")
    for name, kind, default in (("epochs", int, 1), ("batch-size", int, 64), ("lr", float, 0.001), ("seed", int, 0),
                                ("in-memory-mb", int, 2048)):
        ap.add_argument(f"--{name}", type=kind, default=default)
    ap.add_argument("--model", default="", help="a network of cluster.models instead of the recipe's own")
    ap.add_argument("--weights", default="", help="a .keras file to start from (its head replaced for other classes)")
    args = ap.parse_args(argv)
    cfg = TrainLoopConfig(data_dir=args.data, framework="tensorflow", model=args.model, weights=args.weights,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          in_memory_mb=args.in_memory_mb)
    train_loop(cfg, LocalContext(Path(args.checkpoints or tempfile.mkdtemp(prefix="trainflow-ckpt-"))))


if __name__ == "__main__":
    main()
