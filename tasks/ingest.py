"""Stage 1, ingest: make a dataset's raw image files readable (on local disk, or in place in an object store),
and describe them.

A dataset is named by one string, ``<source>`` or ``<source>:<location>``;
the sources (digits, folder, cifar10, tfds) live in ``tasks.sources``, one
module each, behind one registry. This module owns what every source shares:
scanning class folders and fingerprinting them by content (sha256 over the
sorted list of image files, each with the sha256 of its bytes; a dataset read
in place from S3 by its listing), and the Prefect task with its cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from cluster.errors import UserError
from tasks import sources
from tasks.common import cache_root, file_sha256, retry_unless_user_error
from tasks.refs import RawData
from tasks.sources.base import IMAGE_SUFFIXES, SPLITS
from tasks.sources.folder import ARCHIVE_SUFFIXES, is_archive, locate_splits, safe_extract, scan_s3

# names other modules and tests import from here
__all__ = ["ARCHIVE_SUFFIXES", "IMAGE_SUFFIXES", "SPLITS", "check_source", "file_sha256", "fingerprint", "ingest",
           "ingest_task", "is_archive", "locate_splits", "parse_source", "safe_extract", "scan_split",
           "source_stamp"]


def parse_source(source: str) -> tuple[str, str]:
    """Split a dataset string into (kind, location), validating its syntax.

    Raises:
        UserError: for an unknown source, a missing location or a malformed one.
    """
    spec = sources.parse(source)
    return spec.kind, spec.location


def check_source(source: str) -> None:
    """Cheap up-front validation (name, path existence, extras), before any server or cluster starts.

    Raises:
        UserError: for an unknown source, a missing path, or a source whose extra is not installed.
    """
    sources.check(source)


def source_stamp(source: str) -> str:
    """A cheap stamp that changes whenever the source's files change.

    Used as part of the ingest cache key: sizes and modification times of
    every file (or an object listing), so a re-run over unchanged data skips
    ingest without reading the data.
    """
    return sources.stamp(source)


def scan_split(directory: Path | str) -> tuple[dict[str, list[Path]] | dict[str, list[str]], int]:
    """Image files per class folder of ``directory``, and how many non-images were ignored.

    An s3:// prefix is listed instead: its images are s3:// URIs.
    """
    if str(directory).startswith("s3://"):
        return scan_s3(str(directory))
    directory = Path(directory)
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


def ingest(source: str, cache: Path) -> RawData:
    """Make ``source`` available under ``cache`` and describe it.

    Raises:
        UserError: when the source is missing, unreadable or not class folders.
    """
    made = sources.materialise(source, cache)
    split_dirs = made.splits
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
        fingerprint=made.fingerprint or fingerprint(scanned),
        splits={split: str(d) for split, d in split_dirs.items()},
        classes=classes,
        counts={split: sum(map(len, by_class.values())) for split, by_class in scanned.items()},
        ignored_files=ignored,
        origin=made.origin,
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


# The shape of the cached result: a result stored by a version whose RawData had other fields must not be
# handed to this one (the task's source alone does not change when only RawData does).
_RESULT_SHAPE = hashlib.sha256(json.dumps(RawData.model_json_schema(), sort_keys=True).encode()).hexdigest()[:16]


def ingest_cache_key(_, inputs: dict) -> str:
    """The source's stamp, which local cache holds its copy (a wiped cache means ingesting again) and the
    result's shape."""
    cache = cache_root(inputs.get("cache_dir")).resolve()
    return f"{source_stamp(inputs['source'])}|{cache}|{cache_generation(cache)}|{_RESULT_SHAPE}"


@task(
    name="ingest",
    task_run_name="ingest {source}",
    cache_policy=INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=ingest_cache_key),
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
