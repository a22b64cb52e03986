"""The ``digits`` source: scikit-learn's bundled 8x8 digits, written out once as PNG class folders."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from tasks.sources.base import Materialised, Source, publish_dir


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
    publish_dir(tmp, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


SOURCE = Source(
    name="digits",
    form="digits",
    description="bundled with scikit-learn",
    check=lambda spec: None,
    stamp=lambda spec: "digits",  # fixed data: its folder is named by scikit-learn's version
    materialise=lambda spec, cache: Materialised(splits={"all": write_digits(cache)}),
)
