"""One contract, two stores: the same behaviour from a folder and from a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import pytest

from tasks.store import AlreadyExists, Store, open_store
from tests.conftest import run_threads


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "file":
        return open_store(str(tmp_path / "store"))
    server = request.getfixturevalue("s3_server")
    return open_store(f"s3://{server.bucket}/contract-{uuid.uuid4().hex[:8]}")


def test_put_get_list_exists_delete(store):
    store.put_bytes("a/b/one.txt", b"1")
    store.put_bytes("a/two.txt", b"22")
    store.put_bytes("c.txt", b"3")
    assert store.get_bytes("a/b/one.txt") == b"1"
    assert store.list("a") == ["a/b/one.txt", "a/two.txt"]
    assert store.exists("a/two.txt") and not store.exists("a/three.txt")
    store.put_bytes("a/two.txt", b"replaced")
    assert store.get_bytes("a/two.txt") == b"replaced"
    store.delete("a/two.txt")
    store.delete("a/never-there.txt")
    assert store.list("a") == ["a/b/one.txt"]
    with pytest.raises(FileNotFoundError):
        store.get_bytes("a/two.txt")
    assert store.key_of(store.child_uri("a/b/one.txt")) == "a/b/one.txt"


def test_create_only_write_keeps_the_first(store):
    store.put_bytes("claim", b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.put_bytes("claim", b"second", if_absent=True)
    assert store.get_bytes("claim") == b"first"


def test_large_multipart_round_trip_is_verified(store, tmp_path):
    payload = os.urandom(50 * 1024 * 1024)  # above the 16 MiB multipart threshold
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    store.put_file("blobs/big.bin", source)
    dest = tmp_path / "back.bin"
    store.get_file("blobs/big.bin", dest)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(payload).digest()


def test_swap_is_compare_and_swap(store):
    assert store.swap("ptr", b"v1", expected=None)
    assert not store.swap("ptr", b"v2", expected=None)  # not absent any more
    assert not store.swap("ptr", b"v2", expected=b"stale")
    assert store.get_bytes("ptr") == b"v1"
    assert store.swap("ptr", b"v2", expected=b"v1")
    assert store.get_bytes("ptr") == b"v2"


def test_concurrent_swaps_lose_no_update(store):
    store.put_bytes("counter", b"0")

    def bump(times: int) -> None:
        for _ in range(times):
            while True:
                current = store.get_bytes("counter")
                if store.swap("counter", str(int(current) + 1).encode(), expected=current):
                    break

    run_threads(bump, [(10,)] * 4)
    assert store.get_bytes("counter") == b"40"


def test_local_dir_holds_every_object(store, tmp_path):
    store.put_bytes("set/x.npy", b"x")
    store.put_bytes("set/sub/y.npy", b"y")
    local = store.local_dir("set", tmp_path / "cache")
    assert (local / "x.npy").read_bytes() == b"x" and (local / "sub" / "y.npy").read_bytes() == b"y"
    assert isinstance(local, Path)
