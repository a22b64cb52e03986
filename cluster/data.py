"""The prepared-data format, owned in one place: both the writer (preprocess)
and the readers (training workers, evaluation) use these names.

A prepared dataset is a directory holding, per split (``train``, ``val``,
``test``), ``<split>_x.npy`` (uint8, NHWC) and ``<split>_y.npy`` (int64), plus
``meta.json``, written last, which lists classes, image size, channels,
counts, the train-only per-channel mean/std and the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
META = "meta.json"


def split_files(split: str) -> tuple[str, str]:
    """File names of a split's images and labels."""
    return f"{split}_x.npy", f"{split}_y.npy"


@dataclass(frozen=True, kw_only=True)
class Meta:
    classes: tuple[str, ...]
    image_size: int
    channels: int
    counts: dict[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    skipped_images: int = 0  # undecodable files left out (skip_bad_images)

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "classes": list(self.classes),
                           "mean": list(self.mean), "std": list(self.std)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Meta:
        raw = json.loads(text)
        return cls(**{**raw, "classes": tuple(raw["classes"]), "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})


def read_meta(directory: Path) -> Meta:
    return Meta.from_json((directory / META).read_text())


def load_split(directory: Path, split: str, *, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A split's (images uint8 NHWC, labels int64).

    With ``mmap`` the arrays are copy-on-write memory maps: workers on one node
    then share the page cache's one copy instead of each holding its own.
    """
    x_name, y_name = split_files(split)
    mode = "c" if mmap else None
    return np.load(directory / x_name, mmap_mode=mode), np.load(directory / y_name, mmap_mode=mode)


def data_files() -> list[str]:
    """Every array file of a prepared dataset, in fingerprint order."""
    return [name for split in SPLITS for name in split_files(split)]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepared_fingerprint(directory: Path) -> str:
    """sha256 over the sha256 of each array file, in :func:`data_files` order: what ``meta.json`` records."""
    digest = hashlib.sha256()
    for name in data_files():
        digest.update(bytes.fromhex(file_sha256(directory / name)))
    return digest.hexdigest()
