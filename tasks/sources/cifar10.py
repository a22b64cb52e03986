"""The ``cifar10`` source: CIFAR-10 downloaded with torchvision and written once as PNG class folders.

torchvision imports torch, which the Prefect process must never load, so the
download and export run in a child process (``tasks.sources.cifar10_export``).
"""

from __future__ import annotations

from pathlib import Path

from tasks.sources.base import SPLITS, Materialised, Source, run_helper


def download_cifar10(cache: Path) -> dict[str, Path]:
    """Download CIFAR-10 and write it as PNG class folders under ``cache/cifar10`` (once)."""
    dest = cache / "cifar10"
    if not (dest / "done").exists():
        run_helper("tasks.sources.cifar10_export", ["--cache", str(cache)])
    return {split: dest / split for split in SPLITS}


SOURCE = Source(
    name="cifar10",
    form="cifar10",
    description="downloaded by torchvision",
    check=lambda spec: None,
    stamp=lambda spec: "cifar10",  # a fixed, published dataset
    materialise=lambda spec, cache: Materialised(splits=download_cifar10(cache)),
)
