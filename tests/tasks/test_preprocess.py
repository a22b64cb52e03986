"""Preprocess: seeded stratified splits, decoding (sequential and parallel), stats, and the stored layout."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cluster.data
from cluster.data import MANIFEST, load_split, read_manifest, verify_shard
from cluster.errors import UserError
from tests.conftest import write_class_folders
from tasks import preprocess as pp
from tasks.ingest import ingest
from tasks.images import channel_stats, to_channels
from tasks.preprocess import (PreprocessConfig, decode_images, plan_splits, preprocess, preprocess_task,
                              stratified_split, subsample)
from tasks.refs import RawData
from tasks.store import FileStore


def _items(sizes: dict[int, int]) -> list[tuple[str, int]]:
    return sorted((f"/d/{label}/{i:03d}.png", label) for label, n in sizes.items() for i in range(n))


# --- splitting ------------------------------------------------------------------------------------------------


SIZES = {0: 40, 1: 17, 2: 9, 3: 3, 4: 1}


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.45])
def test_stratified_split_is_disjoint_complete_and_keeps_class_shares(fraction: float):
    items = _items(SIZES)
    kept, held = stratified_split(items, fraction, seed=7)
    assert set(kept).isdisjoint(held)
    assert sorted(kept + held) == items
    assert kept == sorted(kept) and held == sorted(held)
    held_per_class = Counter(y for _, y in held)
    for label, n in SIZES.items():
        if n == 1:
            assert held_per_class[label] == 0  # a lone image stays in the kept split
        else:
            assert abs(held_per_class[label] - fraction * n) <= 1, (label, held_per_class[label])
            assert held_per_class[label] >= 1


def test_stratified_split_is_deterministic_per_seed():
    items = _items(SIZES)
    assert stratified_split(items, 0.25, seed=3) == stratified_split(items, 0.25, seed=3)
    assert stratified_split(list(reversed(items)), 0.25, seed=3) != stratified_split(items, 0.25, seed=4)
    assert stratified_split(items, 0.25, seed=3) != stratified_split(items, 0.25, seed=4)


def test_stratified_split_with_zero_fraction_holds_nothing():
    items = _items(SIZES)
    kept, held = stratified_split(items, 0.0, seed=0)
    assert held == [] and kept == items


def test_subsample_matches_random_sample():
    items = _items({0: 30, 1: 25})
    for seed in (0, 1, 42):
        assert subsample(items, 10, seed) == random.Random(seed).sample(items, 10)
    assert subsample(items, None, 0) == items
    assert subsample(items, len(items), 0) == items
    assert subsample(items, 1000, 0) == items


def _raw(splits: dict[str, Path], classes: tuple[str, ...]) -> RawData:
    return RawData(source="folder:test", fingerprint="f" * 64, splits={k: str(v) for k, v in splits.items()},
                   classes=classes, counts={})


CLASSES3 = ("class_0", "class_1", "class_2")


def test_plan_splits_cuts_test_from_all_and_val_from_train(tmp_path: Path):
    root = write_class_folders(tmp_path / "all", classes=3, per_class=10)
    plan = plan_splits(_raw({"all": root}, CLASSES3), PreprocessConfig(test_fraction=0.2, val_fraction=0.25, seed=5))
    assert set(plan) == {"train", "val", "test"}
    assert [len(plan[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    all_paths = sorted(str(p) for p in root.rglob("*.png"))
    assert sorted(p for s in plan.values() for p, _ in s) == all_paths
    for split in plan.values():
        assert Counter(y for _, y in split) == Counter({0: len(split) // 3, 1: len(split) // 3, 2: len(split) // 3})
        for path, label in split:
            assert Path(path).parent.name == CLASSES3[label]
    # the same config plans the same splits
    assert plan == plan_splits(_raw({"all": root}, CLASSES3),
                               PreprocessConfig(test_fraction=0.2, val_fraction=0.25, seed=5))


def test_plan_splits_with_limits(tmp_path: Path):
    root = write_class_folders(tmp_path / "all", classes=3, per_class=10)
    cfg = PreprocessConfig(test_fraction=0.2, val_fraction=0.25, seed=5, limit_train=12, limit_test=4)
    plan = plan_splits(_raw({"all": root}, CLASSES3), cfg)
    assert len(plan["test"]) == 4
    assert len(plan["train"]) + len(plan["val"]) == 12
    unlimited = plan_splits(_raw({"all": root}, CLASSES3), PreprocessConfig(test_fraction=0.2, val_fraction=0.25,
                                                                           seed=5))
    assert set(plan["test"]) <= set(unlimited["test"])
    assert set(plan["train"] + plan["val"]) <= set(unlimited["train"] + unlimited["val"])
    assert plan["test"] == random.Random(5).sample(unlimited["test"], 4)


def test_plan_splits_keeps_a_given_test_split(tmp_path: Path):
    train = write_class_folders(tmp_path / "ds" / "train", classes=3, per_class=10, seed=1)
    test = write_class_folders(tmp_path / "ds" / "test", classes=3, per_class=3, seed=2)
    plan = plan_splits(_raw({"train": train, "test": test}, CLASSES3), PreprocessConfig(val_fraction=0.1))
    assert sorted(p for p, _ in plan["test"]) == sorted(str(p) for p in test.rglob("*.png"))
    assert all(Path(p).is_relative_to(train) for p, _ in plan["train"] + plan["val"])
    assert len(plan["val"]) == 3 and len(plan["train"]) == 27


def test_plan_splits_cuts_test_from_a_lone_train_split(tmp_path: Path):
    train = write_class_folders(tmp_path / "ds" / "train", classes=3, per_class=10)
    plan = plan_splits(_raw({"train": train}, CLASSES3), PreprocessConfig(test_fraction=0.3, val_fraction=0.0))
    assert len(plan["test"]) == 9 and len(plan["train"]) == 21 and plan["val"] == []


# --- decoding -------------------------------------------------------------------------------------------------


def test_decode_resizes_and_reports_rgb(tmp_path: Path):
    root = write_class_folders(tmp_path / "rgb", classes=2, per_class=3, size=20)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    images, gray, _ = decode_images(paths, 16)
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert gray is False
    expected = np.asarray(Image.open(paths[2]).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(images[2], expected)
    same, _, _ = decode_images(paths, 20)  # no resize needed: pixels come back untouched
    assert np.array_equal(same[0], np.asarray(Image.open(paths[0]).convert("RGB")))


def test_decode_marks_all_grayscale(tmp_path: Path):
    gray_root = write_class_folders(tmp_path / "g", classes=2, per_class=2, channels=1)
    paths = sorted(str(p) for p in gray_root.rglob("*.png"))
    images, gray, _ = decode_images(paths, 8)
    assert gray is True
    assert images.shape == (4, 8, 8, 3)
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(images[..., 1], images[..., 2])
    rgb_root = write_class_folders(tmp_path / "c", classes=1, per_class=1)
    _, mixed, _ = decode_images(paths + [str(next(rgb_root.rglob("*.png")))], 8)
    assert mixed is False


def test_decode_of_no_images():
    images, _, _ = decode_images([], 12)
    assert images.shape == (0, 12, 12, 3)


def test_parallel_decode_matches_sequential(tmp_path: Path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("decode_images only uses a process pool with two or more cores")
    rng = np.random.default_rng(0)
    paths = []
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(pp._PARALLEL_THRESHOLD + 37):
        side = 6 + i % 11
        if i % 3 == 0:
            img = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8), mode="L")
        else:
            img = Image.fromarray(rng.integers(0, 256, (side, side + 1, 3), dtype=np.uint8))
        path = folder / f"{i:05d}.png"
        img.save(path)
        paths.append(str(path))
    images, gray, _ = decode_images(paths, 9)
    reference, ref_gray, bad = pp._decode_chunk((paths, 9, None))
    assert bad == []
    assert images.shape == reference.shape == (len(paths), 9, 9, 3)
    assert images.tobytes() == reference.tobytes()
    assert gray is False and gray == all(ref_gray)


@pytest.mark.parametrize("content", [b"not a png at all", "truncated"])
def test_undecodable_image_is_a_user_error_naming_it(tmp_path: Path, content):
    root = write_class_folders(tmp_path / "ds", classes=2, per_class=3)
    bad = root / "class_1" / "broken.png"
    good_bytes = (root / "class_1" / "0000.png").read_bytes()
    bad.write_bytes(good_bytes[:40] if content == "truncated" else content)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    _, _, found = decode_images(paths, 16)
    assert [(paths[i], "broken.png" in what) for i, what in found] == [(str(bad), True)]
    raw = ingest(f"folder:{root}", tmp_path / "cache")
    with pytest.raises(UserError, match="broken.png") as info:
        preprocess(raw, PreprocessConfig(image_size=8), str(tmp_path / "store"))
    assert "1 image(s)" in str(info.value) and "0000.png" not in str(info.value)
    assert "skip_bad_images" in str(info.value)
    assert not (tmp_path / "store").exists() or not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path: Path):
    root = write_class_folders(tmp_path / "ds", classes=2, per_class=10)
    for i in range(12):  # more than the ten an error message lists
        (root / f"class_{i % 2}" / f"broken{i}.png").write_bytes(b"\x89PNG not really")
    raw = ingest(f"folder:{root}", tmp_path / "cache")
    with pytest.raises(UserError, match="12 image\\(s\\)") as info:
        preprocess(raw, PreprocessConfig(image_size=8), str(tmp_path / "store"))
    assert str(info.value).count("broken") == 10
    prepared = preprocess(raw, PreprocessConfig(image_size=8, skip_bad_images=True), str(tmp_path / "store"))
    assert prepared.skipped_images == 12 and sum(prepared.counts.values()) == 20


def test_to_channels_luma():
    pixels = np.array([[[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]]], dtype=np.uint8)
    luma = to_channels(pixels, 1)
    assert luma.shape == (1, 2, 2, 1) and luma.dtype == np.uint8
    # 0.299 R + 0.587 G + 0.114 B, rounded
    assert luma[0, :, :, 0].tolist() == [[76, 150], [29, 18]]
    white = np.full((1, 1, 1, 3), 255, np.uint8)
    assert to_channels(white, 1).item() == 255
    assert to_channels(pixels, 3) is pixels


def test_channel_stats_on_a_known_array():
    images = np.zeros((2, 1, 2, 3), np.uint8)
    images[..., 0] = [[[0, 255]], [[0, 255]]]  # half 0, half 1 → mean .5, std .5
    images[..., 1] = 51  # constant .2 → std floored at 1e-3
    images[1, 0, 1, 2] = 255  # one of four is 1 → mean .25, std sqrt(.25 * .75)
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.5, 0.2, 0.25))
    assert std == pytest.approx((0.5, 1e-3, np.sqrt(0.25 * 0.75)))
    gray_mean, gray_std = channel_stats(np.full((3, 2, 2, 1), 102, np.uint8))
    assert gray_mean == pytest.approx((0.4,)) and gray_std == pytest.approx((1e-3,))


# --- end to end -----------------------------------------------------------------------------------------------


def _prepared_dir(store: FileStore, uri: str) -> Path:
    return store.local_dir(store.key_of(uri), Path("/nonexistent"))


@pytest.mark.parametrize("channels_in, expected_channels", [(3, 3), (1, 1)])
def test_preprocess_end_to_end(tmp_path: Path, channels_in: int, expected_channels: int):
    root = write_class_folders(tmp_path / "ds", classes=3, per_class=12, size=20, channels=channels_in)
    raw = ingest(f"folder:{root}", tmp_path / "cache")
    store = FileStore(tmp_path / "store")
    cfg = PreprocessConfig(image_size=16, seed=3)
    prepared = preprocess(raw, cfg, store.uri)
    directory = _prepared_dir(store, prepared.uri)
    assert directory.is_relative_to(store.root / "prepared")
    meta_path = directory / MANIFEST
    assert meta_path.is_file()
    npys = sorted(directory.rglob("*.npy"))
    meta = read_manifest(directory)
    assert [p.relative_to(directory).as_posix() for p in npys] == sorted(meta.files())
    assert meta.files() == [f"{s}/00000.{a}.npy" for s in ("train", "val", "test") for a in "xy"]  # one shard each
    assert all(verify_shard(directory, shard) for shard in meta.shards)
    assert all(meta_path.stat().st_mtime_ns >= p.stat().st_mtime_ns for p in npys)

    assert prepared.channels == expected_channels and prepared.image_size == 16
    assert prepared.classes == CLASSES3
    total = 0
    for split in ("train", "val", "test"):
        x, y = load_split(directory, split)
        assert x.dtype == np.uint8 and x.shape == (prepared.counts[split], 16, 16, expected_channels)
        assert y.dtype == np.int64 and y.shape == (prepared.counts[split],)
        assert set(y.tolist()) == {0, 1, 2}
        total += len(y)
    assert total == raw.counts["all"] == 36
    # 12 per class: test round(2.4) = 2, val round(10 * 0.1) = 1, the rest train
    assert prepared.counts == {"train": 27, "val": 3, "test": 6}

    x_train, _ = load_split(directory, "train")
    mean, std = channel_stats(x_train)
    assert prepared.mean == pytest.approx(mean) and prepared.std == pytest.approx(std)
    x_all = np.concatenate([load_split(directory, s)[0] for s in ("train", "val", "test")])
    assert prepared.mean != pytest.approx(channel_stats(x_all)[0], abs=1e-12)  # train only, not everything
    assert len(prepared.mean) == expected_channels

    assert meta.fingerprint == prepared.fingerprint
    assert meta.counts == prepared.counts and meta.channels == expected_channels
    assert json.loads(meta_path.read_text())["classes"] == list(CLASSES3)

    # the stored arrays are the planned files, decoded, in plan order
    plan = plan_splits(raw, cfg)
    decoded, _, _ = decode_images([p for p, _ in plan["test"]], 16)
    x_test, y_test = load_split(directory, "test")
    assert np.array_equal(x_test, to_channels(decoded, expected_channels))
    assert y_test.tolist() == [label for _, label in plan["test"]]

    # deterministic: the same input and config give the same place and fingerprint, found without decoding
    again = preprocess(raw, cfg, store.uri)
    assert again == prepared.model_copy(update={"reused": True})
    meta_path.unlink()  # an incomplete (or wiped) copy in the store is prepared again, to the same bytes
    assert preprocess(raw, cfg, store.uri) == prepared


def test_preprocess_channel_overrides(tmp_path: Path):
    gray_root = write_class_folders(tmp_path / "g", classes=2, per_class=6, channels=1)
    rgb_root = write_class_folders(tmp_path / "c", classes=2, per_class=6, channels=3)
    cache, store = tmp_path / "cache", FileStore(tmp_path / "store")
    as_rgb = preprocess(ingest(f"folder:{gray_root}", cache), PreprocessConfig(image_size=8, channels="rgb"),
                        store.uri)
    assert as_rgb.channels == 3 and len(as_rgb.mean) == 3
    x, _ = load_split(_prepared_dir(store, as_rgb.uri), "train")
    assert x.shape[-1] == 3 and np.array_equal(x[..., 0], x[..., 2])
    as_gray = preprocess(ingest(f"folder:{rgb_root}", cache), PreprocessConfig(image_size=8, channels="grayscale"),
                         store.uri)
    assert as_gray.channels == 1
    assert load_split(_prepared_dir(store, as_gray.uri), "test")[0].shape[1:] == (8, 8, 1)
    assert as_gray.uri != as_rgb.uri


@pytest.mark.parametrize("kwargs, field", [
    ({"image_size": 4}, "image_size"),
    ({"image_size": 1024}, "image_size"),
    ({"channels": "cmyk"}, "channels"),
    ({"val_fraction": 0.5}, "val_fraction"),
    ({"test_fraction": 0.0}, "test_fraction"),
])
def test_config_validation(kwargs: dict, field: str):
    with pytest.raises(UserError, match=field):
        PreprocessConfig(**kwargs)


def test_preprocess_task_fn(tmp_path: Path):
    root = write_class_folders(tmp_path / "ds", classes=2, per_class=5)
    raw = ingest(f"folder:{root}", tmp_path / "cache")
    store = FileStore(tmp_path / "store")
    prepared = preprocess_task.fn(raw, PreprocessConfig(image_size=8), store.uri)
    assert sum(prepared.counts.values()) == 10
    assert store.exists(f"{store.key_of(prepared.uri)}/{MANIFEST}")


def test_shards_written_by_the_pool_are_the_one_shard_dataset_cut_in_runs(tmp_path: Path, monkeypatch):
    """A dataset prepared into many shards (in parallel, each written by the process that decoded it) reads
    back as the same pixels, labels and statistics as with one shard per split; only the layout differs."""
    root = write_class_folders(tmp_path / "ds", classes=3, per_class=(pp._PARALLEL_THRESHOLD // 3) + 10, size=12)
    gray = write_class_folders(tmp_path / "ds_gray", classes=3, per_class=1, size=12, channels=1)
    for i, image in enumerate(sorted(gray.rglob("*.png"))):  # a few grayscale images among the RGB ones
        image.rename(root / f"class_{i}" / f"gray_{i}.png")
    raw = ingest(f"folder:{root}", tmp_path / "cache")
    cfg = PreprocessConfig(image_size=8, seed=1)
    one = preprocess(raw, cfg, str(tmp_path / "one"))
    monkeypatch.setattr(cluster.data, "SHARD_BYTES", 8 * 8 * 3 * 100)  # 100 images a shard
    many = preprocess(raw, cfg, str(tmp_path / "many"))
    dirs = {name: _prepared_dir(FileStore(tmp_path / name), ref.uri) for name, ref in (("one", one), ("many", many))}
    shards = read_manifest(dirs["many"]).split_shards("train")
    assert len(shards) == -(-many.counts["train"] // 100) and {s.count for s in shards[:-1]} == {100}
    assert [s.index for s in shards] == list(range(len(shards)))
    for split in ("train", "val", "test"):
        for a, b in zip(load_split(dirs["one"], split), load_split(dirs["many"], split)):
            assert a.dtype == b.dtype and np.array_equal(a, b), split
    assert (many.mean, many.std, many.counts, many.channels) == (one.mean, one.std, one.counts, one.channels)
    assert many.fingerprint != one.fingerprint  # the fingerprint covers the layout: other shards, other data


def test_a_gray_shard_in_an_rgb_dataset_is_widened_on_read(tmp_path: Path, monkeypatch):
    gray = write_class_folders(tmp_path / "ds" / "class_0", classes=1, per_class=6, size=8, channels=1)
    rgb = write_class_folders(tmp_path / "ds" / "class_1", classes=1, per_class=6, size=8)
    for folder in (gray, rgb):  # flatten class_N/class_0/*.png into class_N/*.png
        for image in folder.rglob("*.png"):
            image.rename(folder / image.name)
    raw = ingest(f"folder:{tmp_path / 'ds'}", tmp_path / "cache")
    monkeypatch.setattr(cluster.data, "SHARD_BYTES", 8 * 8 * 3 * 2)  # 2 images a shard: some shards all gray
    prepared = preprocess(raw, PreprocessConfig(image_size=8, val_fraction=0.0), str(tmp_path / "store"))
    directory = _prepared_dir(FileStore(tmp_path / "store"), prepared.uri)
    stored = {s.channels for s in read_manifest(directory).shards}
    assert prepared.channels == 3 and stored == {1, 3}
    x, y = load_split(directory, "train")
    assert x.shape[1:] == (8, 8, 3)
    assert np.array_equal(x[y == 0][..., 0], x[y == 0][..., 2])  # gray images: R = G = B
    mean, std = channel_stats(x)
    assert prepared.mean == pytest.approx(mean, abs=1e-12) and prepared.std == pytest.approx(std, abs=1e-12)


def test_a_val_folder_beside_train_is_the_test_split(tmp_path: Path):
    write_class_folders(tmp_path / "ds" / "train", classes=2, per_class=8)
    write_class_folders(tmp_path / "ds" / "val", classes=2, per_class=3)
    raw = ingest(f"folder:{tmp_path / 'ds'}", tmp_path / "cache")
    assert sorted(raw.splits) == ["test", "train"] and raw.counts == {"train": 16, "test": 6}
    assert raw.splits["test"] == str(tmp_path / "ds" / "val")
    prepared = preprocess(raw, PreprocessConfig(image_size=8), str(tmp_path / "store"))
    assert prepared.counts["test"] == 6 and prepared.counts["train"] + prepared.counts["val"] == 16


def test_a_split_predicted_a_shard_at_a_time_is_the_whole_split_predicted(tmp_path: Path, monkeypatch):
    from cluster.data import predict_split, write_arrays

    rng = np.random.default_rng(0)
    arrays = {"test": (rng.integers(0, 256, (25, 2, 2, 3), dtype=np.uint8), np.arange(25, dtype=np.int64))}
    monkeypatch.setattr(cluster.data, "SHARD_BYTES", 2 * 2 * 3 * 10)  # 10 images a shard: 3 shards
    manifest = write_arrays(tmp_path, arrays, ("a", "b"))
    assert len(manifest.split_shards("test")) == 3
    seen = []
    predict = lambda x: seen.append(len(x)) or x[:, 0, 0, 0].astype(np.int64)  # noqa: E731
    y_true, y_pred = predict_split(tmp_path, "test", predict)
    assert seen == [10, 10, 5]
    assert np.array_equal(y_true, arrays["test"][1]) and np.array_equal(y_pred, arrays["test"][0][:, 0, 0, 0])
    assert [a.tolist() for a in predict_split(tmp_path, "val", predict)] == [[], []]


def test_encoded_training_shards_keep_the_files_and_decode_to_seeded_crops(tmp_path: Path, monkeypatch):
    """stored_as=encoded: the training shards hold each file's bytes (larger ones shrunk to max_side), val and
    test stay pixels, the statistics are the pixels'; a reader's crops follow (seed, epoch, index) alone, and
    the whole-image view is the pixel shard's image."""
    from cluster.data import EncodedImages, load_shard
    from cluster.worker.stream import Piece, Views, read_piece

    root = write_class_folders(tmp_path / "ds", classes=2, per_class=12, size=40)
    raw = ingest(f"folder:{root}", tmp_path / "cache")
    monkeypatch.setattr(cluster.data, "SHARD_BYTES", 16 * 16 * 3 * 5)  # 5 images a shard
    pixels = preprocess(raw, PreprocessConfig(image_size=16), str(tmp_path / "pixels"))
    encoded = preprocess(raw, PreprocessConfig(image_size=16, stored_as="encoded", max_side=32),
                         str(tmp_path / "encoded"))
    dirs = [_prepared_dir(FileStore(tmp_path / name), ref.uri) for name, ref in (("pixels", pixels),
                                                                                 ("encoded", encoded))]
    manifest = read_manifest(dirs[1])
    assert {s.split for s in manifest.shards if s.encoded} == {"train"} and all(map(lambda s: verify_shard(
        dirs[1], s), manifest.shards))
    assert (encoded.mean, encoded.std, encoded.counts) == (pixels.mean, pixels.std, pixels.counts)
    for split in ("val", "test"):
        assert all(np.array_equal(a, b) for a, b in zip(load_split(dirs[0], split), load_split(dirs[1], split)))
    shard = manifest.split_shards("train")[1]
    files, labels = load_shard(dirs[1], shard, 3)
    assert isinstance(files, EncodedImages) and len(files) == shard.count == 5
    with Image.open(__import__("io").BytesIO(files.file(0))) as img:
        assert max(img.size) == 32 and img.format == "JPEG"  # 40 px shrunk to max_side, saved again as JPEG

    piece = Piece(shard, 1, 4, offset=5)
    open_shard = lambda s: load_shard(dirs[1], s, 3)  # noqa: E731
    crops = [read_piece(open_shard, piece, Views(16, 3, seed=0, epoch=epoch))[0] for epoch in (1, 1, 2)]
    assert crops[0].shape == (3, 16, 16, 3) and np.array_equal(crops[0], crops[1])
    assert not np.array_equal(crops[0], crops[2])
    alone = read_piece(open_shard, Piece(shard, 2, 3, offset=5), Views(16, 3, seed=0, epoch=1))[0]
    assert np.array_equal(alone[0], crops[0][1])  # an image's crop depends on its index, not on its piece
    whole, _ = read_piece(open_shard, piece, Views(16, 3))
    reference = load_shard(dirs[0], read_manifest(dirs[0]).split_shards("train")[1], 3)[0][1:4]
    assert np.abs(whole.astype(int) - reference.astype(int)).mean() < 8  # the same images, through a 32 px JPEG


@pytest.mark.parametrize("kwargs, field", [({"stored_as": "jpeg"}, "stored_as"),
                                           ({"stored_as": "encoded", "max_side": 8}, "max_side")])
def test_encoded_options_are_checked(kwargs: dict, field: str):
    with pytest.raises(UserError, match=field):
        PreprocessConfig(image_size=16, **kwargs)


def test_each_training_shard_is_a_sample_of_every_class(tmp_path: Path, monkeypatch):
    """The files come class by class; the training shards must not (a rank streaming its run of shards would
    see a few classes only), while val and test keep the files' order."""
    from cluster.data import split_shards

    raw = ingest(f"folder:{write_class_folders(tmp_path / 'ds', classes=3, per_class=50, size=8)}", tmp_path / "c")
    monkeypatch.setattr(cluster.data, "SHARD_BYTES", 8 * 8 * 3 * 30)  # 30 images a shard
    prepared = preprocess(raw, PreprocessConfig(image_size=8), str(tmp_path / "store"))
    directory = _prepared_dir(FileStore(tmp_path / "store"), prepared.uri)
    labels = [np.asarray(y) for _, y in split_shards(directory, "train")]
    assert len(labels) >= 3 and all(set(y) == {0, 1, 2} for y in labels)
    test_labels = np.concatenate([np.asarray(y) for _, y in split_shards(directory, "test")])
    assert np.array_equal(test_labels, np.sort(test_labels))
