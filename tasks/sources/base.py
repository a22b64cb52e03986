"""What every data source is made of: the registry record, the parsed source string, and shared file helpers.

A source turns the user's one-string form (``kind`` or ``kind:location``,
optionally ``?key=value`` options for sources that declare them) into class
folders on local disk. Each source is one module that builds one ``Source``
record; ``tasks.sources`` registers them by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "test")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """A parsed source string.

    Attributes:
        text: the string as the user gave it, for messages.
        kind: the registered source name.
        location: the part after ``kind:`` (a path, prefix or dataset name), without options.
        options: ``?key=value`` options, typed as the source declares them.
    """

    text: str
    kind: str
    location: str = ""
    options: dict[str, str | bool] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Materialised:
    """Class folders on local disk, or in an object store read in place.

    Attributes:
        splits: ``{"train": dir, "test": dir}``, ``{"train": dir}`` (test cut from train later) or
            ``{"all": dir}`` (train and test both cut later); each a local directory, or an s3:// prefix
            under ``origin``.
        origin: the s3:// prefix of a dataset read in place from an object store, else None.
        fingerprint: the source's own fingerprint where the files are not here to hash (an object
            listing's), else None: ingest hashes the local files' bytes.
    """

    splits: dict[str, Path | str]
    origin: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True, kw_only=True)
class Source:
    """One data source, registered once and looked up by the name the user gave.

    Attributes:
        name: the kind as typed, e.g. ``folder``.
        form: the one-string form for help texts, e.g. ``folder:<directory>``.
        description: what the source is, one phrase for the form's kind choices.
        location_help: what ``location`` (the form's "Dataset path") means; empty when none is taken.
        needs_location: True when ``kind:<location>`` is required, False when the bare kind is the whole form.
        options: ``?key=value`` options the source accepts and their types (str or bool); each is also the
            form field ``<name>_<key>``.
        parse: validates the location's syntax (no IO); raises ``UserError``.
        check: cheap up-front validation (paths exist, extras installed); raises ``UserError``.
        stamp: a cheap fingerprint of the source's files (sizes, mtimes, listings) for the ingest cache key;
            it changes whenever the files do.
        materialise: makes class folders under the given cache directory.
        label: a short name for run names.
    """

    name: str
    form: str
    description: str
    location_help: str = ""
    needs_location: bool = False
    options: dict[str, type] = field(default_factory=dict)
    parse: Callable[[str], None] = lambda location: None
    check: Callable[[SourceSpec], None]
    stamp: Callable[[SourceSpec], str]
    materialise: Callable[[SourceSpec, Path], Materialised]
    label: Callable[[SourceSpec], str] | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.name.islower():
            raise ValueError(f"source name {self.name!r} must be a lower-case identifier")
        for key, kind in self.options.items():
            if kind not in (str, bool):
                raise ValueError(f"source {self.name!r} option {key!r} must be str or bool, not {kind!r}")


def publish_dir(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary folder into place; a concurrent writer that got there first wins."""
    try:
        os.replace(tmp, dest)
    except OSError:
        if not dest.is_dir():
            raise


def stamp_files(root: Path, *extra: str) -> str:
    """sha256 over ``root``'s resolved path, ``extra``, and every file's relative path, size and mtime.

    Reads no file contents: cheap enough for a cache key, and any rewrite,
    addition, removal or rename of a file changes it.
    """
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256(str(root.resolve()).encode())
    for item in extra:
        digest.update(f"{item}\n".encode())
    for p in paths:
        st = p.stat()
        digest.update(f"{p.relative_to(root) if p != root else p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def run_helper(module: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python -m module *args`` in a fresh interpreter and return the JSON object it printed last.

    Sources whose libraries load a framework (TensorFlow Datasets, torchvision)
    read in a child process: the Prefect process must import neither framework
    (TensorFlow after torch in one process has segfaulted, and ``trainflow
    serve`` runs many flows in one process). A helper reports a mistake the
    user can fix as ``{"error": kind, ...}`` for the caller to word.

    Raises:
        RuntimeError: when the helper fails without a result (worth a retry: a download hiccup).
    """
    paths = [str(_PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    child_env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(paths)}
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=child_env,
                         check=False)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            if out.returncode == 0 or "error" in result:
                return result
    tail = " | ".join(out.stderr.strip().splitlines()[-5:])
    raise RuntimeError(f"{module} failed with exit code {out.returncode}: {tail}")
