"""The ``folder:`` source: class folders in a directory, a tar archive, or under an s3:// prefix.

``folder:<path>`` names a directory or ``.tar``/``.tar.gz`` holding class
folders, or ``train/`` and ``test/`` (or ``val/``) splits of class folders (each split
may itself be an archive, e.g. ``train.tar.gz``). Archives are unpacked into a
content-addressed cache, so one archive is never unpacked twice. An
``s3://bucket/prefix`` of class folders is read in place: its layout comes from
one listing, its fingerprint from the listing's keys, sizes and ETags, and the
decoding workers read each image from S3 (the prepared data's fingerprint is
then the decoded content's). Only a prefix whose splits are archives is
downloaded first, to be unpacked.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from cluster.errors import UserError
from tasks.common import file_sha256
from tasks.sources.base import IMAGE_SUFFIXES, SPLITS, Materialised, Source, SourceSpec, publish_dir, stamp_files

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
HELD_OUT_NAMES = ("val", "validation")  # what other layouts call the held-out split, when there is no test/


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _missing(spec: SourceSpec, path: Path) -> UserError:
    return UserError(f"--dataset {spec.text!r}: {path} does not exist; check the path.")


def check(spec: SourceSpec) -> None:
    """The path exists, or the s3:// prefix's bucket is reachable with the environment's credentials."""
    if spec.location.startswith("s3://"):
        from tasks.store import open_store

        open_store(spec.location).check()
    elif not Path(spec.location).expanduser().exists():
        raise _missing(spec, Path(spec.location).expanduser())


def s3_listing_stamp(uri: str) -> str:
    """sha256 over (key, size, ETag) of every object under an s3:// prefix."""
    from tasks.store import open_store

    store = open_store(uri)
    return hashlib.sha256(json.dumps([uri, store.listing("")]).encode()).hexdigest()


def stamp(spec: SourceSpec) -> str:
    """The s3 listing, or every local file's size and modification time: changes whenever the files do."""
    if spec.location.startswith("s3://"):
        return s3_listing_stamp(spec.location)
    root = Path(spec.location).expanduser()
    if not root.exists():
        raise _missing(spec, root)
    return stamp_files(root)


def download_s3(uri: str, rows: list[tuple[str, int, str]], cache: Path) -> Path:
    """Download the objects ``rows`` lists under an s3:// prefix, in parallel, into ``cache/s3/<listing stamp>``."""
    from tasks.store import open_store

    store = open_store(uri)
    dest = cache / "s3" / hashlib.sha256(json.dumps([uri, rows]).encode()).hexdigest()
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda row: store.get_file(row[0], tmp / row[0]), rows))
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def s3_rows(uri: str) -> list[tuple[str, int, str]]:
    """(key relative to ``uri``, size, ETag) of every object under an s3:// dataset prefix, sorted.

    Raises:
        UserError: when the bucket cannot be reached or the prefix holds nothing.
    """
    from tasks.store import open_store

    store = open_store(uri)
    store.check()
    rows = store.listing("")
    if not rows:
        raise UserError(f"--dataset folder:{uri}: no objects under that prefix; check the bucket and prefix.")
    return rows


def listing_fingerprint(rows: list[tuple[str, int, str]]) -> str:
    """An object-store dataset's fingerprint: sha256 over its listing's relative keys, sizes and ETags.

    ETags change with the bytes (an MD5, or one over the parts' MD5s for a multipart upload), so new content
    means a new fingerprint; the same content uploaded anew may get a new one too, which only costs a
    second preparation, whose shards are the same bytes.
    """
    return hashlib.sha256(json.dumps(["s3-listing", rows]).encode()).hexdigest()


class _KeyTree:
    """The folders of an object listing, to find a dataset's layout as :func:`locate_splits` does on disk."""

    def __init__(self, keys: list[str]) -> None:
        self.children: dict[str, set[str]] = {}  # folder ("" is the root) -> its entries' names
        self.folders: set[str] = {""}
        for key in keys:
            parts = key.split("/")
            for depth in range(len(parts)):
                parent = "/".join(parts[:depth])
                self.children.setdefault(parent, set()).add(parts[depth])
                if depth < len(parts) - 1:
                    self.folders.add("/".join(parts[:depth + 1]))

    def entries(self, folder: str) -> list[str]:
        return sorted(f"{folder}/{name}".lstrip("/") for name in self.children.get(folder, ())
                      if not name.startswith("."))

    def descend(self, folder: str) -> str:
        """:func:`_descend` on the listing: down through lone folders that hold no images themselves."""
        while True:
            entries = self.entries(folder)
            if len(entries) == 1 and entries[0] in self.folders and not any(
                    e not in self.folders and PurePosixPath(e).suffix.lower() in IMAGE_SUFFIXES
                    for e in self.entries(entries[0])):
                folder = entries[0]
            else:
                return folder


def s3_splits(uri: str, rows: list[tuple[str, int, str]]) -> dict[str, str] | None:
    """The split prefixes of an s3:// dataset, found from its listing alone; None when a split is an archive."""
    tree = _KeyTree([key for key, _, _ in rows])
    root = tree.descend("")
    entries = set(tree.entries(root))

    def entry(split: str) -> str | None:
        return next((e for e in (f"{root}/{split}".lstrip("/"),
                                 *(f"{root}/{split}{suffix}".lstrip("/") for suffix in ARCHIVE_SUFFIXES))
                     if e in entries), None)

    found = {split: entry(split) for split in SPLITS}
    if found["train"] is None:
        return {"all": f"{uri}/{root}".rstrip("/")}
    for name in HELD_OUT_NAMES:
        found["test"] = found["test"] or entry(name)
    if any(e not in tree.folders for e in found.values() if e is not None):
        return None
    return {split: f"{uri}/{tree.descend(e)}" for split, e in found.items() if e is not None}


def scan_s3(uri: str) -> tuple[dict[str, list[str]], int]:
    """:func:`tasks.ingest.scan_split` of an s3:// prefix: each class folder's images as s3:// URIs, and how
    many other objects were ignored."""
    from tasks.store import open_store

    files: dict[str, list[str]] = {}
    ignored = 0
    for key in open_store(uri).list(""):
        cls, slash, rest = key.partition("/")
        if not slash or cls.startswith("."):
            continue  # objects beside the class folders are not in a class, as on disk
        if PurePosixPath(rest).suffix.lower() in IMAGE_SUFFIXES:
            files.setdefault(cls, []).append(f"{uri}/{key}")
        else:
            ignored += 1
    return dict(sorted(files.items())), ignored


def safe_extract(archive: Path, cache: Path) -> Path:
    """Unpack ``archive`` into ``cache/archives/<sha256>`` once; return that directory.

    Raises:
        UserError: for a corrupt archive or one whose members would land
            outside the destination (absolute paths, ``..``, links).
    """
    dest = cache / "archives" / file_sha256(archive)
    if dest.is_dir():
        return dest
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    name = Path(member.name)
                    if name.is_absolute() or ".." in name.parts or member.issym() or member.islnk():
                        raise UserError(f"{archive} holds an unsafe member {member.name!r}; "
                                        "repack it with relative paths only.")
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            reason = " ".join(str(exc).split())  # tarfile's messages span lines
            raise UserError(f"{archive} is not a readable tar archive ({reason}); re-download or repack it.") from None
        publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    return dest


def _descend(directory: Path) -> Path:
    """Skip wrapper folders: go down while a folder holds exactly one folder and no files.

    Stops above a lone folder of images: that is a (single) class, not a wrapper.
    """
    while True:
        entries = [e for e in directory.iterdir() if not e.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and not any(
                p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in entries[0].iterdir()):
            directory = entries[0]
        else:
            return directory


def _as_dir(path: Path, cache: Path) -> Path:
    return _descend(safe_extract(path, cache) if is_archive(path) else path)


def _split_entry(root: Path, split: str) -> Path | None:
    for name in (split, *(split + suffix for suffix in ARCHIVE_SUFFIXES)):
        if (root / name).exists():
            return root / name
    return None


def locate_splits(location: str, cache: Path) -> dict[str, Path]:
    """Find the class-folder directories of a ``folder:`` source.

    Returns ``{"train": dir, "test": dir}`` for split layouts, ``{"train": dir}``
    when only a train split exists, and ``{"all": dir}`` for plain class folders.
    Without ``test/``, an ImageNet-style ``val/`` (or ``validation/``) beside ``train/`` is the test split.
    """
    path = Path(location).expanduser()
    if not path.exists():
        raise UserError(f"--dataset folder:{location}: {path} does not exist; check the path.")
    root = _as_dir(path, cache)
    entries = {split: _split_entry(root, split) for split in SPLITS}
    if entries["train"] is None:
        return {"all": root}
    for name in HELD_OUT_NAMES:
        entries["test"] = entries["test"] or _split_entry(root, name)
    return {split: _as_dir(entry, cache) for split, entry in entries.items() if entry is not None}


def materialise(spec: SourceSpec, cache: Path) -> Materialised:
    """Local folders as they are; archives unpacked into the cache; an s3:// prefix read in place (downloaded
    first only when its splits are archives)."""
    if not spec.location.startswith("s3://"):
        return Materialised(splits=locate_splits(spec.location, cache))
    uri = spec.location.rstrip("/")
    rows = s3_rows(uri)
    splits = s3_splits(uri, rows)
    if splits is None:
        return Materialised(splits=locate_splits(str(download_s3(uri, rows, cache)), cache))
    return Materialised(splits=splits, origin=uri, fingerprint=listing_fingerprint(rows))


SOURCE = Source(
    name="folder",
    form="folder:<directory, .tar.gz or s3://bucket/prefix>",
    description="your images at 'Dataset path'",
    location_help="a directory of class folders (optionally train/ and test/ or val/), a .tar/.tar.gz of one, or an "
                  "s3://bucket/prefix holding either",
    needs_location=True,
    check=check,
    stamp=stamp,
    materialise=materialise,
    label=lambda spec: f"folder:{PurePosixPath(spec.location.rstrip('/')).name}",
)
