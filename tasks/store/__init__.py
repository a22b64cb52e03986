"""The artifact store: one small interface over where artifacts live, one module per kind of storage.

Keys are ``/``-separated relative paths (``models/cnn/versions/3/model.pt``).
Every write is atomic: a reader sees either the old object or the whole new
one, never a partial file. Multi-file objects (prepared data, model versions)
get their atomicity one level up, from a manifest written last.

``open_store`` picks the implementation by the location's scheme; boto3 is imported
only when an ``s3://`` store is opened.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from cluster.errors import UserError
from tasks.store.base import AlreadyExists, Store
from tasks.store.file import FileStore

__all__ = ["AlreadyExists", "FileStore", "Store", "open_store"]


def open_store(location: str) -> Store:
    """Open the store named by a path, a ``file://`` URI or ``s3://bucket/prefix``.

    Raises:
        UserError: for a location this build cannot store into.
    """
    if location.startswith("file://"):
        return FileStore(Path(url2pathname(urlparse(location).path)))
    if location.startswith("s3://"):
        from tasks.store.s3 import S3Store  # lazy: boto3 only when S3 is used

        return S3Store(location)
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise UserError(f"--store {location!r}: unsupported scheme {scheme!r}; "
                        "use a directory path, a file:// URI or s3://bucket/prefix.")
    return FileStore(Path(location).expanduser())
