"""The GPU check script runs where it is meant to (torch, numpy and Pillow only) and says what it measured.

On this CPU-only machine it runs small: two seeds of one epoch on a few hundred synthetic images at batch 32,
eager, and two epochs of the per-worker loop under torchrun with one rank. The numbers it is for come from a GPU machine (issue 11).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tar, write_class_folders

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_script_trains_the_recipe_and_runs_the_loop_under_torchrun(tmp_path):
    (tmp_path / "archives").mkdir()
    for split, per_class in (("train", 60), ("test", 20)):
        write_class_folders(tmp_path / split, classes=4, per_class=per_class, size=32, suffix=".jpg")
        make_tar(tmp_path / split, tmp_path / "archives" / f"{split}.tar.gz")
    # neither Ray nor Prefect may be needed: the script runs where they are not installed
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    for name in ("ray", "prefect"):
        (blocker / name).mkdir()
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    out = subprocess.run([sys.executable, "bench/gpu_fast_cifar.py", "--archives", str(tmp_path / "archives"),
                          "--runs", "2", "--epochs", "1", "--batch-size", "32", "--no-compile", "--torchrun-epochs", "2",
                          "--out", str(tmp_path / "result.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=280,
                         env={**os.environ, "PYTHONPATH": str(blocker)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["device"] == "cpu" and result["train_images"] == 240
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["seconds"] > 0 for r in result["runs"])
    assert result["share_reaching_94"] == sum(r["time_to_94"] is not None for r in result["runs"]) / 2
    torchrun = result["torchrun"]
    assert torchrun["returncode"] == 0 and torchrun["ranks"] == 1 and len(torchrun["epochs"]) == 2
    assert torchrun["test_accuracy"] > 0.25  # four classes of stripes: chance is 0.25
