"""The per-worker loop without Ray: one process, resume, and torchrun with two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import TrainLoopConfig
from cluster.errors import UserError
from cluster.precision import BF16_CPU_FLAGS, cpu_flags
from cluster.torch_loop import LocalContext, train_loop
from tasks.store import open_store


def data_dir(prepared) -> str:
    store_uri, ref = prepared
    store = open_store(store_uri)
    return str(store.local_dir(store.key_of(ref.uri), Path("/nonexistent")))


def test_loss_falls_and_each_epoch_reports_once(prepared, tmp_path):
    ctx = LocalContext(tmp_path / "ckpt")
    history = train_loop(TrainLoopConfig(data_dir=data_dir(prepared), epochs=6, lr=0.01, batch_size=16), ctx)
    assert [m["epoch"] for m in ctx.reports] == [1, 2, 3, 4, 5, 6]
    assert history == ctx.reports
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.9
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"epoch_000{i}" for i in range(1, 7)]
    # the default, auto, resolved on this machine's CPU and recorded with the checkpoint
    state = json.loads((tmp_path / "ckpt" / "epoch_0006" / "state.json").read_text())
    native = bool(BF16_CPU_FLAGS & cpu_flags())
    assert state["precision"]["requested"] == "auto"
    assert (state["precision"]["dtype"], state["precision"]["channels_last"]) == (("bf16", True) if native
                                                                                  else ("fp32", False))


def test_resumes_from_last_checkpoint_and_only_trains_what_is_left(prepared, tmp_path):
    cfg = TrainLoopConfig(data_dir=data_dir(prepared), epochs=2, lr=0.01, batch_size=32)
    first = LocalContext(tmp_path / "ckpt")
    train_loop(cfg, first)
    second = LocalContext(tmp_path / "ckpt")
    history = train_loop(TrainLoopConfig(**{**cfg.to_dict(), "epochs": 3}), second)
    assert [m["epoch"] for m in second.reports] == [3]
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[:2] == first.reports


def test_bf16_channels_last_mode_learns(prepared, tmp_path):
    ctx = LocalContext(tmp_path / "ckpt")
    cfg = TrainLoopConfig(data_dir=data_dir(prepared), epochs=6, lr=0.01, batch_size=16, precision="bf16",
                          channels_last=True)
    history = train_loop(cfg, ctx)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 0.8
    state = json.loads((tmp_path / "ckpt" / "epoch_0006" / "state.json").read_text())
    assert state["precision"] == {"requested": "bf16", "dtype": "bf16", "channels_last": True, "reason": "as requested"}


def test_config_rejects_bad_values_and_uneven_batches():
    with pytest.raises(UserError, match="epochs"):
        TrainLoopConfig(data_dir="x", epochs=0)
    with pytest.raises(UserError, match="lr"):
        TrainLoopConfig(data_dir="x", lr=0)
    with pytest.raises(UserError, match="split evenly over 3 workers"):
        TrainLoopConfig(data_dir="x", batch_size=64).local_batch_size(3)
    cfg = TrainLoopConfig(data_dir="x", batch_size=64)
    assert TrainLoopConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.slow
def test_runs_under_torchrun_with_two_ranks(prepared, tmp_path):
    """DDP without Ray: two processes over gloo, rank 0 prints one JSON line per epoch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
         "-m", "cluster.torch_loop", "--data", data_dir(prepared), "--epochs", "3", "--lr", "0.01",
         "--batch-size", "32", "--checkpoints", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert "2 workers x 16 per worker (gradients averaged through shared memory)" in out.stdout
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
    assert len(list((tmp_path / "ckpt").iterdir())) == 3
