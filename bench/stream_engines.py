#!/usr/bin/env python3
"""Streaming a prepared training split, two ways, as JSON: trainflow's workers reading shards themselves
(``cluster.worker.stream``) against Ray Data (the shards read in ``map_batches``, batches from
``iter_batches`` with a local shuffle buffer, and ``streaming_split`` for two consumers).

For each image size it writes a prepared dataset of random pixels (``cluster.data.write_arrays``), then
per engine reports images/s over ``--epochs`` epochs with a consumer that only touches each batch
(what the data path alone can feed), the first epoch's time to its first batch, and whether a second
pass over the same epoch yields the same images in the same order (what an exact resume needs). The
two-consumer case splits the split between two threads of this process, as two ranks would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.data import load_shard, write_arrays  # noqa: E402
from cluster.worker.stream import epoch_pieces, read_piece, stream_batches  # noqa: E402

BATCH = 256


def make_dataset(directory: Path, images: int, size: int):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, images).astype(np.int64)
    return write_arrays(directory, {"train": (x, y)}, tuple(str(i) for i in range(10)))


def hand_epoch(directory: Path, manifest, epoch: int, rank: int = 0, world: int = 1):
    shards = manifest.split_shards("train")

    def read(piece):
        return read_piece(lambda shard: load_shard(directory, shard, 3, mmap=True), piece)

    yield from ((x, i) for x, _, i in stream_batches(epoch_pieces(shards, 0, epoch, rank, world), read, BATCH, 0,
                                                      epoch, rank))


def ray_dataset(directory: Path, manifest):
    import ray.data

    def load(batch: dict) -> dict:
        xs, ys, idx = [], [], []
        for name, offset in zip(batch["shard"], batch["offset"]):
            shard = next(s for s in manifest.shards if s.files[0] == name)
            x, y = load_shard(directory, shard, 3)
            xs.append(x)
            ys.append(y)
            idx.append(np.arange(offset, offset + len(y)))
        return {"x": np.concatenate(xs), "y": np.concatenate(ys), "index": np.concatenate(idx)}

    offsets = np.concatenate([[0], np.cumsum([s.count for s in manifest.shards])])
    items = [{"shard": s.files[0], "offset": int(o)} for s, o in zip(manifest.shards, offsets)]
    return ray.data.from_items(items).map_batches(load, batch_size=1)


def ray_epoch(dataset, epoch: int, window: int):
    for batch in dataset.iter_batches(batch_size=BATCH, batch_format="numpy", local_shuffle_buffer_size=window,
                                      local_shuffle_seed=epoch):
        yield batch["x"], batch["index"]


def timed(batches) -> dict:
    start = time.perf_counter()
    first, images, order, checksum = None, 0, [], 0
    for x, index in batches:
        if first is None:
            first = time.perf_counter() - start
        checksum += int(x[:, 0, 0, 0].sum())  # touch the batch, as a copy to a device would
        images += len(index)
        order.append(np.asarray(index))
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "first_batch_s": first,
            "order": np.concatenate(order) if order else np.zeros(0)}


def two_consumers(make_iters) -> dict:
    """Two threads each draining one iterator; seconds until both end and each one's image count."""
    results: list[dict] = [{}, {}]

    def drain(i: int, batches) -> None:
        results[i] = timed(batches)

    start = time.perf_counter()
    threads = [threading.Thread(target=drain, args=(i, it)) for i, it in enumerate(make_iters())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    seconds = time.perf_counter() - start
    images = sum(r.get("images", 0) for r in results)
    return {"images_per_s": round(images / seconds), "per_consumer": [r.get("images", 0) for r in results],
            "seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=["32:50000", "128:8000"], help="SIZE:IMAGES")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="stream-engines-") as tmp:
        for case in args.cases:
            size, images = map(int, case.split(":"))
            directory = Path(tmp) / f"{size}px"
            manifest = make_dataset(directory, images, size)
            window = max(BATCH, (256 << 20) // (size * size * 3))
            row = {"image_size": size, "images": images, "shards": len(manifest.shards)}
            for name, epoch_of in (("hand", lambda e: hand_epoch(directory, manifest, e)),
                                   ("ray_data", lambda e, ds=ray_dataset(directory, manifest): ray_epoch(ds, e, window))):
                runs = [timed(epoch_of(e)) for e in range(1, args.epochs + 1)]
                again = timed(epoch_of(args.epochs))
                total = sum(r["images"] for r in runs)
                row[name] = {"images_per_s": round(total / sum(r["seconds"] for r in runs)),
                             "first_batch_s": round(runs[0]["first_batch_s"], 3),
                             "same_order_when_repeated": bool(np.array_equal(runs[-1]["order"], again["order"]))}
            row["hand"]["two_ranks"] = two_consumers(
                lambda: [hand_epoch(directory, manifest, 1, rank, 2) for rank in range(2)])
            dataset = ray_dataset(directory, manifest)
            row["ray_data"]["two_ranks_streaming_split"] = two_consumers(
                lambda: [((b["x"], b["index"]) for b in split.iter_batches(batch_size=BATCH, batch_format="numpy"))
                         for split in dataset.streaming_split(2, equal=True)])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    ray.shutdown()
    print(json.dumps({"cpus": os.cpu_count(), "batch": BATCH, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
