"""The prepared-data format, owned in one place: the writers (preprocess's decoding workers) and the
readers (training workers, evaluation) use these names.

A prepared dataset is a folder (or store prefix) of shards plus ``manifest.json``, written last. A
shard is a run of one split's images: ``<split>/<index>.x.npy`` (uint8 NHWC) and
``<split>/<index>.y.npy`` (int64 labels), at most :data:`SHARD_BYTES` of pixels, written by
whichever process decoded it, straight into the store. The manifest lists classes, image size,
channels, counts, the train-only per-channel mean and std (merged from each shard's sums), the
shards (split, index, count, channels, sha256, which host wrote it) and the fingerprint: sha256 over
the shards' digests in manifest order. A folder without its manifest is not a prepared dataset.

A shard of an ``auto``-channel dataset holds one channel when all its images were grayscale; a
reader widens it when the dataset as a whole is RGB (a gray pixel is the same value in R, G and B).

A training shard may instead hold its images encoded (``encoded``: the original JPEG/PNG/... files,
downscaled to a maximum side where larger): ``<index>.bytes.npy`` (the files end to end, uint8),
``<index>.offsets.npy`` (int64, where each starts, and the end) and ``<index>.y.npy``. Readers decode
them as they train, a random-resized crop per image and epoch (``cluster.worker.stream``), so no two
epochs see the same pixels; validation and test shards always hold pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT = "trainflow-prepared/2"
SHARD_BYTES = 32 << 20  # pixels per shard: tens of MB, so any process holds a few shards, never a split


def images_per_shard(image_size: int) -> int:
    """How many images one shard holds at ``image_size`` (3 channels): a function of the size alone, so that
    the same data prepares into the same shards on any machine."""
    return max(1, SHARD_BYTES // (image_size * image_size * 3))


@dataclass(frozen=True, kw_only=True)
class Shard:
    split: str
    index: int
    count: int
    channels: int  # as stored: 1 or 3
    sha256: str  # over its files' sha256, concatenated in the order of ``files``
    writer: str  # the host (and Ray node, on a cluster) that decoded and wrote it
    encoded: bool = False  # the images as their encoded files, decoded by the reader

    @property
    def files(self) -> tuple[str, ...]:
        """The shard's file names, relative to the dataset's folder: (images, labels), and the offsets when
        ``encoded``."""
        stem = f"{self.split}/{self.index:05d}"
        if self.encoded:
            return f"{stem}.bytes.npy", f"{stem}.y.npy", f"{stem}.offsets.npy"
        return f"{stem}.x.npy", f"{stem}.y.npy"


@dataclass(frozen=True, kw_only=True)
class Manifest:
    classes: tuple[str, ...]
    image_size: int
    channels: int
    counts: dict[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    shards: tuple[Shard, ...]
    skipped_images: int = 0  # undecodable files left out (skip_bad_images)
    format: str = FORMAT

    def to_json(self) -> str:
        fields = {**asdict(self), "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                  "shards": [asdict(s) for s in self.shards]}
        return json.dumps(fields, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError(f"prepared data of format {raw.get('format')!r}, not {FORMAT!r}: prepare it again")
        return cls(**{**raw, "classes": tuple(raw["classes"]), "mean": tuple(raw["mean"]), "std": tuple(raw["std"]),
                      "shards": tuple(Shard(**s) for s in raw["shards"])})

    def split_shards(self, split: str) -> list[Shard]:
        return [s for s in self.shards if s.split == split]

    def pixel_bytes(self, split: str) -> int:
        """A split's decoded pixels, in bytes: what holding it whole in memory takes."""
        return self.counts[split] * self.image_size ** 2 * self.channels

    def encoded(self, split: str) -> bool:
        """Whether the split's shards hold encoded images (decoded, with random crops, as they are read)."""
        return any(s.encoded for s in self.split_shards(split))

    def files(self) -> list[str]:
        """Every shard file, in manifest order (the manifest itself not included)."""
        return [name for shard in self.shards for name in shard.files]


@dataclass(frozen=True)
class ChannelSums:
    """Per-channel sums of uint8 pixel values and of their squares, and how many pixels: exact integers, so
    that sums over parts (a dataset's shards) merge into exactly the sums over the whole."""

    pixels: int
    sums: tuple[int, ...]
    squares: tuple[int, ...]

    @classmethod
    def of(cls, images: np.ndarray) -> ChannelSums:
        flat = images.reshape(-1, images.shape[-1]).astype(np.int64)
        return cls(len(flat), tuple(int(v) for v in flat.sum(axis=0)), tuple(int(v) for v in (flat * flat).sum(axis=0)))

    def widened(self, channels: int) -> ChannelSums:
        """The sums of the same images repeated into ``channels`` (a gray shard in an RGB dataset)."""
        if len(self.sums) == channels:
            return self
        return ChannelSums(self.pixels, self.sums * channels, self.squares * channels)

    def __add__(self, other: ChannelSums) -> ChannelSums:
        return ChannelSums(self.pixels + other.pixels, tuple(a + b for a, b in zip(self.sums, other.sums)),
                           tuple(a + b for a, b in zip(self.squares, other.squares)))

    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std on the 0..1 scale."""
        n = max(self.pixels, 1)
        mean = tuple(s / (255 * n) for s in self.sums)
        var = [(q * n - s * s) / (255 * 255 * n * n) for s, q in zip(self.sums, self.squares)]  # exact until here
        return mean, tuple(max(float(np.sqrt(v)), 1e-3) for v in var)  # a constant channel must not divide by zero


def read_manifest(directory: Path) -> Manifest:
    return Manifest.from_json((directory / MANIFEST).read_text())


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def shard_bytes(x: np.ndarray | EncodedImages, y: np.ndarray) -> tuple[list[bytes], str]:
    """A shard's files as bytes, in the order of :attr:`Shard.files`, and its digest (see :class:`Shard`)."""
    labels = _npy(np.ascontiguousarray(y, np.int64))
    if isinstance(x, EncodedImages):
        files = [_npy(x.data), labels, _npy(x.offsets)]
    else:
        files = [_npy(np.ascontiguousarray(x, np.uint8)), labels]
    return files, shard_digest(*(hashlib.sha256(f).digest() for f in files))


def shard_digest(*file_sha256s: bytes) -> str:
    return hashlib.sha256(b"".join(file_sha256s)).hexdigest()


@dataclass(frozen=True, eq=False)
class EncodedImages:
    """A shard's images as their encoded files (JPEG, PNG, ...): the files end to end, and where each starts."""

    data: np.ndarray  # uint8
    offsets: np.ndarray  # int64, one more than there are images: the last is the end

    @classmethod
    def of(cls, files: list[bytes]) -> EncodedImages:
        offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
        return cls(np.frombuffer(b"".join(files), np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def file(self, i: int) -> bytes:
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes()


Box = tuple[int, int, int, int]  # left, top, right, bottom


def decode_file(source, size: int, crop: Callable[[int, int], Box] | None = None) -> tuple[np.ndarray, bool]:
    """An image file (a path, or an open binary file) as (size, size, 3) uint8 RGB, resized bilinearly when its
    size differs (the region ``crop(width, height)`` of it, if given), and whether the file was stored as
    grayscale. Raises what Pillow raises for a file it cannot read."""
    from PIL import Image

    with Image.open(source) as img:
        rgb = img.convert("RGB")
        box = crop(*rgb.size) if crop else None
        if rgb.size != (size, size) or box is not None:
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(rgb), img.mode in GRAY_MODES


GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NHWC RGB images with ``channels`` channels: as they are (3), or their luma (1)."""
    if channels == 3:
        return images
    # ITU-R 601 luma, the same weights PIL uses for convert("L")
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]


def fingerprint(shards: list[Shard] | tuple[Shard, ...]) -> str:
    """The dataset's fingerprint: sha256 over its shards' digests, in order."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(bytes.fromhex(shard.sha256))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_shard(directory: Path, shard: Shard) -> bool:
    """Whether a shard's files under ``directory`` are the bytes its manifest entry names."""
    return shard_digest(*(bytes.fromhex(file_sha256(directory / name)) for name in shard.files)) == shard.sha256


def widen(x: np.ndarray, channels: int) -> np.ndarray:
    """A shard's images with the dataset's channel count: a one-channel (gray) shard repeated into RGB."""
    return np.repeat(x, 3, axis=-1) if x.shape[-1] != channels else x


def load_shard(directory: Path, shard: Shard, channels: int, *, mmap: bool = False
               ) -> tuple[np.ndarray | EncodedImages, np.ndarray]:
    """One shard's (images uint8 NHWC with ``channels``, or :class:`EncodedImages`; labels int64)."""
    mode = "c" if mmap else None
    x_name, y_name, *offsets = shard.files
    x = np.load(directory / x_name, mmap_mode=mode)
    labels = np.load(directory / y_name, mmap_mode=mode)
    if shard.encoded:
        return EncodedImages(x, np.load(directory / offsets[0])), labels
    return widen(x, channels), labels


def split_shards(directory: Path, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A split's shards one at a time, as (images, labels) memory maps: for passes that need one shard at once."""
    manifest = read_manifest(directory)
    for shard in manifest.split_shards(split):
        yield load_shard(directory, shard, manifest.channels, mmap=True)


def predict_split(directory: Path, split: str, predict: Callable[[np.ndarray], np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, ``predict(images)``) over a split, a shard at a time: memory bounded by a shard."""
    pairs = [(np.asarray(y), np.asarray(predict(x))) for x, y in split_shards(directory, split)]
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([y for y, _ in pairs]), np.concatenate([p for _, p in pairs])


def load_split(directory: Path, split: str, *, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A split's (images uint8 NHWC, labels int64), its shards in order: the whole split in memory.

    With ``mmap`` and a one-shard split the arrays are copy-on-write memory maps: workers on one node
    then share the page cache's one copy instead of each holding its own.
    """
    manifest = read_manifest(directory)
    parts = [load_shard(directory, s, manifest.channels, mmap=mmap) for s in manifest.split_shards(split)]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        size = manifest.image_size
        return np.zeros((0, size, size, manifest.channels), np.uint8), np.zeros(0, np.int64)
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def write_arrays(directory: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]], classes: tuple[str, ...],
                 writer: str = "") -> Manifest:
    """Arrays already in memory (uint8 NHWC images, int64 labels per split) as a prepared dataset in ``directory``:
    for benchmarks and tests that make small datasets without the pipeline; the pipeline's workers write
    their shards as they decode them instead."""
    shards, sums = [], []
    size, channels = next(iter(arrays.values()))[0].shape[2:]
    step = images_per_shard(size)
    for split in SPLITS:
        x_all, y_all = arrays.get(split, (np.zeros((0, size, size, channels), np.uint8), np.zeros(0, np.int64)))
        for index, start in enumerate(range(0, len(y_all), step)):
            x, y = x_all[start:start + step], y_all[start:start + step]
            files, digest = shard_bytes(x, y)
            shard = Shard(split=split, index=index, count=len(y), channels=channels, sha256=digest, writer=writer)
            for name, data in zip(shard.files, files):
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                (directory / name).write_bytes(data)
            shards.append(shard)
            if split == "train":
                sums.append(ChannelSums.of(x))
    mean, std = sum(sums, ChannelSums(0, (0,) * channels, (0,) * channels)).stats()
    manifest = Manifest(classes=tuple(classes), image_size=size, channels=channels, mean=mean, std=std,
                        counts={s: sum(sh.count for sh in shards if sh.split == s) for s in SPLITS},
                        shards=tuple(shards), fingerprint=fingerprint(shards))
    (directory / MANIFEST).write_text(manifest.to_json())
    return manifest
