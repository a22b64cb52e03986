"""The GPU check script runs where it is meant to (torch, numpy and Pillow only) and says what it measured.

On this CPU-only machine it runs small: two seeds of one epoch on a few hundred synthetic images at batch 32,
eager, and two epochs of the per-worker loop under torchrun with one rank. The numbers it is for come from a GPU machine (see docs/performance.md).
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
    from cluster.precision import BF16_CPU_FLAGS, cpu_flags

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
    # bf16 only where this CPU computes it natively: emulated, it would be several times slower than fp32
    assert result["precision"] == ("bf16" if BF16_CPU_FLAGS & cpu_flags() else "fp32")
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["seconds"] > 0 for r in result["runs"])
    assert result["share_reaching_94"] == sum(r["time_to_94"] is not None for r in result["runs"]) / 2
    torchrun = result["torchrun"]
    assert torchrun["returncode"] == 0 and torchrun["ranks"] == 1 and len(torchrun["epochs"]) == 2
    assert torchrun["test_accuracy"] > 0.25  # four classes of stripes: chance is 0.25


@pytest.mark.slow
@pytest.mark.timeout(600)  # inductor compiles the forward and backward graphs on two cores: about a minute
def test_compiled_and_eager_steps_agree(tmp_path):
    """The GPU check compiles the model (torch.compile) before it times anything: the compiled model must learn
    what the eager one does. Three recipe steps each from the same weights and batches, fp32 on the CPU."""
    import torch

    from cluster.pytorch import model as tb
    from cluster.config import TrainLoopConfig
    from cluster.recipes import fast_cifar
    from cluster.pytorch.loop import RecipeSteps
    from tests.cluster.test_fast_cifar import spec

    cfg = TrainLoopConfig(data_dir=str(tmp_path), recipe="fast_cifar", epochs=1, batch_size=32, lr=0.4,
                          momentum=0.85)
    x = torch.randn(3, 32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (3, 32), generator=torch.Generator().manual_seed(2))
    losses, weights = {}, {}
    for mode in ("eager", "compiled"):
        parts = fast_cifar.torch_parts(cfg)
        torch.manual_seed(0)
        model = tb.build_model(spec(16))
        parts.init(model, x[0])
        net = torch.compile(model) if mode == "compiled" else model
        steps = RecipeSteps(parts, parts.optimizer(model, torch.device("cpu")), parts.averager(model),
                            torch.autocast("cpu", enabled=False), local_batch=32, total=3)
        losses[mode] = []
        for k in range(3):
            torch.manual_seed(k)  # the same augmentation draws in both modes
            losses[mode].append(steps.take(net, x[k], y[k], k, torch.arange(32), epoch=1).item())
        weights[mode] = {name: t.detach().clone() for name, t in model.state_dict().items()}
    # fusion reorders floating-point sums: close, not bit-identical
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4), losses
    for name, tensor in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][name], tensor, rtol=1e-3, atol=1e-4, msg=name)
    assert losses["eager"][2] != losses["eager"][0]  # the steps changed the weights: the comparison means something
