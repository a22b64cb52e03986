"""The artifact store: one small interface over where artifacts live.

Keys are ``/``-separated relative paths (``models/cnn/versions/3/model.pt``).
Every write is atomic: a reader sees either the old object or the whole new
one, never a partial file. Multi-file objects (prepared data, model versions)
get their atomicity one level up, from a manifest written last.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from cluster.errors import UserError


class AlreadyExists(Exception):
    """A create-only write found the key already present."""


class Store(ABC):
    """Atomic object storage addressed by relative keys."""

    uri: str
    is_local: bool = False  # True when keys are plain files on this machine

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        """Write ``data`` at ``key``; with ``if_absent`` raise AlreadyExists instead of replacing."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read the object at ``key`` (FileNotFoundError when missing)."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file to ``key``."""

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Download ``key`` to the local path ``dest``."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    @abstractmethod
    def swap(self, key: str, data: bytes, *, expected: bytes | None) -> bool:
        """Replace ``key`` with ``data`` only if it still holds ``expected``.

        ``expected=None`` means "only if absent". Returns False, writing
        nothing, when another writer got there first.
        """

    @abstractmethod
    def ray_storage_path(self, prefix: str) -> str:
        """Where Ray Train should persist checkpoints under ``prefix`` (a path in :meth:`ray_filesystem`)."""

    def ray_filesystem(self):
        """The pyarrow filesystem Ray Train should use, or None for Ray's default (local paths)."""
        return None

    def check(self) -> None:
        """Fail fast with one clear sentence when the store cannot be used; cheap."""

    def child_uri(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{key}"

    def key_of(self, uri: str) -> str:
        """The key of a URI that :meth:`child_uri` made for this store."""
        root = self.uri.rstrip("/") + "/"
        if not uri.startswith(root):
            raise UserError(f"{uri!r} is not inside the store {self.uri!r}; pass the same --store that produced it.")
        return uri[len(root):]

    def local_dir(self, prefix: str, cache: Path) -> Path:
        """A local directory holding every object under ``prefix``.

        Stores on the local filesystem return their own directory; others
        download into ``cache``.
        """
        dest = cache / hashlib.sha256(self.child_uri(prefix).encode()).hexdigest()[:16]
        for key in self.list(prefix):
            target = dest / key[len(prefix):].lstrip("/")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                self.get_file(key, target)
        return dest


class FileStore(Store):
    """A store in a local (or network-mounted) directory."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"store key {key!r} escapes the store root")
        return path

    def _write_atomic(self, path: Path, writer) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
        writer(tmp)
        return tmp

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        path = self._path(key)
        tmp = self._write_atomic(path, lambda p: p.write_bytes(data))
        if not if_absent:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # link() fails if the target exists: an atomic create-only
        except FileExistsError:
            raise AlreadyExists(key) from None
        finally:
            tmp.unlink()

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        os.replace(self._write_atomic(target, lambda p: shutil.copyfile(path, p)), target)

    def get_file(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), dest)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and ".tmp-" not in p.name and not p.name.endswith(".lock")
        )

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def swap(self, key: str, data: bytes, *, expected: bytes | None) -> bool:
        path = self._path(key)
        with self._locked(path):
            current = path.read_bytes() if path.is_file() else None
            if current != expected:
                return False
            os.replace(self._write_atomic(path, lambda p: p.write_bytes(data)), path)
            return True

    def ray_storage_path(self, prefix: str) -> str:
        return str(self._path(prefix))

    def local_dir(self, prefix: str, cache: Path) -> Path:
        return self._path(prefix)


def open_store(location: str) -> Store:
    """Open the store named by a path, a ``file://`` URI or ``s3://bucket/prefix``.

    Raises:
        UserError: for a location this build cannot store into.
    """
    if location.startswith("file://"):
        return FileStore(Path(url2pathname(urlparse(location).path)))
    if location.startswith("s3://"):
        from tasks.s3store import S3Store  # lazy: boto3 only when S3 is used

        return S3Store(location)
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise UserError(f"--store {location!r}: unsupported scheme {scheme!r}; "
                        "use a directory path, a file:// URI or s3://bucket/prefix.")
    return FileStore(Path(location).expanduser())
