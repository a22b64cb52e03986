"""Ingest: source strings, class-folder layouts and archives, fingerprints, and unsafe or broken input."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from cluster.errors import UserError
from tests.conftest import make_tar, run_threads, write_class_folders
from tasks.ingest import (check_source, file_sha256, ingest, ingest_task, parse_source, safe_extract,
                          source_stamp)

CLASSES = ("class_0", "class_1", "class_2")


# --- source strings -------------------------------------------------------------------------------------------


def test_parse_source_known_kinds():
    assert parse_source("digits") == ("digits", "")
    assert parse_source("cifar10") == ("cifar10", "")
    assert parse_source("folder:/data/x") == ("folder", "/data/x")
    assert parse_source("folder:rel/x.tar.gz") == ("folder", "rel/x.tar.gz")


@pytest.mark.parametrize("bad", ["mnist", "", "folder:", "Digits", "/data/x", "folder"])
def test_parse_source_unknown_names_the_input(bad: str):
    with pytest.raises(UserError) as info:
        parse_source(bad)
    assert repr(bad) in str(info.value)


def test_check_source(tmp_path: Path):
    check_source("digits")
    check_source("cifar10")
    check_source(f"folder:{tmp_path}")
    with pytest.raises(UserError, match="does not exist"):
        check_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="not a known source"):
        check_source("imagenet")


# --- digits ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits-cache")


def test_digits(digits_cache: Path):
    first = ingest("digits", digits_cache)
    assert first.source == "digits"
    assert first.classes == tuple(str(i) for i in range(10))
    assert set(first.splits) == {"all"}
    assert first.counts == {"all": 1797}
    assert first.ignored_files == 0
    root = Path(first.splits["all"])
    files = sorted(root.rglob("*.png"))
    assert len(files) == 1797
    with Image.open(files[0]) as img:
        assert img.size == (8, 8) and img.mode == "L"
    second = ingest("digits", digits_cache)
    assert second.fingerprint == first.fingerprint
    assert second == first
    assert len(first.fingerprint) == 64


# --- folder layouts -------------------------------------------------------------------------------------------


def test_plain_class_folders(image_folder, tmp_path: Path):
    root = image_folder("plain", classes=3, per_class=5)
    raw = ingest(f"folder:{root}", tmp_path / "cache")
    assert raw.classes == CLASSES
    assert raw.splits == {"all": str(root)}
    assert raw.counts == {"all": 15}
    assert raw.ignored_files == 0
    assert raw.source == f"folder:{root}"


def test_tar_gz_with_wrapper_dir(image_folder, tmp_path: Path):
    root = image_folder("plain", classes=3, per_class=5)
    archive = make_tar(root, tmp_path / "data.tar.gz", arcname="wrapper/inner")
    cache = tmp_path / "cache"
    raw = ingest(f"folder:{archive}", cache)
    assert raw.classes == CLASSES
    assert raw.counts == {"all": 15}
    directory = Path(raw.splits["all"])
    assert directory.is_relative_to(cache)
    assert directory.name == "inner"
    # same images → same fingerprint as the unpacked folder
    assert raw.fingerprint == ingest(f"folder:{root}", cache).fingerprint


def test_split_layout_dirs(tmp_path: Path):
    write_class_folders(tmp_path / "ds" / "train", classes=3, per_class=6, seed=1)
    write_class_folders(tmp_path / "ds" / "test", classes=3, per_class=2, seed=2)
    raw = ingest(f"folder:{tmp_path / 'ds'}", tmp_path / "cache")
    assert raw.splits == {"train": str(tmp_path / "ds" / "train"), "test": str(tmp_path / "ds" / "test")}
    assert raw.counts == {"train": 18, "test": 6}
    assert raw.classes == CLASSES


def test_split_layout_of_archives_like_cifar(tmp_path: Path):
    write_class_folders(tmp_path / "src" / "train", classes=3, per_class=6, seed=1)
    write_class_folders(tmp_path / "src" / "test", classes=3, per_class=2, seed=2)
    ds = tmp_path / "ds"
    ds.mkdir()
    make_tar(tmp_path / "src" / "train", ds / "train.tar.gz")
    make_tar(tmp_path / "src" / "test", ds / "test.tar.gz")
    cache = tmp_path / "cache"
    raw = ingest(f"folder:{ds}", cache)
    assert set(raw.splits) == {"train", "test"}
    assert raw.counts == {"train": 18, "test": 6}
    assert raw.classes == CLASSES
    for split in ("train", "test"):
        directory = Path(raw.splits[split])
        assert directory.is_relative_to(cache)
        assert directory.name == split  # the wrapper folder inside each archive
    # the fingerprint is over content: the same as the unpacked split folders
    plain = ingest(f"folder:{tmp_path / 'src'}", cache)
    assert raw.fingerprint == plain.fingerprint


def test_non_images_are_ignored_and_counted(image_folder, tmp_path: Path):
    root = image_folder("plain", classes=2, per_class=4)
    (root / "class_0" / "notes.txt").write_text("hello")
    (root / "class_1" / "labels.csv").write_text("a,b")
    (root / "class_1" / "Thumbs.db").write_bytes(b"\0")
    (root / "README.md").write_text("top-level file, not in a class folder")
    raw = ingest(f"folder:{root}", tmp_path / "cache")
    assert raw.counts == {"all": 8}
    assert raw.ignored_files == 3
    # ignoring them also leaves the fingerprint alone
    clean = image_folder("clean", classes=2, per_class=4)
    assert ingest(f"folder:{clean}", tmp_path / "cache").fingerprint == raw.fingerprint


def test_upper_case_suffixes_are_images(image_folder, tmp_path: Path):
    root = image_folder("upper", classes=2, per_class=3, suffix=".PNG")
    assert ingest(f"folder:{root}", tmp_path / "cache").counts == {"all": 6}


def test_fingerprint_follows_content_not_mtime(image_folder, tmp_path: Path):
    root = image_folder("fp", classes=2, per_class=4)
    cache = tmp_path / "cache"
    before = ingest(f"folder:{root}", cache).fingerprint
    target = root / "class_1" / "0002.png"
    os.utime(target, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    assert ingest(f"folder:{root}", cache).fingerprint == before
    pixels = Image.open(target).convert("RGB")
    pixels.putpixel((0, 0), (255 - pixels.getpixel((0, 0))[0], 0, 0))
    pixels.save(target)
    after = ingest(f"folder:{root}", cache).fingerprint
    assert after != before
    # renaming an image (same bytes) also changes it: names are part of the fingerprint
    target.rename(root / "class_1" / "renamed.png")
    assert ingest(f"folder:{root}", cache).fingerprint not in (before, after)


def test_source_stamp_changes_with_files(image_folder):
    root = image_folder("stamp", classes=2, per_class=3)
    source = f"folder:{root}"
    stamp = source_stamp(source)
    assert source_stamp(source) == stamp
    target = root / "class_0" / "0000.png"
    target.write_bytes(target.read_bytes() + b"\0")
    changed = source_stamp(source)
    assert changed != stamp
    os.utime(target, ns=(5_000_000_000, 5_000_000_000))
    assert source_stamp(source) != changed
    (root / "class_1" / "new.png").write_bytes((root / "class_1" / "0000.png").read_bytes())
    assert source_stamp(source) not in (stamp, changed)
    assert source_stamp("digits") == "digits"
    with pytest.raises(UserError):
        source_stamp(f"folder:{root / 'missing'}")


def test_source_stamp_of_an_archive_changes_with_its_bytes(image_folder, tmp_path: Path):
    archive = make_tar(image_folder("a", classes=2, per_class=2), tmp_path / "a.tar.gz")
    stamp = source_stamp(f"folder:{archive}")
    with open(archive, "ab") as f:
        f.write(b"\0" * 10)
    assert source_stamp(f"folder:{archive}") != stamp


# --- unsafe and broken input ----------------------------------------------------------------------------------


def _tar_with_member(archive: Path, member_name: str, payload: bytes = b"evil") -> Path:
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    with tarfile.open(archive, "w:gz") as tar:
        for cls in ("a", "b"):
            info = tarfile.TarInfo(f"ds/{cls}/ok.png")
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
        info = tarfile.TarInfo(member_name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return archive


@pytest.mark.parametrize("member", ["../evil.png", "ds/a/../../../evil.png"])
def test_archive_with_parent_member_is_refused(tmp_path: Path, member: str):
    work = tmp_path / "work"
    work.mkdir()
    archive = _tar_with_member(work / "bad.tar.gz", member)
    cache = work / "cache"
    with pytest.raises(UserError, match="unsafe member"):
        ingest(f"folder:{archive}", cache)
    assert sorted(p.name for p in work.iterdir()) == ["bad.tar.gz", "cache"]
    assert not list(tmp_path.rglob("evil.png"))
    assert not (cache / "archives").exists() or not any((cache / "archives").iterdir())


def test_archive_with_absolute_member_is_refused(tmp_path: Path):
    target = tmp_path / "abs" / "evil.png"
    archive = _tar_with_member(tmp_path / "bad.tar.gz", str(target))
    with pytest.raises(UserError, match="unsafe member"):
        ingest(f"folder:{archive}", tmp_path / "cache")
    assert not target.exists()
    assert not list(tmp_path.rglob("evil.png"))


def test_archive_with_symlink_member_is_refused(tmp_path: Path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("ds/a/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(UserError, match="unsafe member"):
        ingest(f"folder:{archive}", tmp_path / "cache")


@pytest.mark.parametrize("corruption", ["truncated", "garbage", "flipped"])
def test_corrupt_archive_is_a_user_error(image_folder, tmp_path: Path, corruption: str):
    good = make_tar(image_folder("c", classes=2, per_class=3), tmp_path / "good.tar.gz").read_bytes()
    data = {"truncated": good[: len(good) // 2],
            "garbage": b"this is not a tar archive " * 20,
            "flipped": good[:30] + bytes(b ^ 0xFF for b in good[30:200]) + good[200:]}[corruption]
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(data)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="not a readable tar archive"):
        ingest(f"folder:{bad}", cache)
    # no half-extracted directory is left to be mistaken for a finished one
    assert not (cache / "archives" / file_sha256(bad)).exists()


def test_train_and_test_with_different_classes(tmp_path: Path):
    write_class_folders(tmp_path / "ds" / "train", classes=3, per_class=2)
    write_class_folders(tmp_path / "ds" / "test", classes=2, per_class=2)
    with pytest.raises(UserError, match="same class folders"):
        ingest(f"folder:{tmp_path / 'ds'}", tmp_path / "cache")


def test_single_class_is_refused(image_folder, tmp_path: Path):
    root = image_folder("one", classes=1, per_class=3)
    with pytest.raises(UserError, match="class"):
        ingest(f"folder:{root}", tmp_path / "cache")


def test_single_class_with_class_folder_siblings_is_refused(tmp_path: Path):
    # a second, empty class folder keeps ingest from descending into the only populated one
    root = write_class_folders(tmp_path / "one", classes=1, per_class=3)
    (root / "empty_class").mkdir()
    with pytest.raises(UserError, match="only the class 'class_0'"):
        ingest(f"folder:{root}", tmp_path / "cache")


def test_empty_folder_is_refused(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders with images"):
        ingest(f"folder:{tmp_path / 'empty'}", tmp_path / "cache")


def test_folder_with_only_non_images_is_refused(tmp_path: Path):
    for cls in ("a", "b"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        (tmp_path / "ds" / cls / "x.txt").write_text("x")
    with pytest.raises(UserError, match="no class folders with images"):
        ingest(f"folder:{tmp_path / 'ds'}", tmp_path / "cache")


def test_missing_path_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        ingest(f"folder:{tmp_path / 'nope'}", tmp_path / "cache")


def test_unknown_source_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match="'nonsense'"):
        ingest("nonsense", tmp_path / "cache")


# --- archive cache --------------------------------------------------------------------------------------------


def test_safe_extract_reuses_an_extracted_archive(image_folder, tmp_path: Path):
    archive = make_tar(image_folder("x", classes=2, per_class=2), tmp_path / "x.tar.gz")
    cache = tmp_path / "cache"
    first = safe_extract(archive, cache)
    assert first == cache / "archives" / file_sha256(archive)
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*.png")) == [
        "x/class_0/0000.png", "x/class_0/0001.png", "x/class_1/0000.png", "x/class_1/0001.png"]
    marker = first / "x" / "class_0" / "0000.png"
    marker.write_bytes(b"planted")
    (first / "planted-marker").write_text("still here")
    second = safe_extract(archive, cache)
    assert second == first
    assert marker.read_bytes() == b"planted"  # not re-extracted
    assert (first / "planted-marker").read_text() == "still here"
    # only one entry in the archive cache, no temporaries left
    assert [p.name for p in (cache / "archives").iterdir()] == [first.name]


def test_copied_archive_shares_the_extraction(image_folder, tmp_path: Path):
    archive = make_tar(image_folder("x", classes=2, per_class=2), tmp_path / "x.tar.gz")
    copy = tmp_path / "elsewhere" / "y.tar.gz"
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)
    cache = tmp_path / "cache"
    assert safe_extract(archive, cache) == safe_extract(copy, cache)


# --- the Prefect task -----------------------------------------------------------------------------------------


def test_ingest_task_fn_uses_the_raw_cache(image_folder, tmp_path: Path):
    root = image_folder("t", classes=2, per_class=3)
    archive = make_tar(root, tmp_path / "t.tar.gz")
    raw = ingest_task.fn(f"folder:{archive}", str(tmp_path / "mycache"))
    assert raw.counts == {"all": 6}
    assert Path(raw.splits["all"]).is_relative_to(tmp_path / "mycache" / "raw")
    assert raw == ingest(f"folder:{archive}", tmp_path / "mycache" / "raw")


def test_concurrent_extraction_of_one_archive(image_folder, tmp_path: Path):
    import threading

    archive = make_tar(image_folder("x", classes=3, per_class=30), tmp_path / "x.tar.gz")
    for round_ in range(5):
        cache = tmp_path / f"cache{round_}"
        results: list[object] = []
        barrier = threading.Barrier(4)

        def extract() -> None:
            barrier.wait()
            try:
                results.append(safe_extract(archive, cache))
            except Exception as exc:
                results.append(exc)

        run_threads(extract, [()] * 4, timeout=60)
        assert results == [cache / "archives" / file_sha256(archive)] * 4
