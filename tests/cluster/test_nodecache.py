"""Workers fetch prepared data into a node-local cache: once per node, verified, shared by memory maps."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest

from cluster.data import MANIFEST, load_split, read_manifest
from cluster.execution.nodecache import StoredData, materialize
from tasks.store import open_store


def stored(prepared, tmp_path: Path) -> StoredData:
    """The prepared dataset as a worker on another node sees it: a filesystem and a path, not in place."""
    store_uri, ref = prepared
    store = open_store(store_uri)
    copy = tmp_path / "remote"
    shutil.copytree(store.local_dir(store.key_of(ref.uri), tmp_path), copy)
    return StoredData(filesystem=pyarrow.fs.LocalFileSystem(), path=str(copy), fingerprint=ref.fingerprint)


def test_fetches_once_per_node_and_verifies(prepared, tmp_path):
    data = stored(prepared, tmp_path)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(materialize(data, tmp_path / "node")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(set(results)) == 1 and len(results) == 4
    local = results[0]
    assert local.parent == tmp_path / "node" / "prepared"
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert files == sorted([*read_manifest(local).files(), MANIFEST])
    assert [p.name for p in local.parent.iterdir() if p.is_dir()] == [local.name]  # one copy, no leftovers
    before = {p: p.stat().st_mtime_ns for p in local.rglob("*")}
    assert materialize(data, tmp_path / "node") == local
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*")} == before  # not fetched again


def test_a_corrupt_copy_is_refused_and_leaves_nothing(prepared, tmp_path):
    data = stored(prepared, tmp_path)
    train_x = Path(data.path) / read_manifest(Path(data.path)).split_shards("train")[0].files[0]
    raw = bytearray(train_x.read_bytes())
    raw[-1] ^= 0xFF
    train_x.write_bytes(bytes(raw))
    with pytest.raises(OSError, match="corrupt"):
        materialize(data, tmp_path / "node")
    assert [p for p in (tmp_path / "node" / "prepared").iterdir() if p.is_dir()] == []


def test_in_place_data_is_not_copied(prepared, tmp_path):
    data = stored(prepared, tmp_path)
    in_place = StoredData(filesystem=None, path=data.path, fingerprint=data.fingerprint)
    assert materialize(in_place, tmp_path / "node") == Path(data.path)
    assert not (tmp_path / "node").exists()


def test_a_manifest_of_other_data_is_refused(prepared, tmp_path):
    data = stored(prepared, tmp_path)
    other = StoredData(filesystem=data.filesystem, path=data.path, fingerprint="0" * 64)
    with pytest.raises(OSError, match="fingerprint"):
        materialize(other, tmp_path / "node")


def test_splits_load_as_shared_memory_maps(prepared, tmp_path):
    local = materialize(stored(prepared, tmp_path), tmp_path / "node")
    x, y = load_split(local, "train", mmap=True)
    assert isinstance(x, np.memmap) and x.dtype == np.uint8 and x.ndim == 4 and len(x) == len(y)


def test_a_dataset_bigger_than_the_cache_limit_streams_its_training_shards_through_a_bounded_cache(tmp_path,
                                                                                                   monkeypatch):
    import cluster.data
    from cluster.data import load_split, write_arrays
    from cluster.execution.nodecache import ShardCache

    rng = np.random.default_rng(0)
    arrays = {s: (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int64))
              for s, n in (("train", 100), ("val", 10), ("test", 20))}
    monkeypatch.setattr(cluster.data, "SHARD_BYTES", 4 * 4 * 3 * 10)  # 10 images a shard
    manifest = write_arrays(tmp_path / "remote", arrays, ("a", "b", "c"))
    shard_bytes = 4 * 4 * 3 * 10 + 10 * 8 + 2 * 128  # pixels, labels, two .npy headers
    data = StoredData(filesystem=pyarrow.fs.LocalFileSystem(), path=str(tmp_path / "remote"),
                      fingerprint=manifest.fingerprint, cache_limit=3 * shard_bytes)
    local = materialize(data, tmp_path / "node")
    assert local.name.endswith("-streamed")
    assert not (local / "train").exists() and load_split(local, "test")[0].shape == (20, 4, 4, 3)

    cache = ShardCache(data, tmp_path / "node")
    train = manifest.split_shards("train")
    for shard in [*train, *train[:2]]:  # every shard once, then the first two again: fetched anew
        x, y = cache.open(shard, 3)
        start = shard.index * 10
        assert np.array_equal(x, arrays["train"][0][start:start + 10])
        assert np.array_equal(y, arrays["train"][1][start:start + 10])
        held = [p for p in cache.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert len(held) <= 3 and shard.sha256 in {p.name for p in held}  # the limit, the newest kept
    unlimited = StoredData(filesystem=data.filesystem, path=data.path, fingerprint=data.fingerprint)
    assert materialize(unlimited, tmp_path / "node").name == manifest.fingerprint  # a whole copy, kept apart
