"""Workers find their own data: prepared datasets fetched from the store into a node-local cache.

The driver hands a worker a :class:`StoredData` (a pyarrow filesystem, a path
in it and the dataset's fingerprint), never a path on the driver's disk. The
first worker on a node downloads the files under a file lock, checks them
against the fingerprint and renames the folder into place; every other worker
on that node finds the finished folder and reads the same files through
memory maps, so a node holds one copy however many workers it runs. A single
file (a run's starting weights, :class:`StoredFile`) is fetched the same way,
checked against its sha256.

A dataset bigger than its ``cache_limit`` is not copied whole: the manifest and the
validation and test shards are, and the training shards are fetched one by one as
the workers stream them (:class:`ShardCache`), the least recently used dropped
once the node holds more than the limit of them, and fetched again when needed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.data import MANIFEST, Manifest, Shard, file_sha256, fingerprint, load_shard, verify_shard


@dataclass(frozen=True, kw_only=True)
class StoredData:
    """Where a prepared dataset lives in the store, as any node can reach it.

    Without a filesystem the path is a folder every node can read as it is (the
    folder store of a local run, or one the user declared shared): no copy.
    """

    filesystem: Any  # a pyarrow.fs.FileSystem, or None; Any keeps pyarrow out of this module's imports
    path: str
    fingerprint: str
    cache_limit: int | None = None  # bytes of its training shards a node keeps; None: the whole dataset

    @property
    def in_place(self) -> bool:
        return self.filesystem is None


@dataclass(frozen=True)
class StoredFile:
    """One file in the store (a run's starting weights), as any node can reach it, and its bytes' sha256."""

    filesystem: Any  # a pyarrow.fs.FileSystem, or None: a path every node reads as it is
    path: str
    sha256: str


def fetch_file(stored: StoredFile, cache: Path | None = None) -> Path:
    """A local copy of ``stored``, fetched at most once per node (``<cache>/files/<sha256>/<name>``) and verified.

    Raises:
        OSError: when the bytes do not match the recorded sha256 (the file changed since the run resolved it).
    """
    name = stored.path.rstrip("/").rsplit("/", 1)[-1]
    if stored.filesystem is None:
        local = Path(stored.path)
        _verify(local, stored)
        return local
    dest = (cache or node_cache_root()) / "files" / stored.sha256 / name
    if dest.is_file():  # renamed into place once verified
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with stored.filesystem.open_input_stream(stored.path) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        _verify(tmp, stored)
        os.rename(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _verify(local: Path, stored: StoredFile) -> None:
    digest = file_sha256(local)
    if digest != stored.sha256:
        raise OSError(f"{stored.path} has sha256 {digest[:16]}…, not the {stored.sha256[:16]}… the run "
                      "recorded: it changed since the run started; start the run again.")


def node_cache_root() -> Path:
    """This node's cache: ``TRAINFLOW_CACHE_DIR`` or ``~/.cache/trainflow``, read at call time."""
    return Path(os.environ.get("TRAINFLOW_CACHE_DIR") or "~/.cache/trainflow").expanduser()


def materialize(data: StoredData, cache: Path | None = None) -> Path:
    """A local folder holding ``data``, downloaded at most once per node and verified (its training shards
    only when they fit ``data.cache_limit``; else :class:`ShardCache` fetches them).

    Raises:
        OSError: when the downloaded files do not match the fingerprint (the store's copy is corrupt).
    """
    if data.in_place:
        return Path(data.path)
    root = (cache or node_cache_root()) / "prepared"
    whole = data.cache_limit is None or fits(data, stored_manifest(data))
    dest = root / (data.fingerprint if whole else f"{data.fingerprint}-streamed")
    if (dest / MANIFEST).is_file():  # complete copies are renamed into place, so a manifest means whole
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{dest.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (dest / MANIFEST).is_file():
            _download(data, dest, whole)
    return dest


def stored_manifest(data: StoredData) -> Manifest:
    """The manifest in the store, checked against the fingerprint the driver recorded.

    Raises:
        OSError: when it describes other data than the fingerprint says.
    """
    with data.filesystem.open_input_stream(f"{data.path.rstrip('/')}/{MANIFEST}") as src:
        manifest = Manifest.from_json(src.read().decode())
    if fingerprint(manifest.shards) != data.fingerprint:
        raise OSError(f"prepared data at {data.path} has fingerprint {fingerprint(manifest.shards)[:16]}… but "
                      f"{data.fingerprint[:16]}… was recorded; run preprocess again with a fresh store.")
    return manifest


def fits(data: StoredData, manifest: Manifest) -> bool:
    """Whether a node keeps all of ``data``'s training shards (else it streams them through a :class:`ShardCache`)."""
    return data.cache_limit is None or manifest.pixel_bytes("train") <= data.cache_limit


def _fetch_shard(data: StoredData, shard: Shard, into: Path) -> None:
    """Copy one shard's files from the store into ``into`` and check them against the manifest's digest."""
    for name in shard.files:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        with data.filesystem.open_input_stream(f"{data.path.rstrip('/')}/{name}") as src, open(into / name, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    if not verify_shard(into, shard):
        raise OSError(f"prepared data at {data.path} is corrupt: {shard.files[0]} and its labels do not "
                      "match the manifest's digest; run preprocess again with a fresh store.")


def _download(data: StoredData, dest: Path, whole: bool) -> None:
    """The manifest and its shards (less the training ones unless ``whole``) into ``dest``, renamed into place."""
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        manifest = stored_manifest(data)
        for shard in manifest.shards:
            if whole or shard.split != "train":
                _fetch_shard(data, shard, tmp)
        (tmp / MANIFEST).write_text(manifest.to_json())
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ShardCache:
    """A dataset's training shards on this node, fetched when first read, at most ``data.cache_limit`` bytes
    of them kept: after each fetch the least recently read are dropped. Workers on one node share it
    (a file lock); a shard is opened as a memory map under that lock, so dropping it later does not
    take it from a worker still reading it."""

    def __init__(self, data: StoredData, cache: Path | None = None) -> None:
        self.data = data
        self.root = (cache or node_cache_root()) / "shards" / data.fingerprint
        self.root.mkdir(parents=True, exist_ok=True)

    def open(self, shard: Shard, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """The shard's (images, labels) as memory maps, fetched first if this node does not hold it."""
        folder = self.root / shard.sha256
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not folder.is_dir():
                tmp = self.root / f".{shard.sha256}.tmp-{uuid.uuid4().hex}"
                try:
                    _fetch_shard(self.data, shard, tmp)
                    os.rename(tmp, folder)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            os.utime(folder)  # read now: the most recently used
            arrays = load_shard(folder, shard, channels, mmap=True)
            self._drop_beyond_limit(keep=folder)
        return arrays

    def _drop_beyond_limit(self, keep: Path) -> None:
        held = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime_ns, reverse=True)
        total = 0
        for folder in held:
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            if total > (self.data.cache_limit or 0) and folder != keep:
                shutil.rmtree(folder, ignore_errors=True)
