"""Build small, real TFDS datasets for the tests: ``python -m tests.tfds_build OUT``.

Run as a child process because it imports TensorFlow, which must never share
a process with torch (the pytest process imports torch in other tests). It
writes, with ``tfds.dataset_builders.store_as_tfds_dataset`` (TFDS's own
preparation: tfrecord shards, ``dataset_info.json``, ``features.json``):

* ``OUT/base``: ``toy_shapes/rgb16:1.0.0``, 16x16 RGB stripes whose
  orientation and colour give the class (learnable in an epoch or two), train
  and test splits; ``toy_train_only`` (a train split only); ``toy_unlabelled``
  (images without a ClassLabel feature).
* ``OUT/rebuilt``: ``toy_shapes`` again from another seed, as when a dataset is
  regenerated: same names, same counts, different files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from tests.conftest import pattern_image

CLASSES = ("horizontal", "vertical", "diagonal")  # pattern_image's labels 0, 1, 2
TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE = 80, 20, 16


def examples(count: int, rng: np.random.Generator, prefix: str, labelled: bool = True) -> list[tuple[str, dict]]:
    rows = []
    for i in range(count):
        label = i % len(CLASSES)
        example = {"image": pattern_image(label, SIZE, rng)}
        rows.append((f"{prefix}{i:05d}", {**example, "label": label} if labelled else example))
    return rows


def build(data_dir: Path, seed: int, extras: bool) -> None:
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(seed)
    image = tfds.features.Image(shape=(SIZE, SIZE, 3))
    labelled = tfds.features.FeaturesDict({"image": image, "label": tfds.features.ClassLabel(names=list(CLASSES))})
    n = len(CLASSES)
    tfds.dataset_builders.store_as_tfds_dataset(
        name="toy_shapes", config="rgb16", version="1.0.0", features=labelled, data_dir=data_dir,
        split_datasets={"train": examples(TRAIN_PER_CLASS * n, rng, "train"),
                        "test": examples(TEST_PER_CLASS * n, rng, "test")})
    if extras:
        tfds.dataset_builders.store_as_tfds_dataset(
            name="toy_train_only", version="1.0.0", features=labelled, data_dir=data_dir,
            split_datasets={"train": examples(10 * n, rng, "train")})
        tfds.dataset_builders.store_as_tfds_dataset(
            name="toy_unlabelled", version="1.0.0", data_dir=data_dir,
            features=tfds.features.FeaturesDict({"image": image}),
            split_datasets={"train": examples(n, rng, "train", labelled=False)})


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    out = Path(sys.argv[1])
    build(out / "base", seed=0, extras=True)
    build(out / "rebuilt", seed=1, extras=False)


if __name__ == "__main__":
    main()
