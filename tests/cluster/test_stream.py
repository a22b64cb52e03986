"""Streaming a split from its shards: each rank's share, the order, the window, the prefetching reader."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.data import Shard
from cluster.worker.stream import epoch_pieces, steps_per_epoch, stream_batches

COUNTS = [100, 100, 100, 37]  # the last shard of a split is the short one


def shards(counts=COUNTS) -> list[Shard]:
    return [Shard(split="train", index=i, count=n, channels=3, sha256=f"{i:064x}", writer="")
            for i, n in enumerate(counts)]


def split_images(counts=COUNTS) -> tuple[np.ndarray, np.ndarray]:
    """Image i is a 1x1x1 pixel holding i % 251 and labelled i, so every image says where it came from."""
    n = sum(counts)
    return (np.arange(n) % 251).astype(np.uint8).reshape(n, 1, 1, 1), np.arange(n, dtype=np.int64)


def reader(counts=COUNTS):
    x, y = split_images(counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    return lambda p: (x[starts[p.shard.index] + p.start:starts[p.shard.index] + p.stop],
                      y[starts[p.shard.index] + p.start:starts[p.shard.index] + p.stop])


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_read_disjoint_equal_runs_that_cover_all_but_the_remainder(world_size):
    taken = []
    for rank in range(world_size):
        pieces = epoch_pieces(shards(), seed=1, epoch=2, rank=rank, world_size=world_size)
        mine = [p.offset + i for p in pieces for i in range(p.start, p.stop)]
        assert len(mine) == sum(COUNTS) // world_size
        assert {p.shard.index for p in pieces} != set(range(len(COUNTS))) or world_size == 1  # a part of the shards
        taken += mine
    assert len(set(taken)) == len(taken)
    assert len(taken) == sum(COUNTS) - sum(COUNTS) % world_size


def test_the_shard_order_is_a_function_of_seed_and_epoch():
    order = lambda seed, epoch: [p.shard.index for p in epoch_pieces(shards(), seed, epoch, 0, 1)]  # noqa: E731
    assert order(0, 1) == order(0, 1)
    assert len({tuple(order(0, e)) for e in range(1, 8)}) > 1
    assert sorted(order(3, 5)) == list(range(len(COUNTS)))


@pytest.mark.parametrize("window", [None, 64, 10_000])
def test_batches_hold_each_image_of_the_rank_once_with_its_label_and_index(window):
    pieces = epoch_pieces(shards(), seed=0, epoch=1, rank=1, world_size=2)
    batches = list(stream_batches(pieces, reader(), batch=16, seed=0, epoch=1, rank=1, window=window))
    assert len(batches) == steps_per_epoch(shards(), world_size=2, batch=16)
    assert [len(y) for _, y, _ in batches[:-1]] == [16] * (len(batches) - 1)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    idx = np.concatenate([b[2] for b in batches])
    assert np.array_equal(y, idx) and np.array_equal(x.reshape(-1), (idx % 251).astype(np.uint8))
    assert sorted(idx.tolist()) == sorted(p.offset + i for p in pieces for i in range(p.start, p.stop))
    assert not np.array_equal(idx, np.sort(idx))  # shuffled


def test_the_same_seed_epoch_and_rank_stream_the_same_batches_and_others_do_not():
    def stream(epoch, rank):
        pieces = epoch_pieces(shards(), seed=4, epoch=epoch, rank=rank, world_size=2)
        return np.concatenate([i for _, _, i in stream_batches(pieces, reader(), 8, 4, epoch, rank, window=50)])

    assert np.array_equal(stream(3, 0), stream(3, 0))
    assert not np.array_equal(stream(3, 0), stream(4, 0))


def test_a_read_that_fails_fails_the_stream():
    pieces = epoch_pieces(shards(), seed=0, epoch=1, rank=0, world_size=1)

    def broken(piece):
        if piece.shard.index == 2:
            raise OSError("the store is gone")
        return reader()(piece)

    with pytest.raises(OSError, match="the store is gone"):
        list(stream_batches(pieces, broken, batch=8, seed=0, epoch=1, rank=0, window=8))


def test_a_stream_left_early_stops_its_reader():
    pieces = epoch_pieces(shards([50] * 40), seed=0, epoch=1, rank=0, world_size=1)
    stream = stream_batches(pieces, reader([50] * 40), batch=10, seed=0, epoch=1, rank=0, window=10)
    next(stream)
    stream.close()  # the generator's finally sets the stop; the reader thread ends instead of blocking on a full queue
    import threading
    import time

    deadline = time.monotonic() + 5
    while any(t.name == "shard-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "shard-prefetch" for t in threading.enumerate())
