"""How one image becomes pixels: decode, convert, resize, and the statistics of a decoded set.

Preprocessing maps these over every file; ``trainflow predict`` decodes its
images the same way. This module needs only numpy and Pillow (no Prefect, no
store), so a script on a machine without the pipeline (``bench/gpu_fast_cifar.py``)
prepares data exactly as the flow does.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np

from cluster.data import ChannelSums

__all__ = ["GRAY_MODES", "channel_stats", "decode_image", "to_channels"]

GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def decode_image(source: str | BinaryIO, size: int) -> tuple[np.ndarray, bool]:
    """A file (path or open binary file) as (size, size, 3) uint8 RGB, resized bilinearly when its size differs,
    and whether it was stored as grayscale. Raises what Pillow raises for a file it cannot read."""
    from PIL import Image

    with Image.open(source) as img:
        rgb = img.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb), img.mode in GRAY_MODES


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NHWC RGB images with ``channels`` channels: as they are (3), or their luma (1)."""
    if channels == 3:
        return images
    # ITU-R 601 luma, the same weights PIL uses for convert("L")
    luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, on the 0..1 scale."""
    return ChannelSums.of(images).stats()
