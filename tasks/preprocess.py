"""Stage 2, preprocess: decode every image exactly once into shards of uint8 pixels.

Splits are cut here, seeded and stratified: a test split when the source has
none, and a validation split from train. Each split is cut into shards of a
fixed number of images; worker processes (this machine's cores, or Ray tasks on
a cluster's nodes for a dataset in an object store) each decode a shard and
write it straight into the store under ``prepared/<key>/``, reporting back only
its per-channel sums. The manifest (see ``cluster.data``) is written last, so a
reader never sees a half-written dataset, and no process holds the whole of it.
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
import socket
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from cluster.data import (FORMAT, MANIFEST, SPLITS, ChannelSums, EncodedImages, Manifest, Shard, fingerprint,
                          images_per_shard, shard_bytes)
from cluster.errors import UserError
from cluster.execution.fanout import map_on_cluster
from cluster.execution.session import ray_session
from tasks.common import in_prefect_run, retry_unless_user_error
from tasks.images import decode_image, downscaled, to_channels
from tasks.ingest import scan_split
from tasks.refs import PreparedData, RawData
from tasks.sources.folder import listing_fingerprint, s3_rows
from tasks.store import Store, open_store

Item = tuple[str, int]  # (image path, class index)
_PARALLEL_THRESHOLD = 2000  # below this, a process pool costs more than it saves
_FETCH_THREADS = 8  # objects read ahead from an object store by each decoding process


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
    stored_as: str = "pixels"  # the training split's shards: pixels, or encoded (decoded with random crops)
    max_side: int = 0  # encoded: larger images are shrunk to this longer side; 0: twice image_size

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 512:
            raise UserError(f"image_size={self.image_size} is out of range; choose 8 to 512 pixels.")
        if self.channels not in ("auto", "rgb", "grayscale"):
            raise UserError(f"channels={self.channels!r} is unknown; choose auto, rgb or grayscale.")
        if self.stored_as not in ("pixels", "encoded"):
            raise UserError(f"stored_as={self.stored_as!r} is unknown; choose pixels or encoded.")
        if self.max_side and self.max_side < self.image_size:
            raise UserError(f"max_side={self.max_side} is below image_size={self.image_size}; choose at least "
                            "the image size, or 0 for twice it.")
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
    """Decide which file goes to which split, and in what order, before decoding anything: val and test in
    file order, train shuffled (seeded)."""
    items: dict[str, list[Item]] = {}
    for split, directory in raw.splits.items():
        by_class, _ = scan_split(directory)
        items[split] = [(str(p), raw.classes.index(c)) for c in raw.classes for p in by_class[c]]
    if "all" in items:
        items["train"], items["test"] = stratified_split(items.pop("all"), cfg.test_fraction, cfg.seed)
    elif "test" not in items:
        items["train"], items["test"] = stratified_split(items["train"], cfg.test_fraction, cfg.seed)
    train = subsample(items["train"], cfg.limit_train, cfg.seed)
    test = subsample(items["test"], cfg.limit_test, cfg.seed)
    train, val = stratified_split(train, cfg.val_fraction, cfg.seed + 1)
    # in a seeded random order, so that each training shard (and each rank's run of shards, when streamed) is a
    # sample of every class, not a run of one: the splits' files come sorted, class by class
    random.Random(cfg.seed + 2).shuffle(train)
    return {"train": train, "val": val, "test": test}


def count_train_images(raw: RawData, cfg: PreprocessConfig) -> int:
    """How many images the training split will hold, known before decoding any."""
    return len(plan_splits(raw, cfg)["train"])


Chunk = tuple[list[str], int, str | None]  # (files, image size, s3:// prefix the files are keys of, or None)


def _decode_chunk(chunk: Chunk) -> tuple[np.ndarray, list[bool], list[tuple[int, str]]]:
    """Decode one chunk: local paths, or keys under an s3:// prefix."""
    files, size, origin = chunk
    out, gray, bad, _ = _decode_files(files, size, origin)
    return out, gray, bad


def _decode_files(files: list[str], size: int, origin: str | None, keep_max_side: int | None = None
                  ) -> tuple[np.ndarray, list[bool], list[tuple[int, str]], list[bytes]]:
    """Decode local paths, or keys under an s3:// prefix, which a few threads fetch from the object store ahead
    of the decoding: (pixels, which were gray, (index, description) of the undecodable, and with
    ``keep_max_side`` each decodable file as it is kept for training, see :func:`downscaled`)."""
    out = np.zeros((len(files), size, size, 3), dtype=np.uint8)
    gray: list[bool] = []
    bad: list[tuple[int, str]] = []
    kept: list[bytes] = []
    with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
        read = _fetcher(open_store(origin).get_bytes) if origin else _fetcher(lambda p: Path(p).read_bytes())
        sources = pool.map(read, files) if origin or keep_max_side else iter(files)
        for i, name in enumerate(files):
            try:
                source = next(sources)
                if isinstance(source, Exception):
                    raise source
                out[i], is_gray = decode_image(source, size)
                if keep_max_side:
                    kept.append(downscaled(source.getvalue(), keep_max_side))
                gray.append(is_gray)
            except Exception as exc:  # PIL raises many types for bad files
                bad.append((i, f"{f'{origin}/' if origin else ''}{name} ({type(exc).__name__})"))
    return out, gray, bad, kept


def _fetcher(read: Callable[[str], bytes]) -> Callable[[str], io.BytesIO | Exception]:
    """Reads one file as a file for Pillow, or returns (to be raised in order) what reading it raised."""
    def fetch(name: str) -> io.BytesIO | Exception:
        try:
            return io.BytesIO(read(name))
        except Exception as exc:
            return exc
    return fetch


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


def decode_images(paths: list[str], size: int) -> tuple[np.ndarray, bool, list[tuple[int, str]]]:
    """Decode and resize local images to one (N, size, size, 3) uint8 array, in chunks over this machine's cores:
    for a handful of images held at once (``trainflow predict``'s), not a dataset.

    Returns the array, whether every decodable image was grayscale, and the
    (index, description) of each file that could not be decoded (its row is zeros).
    """
    step = max(64, len(paths) // ((os.cpu_count() or 1) * 4) + 1)
    results = _map_here(_decode_chunk, [(paths[i:i + step], size, None) for i in range(0, len(paths), step)])
    bad = [(c * step + i, what) for c, (_, _, chunk_bad) in enumerate(results) for i, what in chunk_bad]
    images = np.concatenate([r[0] for r in results]) if results else np.zeros((0, size, size, 3), np.uint8)
    return images, all(g for _, gray, _ in results for g in gray), bad


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """One shard to decode and write: a run of one split's planned images."""

    split: str
    index: int
    files: list[str]  # local paths, or keys under ``origin``
    labels: list[int]
    image_size: int
    channels: str  # the PreprocessConfig's: auto, rgb or grayscale
    skip_bad_images: bool
    store: str  # the store's URI; the shard goes under ``prefix`` there
    prefix: str
    origin: str | None = None  # the s3:// prefix the files are keys of
    encoded_max_side: int | None = None  # keep the files encoded, shrunk to this side, instead of pixels


@dataclass(frozen=True, kw_only=True)
class ShardDone:
    """What a decoding worker reports of its shard: never the pixels, only their sums."""

    shard: Shard | None  # None when bad images stopped it (and nothing was written)
    sums: ChannelSums | None
    all_gray: bool
    bad: list[str]


def channel_count(mode: str, all_gray: bool) -> int:
    """Channels that ``mode`` (PreprocessConfig.channels) keeps: 3 for rgb, 1 for grayscale, auto: 1 if all gray."""
    return {"rgb": 3, "grayscale": 1}.get(mode, 1 if all_gray else 3)


def write_shard(job: ShardJob) -> ShardDone:
    """Decode one shard's images, write its files straight into the store, and report its sums.

    An ``auto``-channel shard of grayscale images is stored with one channel (see ``cluster.data``).
    """
    out, gray, failed, kept = _decode_files(job.files, job.image_size, job.origin, job.encoded_max_side)
    bad = [what for _, what in failed]
    keep = np.ones(len(job.files), dtype=bool)
    keep[[i for i, _ in failed]] = False
    all_gray = all(gray)
    if bad and not job.skip_bad_images:
        return ShardDone(shard=None, sums=None, all_gray=all_gray, bad=bad)
    channels = channel_count(job.channels, all_gray)
    x = to_channels(out[keep] if bad else out, channels)
    y = np.asarray(job.labels, dtype=np.int64)[keep]
    files, digest = shard_bytes(EncodedImages.of(kept) if job.encoded_max_side else x, y)
    shard = Shard(split=job.split, index=job.index, count=len(y), channels=channels, sha256=digest,
                  writer=socket.gethostname(), encoded=bool(job.encoded_max_side))
    store = open_store(job.store)
    for name, data in zip(shard.files, files):
        store.put_bytes(f"{job.prefix}/{name}", data)
    return ShardDone(shard=shard, sums=ChannelSums.of(x), all_gray=all_gray, bad=bad)


def shard_jobs(raw: RawData, cfg: PreprocessConfig, store_uri: str, prefix: str) -> list[ShardJob]:
    """The planned splits cut into shards of :func:`images_per_shard` images, in manifest order.

    Files of a dataset read in place from an s3:// prefix are named by their keys there, so that
    workers on any node read them.

    Raises:
        UserError: when the splits leave no training images, or an object-store dataset changed since ingest.
    """
    if raw.origin and listing_fingerprint(s3_rows(raw.origin)) != raw.fingerprint:
        raise UserError(f"--dataset {raw.source!r} changed since it was ingested (its listing differs); run again "
                        "once it is complete.")
    plan = plan_splits(raw, cfg)
    if not plan["train"]:
        raise UserError(f"--dataset {raw.source!r} leaves no training images after the splits; add images.")
    origin = raw.origin
    if origin:
        plan = {s: [(p[len(origin) + 1:], y) for p, y in items] for s, items in plan.items()}
    step = images_per_shard(cfg.image_size)
    encoded = (cfg.max_side or 2 * cfg.image_size) if cfg.stored_as == "encoded" else None
    return [ShardJob(split=split, index=i // step, files=[p for p, _ in items[i:i + step]],
                     labels=[y for _, y in items[i:i + step]], image_size=cfg.image_size, channels=cfg.channels,
                     skip_bad_images=cfg.skip_bad_images, store=store_uri, prefix=prefix, origin=origin,
                     encoded_max_side=encoded if split == "train" else None)
            for split, items in plan.items() for i in range(0, len(items), step)]


def _write_here(jobs: list[ShardJob]) -> Iterator[tuple[str, ShardDone]]:
    """Write the shards with this machine's cores: a fork pool (children only run PIL and the store's client)."""
    host = socket.gethostname()
    if sum(len(j.files) for j in jobs) < _PARALLEL_THRESHOLD or (os.cpu_count() or 1) == 1:
        yield from ((host, write_shard(job)) for job in jobs)
        return
    with multiprocessing.get_context("fork").Pool(os.cpu_count(), initializer=_default_sigterm) as pool:
        yield from ((host, done) for done in pool.imap(write_shard, jobs))


def _write_on_cluster(jobs: list[ShardJob], log: Callable[[str], None]) -> Iterator[tuple[str, ShardDone]]:
    """Write the shards as Ray tasks spread over the connected cluster's nodes, each reading from the store."""
    results = map_on_cluster(write_shard, jobs)
    log(f"decoded {sum(len(j.files) for j in jobs)} images into {len(jobs)} shards as Ray tasks on "
        f"{len({node for node, _ in results})} node(s), read from {jobs[0].origin}")
    yield from ((f"{done.shard.writer if done.shard else '?'} (Ray node {node[:12]})", done) for node, done in results)


def _forget(store: Store, prefix: str) -> None:
    """Remove what a failed preparation wrote: shards without a manifest are nobody's."""
    for key in store.list(prefix):
        store.delete(key)


def write_prepared(raw: RawData, cfg: PreprocessConfig, store_uri: str, prefix: str, *, on_cluster: bool = False,
                   log: Callable[[str], None] = lambda m: None) -> Manifest:
    """Decode every planned image once into shards in the store, then write the manifest last.

    Each worker writes its own shards; this process only merges their sums, so its memory does not
    grow with the images' size or number.

    Raises:
        UserError: when images cannot be decoded (listing up to ten) and ``cfg.skip_bad_images`` is off, or when
            every training image fails to decode; nothing is left in the store then.
    """
    jobs = shard_jobs(raw, cfg, store_uri, prefix)
    store = open_store(store_uri)
    shards: list[Shard] = []
    sums: list[ChannelSums] = []
    bad: list[str] = []
    all_gray = True
    try:
        written = _write_on_cluster(jobs, log) if on_cluster and jobs[0].origin else _write_here(jobs)
        for writer, done in written:
            bad += done.bad
            if done.shard is not None:
                all_gray &= done.all_gray
                shards.append(replace(done.shard, writer=writer))
                if done.shard.split == "train":
                    sums.append(done.sums)
        if bad and not cfg.skip_bad_images:
            raise UserError(f"{len(bad)} image(s) could not be decoded, e.g. {', '.join(bad[:10])}; remove or fix them, "
                            "or set skip_bad_images (--skip-bad-images) to leave them out.")
        counts = {split: sum(s.count for s in shards if s.split == split) for split in SPLITS}
        if not counts["train"]:
            raise UserError(f"--dataset {raw.source!r}: every training image failed to decode; check the files.")
    except BaseException:
        _forget(store, prefix)
        raise
    channels = channel_count(cfg.channels, all_gray)
    mean, std = sum((s.widened(channels) for s in sums[1:]), sums[0].widened(channels)).stats()
    manifest = Manifest(classes=raw.classes, image_size=cfg.image_size, channels=channels, counts=counts, mean=mean,
                        std=std, shards=tuple(shards), fingerprint=fingerprint(shards), skipped_images=len(bad))
    store.put_bytes(f"{prefix}/{MANIFEST}", manifest.to_json().encode())
    return manifest


def prepared_ref(store: Store, prefix: str, manifest: Manifest, reused: bool) -> PreparedData:
    return PreparedData(uri=store.child_uri(prefix), fingerprint=manifest.fingerprint, classes=manifest.classes,
                        image_size=manifest.image_size, channels=manifest.channels, counts=manifest.counts,
                        mean=manifest.mean, std=manifest.std, skipped_images=manifest.skipped_images, reused=reused)


def prepared_prefix(raw: RawData, cfg: PreprocessConfig) -> str:
    """Where the prepared form of ``raw`` under ``cfg`` lives in a store: named by both and the format's version,
    so it is content-addressed."""
    key = [raw.fingerprint, asdict(cfg), FORMAT]
    return "prepared/" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()
                                        ).hexdigest()[:16]


def preprocess(raw: RawData, cfg: PreprocessConfig, store_uri: str, ray_address: str | None = None,
               log: Callable[[str], None] = lambda m: None) -> PreparedData:
    """Decode ``raw`` into prepared shards in the store at ``store_uri``.

    When the store already holds them (its manifest is written last, so it
    means complete), they are returned as they are, with ``reused`` set. The
    check reads the store itself, so a wiped store is simply prepared again.
    With the ``ray_address`` of a cluster and a dataset in an object store,
    the shards are decoded and written by Ray tasks on the cluster's nodes;
    they are the same bytes either way.
    """
    store = open_store(store_uri)
    prefix = prepared_prefix(raw, cfg)
    if store.exists(f"{prefix}/{MANIFEST}"):
        return prepared_ref(store, prefix, Manifest.from_json(store.get_bytes(f"{prefix}/{MANIFEST}").decode()), True)
    if ray_address and raw.origin:
        with ray_session(ray_address):
            manifest = write_prepared(raw, cfg, store_uri, prefix, on_cluster=True, log=log)
    else:
        manifest = write_prepared(raw, cfg, store_uri, prefix, log=log)
    return prepared_ref(store, prefix, manifest, reused=False)


@task(name="preprocess", task_run_name="preprocess {raw.source}", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=retry_unless_user_error)
def preprocess_task(raw: RawData, cfg: PreprocessConfig, store: str, ray_address: str | None = None) -> PreparedData:
    """Prefect task: decode the raw images once into prepared shards in ``store`` (or find them there).

    ``ray_address``: a cluster this run trains on; an object-store dataset is then decoded on its nodes.
    """
    log = get_run_logger() if in_prefect_run() else logging.getLogger(__name__)  # a bare .fn call has no run
    prepared = preprocess(raw, cfg, store, ray_address, log.info)
    if prepared.skipped_images:
        log.warning("left out %d image(s) that could not be decoded (skip_bad_images)", prepared.skipped_images)
    return prepared
