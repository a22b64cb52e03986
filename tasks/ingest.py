"""Stage 1, ingest: make a dataset's raw image files available on local disk.

A dataset is named by one string:

* ``digits``: scikit-learn's bundled 8x8 digits, written out once as PNGs;
* ``folder:<path>``: a directory or ``.tar``/``.tar.gz`` holding class
  folders, or ``train/`` and ``test/`` splits of class folders (each split may
  itself be an archive, e.g. ``train.tar.gz``);
* ``cifar10``: downloaded with torchvision's downloader.

Archives are unpacked into a content-addressed cache, so one archive is never
unpacked twice. The result is fingerprinted by content: sha256 over the sorted
list of image files, each with the sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from cluster.errors import UserError
from tasks.refs import RawData
from tasks.common import cache_root, file_sha256, retry_unless_user_error

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLITS = ("train", "test")


def parse_source(source: str) -> tuple[str, str]:
    """Split a dataset string into (kind, location), validating it."""
    if source in ("digits", "cifar10"):
        return source, ""
    if source.startswith("folder:") and len(source) > len("folder:"):
        return "folder", source[len("folder:"):]
    raise UserError(
        f"--dataset {source!r} is not a known source; use 'digits', 'cifar10' or 'folder:<directory or .tar.gz>'."
    )


def check_source(source: str) -> None:
    """Cheap up-front validation (name and path existence), before any server or cluster starts.

    Raises:
        UserError: for an unknown source or a missing path.
    """
    kind, location = parse_source(source)
    if kind == "folder" and location.startswith("s3://"):
        from tasks.store import open_store

        open_store(location).check()
    elif kind == "folder" and not Path(location).expanduser().exists():
        raise UserError(f"--dataset {source!r}: {location} does not exist; check the path.")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def s3_listing_stamp(uri: str) -> str:
    """sha256 over (key, size, ETag) of every object under an s3:// prefix."""
    from tasks.store import open_store

    store = open_store(uri)
    return hashlib.sha256(json.dumps([uri, store.listing("")]).encode()).hexdigest()


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
        _publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def source_stamp(source: str) -> str:
    """A cheap stamp that changes whenever the source's files change.

    Used as part of the ingest cache key: sizes and modification times of
    every file, so a re-run over unchanged data skips ingest without reading
    the data.
    """
    kind, location = parse_source(source)
    if kind != "folder":
        return kind
    if location.startswith("s3://"):
        return s3_listing_stamp(location)
    root = Path(location).expanduser()
    if not root.exists():
        raise UserError(f"--dataset {source!r}: {root} does not exist; check the path.")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256(str(root.resolve()).encode())
    for p in paths:
        st = p.stat()
        digest.update(f"{p.relative_to(root) if p != root else p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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
        _publish_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    return dest


def _publish_dir(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary folder into place; a concurrent writer that got there first wins."""
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.is_dir():
            raise


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
    """
    path = download_s3(location, cache) if location.startswith("s3://") else Path(location).expanduser()
    if not path.exists():
        raise UserError(f"--dataset folder:{location}: {path} does not exist; check the path.")
    root = _as_dir(path, cache)
    entries = {split: _split_entry(root, split) for split in SPLITS}
    if entries["train"] is None:
        return {"all": root}
    return {split: _as_dir(entry, cache) for split, entry in entries.items() if entry is not None}


def scan_split(directory: Path) -> tuple[dict[str, list[Path]], int]:
    """Image files per class folder of ``directory``, and how many non-images were ignored."""
    files: dict[str, list[Path]] = {}
    ignored = 0
    for class_dir in sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith(".")):
        images = []
        for p in sorted(class_dir.rglob("*")):
            if p.is_file():
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(p)
                else:
                    ignored += 1
        if images:
            files[class_dir.name] = images
    return files, ignored


def fingerprint(splits: dict[str, dict[str, list[Path]]]) -> str:
    """sha256 over every image's ``split/class/name`` and content hash, in sorted order."""
    items = sorted(
        (f"{split}/{cls}/{p.name}", p) for split, by_class in splits.items() for cls, ps in by_class.items() for p in ps
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        hashes = pool.map(lambda item: file_sha256(item[1]), items)
        digest = hashlib.sha256()
        for (name, _), h in zip(items, hashes):
            digest.update(f"{name}:{h}\n".encode())
    return digest.hexdigest()


def write_digits(cache: Path) -> Path:
    """Write scikit-learn's digits as 8x8 grayscale PNG class folders (once)."""
    import numpy as np
    import sklearn
    from PIL import Image
    from sklearn.datasets import load_digits

    dest = cache / "digits" / sklearn.__version__
    if dest.is_dir():
        return dest
    digits = load_digits()
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        out = tmp / str(label) / f"{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.round(image * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(out)
    _publish_dir(tmp, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download_cifar10(cache: Path) -> dict[str, Path]:
    """Download CIFAR-10 with torchvision and write it as PNG class folders (once)."""
    from torchvision.datasets import CIFAR10  # lazy: only this source needs torchvision

    dest = cache / "cifar10"
    if not (dest / "done").exists():
        for split, train in (("train", True), ("test", False)):
            data = CIFAR10(root=str(cache / "cifar10-download"), train=train, download=True)
            for i, (image, label) in enumerate(data):
                out = dest / split / data.classes[label] / f"{i:05d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                image.save(out)
        (dest / "done").touch()
    return {split: dest / split for split in SPLITS}


def ingest(source: str, cache: Path) -> RawData:
    """Make ``source`` available under ``cache`` and describe it.

    Raises:
        UserError: when the source is missing, unreadable or not class folders.
    """
    kind, location = parse_source(source)
    mirror = None
    if kind == "digits":
        split_dirs = {"all": write_digits(cache)}
    elif kind == "cifar10":
        split_dirs = download_cifar10(cache)
    elif location.startswith("s3://"):
        local = download_s3(location, cache)
        split_dirs, mirror = locate_splits(str(local), cache), (str(local), location)
    else:
        split_dirs = locate_splits(location, cache)
    scanned: dict[str, dict[str, list[Path]]] = {}
    ignored = 0
    for split, directory in split_dirs.items():
        scanned[split], skipped = scan_split(directory)
        ignored += skipped
        if not scanned[split]:
            raise UserError(f"--dataset {source!r}: {directory} holds no class folders with images; "
                            "lay it out as <class>/<image> (JPEG or PNG).")
    classes = tuple(sorted(next(iter(scanned.values()))))
    for split, by_class in scanned.items():
        if tuple(sorted(by_class)) != classes:
            raise UserError(f"--dataset {source!r}: the {split} split has classes {sorted(by_class)} but "
                            f"expected {list(classes)}; give every split the same class folders.")
    if len(classes) < 2:
        raise UserError(f"--dataset {source!r} has only the class {classes[0]!r}; a classifier needs at least two.")
    return RawData(
        source=source,
        fingerprint=fingerprint(scanned),
        splits={split: str(d) for split, d in split_dirs.items()},
        classes=classes,
        counts={split: sum(map(len, by_class.values())) for split, by_class in scanned.items()},
        ignored_files=ignored,
        mirror=mirror,
    )


def cache_generation(cache: Path) -> str:
    """A random token stored in the cache folder: it changes whenever the folder is wiped."""
    marker = cache / ".generation"
    if not marker.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".generation.tmp-{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex)
        try:
            os.link(tmp, marker)  # create-only: concurrent runs agree on one token
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return marker.read_text()


def _ingest_cache_key(_, inputs: dict) -> str:
    """The source's stamp plus which local cache holds its copy: a wiped cache means ingesting again."""
    cache = cache_root(inputs.get("cache_dir")).resolve()
    return f"{source_stamp(inputs['source'])}|{cache}|{cache_generation(cache)}"


@task(
    name="ingest",
    task_run_name="ingest {source}",
    cache_policy=INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_ingest_cache_key),
    persist_result=True,
    retries=3,
    retry_delay_seconds=[2, 8, 30],
    retry_condition_fn=retry_unless_user_error,
)
def ingest_task(source: str, cache_dir: str | None = None) -> RawData:
    """Prefect task: ingest ``source`` into the local raw-data cache."""
    raw = ingest(source, cache_root(cache_dir) / "raw")
    if raw.ignored_files:
        get_run_logger().info("ignored %d non-image file(s) in %s", raw.ignored_files, source)
    return raw
