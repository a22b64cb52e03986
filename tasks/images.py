"""How one image becomes pixels: decode, convert, resize, and the statistics of a decoded set.

Preprocessing maps these over every file; ``trainflow predict`` decodes its
images the same way. This module needs only numpy and Pillow (no Prefect, no
store), so a script on a machine without the pipeline (``bench/gpu_fast_cifar.py``)
prepares data exactly as the flow does.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np

from cluster.data import GRAY_MODES, ChannelSums, decode_file, to_channels

__all__ = ["GRAY_MODES", "channel_stats", "decode_image", "downscaled", "to_channels"]


def decode_image(source: str | BinaryIO, size: int) -> tuple[np.ndarray, bool]:
    """A file (path or open binary file) as (size, size, 3) uint8 RGB, resized bilinearly when its size differs,
    and whether it was stored as grayscale. Raises what Pillow raises for a file it cannot read."""
    return decode_file(source, size)


def downscaled(data: bytes, max_side: int) -> bytes:
    """An encoded image kept for training: as it is when neither side exceeds ``max_side``, else shrunk to fit
    (Lanczos) and saved again as JPEG (quality 90). Raises what Pillow raises for a file it cannot read."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= max_side:
            return data
        small = img.convert("L" if img.mode in GRAY_MODES else "RGB")
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=90)
    return out.getvalue()


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, on the 0..1 scale."""
    return ChannelSums.of(images).stats()
