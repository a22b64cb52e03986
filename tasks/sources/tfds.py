"""The ``tfds:`` source: an image-classification dataset of TensorFlow Datasets, as PNG/JPEG class folders.

``tfds:<name>[/<config>][:<version>]`` with the options ``data_dir`` (default
``$TFDS_DATA_DIR``, else TFDS's ``~/tensorflow_datasets``) and ``download``
(let TFDS download and prepare it; off by default, so a run reads only what is
already prepared). Reading imports TensorFlow, which the Prefect process must
never load, so it runs in a child process (``tasks.sources.tfds_export``); the
checks and the stamp here look at the data dir's files with plain Python.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import uuid
from pathlib import Path

from cluster.errors import UserError
from tasks.sources.base import SPLITS, Materialised, Source, SourceSpec, publish_dir, run_helper, stamp_files

# TFDS's own name grammar (tensorflow_datasets/core/naming.py), less namespaces and builder kwargs
_NAME = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)(?:/(?P<config>[\w+\-.]+))?"
                   r"(?::(?P<version>(?:\d+|\*)(?:\.(?:\d+|\*)){2}))?$")
_EXPORT_ENV = {
    "KERAS_BACKEND": "tensorflow",  # a user's KERAS_BACKEND=torch would make TFDS's keras import load torch
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "CUDA_VISIBLE_DEVICES": "",  # reading records needs no GPU; initialising one costs seconds and memory
}


def parse(location: str) -> None:
    """``name[/config][:version]`` as TFDS spells it (snake_case name, version x.y.z)."""
    if not _NAME.match(location):
        raise UserError(f"--dataset 'tfds:{location}': {location!r} is not a TFDS dataset name; "
                        "write it as name[/config][:x.y.z], e.g. tfds:mnist or tfds:cifar10:3.0.2.")


def data_dir(spec: SourceSpec) -> Path:
    """The data dir option, else ``TFDS_DATA_DIR``, else TFDS's default (read now, never at import)."""
    given = spec.options.get("data_dir") or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return Path(str(given)).expanduser().resolve()


def _dataset_root(spec: SourceSpec) -> Path:
    """The folder TFDS keeps this dataset's prepared files in: ``<data_dir>/<name>[/<config>]``."""
    match = _NAME.match(spec.location)
    assert match is not None, spec.location  # parse() ran first
    root = data_dir(spec) / match["name"]
    return root / match["config"] if match["config"] else root


def _has_extra() -> bool:
    for module in ("tensorflow_datasets", "tensorflow"):
        try:
            if importlib.util.find_spec(module) is None:  # finds without importing
                return False
        except (ImportError, ValueError):  # a hidden (None) or half-installed module
            return False
    return True


def not_prepared(spec: SourceSpec) -> UserError:
    return UserError(f"--dataset {spec.text!r}: TFDS dataset {spec.location!r} is not prepared in "
                     f"{data_dir(spec)}; set tfds_data_dir (or TFDS_DATA_DIR) to the folder that holds it, "
                     "or allow tfds_download.")


def check(spec: SourceSpec) -> None:
    """The extra is installed and, unless downloading is allowed, the dataset is prepared in the data dir."""
    if not _has_extra():
        raise UserError(f"--dataset {spec.text!r} needs TensorFlow Datasets: pip install 'trainflow[tensorflow]'.")
    if "://" in str(spec.options.get("data_dir") or ""):
        raise UserError(f"--dataset {spec.text!r}: tfds_data_dir must be a local folder; copy the dataset "
                        "to one or allow tfds_download.")
    if not spec.options.get("download") and not any(_dataset_root(spec).rglob("dataset_info.json")):
        raise not_prepared(spec)


def stamp(spec: SourceSpec) -> str:
    """Every file of the dataset's folder (path, size, mtime), plus the data dir and the download switch.

    Before a permitted download the folder may not exist yet: its stamp is then
    that of an empty folder, and the download's files make the next one differ.
    """
    return stamp_files(_dataset_root(spec), spec.location, f"download={bool(spec.options.get('download'))}")


def _user_error(spec: SourceSpec, result: dict) -> UserError:
    kind = result["error"]
    if kind == "not_prepared":
        return not_prepared(spec)
    if kind == "not_found":
        return UserError(f"--dataset {spec.text!r}: TensorFlow Datasets has no dataset {spec.location!r} (neither "
                         f"registered nor prepared in {data_dir(spec)}); check the name, config and version.")
    if kind == "not_classification":
        return UserError(f"--dataset {spec.text!r}: {result['detail']}; only image classification datasets "
                         "(an Image and a ClassLabel feature) can be ingested.")
    if kind == "unsupported_image":
        return UserError(f"--dataset {spec.text!r}: {result['detail']}; only 8-bit PNG or JPEG images can be "
                         "ingested.")
    if kind == "no_train":
        return UserError(f"--dataset {spec.text!r} has no 'train' split (only {', '.join(result['splits'])}); "
                         "choose a dataset with one.")
    return UserError(f"--dataset {spec.text!r}: {result.get('detail', kind)}.")


def materialise(spec: SourceSpec, cache: Path) -> Materialised:
    """Export once into ``cache/tfds/<stamp>/<split>/<class>/<n>.<png|jpg>`` in a child process."""
    check(spec)
    dest = cache / "tfds" / stamp(spec)
    if not dest.is_dir():
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
        args = ["--name", spec.location, "--data-dir", str(data_dir(spec)), "--out", str(tmp)]
        try:
            result = run_helper("tasks.sources.tfds_export",
                                args + (["--download"] if spec.options.get("download") else []), _EXPORT_ENV)
            if "error" in result:
                raise _user_error(spec, result)
            publish_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return Materialised(splits={split: dest / split for split in SPLITS if (dest / split).is_dir()})


SOURCE = Source(
    name="tfds",
    form="tfds:<name>[/<config>][:<version>]",
    description="a TensorFlow Datasets image-classification dataset named at 'Dataset path', read from "
                "'TFDS data dir'",
    location_help="the TFDS dataset name, e.g. mnist, cifar10:3.0.2 or my_set/config",
    needs_location=True,
    options={"data_dir": str, "download": bool},
    parse=parse,
    check=check,
    stamp=stamp,
    materialise=materialise,
    label=lambda spec: f"tfds:{spec.location}",
)
