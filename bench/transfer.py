"""Transfer: a network trained on five CIFAR-10 classes, fine-tuned on a few images of the other five, against
the same network trained on those images from scratch. JSON on stdout.

    .venv/bin/python bench/transfer.py --archives ../shared/datasets/cifar10-jpeg [--seeds 0 1 2]

Source: ``--model`` (default torchvision:resnet18) with the finetune recipe on ``--source-per-class`` training
images of each of airplane, automobile, bird, cat and deer, published to a folder store as ``transfer-source``.
Target: dog, frog, horse, ship and truck, ``--target-per-class`` training images each (from train/) and
``--test-per-class`` test images each (from test/), a folder with train/ and test/. For each seed the target is
trained twice with the same recipe, epochs and rate: from the source's weights (``--weights
model:transfer-source``, its head replaced) and from scratch. Every run is `trainflow run` as a user types it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
TARGET_CLASSES = ("dog", "frog", "horse", "ship", "truck")


def extract(archive: Path, split: str, classes: tuple[str, ...], per_class: int, into: Path) -> Path:
    """The first ``per_class`` images of each of ``classes`` from ``archive``'s ``split/`` into ``into/split/``."""
    taken = {name: 0 for name in classes}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[1] in taken and taken[parts[1]] < per_class:
                taken[parts[1]] += 1
                target = into / split / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return into


def run(*args: str) -> dict:
    """`trainflow run ARGS --json`: the summary, with its wall time."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", *args, "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"trainflow run {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    summary = json.loads(out.stdout[out.stdout.index("{\n"):])
    return {"accuracy": summary["accuracy"], "wall_s": round(time.perf_counter() - started, 1),
            "training_seconds": round(summary["training_seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archives", type=Path, required=True, help="the folder holding train.tar.gz and test.tar.gz")
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--source-per-class", type=int, default=1000)
    parser.add_argument("--source-epochs", type=int, default=4)
    parser.add_argument("--target-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--target-epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.002)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="transfer-") as tmp:
        tmp = Path(tmp)
        source = extract(args.archives / "train.tar.gz", "train", SOURCE_CLASSES, args.source_per_class,
                         tmp / "source")
        target = extract(args.archives / "train.tar.gz", "train", TARGET_CLASSES, args.target_per_class,
                         tmp / "target")
        extract(args.archives / "test.tar.gz", "test", TARGET_CLASSES, args.test_per_class, target)
        common = ["--model", args.model, "--recipe", "finetune", "--lr", str(args.lr), "--image-size", "32",
                  "--store", str(tmp / "store")]
        source_run = run("--dataset", f"folder:{source}", "--epochs", str(args.source_epochs), *common,
                         "--model-name", "transfer-source")
        seeds = []
        for seed in args.seeds:
            target_args = ["--dataset", f"folder:{target}", "--epochs", str(args.target_epochs), "--seed", str(seed),
                           *common]
            tuned = run(*target_args, "--weights", "model:transfer-source", "--model-name", "transfer-tuned")
            scratch = run(*target_args, "--model-name", "transfer-scratch")
            seeds.append({"seed": seed, "fine_tuned": tuned, "from_scratch": scratch,
                          "margin": round(tuned["accuracy"] - scratch["accuracy"], 4)})
    margins = [s["margin"] for s in seeds]
    print(json.dumps({"model": args.model, "source": {**source_run, "classes": SOURCE_CLASSES,
                                                      "images": args.source_per_class * len(SOURCE_CLASSES)},
                      "target": {"classes": TARGET_CLASSES, "train_images": args.target_per_class * 5,
                                 "test_images": args.test_per_class * 5, "epochs": args.target_epochs},
                      "seeds": seeds, "margin_min": min(margins), "margin_mean": round(statistics.mean(margins), 4)},
                     indent=2))


if __name__ == "__main__":
    main()
