"""The `trainflow` command as a user runs it: a real subprocess, real Prefect and Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tar, pattern_image

ROOT = Path(__file__).resolve().parents[2]


def trainflow(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("args", "words"), [
    (["--dataset", "imagenet"], ["--dataset", "'imagenet'", "digits", "folder:"]),
    (["--dataset", "folder:/no/such/dir"], ["/no/such/dir", "does not exist"]),
    (["--epochs", "0"], ["train.epochs", "greater than or equal to 1"]),
    (["--lr", "-1"], ["train.lr"]),
    (["--batch-size", "0"], ["train.batch_size"]),
    (["--workers", "0"], ["cluster.num_workers"]),
    (["--preset", "nope"], ["--preset", "'nope'", "digits-quickstart"]),
    (["--store", "ftp://host/x"], ["--store", "unsupported scheme"]),
    (["--workers", "3"], ["batch_size=64", "3 workers", "multiple of 3"]),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, words):
    store = tmp_path / "store"
    out = trainflow("run", "--store", str(store), *args, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainflow: error:"), out.stderr
    for word in words:
        assert word in lines[0]
    assert not store.exists()


def mixed_image_set(root: Path) -> Path:
    """JPEG and PNG, RGB and grayscale, several sizes, in class folders."""
    rng = np.random.default_rng(1)
    for label in range(3):
        for i in range(40):
            size = (24, 30, 40)[i % 3]
            gray = i % 2 == 0
            image = Image.fromarray(pattern_image(label, size, rng, channels=1 if gray else 3))
            folder = root / f"kind{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / (f"{i}.jpg" if i % 4 < 2 else f"{i}.png"), quality=95)
    (root / "kind0" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.slow
def test_run_on_a_mixed_image_archive_prints_a_summary(tmp_path):
    archive = make_tar(mixed_image_set(tmp_path / "mixed"), tmp_path / "mixed.tar.gz")
    store = tmp_path / "store"
    out = trainflow("run", "--dataset", f"folder:{archive}", "--workers", "1", "--epochs", "6", "--lr", "0.01",
                    "--image-size", "16", "--batch-size", "16", "--store", str(store), "--json")
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert [s["name"] for s in summary["stages"]] == ["ingest", "preprocess", "train", "evaluate", "publish"]
    assert summary["test_size"] == 24  # 20 % of 120 images, stratified
    assert summary["accuracy"] > 0.8
    assert summary["version"] == 1 and summary["promoted"]
    meta = json.loads(next((store / "prepared").glob("*/meta.json")).read_text())
    assert meta["channels"] == 3 and meta["image_size"] == 16  # mixed set: kept as RGB
    assert "epoch 6/6" in out.stderr  # per-epoch progress in the run's log
