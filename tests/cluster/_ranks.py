"""Run a function on W ranks in spawned processes, as on one machine or on W machines, and read what each wrote."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def run_ranks(fn: Callable, tmp_path: Path, world_size: int, shared: bool, *args) -> list[dict]:
    """``fn(rank, world_size, init_file, shm_dirs, out_dir, *args)`` on every rank; each writes ``out_dir/<rank>.json``.

    ``shared``: every rank sees one shared-memory folder (one machine), else each its own (separate machines).
    Afterwards no segment's file is left in any of them.
    """
    dirs = [tmp_path / ("shm" if shared else f"shm{rank}") for rank in range(world_size)]
    for d in dirs:
        d.mkdir(exist_ok=True)
    mp.start_processes(fn, args=(world_size, str(tmp_path / "init"), list(map(str, dirs)), str(tmp_path), *args),
                       nprocs=world_size, start_method="spawn")
    assert [list(d.iterdir()) for d in dirs] == [[] for _ in dirs]
    return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(world_size)]
