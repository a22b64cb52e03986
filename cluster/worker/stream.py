"""Which images each rank reads in an epoch, and in what order, when the training split is streamed from
its shards instead of held in memory (no Ray, no framework).

Per epoch, the split's shards are put in an order drawn from (seed, epoch) and laid end to end; rank
``r`` of ``w`` reads the ``r``-th of ``w`` equal runs of that sequence (the last ``n mod w`` images are
left out, as the in-memory path leaves them out), so that every rank takes the same number of steps
and reads only about ``1/w`` of the shards. Within its run, a rank shuffles through a window of
images drawn from (seed, epoch, rank). A shard of encoded images is decoded as it is read, each image
a random-resized crop drawn from (seed, epoch, its index in the split). Everything is a function of
(seed, epoch, rank): a resumed epoch reads exactly what the interrupted one would have.
"""

from __future__ import annotations

import io
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cluster.data import Box, EncodedImages, Manifest, Shard, decode_file, to_channels

WINDOW_BYTES = 256 << 20  # the shuffle window's pixels: big enough to mix several shards, bounded in memory
MIN_WINDOW_IMAGES = 1024


@dataclass(frozen=True)
class Piece:
    """Images ``start`` to ``stop`` of one shard, whose first image is image ``offset`` of the split."""

    shard: Shard
    start: int
    stop: int
    offset: int


CROP_SCALE = (0.25, 1.0)  # a random-resized crop covers this share of the image's area ...
CROP_RATIO = (3 / 4, 4 / 3)  # ... at this aspect ratio (drawn log-uniformly), as torchvision's RandomResizedCrop
DECODE_THREADS = min(4, os.cpu_count() or 1)  # Pillow decodes and resizes without the GIL


@dataclass(frozen=True)
class Views:
    """How encoded images become a piece's pixels: ``size`` square with ``channels``; a random-resized crop per
    image drawn from (``seed``, ``epoch``, its index in the split), or the whole image when ``epoch`` is None."""

    size: int
    channels: int
    seed: int = 0
    epoch: int | None = None


def crop_box(width: int, height: int, rng: np.random.Generator) -> Box:
    """A random-resized crop's region of a ``width`` x ``height`` image (torchvision's draw: ten tries, then the
    whole image)."""
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return 0, 0, width, height


def decode_views(images: EncodedImages, start: int, stop: int, first: int, views: Views) -> np.ndarray:
    """Images ``start`` to ``stop`` of an encoded shard, decoded as ``views`` says; ``first`` is image
    ``start``'s index in the split."""
    def one(k: int) -> np.ndarray:
        crop = None
        if views.epoch is not None:
            rng = np.random.default_rng([views.seed, views.epoch, first + k, 0xC409])
            crop = lambda width, height: crop_box(width, height, rng)  # noqa: E731
        return decode_file(io.BytesIO(images.file(start + k)), views.size, crop)[0]

    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        pixels = list(pool.map(one, range(stop - start)))
    out = np.stack(pixels) if pixels else np.zeros((0, views.size, views.size, 3), np.uint8)
    return to_channels(out, views.channels)


def read_piece(open_shard: Callable[[Shard], tuple[np.ndarray | EncodedImages, np.ndarray]], piece: Piece,
               views: Views | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A piece's images and labels, copied out of its shard (opened by ``open_shard``, e.g. as memory maps);
    encoded images decoded as ``views`` says."""
    x, y = open_shard(piece.shard)
    labels = np.ascontiguousarray(y[piece.start:piece.stop])
    if isinstance(x, EncodedImages):
        if views is None:
            raise ValueError("an encoded shard needs Views to be decoded")
        return decode_views(x, piece.start, piece.stop, piece.offset + piece.start, views), labels
    return np.ascontiguousarray(x[piece.start:piece.stop]), labels


def epoch_pieces(shards: list[Shard], seed: int, epoch: int, rank: int, world_size: int) -> list[Piece]:
    """The runs of shards rank ``rank`` reads in ``epoch``, in reading order."""
    offsets = np.concatenate([[0], np.cumsum([s.count for s in shards])])
    per_rank = int(offsets[-1]) // world_size
    low, high = rank * per_rank, (rank + 1) * per_rank
    pieces, position = [], 0
    for i in np.random.default_rng(seed * 100_003 + epoch).permutation(len(shards)):
        shard = shards[i]
        start, stop = max(low - position, 0), min(high - position, shard.count)
        if start < stop:
            pieces.append(Piece(shard, start, stop, int(offsets[i])))
        position += shard.count
    return pieces


def window_images(image_bytes: int, batch: int) -> int:
    """How many images the shuffle window holds: :data:`WINDOW_BYTES` of them, at least a batch and
    :data:`MIN_WINDOW_IMAGES`."""
    return max(batch, MIN_WINDOW_IMAGES, WINDOW_BYTES // max(image_bytes, 1))


def stream_batches(pieces: list[Piece], read: Callable[[Piece], tuple[np.ndarray, np.ndarray]], batch: int,
                   seed: int, epoch: int, rank: int, *, window: int | None = None,
                   prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(images, labels, indices in the split)`` batches of ``batch`` (the last one smaller) over ``pieces``.

    ``read`` returns a piece's images and labels; it runs on a background thread, ``prefetch`` pieces ahead
    of the batches being used, so that reading (from the node's cache or the store) overlaps training.
    """
    rng = np.random.default_rng([seed, epoch, rank, 0x5EED])
    ahead: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    stop = threading.Event()

    def hand(item) -> bool:
        """Queue ``item`` for the consumer unless it has stopped listening."""
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for piece in pieces:
                x, y = read(piece)
                if not hand((np.asarray(x), np.asarray(y),
                             np.arange(piece.offset + piece.start, piece.offset + piece.stop))):
                    return
            hand(None)
        except BaseException as exc:  # handed to the consumer, which raises it
            hand(exc)

    thread = threading.Thread(target=reader, name="shard-prefetch", daemon=True)
    thread.start()
    held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    count, done = 0, False
    limit = window or MIN_WINDOW_IMAGES
    try:
        while not done:
            item = ahead.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                done = True
            else:
                held.append(item)
                count += len(item[1])
                if window is None and len(held) == 1:  # sized by the first piece's images
                    limit = window_images(item[0][0].nbytes if len(item[0]) else 1, batch)
            if count < limit and not done:
                continue
            x, y, idx = (np.concatenate(parts) for parts in zip(*held)) if held else (None, None, None)
            held, count = [], 0
            if x is None:
                break
            order = rng.permutation(len(y))
            full = len(order) if done else len(order) - len(order) % batch  # the rest waits for the next window
            for i in range(0, full, batch):
                j = order[i:i + batch]
                yield x[j], y[j], idx[j]
            if full < len(order):
                rest = order[full:]
                held, count = [(x[rest], y[rest], idx[rest])], len(rest)
    finally:
        stop.set()


def streams(manifest: Manifest, in_memory_mb: int) -> bool:
    """Whether training streams the split from its shards: when they are encoded (each epoch new crops), or
    their pixels exceed ``in_memory_mb`` (TrainLoopConfig's); else the split is held in memory."""
    return manifest.encoded("train") or manifest.pixel_bytes("train") > in_memory_mb << 20


def steps_per_epoch(shards: list[Shard], world_size: int, batch: int) -> int:
    """Batches each rank takes per epoch (the same on every rank)."""
    return -(-(sum(s.count for s in shards) // world_size) // batch)


def read_whole(open_shard: Callable[[Shard], tuple[np.ndarray, np.ndarray]], shards: list[Shard]
               ) -> tuple[np.ndarray, np.ndarray]:
    """A split's shards read through ``open_shard`` and laid end to end, for a split held in memory."""
    parts = [open_shard(shard) for shard in shards]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])
