"""Every mistake a user can make, through the real `trainflow run`.

Each case asserts: exit code 2, one `trainflow: error:` line naming the input
and the fix, no traceback anywhere, and a store exactly as it was before (a
store that already holds a champion, so "nothing published, pointer unchanged"
is checked, not assumed). Cases caught by the preflight take a few seconds;
those caught inside the flow (by ingest, or before preprocess writes) start a
flow run (on the module's `trainflow up`, whose Ray they use) and so take longer:
they are marked slow, and `make test-fast` keeps the preflight cases and the
champion store's real run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import make_tar, write_class_folders
from tests.flows.test_cli import trainflow


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and the sha256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> Iterator[dict[str, str | None]]:
    """`trainflow up` for the module's runs (the environment that points them at it): the cases caught inside
    the flow then start no Ray of their own, as a user's runs do once `up` is running. Stopped by `down`."""
    from cluster.ports import free_port

    env = {"TRAINFLOW_HOME": str(tmp_path_factory.mktemp("up-home")), "PREFECT_API_URL": None, "RAY_ADDRESS": None,
           "PREFECT_HOME": str(tmp_path_factory.mktemp("up-prefect"))}
    started = trainflow("up", "--prefect-port", str(free_port()), "--cpus", "2", env=env, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield env
    finally:
        stopped = trainflow("down", env=env, timeout=300)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory, warm) -> Path:
    """A store holding one published champion, made by a real smoke run."""
    store = tmp_path_factory.mktemp("champion") / "store"
    out = trainflow("run", "--preset", "smoke", "--store", str(store), env=warm)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (store / "models" / "seed-cnn" / "champion.json").exists()
    return store


# --- the inputs ------------------------------------------------------------------------------------------------
# Each builder gets a scratch folder and returns the arguments to add to `trainflow run`.


def tiny_images(root: Path, classes: int = 2, per_class: int = 10) -> Path:
    return write_class_folders(root, classes=classes, per_class=per_class, size=10)


def empty_folder(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return ["--dataset", f"folder:{tmp / 'empty'}"]


def folders_without_images(tmp: Path) -> list[str]:
    for name in ("cats", "dogs"):
        (tmp / "noimg" / name).mkdir(parents=True)
        (tmp / "noimg" / name / "README.txt").write_text("photos to follow")
    return ["--dataset", f"folder:{tmp / 'noimg'}"]


def single_class(tmp: Path) -> list[str]:
    return ["--dataset", f"folder:{tiny_images(tmp / 'one', classes=1)}"]


def undecodable_images(tmp: Path) -> list[str]:
    root = tiny_images(tmp / "broken", per_class=50)  # enough for the smoke preset's batch of 64
    good = (root / "class_0" / "0000.png").read_bytes()
    (root / "class_0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class_1" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    return ["--dataset", f"folder:{root}"]


def split_class_mismatch(tmp: Path) -> list[str]:
    tiny_images(tmp / "splits" / "train", classes=3)
    tiny_images(tmp / "splits" / "test", classes=2)
    return ["--dataset", f"folder:{tmp / 'splits'}"]


def corrupt_archive(tmp: Path) -> list[str]:
    (tmp / "corrupt.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8)
    return ["--dataset", f"folder:{tmp / 'corrupt.tar.gz'}"]


def truncated_archive(tmp: Path) -> list[str]:
    archive = make_tar(tiny_images(tmp / "imgs", per_class=40), tmp / "whole.tar.gz")
    data = archive.read_bytes()
    (tmp / "truncated.tar.gz").write_bytes(data[: len(data) // 2])
    return ["--dataset", f"folder:{tmp / 'truncated.tar.gz'}"]


def archive_with_member(name: str) -> Callable[[Path], list[str]]:
    """An archive of good class folders plus one member at ``name`` (``{tmp}`` is the scratch folder)."""

    def build(tmp: Path) -> list[str]:
        archive = tmp / "unsafe.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(tiny_images(tmp / "imgs"), arcname="imgs")
            payload = b"escaped"
            info = tarfile.TarInfo(name.format(tmp=tmp))
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        return ["--dataset", f"folder:{archive}"]

    return build


ESCAPE = f"escaped-{uuid.uuid4().hex[:8]}.png"

# id → (builder of extra args, words the error line must contain)
Cases = dict[str, tuple[Callable[[Path], list[str]], list[str]]]
# caught by the preflight, before any server or cluster starts
PREFLIGHT: Cases = {
    "missing-path": (lambda tmp: ["--dataset", f"folder:{tmp / 'nowhere'}"], ["nowhere", "does not exist"]),
    "unknown-source": (lambda tmp: ["--dataset", "imagenet"], ["--dataset", "'imagenet'", "digits", "folder:",
                                                                "tfds:<name>"]),
    "tfds-not-prepared": (lambda tmp: ["--dataset", "tfds:absent_set", "--tfds-data-dir", str(tmp)],
                          ["'tfds:absent_set?data_dir=", "not prepared in", "tfds_data_dir", "tfds_download"]
                          if importlib.util.find_spec("tensorflow_datasets") else
                          ["'tfds:absent_set", "needs TensorFlow Datasets", "trainflow[tensorflow]"]),
    "unknown-framework": (lambda tmp: ["--framework", "caffe"], ["train.framework", "'torch'"]),
    "unknown-recipe": (lambda tmp: ["--recipe", "resnet9000"], ["train.recipe", "'article'", "'fast_cifar'"]),
    "recipe-framework": (lambda tmp: ["--recipe", "fast_cifar", "--framework", "tensorflow"],
                         ["recipe='fast_cifar' is not implemented for framework='tensorflow'", "'torch'"]),
    "recipe-image-size": (lambda tmp: ["--recipe", "fast_cifar", "--image-size", "12"],
                          ["recipe='fast_cifar' needs images of at least 16 pixels", "image_size"]),
    "unknown-preset": (lambda tmp: ["--preset", "nope"], ["--preset", "'nope'", "digits-quickstart"]),
    "epochs-0": (lambda tmp: ["--epochs", "0"], ["train.epochs", "greater than or equal to 1"]),
    "epochs-huge": (lambda tmp: ["--epochs", "100000"], ["train.epochs", "less than or equal to 1000"]),
    "lr-negative": (lambda tmp: ["--lr", "-1"], ["train.lr", "greater than 0"]),
    "lr-huge": (lambda tmp: ["--lr", "50"], ["train.lr", "less than or equal to 10"]),
    "batch-0": (lambda tmp: ["--batch-size", "0"], ["train.batch_size", "greater than or equal to 1"]),
    "workers-0": (lambda tmp: ["--workers", "0"], ["cluster.num_workers"]),
    "batch-not-divisible": (lambda tmp: ["--workers", "3"], ["batch_size=64", "3 workers", "multiple of 3"]),
    "store-scheme": (lambda tmp: ["--store", "ftp://host/x"], ["--store", "unsupported scheme"]),
}
# caught inside the flow: by ingest, or before preprocess writes to the store
IN_FLOW: Cases = {
    "empty-folder": (empty_folder, ["empty", "no class folders with images", "<class>/<image>"]),
    "folders-without-images": (folders_without_images, ["noimg", "no class folders with images"]),
    "single-class": (single_class, ["only the class 'class_0'", "at least two"]),
    "undecodable-images": (undecodable_images,
                           ["2 image(s) could not be decoded", "truncated.png", "garbage.jpg", "--skip-bad-images"]),
    "split-class-mismatch": (split_class_mismatch, ["test split", "class_2", "same class folders"]),
    "corrupt-archive": (corrupt_archive, ["corrupt.tar.gz", "not a readable tar archive", "repack"]),
    "truncated-archive": (truncated_archive, ["truncated.tar.gz", "not a readable tar archive"]),
    "archive-dotdot-member": (archive_with_member(f"imgs/../../{ESCAPE}"), ["unsafe member", "relative paths"]),
    "archive-absolute-member": (archive_with_member(f"{{tmp}}/abs-{ESCAPE}"), ["unsafe member", "relative paths"]),
    "batch-larger-than-train-set": (lambda tmp: ["--dataset", f"folder:{tiny_images(tmp / 'few')}"],
                                    ["batch_size=64", "larger than the training set", "--batch-size"]),
    "more-workers-than-cpus": (lambda tmp: ["--workers", "64"], ["cannot place 64 workers x (1 CPU)", "at most 2 such", "lower num_workers"]),
    "gpus-on-a-cpu-cluster": (lambda tmp: ["--gpu", "--workers", "1"], ["cannot place 1 worker x (1 CPU + 1 GPU)", "2 CPU + 0 GPU", "use_gpu"]),
}
CASES: Cases = {**PREFLIGHT, **IN_FLOW}


def assert_one_clear_line(out, words: list[str]) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    errors = [line for line in out.stderr.splitlines() if line.startswith("trainflow: error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("case", [*PREFLIGHT, *(pytest.param(case, marks=pytest.mark.slow) for case in IN_FLOW)])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, champion_store, warm, tmp_path):
    if case == "gpus-on-a-cpu-cluster" and shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU, so a one-GPU worker fits")
    build, words = CASES[case]
    scratch = tmp_path / "input"
    scratch.mkdir()
    extra = build(scratch)
    store = tmp_path / "store"
    shutil.copytree(champion_store, store)
    before = snapshot(store)
    out = trainflow("run", "--preset", "smoke", "--store", str(store), *extra, timeout=300, env=warm)
    assert_one_clear_line(out, words)
    assert snapshot(store) == before  # nothing published, no prepared data, champion pointer as it was
    cache = Path(os.environ["TRAINFLOW_CACHE_DIR"])
    assert not list(cache.rglob(f"*{ESCAPE}")) and not list(tmp_path.rglob(f"*{ESCAPE}"))  # nothing extracted
