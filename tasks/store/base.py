"""The interface every store implementation (folder, S3) implements (see the package docstring for the contract)."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

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
