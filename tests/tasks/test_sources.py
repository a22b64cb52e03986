"""Data sources: the registry, the one-string form, and TFDS read from a real dataset the tests build."""

from __future__ import annotations

import os
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.data import load_split
from cluster.errors import UserError
from tasks import sources
from tasks.ingest import ingest_cache_key, check_source, ingest, parse_source, source_stamp
from tasks.preprocess import PreprocessConfig, preprocess_task
from tasks.sources import SOURCES
from tasks.store import FileStore
from tests.conftest import needs_tfds

TOY = ("diagonal", "horizontal", "vertical")  # tests/tfds_build.py's ClassLabel names, as sorted class folders
FRAMEWORK_MODULES = ("tensorflow", "tensorflow_datasets", "keras", "torch", "torchvision")


# --- the registry and the one-string form ---------------------------------------------------------------------


def test_registry_holds_one_record_per_source():
    assert list(SOURCES) == ["digits", "cifar10", "folder", "tfds"]
    for name, record in SOURCES.items():
        assert record.name == name and record.form.startswith(name) and record.description
        assert bool(record.location_help) == record.needs_location
    assert SOURCES["tfds"].options == {"data_dir": str, "download": bool}


def test_tfds_strings_parse_and_round_trip():
    assert parse_source("tfds:mnist") == ("tfds", "mnist")
    assert parse_source("tfds:cifar10:3.0.2") == ("tfds", "cifar10:3.0.2")
    spec = sources.parse("tfds:my_set/cfg-1:1.0.0?data_dir=/data/tf%20ds&download=yes")
    assert (spec.kind, spec.location, spec.options) == ("tfds", "my_set/cfg-1:1.0.0",
                                                          {"data_dir": "/data/tf ds", "download": True})
    text = sources.source_string("tfds", spec.location, spec.options)
    assert text == "tfds:my_set/cfg-1:1.0.0?data_dir=/data/tf%20ds&download=true"
    assert sources.parse(text).options == spec.options
    assert sources.source_string("tfds", "mnist", {"data_dir": None, "download": False}) == "tfds:mnist"
    # a folder source takes no options: a '?' is part of its path
    assert parse_source("folder:/data/what?x=1") == ("folder", "/data/what?x=1")


@pytest.mark.parametrize("bad, words", [
    ("tfds:", ["not a known source"]),
    ("tfds", ["not a known source"]),
    ("digits:x", ["not a known source"]),
    ("tfds:MNIST", ["not a TFDS dataset name", "name[/config][:x.y.z]"]),
    ("tfds:mnist:1.0", ["not a TFDS dataset name"]),
    ("tfds:../mnist", ["not a TFDS dataset name"]),
    ("tfds:mnist?colour=red", ["no option 'colour'", "data_dir, download"]),
    ("tfds:mnist?download=maybe", ["download='maybe'", "download=true or false"]),
])
def test_bad_source_strings_are_one_sentence_naming_the_input(bad: str, words: list[str]):
    with pytest.raises(UserError) as info:
        parse_source(bad)
    message = str(info.value)
    assert message.startswith(f"--dataset {bad!r}") and message.endswith(".") and "\n" not in message
    assert not re.search(r"\.\s+[A-Z]", message), message  # one sentence
    for word in words:
        assert word in message


def test_unknown_source_lists_every_form():
    with pytest.raises(UserError) as info:
        check_source("imagenet")
    assert all(record.form in str(info.value) for record in SOURCES.values())
    assert "'tfds:<name>[/<config>][:<version>]'" in str(info.value)


def test_tfds_split_mapping_and_class_folder_names():
    from tasks.sources.tfds_export import Refusal, folder_names, split_map  # plain functions: no TensorFlow

    assert split_map(["test", "train", "extra"]) == {"train": "train", "test": "test"}
    assert split_map(["train", "validation"]) == {"train": "train", "test": "validation"}
    assert split_map(["train"]) == {"train": "train"}
    with pytest.raises(Refusal) as info:
        split_map(["test", "validation"])
    assert info.value.fields == {"error": "no_train", "splits": ["test", "validation"]}
    assert folder_names(["cat", "a/b", "", ".hidden", "cat"]) == ["cat", "a_b", "class_2", "hidden_3", "cat_4"]


# --- tfds: checks before anything starts ----------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [None, types.ModuleType("tensorflow_datasets")],
                         ids=["not-installed", "spec-less-module"])
def test_tfds_without_the_extra_is_one_sentence(monkeypatch, tmp_path: Path, hidden):
    # None in sys.modules: find_spec says "not there"; a module without a spec: find_spec raises ValueError
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", hidden)
    expected = "--dataset 'tfds:x' needs TensorFlow Datasets: pip install 'trainflow[tensorflow]'."
    with pytest.raises(UserError) as info:
        check_source("tfds:x")
    assert str(info.value) == expected
    with pytest.raises(UserError, match="needs TensorFlow Datasets"):
        ingest("tfds:x", tmp_path / "cache")  # ingest called on its own checks first, too
    assert not (tmp_path / "cache").exists()


# The tests below read real TFDS datasets that the session builds with TensorFlow in child processes
# (tfds_data, then an export per dataset: seconds each): slow, as are the tfds flows in tests/flows.
@needs_tfds
@pytest.mark.slow
def test_tfds_check(tfds_data: Path, tmp_path: Path, monkeypatch):
    base = tfds_data / "base"
    for name in ("toy_shapes", "toy_shapes/rgb16", "toy_shapes/rgb16:1.0.0", "toy_train_only"):
        check_source(f"tfds:{name}?data_dir={base}")
    monkeypatch.setenv("TFDS_DATA_DIR", str(base))
    check_source("tfds:toy_shapes")  # the data dir defaults to TFDS_DATA_DIR ...
    missing = tmp_path / "missing"
    for source, where in ((f"tfds:toy_shapes?data_dir={missing}", missing), ("tfds:imagenet_nope", base),
                          ("tfds:toy_shapes/other_config", base)):
        with pytest.raises(UserError) as info:
            check_source(source)
        assert str(info.value) == (f"--dataset {source!r}: TFDS dataset {source[5:].split('?')[0]!r} is not "
                                   f"prepared in {where}; set tfds_data_dir (or TFDS_DATA_DIR) to the folder that "
                                   "holds it, or allow tfds_download.")
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match=f"not prepared in {tmp_path / 'tensorflow_datasets'};"):
        check_source("tfds:toy_shapes")  # ... then to TFDS's own ~/tensorflow_datasets
    check_source(f"tfds:toy_shapes?data_dir={missing}&download=true")  # a download will prepare it
    assert not missing.exists()


# --- tfds: ingest in a child process --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_raw(tfds_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The base toy dataset ingested once, and the modules this process gained while doing so."""
    before = set(sys.modules)
    raw = ingest(f"tfds:toy_shapes?data_dir={tfds_data / 'base'}", tmp_path_factory.mktemp("tfds-cache"))
    return raw, set(sys.modules) - before


def _stripe_profile(path: Path) -> tuple[float, float]:
    """Variance of the row means and of the column means: horizontal stripes vary between rows only."""
    with Image.open(path) as img:
        assert img.size == (16, 16) and img.mode == "RGB"
        pixels = np.asarray(img, dtype=np.float32).mean(axis=2)
    return float(pixels.mean(axis=1).var()), float(pixels.mean(axis=0).var())


@needs_tfds
@pytest.mark.slow
def test_tfds_ingest_writes_the_class_folders(toy_raw):
    raw, gained = toy_raw
    assert not {m.split(".")[0] for m in gained} & set(FRAMEWORK_MODULES), "ingest loaded a framework here"
    assert raw.classes == TOY  # the ClassLabel's names
    assert raw.counts == {"train": 240, "test": 60}
    assert set(raw.splits) == {"train", "test"} and raw.ignored_files == 0 and raw.origin is None
    for split, per_class in (("train", 80), ("test", 20)):
        folder = Path(raw.splits[split])
        assert folder.parent.parent.name == "tfds"  # <cache>/tfds/<stamp>/<split>
        profiles = {}
        for cls in TOY:
            files = sorted((folder / cls).iterdir())
            assert len(files) == per_class and all(f.suffix == ".png" for f in files)
            profiles[cls] = np.array([_stripe_profile(f) for f in files])  # (rows, cols) per image
        # each label went with its image: stripes of the class's orientation (diagonal ones average out)
        strong = min(profiles["horizontal"][:, 0].min(), profiles["vertical"][:, 1].min())
        assert profiles["horizontal"][:, 1].max() < strong / 10 and profiles["vertical"][:, 0].max() < strong / 10
        assert profiles["diagonal"].max() < strong / 10


@needs_tfds
@pytest.mark.slow
def test_tfds_ingest_again_reuses_the_export(toy_raw, tfds_data: Path, monkeypatch):
    raw, _ = toy_raw
    cache = Path(raw.splits["train"]).parents[2]
    monkeypatch.setattr(sources.tfds, "run_helper", lambda *a, **k: pytest.fail("exported twice"))
    assert ingest(f"tfds:toy_shapes?data_dir={tfds_data / 'base'}", cache) == raw


@needs_tfds
@pytest.mark.slow
def test_tfds_stamp_and_fingerprint_follow_the_files(toy_raw, tfds_data: Path, tmp_path: Path):
    raw, _ = toy_raw
    data_dir = tmp_path / "tfds"
    shutil.copytree(tfds_data / "base" / "toy_shapes", data_dir / "toy_shapes")
    source = f"tfds:toy_shapes?data_dir={data_dir}"
    before = source_stamp(source)
    assert source_stamp(source) == before and len(before) == 64
    # the dataset is regenerated: same name, splits and counts, other images
    shutil.rmtree(data_dir / "toy_shapes")
    shutil.copytree(tfds_data / "rebuilt" / "toy_shapes", data_dir / "toy_shapes")
    rebuilt = source_stamp(source)
    assert rebuilt != before
    again = ingest(source, tmp_path / "cache")
    assert (again.classes, again.counts) == (raw.classes, raw.counts)
    assert again.fingerprint != raw.fingerprint  # raw holds the base dataset's images
    # any file touched: another stamp; the download switch and data dir are part of it, and so of the cache key
    shard = next((data_dir / "toy_shapes").rglob("*-train.tfrecord-*"))
    os.utime(shard, ns=(1_000_000_000, 1_000_000_000))
    assert source_stamp(source) not in (before, rebuilt)
    assert source_stamp(f"{source}&download=true") != source_stamp(source)
    assert source_stamp(f"tfds:toy_shapes?data_dir={tfds_data / 'base'}") != source_stamp(source)
    key = ingest_cache_key(None, {"source": source, "cache_dir": str(tmp_path / "c")})
    shard.write_bytes(shard.read_bytes())
    assert ingest_cache_key(None, {"source": source, "cache_dir": str(tmp_path / "c")}) != key


@needs_tfds
@pytest.mark.slow
def test_tfds_without_a_test_split_gives_train_only(tfds_data: Path, tmp_path: Path):
    raw = ingest(f"tfds:toy_train_only?data_dir={tfds_data / 'base'}", tmp_path / "cache")
    assert raw.counts == {"train": 30} and raw.classes == TOY  # preprocess cuts test from train, as for folders


@needs_tfds
@pytest.mark.slow
@pytest.mark.parametrize("name, words", [
    ("toy_shapes:9.9.9", ["TensorFlow Datasets has no dataset 'toy_shapes:9.9.9'", "check the name"]),
    ("toy_unlabelled", ["no ClassLabel feature (features: image)", "only image classification datasets"]),
])
def test_tfds_datasets_it_cannot_use_are_one_sentence(tfds_data: Path, tmp_path: Path, name: str, words: list[str]):
    source = f"tfds:{name}?data_dir={tfds_data / 'base'}"
    with pytest.raises(UserError) as info:
        ingest(source, tmp_path / "cache")
    assert str(info.value).startswith(f"--dataset {source!r}: ")
    for word in words:
        assert word in str(info.value)
    assert not list((tmp_path / "cache").rglob("*.png"))  # nothing half-exported left behind


@needs_tfds
@pytest.mark.slow
def test_tfds_through_preprocess(toy_raw, tmp_path: Path):
    raw, _ = toy_raw
    store = FileStore(tmp_path / "store")
    prepared = preprocess_task.fn(raw, PreprocessConfig(image_size=16, val_fraction=0.1), store.uri)
    assert prepared.classes == TOY and prepared.image_size == 16 and prepared.channels == 3
    assert prepared.counts == {"train": 216, "val": 24, "test": 60}
    directory = store.local_dir(store.key_of(prepared.uri), Path("/nonexistent"))
    x, y = load_split(directory, "test")
    assert x.shape == (60, 16, 16, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [20, 20, 20]
