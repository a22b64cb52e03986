"""The ``folder:`` source: class folders in a directory, a tar archive, or under an s3:// prefix.

``folder:<path>`` names a directory or ``.tar``/``.tar.gz`` holding class
folders, or ``train/`` and ``test/`` (or ``val/``) splits of class folders (each split
may itself be an archive, e.g. ``train.tar.gz``); an ``s3://bucket/prefix`` holding
either is downloaded first. Archives are unpacked into a content-addressed
cache, so one archive is never unpacked twice.
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


def download_s3(uri: str, cache: Path) -> Path:
    """Download every object under an s3:// prefix, in parallel, into ``cache/s3/<listing stamp>``.

    The folder is named by the listing (keys, sizes, ETags): ETags are not
    content hashes for multipart uploads, so the dataset's fingerprint is still
    computed from the downloaded bytes, like any local folder's.
    """
    from tasks.store import open_store

    store = open_store(uri)
    store.check()
    rows = store.listing("")
    if not rows:
        raise UserError(f"--dataset folder:{uri}: no objects under that prefix; check the bucket and prefix.")
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


HELD_OUT_NAMES = ("val", "validation")  # what other layouts call the held-out split, when there is no test/


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
    path = download_s3(location, cache) if location.startswith("s3://") else Path(location).expanduser()
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
    """Local folders as they are; archives unpacked into the cache; an s3:// prefix downloaded first."""
    if spec.location.startswith("s3://"):
        local = download_s3(spec.location, cache)
        return Materialised(splits=locate_splits(str(local), cache), mirror=(str(local), spec.location))
    return Materialised(splits=locate_splits(spec.location, cache))


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
