"""Run a function on W ranks in spawned processes, as on one machine or on W machines, and read what each wrote."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def _rank_then_leave(rank: int, fn: Callable, *args) -> None:
    """``fn`` on this rank, then leave without the interpreter's teardown, as ``cluster.pytorch.loop`` does.

    gloo's worker threads can outlive ``destroy_process_group`` and free the last collective's tensors while
    the interpreter finalizes, which aborts the process (``terminate called without an active exception``)
    after ``fn`` succeeded: 5 of 58 runs here of a rank that only made the collectives of
    :func:`cluster.pytorch.allreduce.shared_segment`. An exception from ``fn`` still ends the rank as a failure.
    """
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable, tmp_path: Path, world_size: int, shared: bool, *args) -> list[dict]:
    """``fn(rank, world_size, init_file, shm_dirs, out_dir, *args)`` on every rank; each writes ``out_dir/<rank>.json``.

    ``shared``: every rank sees one shared-memory folder (one machine), else each its own (separate machines).
    Afterwards no segment's file is left in any of them.
    """
    dirs = [tmp_path / ("shm" if shared else f"shm{rank}") for rank in range(world_size)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    mp.start_processes(_rank_then_leave, nprocs=world_size, start_method="spawn",
                       args=(fn, world_size, str(tmp_path / "init"), list(map(str, dirs)), str(tmp_path), *args))
    assert [list(d.iterdir()) for d in dirs] == [[] for _ in dirs]
    return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(world_size)]
