"""Workers find their own data: prepared datasets fetched from the store into a node-local cache.

The driver hands a worker a :class:`StoredData` (a pyarrow filesystem, a path
in it and the dataset's fingerprint), never a path on the driver's disk. The
first worker on a node downloads the files under a file lock, checks them
against the fingerprint and renames the folder into place; every other worker
on that node finds the finished folder and reads the same files through
memory maps, so a node holds one copy however many workers it runs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.data import MANIFEST, Manifest, fingerprint, verify_shard


@dataclass(frozen=True, kw_only=True)
class StoredData:
    """Where a prepared dataset lives in the store, as any node can reach it.

    Without a filesystem the path is a folder every node can read as it is (the
    folder store of a local run, or one the user declared shared): no copy.
    """

    filesystem: Any  # a pyarrow.fs.FileSystem, or None; Any keeps pyarrow out of this module's imports
    path: str
    fingerprint: str

    @property
    def in_place(self) -> bool:
        return self.filesystem is None


def node_cache_root() -> Path:
    """This node's cache: ``TRAINFLOW_CACHE_DIR`` or ``~/.cache/trainflow``, read at call time."""
    return Path(os.environ.get("TRAINFLOW_CACHE_DIR") or "~/.cache/trainflow").expanduser()


def materialize(data: StoredData, cache: Path | None = None) -> Path:
    """A local folder holding ``data``, downloaded at most once per node and verified.

    Raises:
        OSError: when the downloaded files do not match the fingerprint (the store's copy is corrupt).
    """
    if data.in_place:
        return Path(data.path)
    root = (cache or node_cache_root()) / "prepared"
    dest = root / data.fingerprint
    if (dest / MANIFEST).is_file():  # complete copies are renamed into place, so a manifest means whole
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{data.fingerprint}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (dest / MANIFEST).is_file():
            _download(data, dest)
    return dest


def _download(data: StoredData, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        base = data.path.rstrip("/")
        with data.filesystem.open_input_stream(f"{base}/{MANIFEST}") as src:
            text = src.read().decode()
        manifest = Manifest.from_json(text)
        if fingerprint(manifest.shards) != data.fingerprint:
            raise OSError(f"prepared data at {data.path} has fingerprint {fingerprint(manifest.shards)[:16]}… but "
                          f"{data.fingerprint[:16]}… was recorded; run preprocess again with a fresh store.")
        for shard in manifest.shards:
            for name in shard.files:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                with data.filesystem.open_input_stream(f"{base}/{name}") as src, open(tmp / name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            if not verify_shard(tmp, shard):
                raise OSError(f"prepared data at {data.path} is corrupt: {shard.files[0]} and its labels do not "
                              "match the manifest's digest; run preprocess again with a fresh store.")
        (tmp / MANIFEST).write_text(text)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
