"""The `trainflow` command as a user runs it: a real subprocess, real Prefect and Ray."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import make_tar, pattern_image
from tests.flows.test_console import ray_noise

ROOT = Path(__file__).resolve().parents[2]


def trainflow(*args: str, timeout: int = 600, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """`trainflow ARGS` in a subprocess, with this process's environment updated by ``env`` (None removes)."""
    merged = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={k: v for k, v in merged.items() if v is not None})


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
    (root / "kind1" / "cut.jpg").write_bytes((root / "kind1" / "1.jpg").read_bytes()[:300])  # truncated JPEG
    return root


def started_with(env: dict[str, str]) -> list[psutil.Process]:
    """The running processes whose environment has ``env``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if env.items() <= proc.environ().items():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.mark.slow
def test_run_on_a_mixed_image_archive_prints_a_summary(tmp_path):
    archive = make_tar(mixed_image_set(tmp_path / "mixed"), tmp_path / "mixed.tar.gz")
    store = tmp_path / "store"
    # inherited by every process the run starts; no PREFECT_API_URL: the run starts (and stops) its own server
    mark = {"TRAINFLOW_TEST_RUN": str(tmp_path), "PREFECT_API_URL": None}
    data_options = ["--dataset", f"folder:{archive}", "--image-size", "16", "--skip-bad-images",
                    "--stored-as", "encoded", "--store", str(store)]  # the files kept, decoded with random crops
    prepared = trainflow("prepare", *data_options, "--json", env=mark)  # once; the run then finds it in the store
    assert prepared.returncode == 0, prepared.stderr[-4000:]
    ref = json.loads(prepared.stdout[prepared.stdout.index("{"):])
    assert ref["uri"].startswith((store / "prepared").as_uri()) and ref["skipped_images"] == 1 and not ref["reused"]
    out = trainflow("run", *data_options, "--workers", "1", "--epochs", "6", "--lr", "0.01", "--batch-size", "16",
                    "--json", env=mark)
    assert out.returncode == 0, out.stderr[-4000:]
    # it stopped what it started (its Ray, Prefect's temporary server), though it exits without Python's teardown
    _, left = psutil.wait_procs(started_with({"TRAINFLOW_TEST_RUN": str(tmp_path)}), timeout=10)
    assert not left, [" ".join(p.cmdline()[:3]) for p in left]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert [s["name"] for s in summary["stages"]] == ["ingest", "preprocess", "train", "evaluate", "publish"]
    assert summary["stages"][1]["skipped"] and summary["stages"][1]["note"].startswith("reused")  # prepare's
    assert (summary["ignored_files"], summary["skipped_images"]) == (1, 1)  # notes.txt, cut.jpg
    assert summary["accuracy"] > 0.8
    assert summary["version"] == 1 and summary["promoted"]
    meta = json.loads(next((store / "prepared").glob("*/manifest.json")).read_text())
    assert meta["channels"] == 3 and meta["image_size"] == 16  # mixed set: kept as RGB
    assert {s["split"] for s in meta["shards"] if s["encoded"]} == {"train"}  # the files, decoded with crops
    assert sum(meta["counts"].values()) == 120 and meta["counts"]["test"] == summary["test_size"]
    # not a terminal: plain lines, one per stage and one per epoch, and none of Ray's own lines
    epochs = [line.split(":")[0] for line in out.stderr.splitlines() if line.startswith("epoch ")]
    assert epochs == [f"epoch {e}/6" for e in range(1, 7)], out.stderr[-4000:]
    assert [line.split()[0] for line in out.stderr.splitlines() if re.match(r"\w+ +[\d.]+ s\b", line)] == \
        ["ingest", "preprocess", "train", "evaluate", "publish"], out.stderr[-4000:]
    assert not ray_noise(out.stdout + out.stderr), ray_noise(out.stdout + out.stderr)
    assert "| INFO " not in out.stderr, out.stderr[-4000:]  # nor Prefect's log lines (its UI and API have them)


@pytest.mark.slow
def test_a_torchvision_network_by_name_fine_tuned_from_a_published_version_on_grayscale(tmp_path):
    """``--model torchvision:resnet18`` through the whole flow twice: on digits, published; then on a 3-class
    folder of one-channel images (repeated to the three channels the network takes) from that version's weights
    (``--weights model:NAME``, its champion) with the finetune recipe, the 10-class head replaced. The run's name, the lineage (origin and
    sha256 of the weights) and ``trainflow predict``, which rebuilds the network from the checkpoint's record,
    all name what was used."""
    from tests.conftest import write_class_folders

    store = str(tmp_path / "store")
    network = ["--model", "torchvision:resnet18", "--batch-size", "16", "--store", store, "--json"]
    source = trainflow("run", "--preset", "smoke", *network, "--model-name", "digits-resnet")
    assert source.returncode == 0, source.stderr[-3000:]
    images = write_class_folders(tmp_path / "gray", classes=3, per_class=20, size=8, channels=1)
    tuned = trainflow("run", "--dataset", f"folder:{images}", "--image-size", "8", "--workers", "1", "--epochs", "2",
                      "--recipe", "finetune", "--lr", "0.002", *network, "--weights", "model:digits-resnet",
                      "--model-name", "gray-resnet")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "starting from model.pt; new head: fc.weight, fc.bias" in tuned.stderr, tuned.stderr[-3000:]
    summary = json.loads(tuned.stdout[tuned.stdout.index("{"):])
    assert summary["run_id"].startswith("torchvision-resnet18-") and summary["model_name"] == "gray-resnet"
    shown = trainflow("models", "show", "gray-resnet", "--store", store)
    lineage = json.loads(shown.stdout[shown.stdout.index("{"):])["lineage"]
    manifest = json.loads((tmp_path / "store/models/digits-resnet/versions/1/manifest.json").read_text())
    digest = {f["name"]: f["sha256"] for f in manifest["files"]}["model.pt"]
    assert lineage["starting_weights"] == {"origin": "model:digits-resnet@1", "sha256": digest}
    assert lineage["parameters"]["train"]["model"] == "torchvision:resnet18"
    assert lineage["parameters"]["train"]["recipe"] == "finetune"
    predicted = trainflow("predict", str(images / "class_1"), "--store", store, "--model", "gray-resnet", "--json")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = json.loads(predicted.stdout[predicted.stdout.index("{"):])["predictions"]
    assert len(rows) == 20 and {row["class"] for row in rows} <= {"class_0", "class_1", "class_2"}
    wrong = trainflow("run", "--dataset", f"folder:{images}", "--image-size", "8", *network, "--weights",
                      "model:digits-resnet@7")
    assert wrong.returncode != 0 and "model 'digits-resnet' has no published version 7" in wrong.stderr


def test_options_are_matched_only_as_spelled():
    """argparse's prefix matching took ``--model`` for ``--model-name`` before ``--model`` existed."""
    from flows.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--model-nam", "x"])
    assert build_parser().parse_args(["run", "--model", "torchvision:resnet18"]).model == "torchvision:resnet18"
