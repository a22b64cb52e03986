"""The prepared-data format, owned in one place: both the writer (preprocess)
and the readers (training workers, evaluation) use these names.

A prepared dataset is a directory holding, per split (``train``, ``val``,
``test``), ``<split>_x.npy`` (uint8, NHWC) and ``<split>_y.npy`` (int64), plus
``meta.json``, written last, which lists classes, image size, channels,
counts, the train-only per-channel mean/std and the fingerprint.
"""

from __future__ import annotations

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


def load_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's (images uint8 NHWC, labels int64)."""
    x_name, y_name = split_files(split)
    return np.load(directory / x_name), np.load(directory / y_name)
