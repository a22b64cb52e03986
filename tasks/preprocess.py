"""Stage 2, preprocess: decode every image exactly once into uint8 arrays.

Splits are cut here, seeded and stratified: a test split when the source has
none, and a validation split from train. Decoding runs in parallel over the
machine's cores. The output (see ``cluster.data``) goes to the store under
``prepared/<key>/`` with ``meta.json`` written last, so a reader never sees a
half-written dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import random
import signal
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from cluster.data import META, SPLITS, Meta, data_files, prepared_fingerprint, split_files
from cluster.errors import UserError
from cluster.execution.fanout import cluster_cpus, map_on_cluster
from cluster.execution.session import ray_session
from tasks.common import in_prefect_run, retry_unless_user_error
from tasks.images import channel_stats, decode_image, to_channels
from tasks.ingest import scan_split
from tasks.refs import PreparedData, RawData
from tasks.store import Store, open_store

Item = tuple[str, int]  # (image path, class index)
_PARALLEL_THRESHOLD = 2000  # below this, a process pool costs more than it saves


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    image_size: int = 32
    channels: str = "auto"  # auto | rgb | grayscale
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # only for sources without a test split
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    skip_bad_images: bool = False  # drop (and count) files that fail to decode instead of failing

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 512:
            raise UserError(f"image_size={self.image_size} is out of range; choose 8 to 512 pixels.")
        if self.channels not in ("auto", "rgb", "grayscale"):
            raise UserError(f"channels={self.channels!r} is unknown; choose auto, rgb or grayscale.")
        for name in ("limit_train", "limit_test"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise UserError(f"{name}={limit} must be at least 1, or unset to use every image.")
        if not 0.0 <= self.val_fraction < 0.5 or not 0.0 < self.test_fraction < 0.5:
            raise UserError("val_fraction must be in [0, 0.5) and test_fraction in (0, 0.5); adjust the data parameters.")


def stratified_split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Seeded split keeping each class's share: returns (kept, held_out)."""
    rng = random.Random(seed)
    kept: list[Item] = []
    held: list[Item] = []
    for label in sorted({y for _, y in items}):
        members = [it for it in items if it[1] == label]
        rng.shuffle(members)
        n_held = round(len(members) * fraction) if len(members) > 1 else 0
        if fraction > 0 and len(members) > 1:
            n_held = max(1, n_held)
        held += members[:n_held]
        kept += members[n_held:]
    return sorted(kept), sorted(held)


def subsample(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """A fixed random subset: ``random.Random(seed).sample(items, limit)``, the draw that
    ``../shared/bench/baseline_torch.py --limit`` makes over its (class, name)-sorted file list."""
    if limit is None or limit >= len(items):
        return items
    return random.Random(seed).sample(items, limit)


def plan_splits(raw: RawData, cfg: PreprocessConfig) -> dict[str, list[Item]]:
    """Decide which file goes to which split, before decoding anything."""
    items: dict[str, list[Item]] = {}
    for split, directory in raw.splits.items():
        by_class, _ = scan_split(Path(directory))
        items[split] = [(str(p), raw.classes.index(c)) for c in raw.classes for p in by_class[c]]
    if "all" in items:
        items["train"], items["test"] = stratified_split(items.pop("all"), cfg.test_fraction, cfg.seed)
    elif "test" not in items:
        items["train"], items["test"] = stratified_split(items["train"], cfg.test_fraction, cfg.seed)
    train = subsample(items["train"], cfg.limit_train, cfg.seed)
    test = subsample(items["test"], cfg.limit_test, cfg.seed)
    train, val = stratified_split(train, cfg.val_fraction, cfg.seed + 1)
    return {"train": train, "val": val, "test": test}


def count_train_images(raw: RawData, cfg: PreprocessConfig) -> int:
    """How many images the training split will hold, known before decoding any."""
    return len(plan_splits(raw, cfg)["train"])


Chunk = tuple[list[str], int, str | None]  # (files, image size, s3:// prefix the files are keys of, or None)
MapChunks = Callable[[Callable[[Chunk], Any], list[Chunk]], list[Any]]


def _decode_chunk(chunk: Chunk) -> tuple[np.ndarray, list[bool], list[tuple[int, str]]]:
    """Decode one chunk: local paths, or keys under an s3:// prefix read from the object store."""
    files, size, origin = chunk
    source = open_store(origin) if origin else None
    out = np.zeros((len(files), size, size, 3), dtype=np.uint8)
    gray: list[bool] = []
    bad: list[tuple[int, str]] = []
    for i, name in enumerate(files):
        try:
            out[i], is_gray = decode_image(io.BytesIO(source.get_bytes(name)) if source else name, size)
            gray.append(is_gray)
        except Exception as exc:  # PIL raises many types for bad files
            bad.append((i, f"{f'{origin}/' if origin else ''}{name} ({type(exc).__name__})"))
    return out, gray, bad


def _map_here(fn: Callable[[Chunk], Any], chunks: list[Chunk]) -> list[Any]:
    """Map over this machine's cores: a fork pool (children only run PIL, and start in milliseconds)."""
    if sum(len(files) for files, _, _ in chunks) < _PARALLEL_THRESHOLD or (os.cpu_count() or 1) == 1:
        return list(map(fn, chunks))
    with multiprocessing.get_context("fork").Pool(os.cpu_count(), initializer=_default_sigterm) as pool:
        return pool.map(fn, chunks)


def _default_sigterm() -> None:
    """A pool child dies quietly of the SIGTERM that ends the pool.

    Forked inside a flow run, it inherits Prefect's handler, which turns SIGTERM into a
    TerminationSignal traceback per child as the pool shuts down after a successful map.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def decode_images(paths: list[str], size: int, *, origin: str | None = None, map_chunks: MapChunks = _map_here,
                  parallelism: int | None = None) -> tuple[np.ndarray, bool, list[tuple[int, str]]]:
    """Decode and resize images to (N, size, size, 3) uint8, in chunks mapped by ``map_chunks``.

    ``paths`` are local files, or keys under the ``origin`` s3:// prefix. The
    result does not depend on how the chunks were mapped. Returns the array,
    whether every decodable image was grayscale, and the (index, description)
    of each file that could not be decoded (its row is zeros).
    """
    workers = parallelism or os.cpu_count() or 1
    step = max(64, len(paths) // (workers * 4) + 1)
    results = map_chunks(_decode_chunk, [(paths[i:i + step], size, origin) for i in range(0, len(paths), step)])
    bad = [(c * step + i, what) for c, (_, _, chunk_bad) in enumerate(results) for i, what in chunk_bad]
    images = np.concatenate([r[0] for r in results]) if results else np.zeros((0, size, size, 3), np.uint8)
    return images, all(g for _, gray, _ in results for g in gray), bad


Decode = Callable[[list[str], int], tuple[np.ndarray, bool, list[tuple[int, str]]]]


def cluster_decode(raw: RawData, log: Callable[[str], None]) -> Decode | None:
    """Decode as Ray tasks over the connected cluster, each reading its files from the object store.

    None when some file exists only on this machine (a dataset that is not a
    copy of an s3:// prefix, or one unpacked from an archive there).
    """
    if raw.mirror is None or not all(Path(d).is_relative_to(raw.mirror[0]) for d in raw.splits.values()):
        return None
    root, origin = raw.mirror

    def decode(paths: list[str], size: int) -> tuple[np.ndarray, bool, list[tuple[int, str]]]:
        keys = [Path(p).relative_to(root).as_posix() for p in paths]

        def map_chunks(fn, chunks):
            results, nodes = map_on_cluster(fn, chunks)
            log(f"decoded {len(paths)} images as {len(chunks)} Ray tasks on {nodes} node(s), read from {origin}")
            return results

        return decode_images(keys, size, origin=origin, map_chunks=map_chunks, parallelism=cluster_cpus())

    return decode


def prepare_arrays(raw: RawData, cfg: PreprocessConfig, decode: Decode = decode_images
                   ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, int]:
    """Decode every planned image once; return arrays per split, the channel count and how many were skipped.

    Raises:
        UserError: when images cannot be decoded (listing up to ten) and ``cfg.skip_bad_images`` is off.
    """
    plan = plan_splits(raw, cfg)
    if not plan["train"]:
        raise UserError(f"--dataset {raw.source!r} leaves no training images after the splits; add images.")
    paths = [p for s in SPLITS for p, _ in plan[s]]
    images, all_gray, bad = decode(paths, cfg.image_size)
    if bad and not cfg.skip_bad_images:
        raise UserError(f"{len(bad)} image(s) could not be decoded, e.g. {', '.join(w for _, w in bad[:10])}; "
                        "remove or fix them, or set skip_bad_images (--skip-bad-images) to leave them out.")
    channels = {"rgb": 3, "grayscale": 1}.get(cfg.channels, 1 if all_gray else 3)
    images = to_channels(images, channels)
    keep = np.ones(len(paths), dtype=bool)
    keep[[i for i, _ in bad]] = False
    arrays = {}
    start = 0
    for s in SPLITS:
        n = len(plan[s])
        mask = keep[start:start + n]
        labels = np.array([y for _, y in plan[s]], dtype=np.int64)
        arrays[s] = (images[start:start + n][mask], labels[mask])
        start += n
    if not len(arrays["train"][1]):
        raise UserError(f"--dataset {raw.source!r}: every training image failed to decode; check the files.")
    return arrays, channels, len(bad)


def prepared_from_meta(store: Store, prefix: str, meta: Meta, reused: bool) -> PreparedData:
    return PreparedData(uri=store.child_uri(prefix), fingerprint=meta.fingerprint, classes=meta.classes,
                        image_size=meta.image_size, channels=meta.channels, counts=meta.counts, mean=meta.mean,
                        std=meta.std, skipped_images=meta.skipped_images, reused=reused)


def write_prepared(arrays: dict[str, tuple[np.ndarray, np.ndarray]], meta_fields: dict, store_uri: str,
                   prefix: str) -> PreparedData:
    """Save the arrays to the store, fingerprint them, and write ``meta.json`` last."""
    store = open_store(store_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for split, (x, y) in arrays.items():
            for name, array in zip(split_files(split), (x, y)):
                np.save(Path(tmp) / name, array)
        fingerprint = prepared_fingerprint(Path(tmp))
        for name in data_files():
            store.put_file(f"{prefix}/{name}", Path(tmp) / name)
    meta = Meta(fingerprint=fingerprint, **meta_fields)
    store.put_bytes(f"{prefix}/{META}", meta.to_json().encode())
    return prepared_from_meta(store, prefix, meta, reused=False)


def prepared_prefix(raw: RawData, cfg: PreprocessConfig) -> str:
    """Where the prepared form of ``raw`` under ``cfg`` lives in a store: named by both, so it is content-addressed."""
    return "prepared/" + hashlib.sha256(json.dumps([raw.fingerprint, asdict(cfg)], sort_keys=True).encode()
                                        ).hexdigest()[:16]


def preprocess(raw: RawData, cfg: PreprocessConfig, store_uri: str, ray_address: str | None = None,
               log: Callable[[str], None] = lambda m: None) -> PreparedData:
    """Decode ``raw`` into prepared arrays in the store at ``store_uri``.

    When the store already holds them (its ``meta.json`` is written last, so it
    means complete), they are returned as they are, with ``reused`` set. The
    check reads the store itself, so a wiped store is simply prepared again.
    With the ``ray_address`` of a cluster and a dataset in an object store,
    the decoding runs as Ray tasks on the cluster's nodes; the arrays are the
    same bytes either way.
    """
    store = open_store(store_uri)
    prefix = prepared_prefix(raw, cfg)
    if store.exists(f"{prefix}/{META}"):
        return prepared_from_meta(store, prefix, Meta.from_json(store.get_bytes(f"{prefix}/{META}").decode()), True)
    decode = cluster_decode(raw, log) if ray_address else None
    if decode is None:
        arrays, channels, skipped = prepare_arrays(raw, cfg)
    else:
        with ray_session(ray_address):
            arrays, channels, skipped = prepare_arrays(raw, cfg, decode)
    mean, std = channel_stats(arrays["train"][0])
    fields = dict(classes=raw.classes, image_size=cfg.image_size, channels=channels,
                  counts={s: len(y) for s, (_, y) in arrays.items()}, mean=mean, std=std, skipped_images=skipped)
    return write_prepared(arrays, fields, store_uri, prefix)


@task(name="preprocess", task_run_name="preprocess {raw.source}", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_unless_user_error)
def preprocess_task(raw: RawData, cfg: PreprocessConfig, store: str, ray_address: str | None = None) -> PreparedData:
    """Prefect task: decode the raw images once into prepared arrays in ``store`` (or find them there).

    ``ray_address``: a cluster this run trains on; an object-store dataset is then decoded on its nodes.
    """
    log = get_run_logger() if in_prefect_run() else logging.getLogger(__name__)  # a bare .fn call has no run
    prepared = preprocess(raw, cfg, store, ray_address, log.info)
    if prepared.skipped_images:
        log.warning("left out %d image(s) that could not be decoded (skip_bad_images)", prepared.skipped_images)
    return prepared
