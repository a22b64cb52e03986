"""Which part of the training set each rank reads in an epoch."""

from __future__ import annotations

import numpy as np


def epoch_shard(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's equal-length shard of a permutation of ``range(n)`` that every rank draws identically.

    A function of (seed, epoch): a resumed epoch draws what the interrupted one would have.
    """
    perm = np.random.default_rng(seed * 100_003 + epoch).permutation(n)
    return perm[rank::world_size][: n // world_size]
