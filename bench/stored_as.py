#!/usr/bin/env python3
"""Training shards as pixels or as encoded files (``--stored-as``), as JSON: what each costs to prepare and to
store, and how fast one training process can read an epoch of it.

Per dataset it prepares the training images both ways (``tasks.preprocess``, no Prefect, into a folder store),
then streams one epoch through ``cluster.worker.stream`` as a training worker does (one rank, shards read from
the local folder, encoded images decoded with their random-resized crops on ``DECODE_THREADS`` threads), with
a consumer that only touches each batch: what the data path alone can feed. Datasets: the real CIFAR-10
training JPEGs (32 px originals, prepared at 32 px; ``--cifar`` is the folder holding train.tar.gz) and
synthetic 256x256 JPEGs prepared at 224 px.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.data import load_shard, read_manifest  # noqa: E402
from cluster.worker.stream import DECODE_THREADS, Views, epoch_pieces, read_piece, stream_batches  # noqa: E402
from tasks.ingest import ingest  # noqa: E402
from tasks.preprocess import PreprocessConfig, preprocess  # noqa: E402
from tasks.store import open_store  # noqa: E402

from data_scale import synthetic_jpegs  # noqa: E402  (bench/, this script's folder)

BATCH = 256


def one_epoch(directory: Path) -> dict:
    """Images/s of one epoch of the training split streamed by one rank, and the seconds to its first batch."""
    manifest = read_manifest(directory)
    views = Views(manifest.image_size, manifest.channels, seed=0, epoch=1)
    read = lambda piece: read_piece(lambda s: load_shard(directory, s, manifest.channels, mmap=True),  # noqa: E731
                                    piece, views)
    pieces = epoch_pieces(manifest.split_shards("train"), 0, 1, 0, 1)
    start, first, seen, checksum = time.perf_counter(), None, 0, 0
    for x, _, _ in stream_batches(pieces, read, BATCH, 0, 1, 0):
        first = first or time.perf_counter() - start
        seen += len(x)
        checksum += int(x[:, 0, 0, 0].sum())  # touch the batch
    seconds = time.perf_counter() - start
    return {"images": seen, "images_per_s": round(seen / seconds, 1), "first_batch_s": round(first or 0, 3)}


def measure(name: str, source: str, image_size: int, work: Path) -> list[dict]:
    raw = ingest(source, work / "cache")
    rows = []
    for stored_as in ("pixels", "encoded"):
        store = work / f"{name}-{stored_as}"
        cfg = PreprocessConfig(image_size=image_size, stored_as=stored_as, val_fraction=0.0)
        t0 = time.perf_counter()
        ref = preprocess(raw, cfg, str(store))
        prepare_s = time.perf_counter() - t0
        folder = open_store(str(store)).local_dir(open_store(str(store)).key_of(ref.uri), work)
        manifest = read_manifest(folder)
        train_bytes = sum((folder / f).stat().st_size for s in manifest.split_shards("train") for f in s.files)
        rows.append({"dataset": name, "image_size": image_size, "stored_as": stored_as,
                     "train_images": ref.counts["train"], "train_shard_mb": round(train_bytes / 1e6, 1),
                     "prepare_s": round(prepare_s, 1), **one_epoch(folder)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", default=os.environ.get("TRAINFLOW_CIFAR10_DIR", ""),
                    help="folder with CIFAR-10's train.tar.gz (default $TRAINFLOW_CIFAR10_DIR; empty: skip)")
    ap.add_argument("--synthetic", type=int, default=4000, help="synthetic 256 px JPEGs (0: skip)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.cifar:
            rows += measure("cifar10-train", f"folder:{Path(args.cifar) / 'train.tar.gz'}", 32, work)
        if args.synthetic:
            rows += measure("synthetic-256px", f"folder:{synthetic_jpegs(work / 'jpegs', args.synthetic)}", 224, work)
    print(json.dumps({"machine": f"{platform.node()} ({os.cpu_count()} cores)", "decode_threads": DECODE_THREADS,
                      "batch": BATCH, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
