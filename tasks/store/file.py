"""The folder store: keys are files under a root directory on this machine (or a mount every node sees).

Atomic writes by temporary file and rename; create-only by ``link()``;
compare-and-swap under an ``flock``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.store.base import Store, AlreadyExists


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
