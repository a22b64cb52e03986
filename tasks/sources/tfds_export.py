"""Child process of the ``tfds:`` source: read a TFDS dataset and write its images as class folders.

Run as ``python -m tasks.sources.tfds_export --name N --data-dir D --out O
[--download]``. Prints one JSON line: ``{"classes", "counts", "splits"}`` on
success, or ``{"error": kind, ...}`` for a mistake the user can fix (the
parent words it). It imports TensorFlow, which is why it is a process of its
own.

Images are written as TFDS stored them (PNG or JPEG bytes, never decoded and
re-encoded), so preprocess decodes each image exactly once, as for any folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_MAGIC = {b"\x89PNG\r\n\x1a\n": ".png", b"\xff\xd8\xff": ".jpg"}


class Refusal(Exception):
    """A dataset this source cannot use, with the JSON fields that say why."""

    def __init__(self, kind: str, **fields: Any) -> None:
        super().__init__(kind)
        self.fields = {"error": kind, **fields}


def pick_features(info: Any, tfds: Any) -> tuple[str, str]:
    """The (image, label) feature names: the supervised keys when they are an Image and a ClassLabel,
    else the first Image and the first ClassLabel feature."""
    features = info.features
    kinds = {"image": tfds.features.Image, "label": tfds.features.ClassLabel}
    keys = info.supervised_keys
    if (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) and k in features for k in keys)
            and isinstance(features[keys[0]], kinds["image"]) and isinstance(features[keys[1]], kinds["label"])):
        return keys
    found = {role: next((k for k, f in features.items() if isinstance(f, kind)), None) for role, kind in kinds.items()}
    missing = [f"no {kinds[role].__name__} feature" for role, key in found.items() if key is None]
    if missing:
        raise Refusal("not_classification", detail=f"it has {' and '.join(missing)} (features: {', '.join(features)})")
    return found["image"], found["label"]


def folder_names(names: list[str]) -> list[str]:
    """Class names as safe, distinct folder names (a name may hold '/' or be empty)."""
    out: list[str] = []
    for i, name in enumerate(names):
        safe = name.replace("/", "_").replace("\\", "_").replace("\0", "").strip()
        if not safe or safe.startswith(".") or safe in out:
            safe = f"{safe or 'class'}_{i}".lstrip(".")
        out.append(safe)
    return out


def split_map(available: list[str]) -> dict[str, str]:
    """Our split → TFDS split: train → train; test → test, else validation (e.g. ImageNet's labelled one)."""
    if "train" not in available:
        raise Refusal("no_train", splits=sorted(available))
    test = next((s for s in ("test", "validation") if s in available), None)
    return {"train": "train", **({"test": test} if test else {})}


def export(name: str, data_dir: str, out: Path, download: bool) -> dict[str, Any]:
    """Write ``out/<split>/<class>/<n>.<png|jpg>`` for the train and test splits."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise Refusal("not_found") from None
    if download:
        builder.download_and_prepare()  # the real download path: network, then TFDS's own preparation
    elif not builder.is_prepared():
        raise Refusal("not_prepared")
    image_key, label_key = pick_features(builder.info, tfds)
    classes = folder_names(list(builder.info.features[label_key].names))
    splits = split_map(list(builder.info.splits))
    counts = {}
    for ours, theirs in splits.items():
        for cls in classes:
            (out / ours / cls).mkdir(parents=True, exist_ok=True)
        ds = builder.as_dataset(split=theirs, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()})
        n = 0
        for n, example in enumerate(tfds.as_numpy(ds), start=1):
            data = example[image_key]
            suffix = next((s for magic, s in _MAGIC.items() if data.startswith(magic)), None)
            if suffix is None:
                raise Refusal("unsupported_image", detail=f"its feature {image_key!r} is stored neither as PNG "
                                                          "nor as JPEG (float or 16-bit pixels?)")
            (out / ours / classes[int(example[label_key])] / f"{n - 1:06d}{suffix}").write_bytes(data)
        counts[ours] = n
    return {"classes": classes, "counts": counts, "splits": splits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--download", action="store_true")
    args = ap.parse_args()
    try:
        result = export(args.name, args.data_dir, args.out, args.download)
    except Refusal as refusal:
        print(json.dumps(refusal.fields), flush=True)
        sys.exit(3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
