"""Child process of the ``cifar10`` source: download CIFAR-10 with torchvision, write PNG class folders.

Run as ``python -m tasks.sources.cifar10_export --cache DIR``; prints one JSON
line with the counts per split. It imports torch (through torchvision), which
is why it is a process of its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def export(cache: Path) -> dict[str, int]:
    """Write ``cache/cifar10/<split>/<class>/<n>.png`` and a ``done`` marker last."""
    from torchvision.datasets import CIFAR10  # lazy: only this source needs torchvision

    dest = cache / "cifar10"
    counts = {}
    for split, train in (("train", True), ("test", False)):
        data = CIFAR10(root=str(cache / "cifar10-download"), train=train, download=True)
        for i, (image, label) in enumerate(data):
            out = dest / split / data.classes[label] / f"{i:05d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            image.save(out)
        counts[split] = len(data)
    (dest / "done").touch()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", required=True, type=Path)
    print(json.dumps({"counts": export(ap.parse_args().cache)}), flush=True)


if __name__ == "__main__":
    main()
