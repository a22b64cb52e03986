"""FileStore: atomic writes, create-only writes, compare-and-swap, listing, keys and URIs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cluster.errors import UserError
from tasks.store import AlreadyExists, FileStore, open_store
from tests.conftest import run_threads


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


def test_put_get_bytes_round_trip_and_overwrite(store: FileStore):
    store.put_bytes("a/b/c.bin", b"\x00\x01hello")
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01hello"
    assert (store.root / "a" / "b" / "c.bin").read_bytes() == b"\x00\x01hello"
    store.put_bytes("a/b/c.bin", b"second")
    assert store.get_bytes("a/b/c.bin") == b"second"
    # no temporary file is left behind next to the object
    assert sorted(p.name for p in (store.root / "a" / "b").iterdir()) == ["c.bin"]


def test_get_missing_raises_file_not_found(store: FileStore):
    with pytest.raises(FileNotFoundError):
        store.get_bytes("nope")


def test_put_file_and_get_file(store: FileStore, tmp_path: Path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 100)
    store.put_file("files/x.bin", src)
    dest = tmp_path / "out" / "deep" / "x.bin"
    store.get_file("files/x.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert store.get_bytes("files/x.bin") == src.read_bytes()


def test_list_is_recursive_sorted_and_skips_temp_and_lock_files(store: FileStore):
    for key in ("p/z.txt", "p/a.txt", "p/sub/m.txt", "p/sub/deeper/b.txt", "other/q.txt"):
        store.put_bytes(key, key.encode())
    (store.root / "p" / ".z.txt.tmp-0123abcd").write_bytes(b"partial")
    (store.root / "p" / "champion.json.lock").write_bytes(b"")
    assert store.list("p") == ["p/a.txt", "p/sub/deeper/b.txt", "p/sub/m.txt", "p/z.txt"]
    assert store.list("p/sub") == ["p/sub/deeper/b.txt", "p/sub/m.txt"]
    assert store.list("missing") == []
    assert store.list("p/a.txt") == []  # a file is not a prefix


def test_swap_lock_file_is_not_listed(store: FileStore):
    assert store.swap("c/champion.json", b"1", expected=None)
    assert store.list("c") == ["c/champion.json"]


def test_exists_and_delete(store: FileStore):
    assert not store.exists("k")
    store.put_bytes("k", b"v")
    assert store.exists("k")
    store.put_bytes("dir/k", b"v")
    assert not store.exists("dir")  # a directory is not an object
    store.delete("k")
    assert not store.exists("k")
    store.delete("k")  # missing is fine
    store.delete("never/was/here")


def test_put_if_absent_is_create_only(store: FileStore):
    store.put_bytes("once", b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.put_bytes("once", b"second", if_absent=True)
    assert store.get_bytes("once") == b"first"
    assert [p.name for p in store.root.iterdir()] == ["once"]  # the temp file was cleaned up


def test_swap_compare_and_swap_semantics(store: FileStore):
    key = "models/m/champion.json"
    assert store.swap(key, b"v1", expected=None) is True
    assert store.get_bytes(key) == b"v1"
    # expected=None only succeeds while absent
    assert store.swap(key, b"v-other", expected=None) is False
    assert store.get_bytes(key) == b"v1"
    # wrong expectation: refused, nothing written
    assert store.swap(key, b"v2", expected=b"v0") is False
    assert store.get_bytes(key) == b"v1"
    # right expectation: replaced
    assert store.swap(key, b"v2", expected=b"v1") is True
    assert store.get_bytes(key) == b"v2"
    # expecting a value of an absent key fails and creates nothing
    assert store.swap("absent", b"x", expected=b"something") is False
    assert not store.exists("absent")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a/../../../tmp/evil"])
def test_keys_escaping_the_root_are_refused(store: FileStore, key: str, tmp_path: Path):
    with pytest.raises(ValueError, match="escapes the store root"):
        store.put_bytes(key, b"evil")
    with pytest.raises(ValueError):
        store.get_bytes(key)
    with pytest.raises(ValueError):
        store.swap(key, b"evil", expected=None)
    assert not (tmp_path / "x").exists()


def test_keys_with_inner_dotdot_staying_inside_are_fine(store: FileStore):
    store.put_bytes("a/../b", b"ok")
    assert store.get_bytes("b") == b"ok"


def test_open_store_path_uri_and_bad_scheme(tmp_path: Path):
    by_path = open_store(str(tmp_path / "s"))
    assert isinstance(by_path, FileStore)
    assert by_path.root == (tmp_path / "s").resolve()
    by_path.put_bytes("k", b"v")
    by_uri = open_store((tmp_path / "s").as_uri())
    assert isinstance(by_uri, FileStore)
    assert by_uri.root == by_path.root
    assert by_uri.uri == by_path.uri
    assert by_uri.get_bytes("k") == b"v"
    with pytest.raises(UserError, match="ftp"):
        open_store("ftp://x")
    s3 = open_store("s3://bucket/some/prefix/")  # constructing talks to no server
    assert (s3.bucket, s3.prefix, s3.uri) == ("bucket", "some/prefix", "s3://bucket/some/prefix")


def test_open_store_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_store("~/st").root == (tmp_path / "st").resolve()


def test_child_uri_and_key_of_round_trip(store: FileStore):
    key = "prepared/abc/train_x.npy"
    uri = store.child_uri(key)
    assert uri == store.uri + "/" + key
    assert uri.startswith("file://")
    assert store.key_of(uri) == key
    # a URI from the same store reopened by URI maps to the same key
    assert open_store(store.uri).key_of(uri) == key
    with pytest.raises(UserError, match="not inside the store"):
        store.key_of("file:///somewhere/else/x")
    # a sibling directory sharing the root as a string prefix is not inside
    with pytest.raises(UserError):
        store.key_of(store.uri + "-other/x")


def test_local_dir_is_the_stores_own_directory(store: FileStore, tmp_path: Path):
    store.put_bytes("pre/a.npy", b"1")
    assert store.local_dir("pre", tmp_path / "cache") == store.root / "pre"
    assert not (tmp_path / "cache").exists()


def test_concurrent_swap_increments_are_never_lost(store: FileStore):
    key = "counter"
    threads_n, per_thread = 8, 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def worker() -> None:
        try:
            start.wait()
            for _ in range(per_thread):
                while True:
                    current = store.get_bytes(key) if store.exists(key) else None
                    value = int(current) if current is not None else 0
                    if store.swap(key, str(value + 1).encode(), expected=current):
                        break
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    run_threads(worker, [()] * threads_n, timeout=60)
    assert not errors
    assert int(store.get_bytes(key)) == threads_n * per_thread


def test_file_uri_of_a_root_with_a_space_round_trips(tmp_path: Path):
    store = FileStore(tmp_path / "with space")
    store.put_bytes("k", b"v")
    reopened = open_store(store.uri)  # store.uri is percent-encoded: .../with%20space
    assert reopened.root == store.root
    assert reopened.get_bytes("k") == b"v"
