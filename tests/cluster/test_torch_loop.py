"""The per-worker loop without Ray: one process, resume, and torchrun with two ranks."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import TrainLoopConfig
from cluster.errors import UserError
from cluster.frameworks import get_framework
from cluster.precision import BF16_CPU_FLAGS, cpu_flags
from cluster.pytorch.loop import LocalContext, train_loop
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


# minor page faults of filling a fresh 64 MiB block (16 384 pages) after one such block was freed
FAULTS_OF_A_BLOCK = """
import resource

def faults_of_a_block():
    bytearray(64 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    bytearray(64 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's (mallopt)")
def test_a_training_process_keeps_the_memory_it_frees(prepared, tmp_path):
    """After the loop, freed blocks are reused instead of unmapped: a step's buffers no longer come back as fresh
    pages to fault in (cluster.worker.keep_freed_memory)."""
    script = FAULTS_OF_A_BLOCK + f"""
import json
from pathlib import Path
from cluster.config import TrainLoopConfig
from cluster.pytorch.loop import LocalContext, train_loop

before = faults_of_a_block()
cfg = TrainLoopConfig(data_dir={data_dir(prepared)!r}, epochs=1, batch_size=32)
train_loop(cfg, LocalContext(Path({str(tmp_path)!r})))
print(json.dumps([before, faults_of_a_block()]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = json.loads(out.stdout.splitlines()[-1])
    assert before > 10_000  # glibc's default: a block this large is a mapping of its own, unmapped on free
    assert after < 1_000


# What a step does on a thread, as Ray Train runs the loop: with 40 MiB kept (the model, the optimizer), a 32 MiB
# block does not fit in the thread's 64 MiB heap, gets a heap of its own, and that heap is unmapped when freed.
# Prints the page faults of filling such a block, 4 times.
THREAD_STEPS = """
import json, resource, threading
from cluster.worker.memory import keep_freed_memory

keep_freed_memory()
faults = []

def steps():
    kept = [bytearray(1 << 20) for _ in range(40)]
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        bytearray(32 << 20)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

thread = threading.Thread(target=steps)
thread.start()
thread.join()
print(json.dumps(faults))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_a_training_thread_keeps_the_memory_it_frees_in_the_torch_workers_environment():
    """Ray's torch workers start with the framework's environment (cluster.frameworks), whose single malloc arena
    keeps what the loop's thread frees; glibc's own thread arenas unmap it."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    faults = {}
    for name, extra in (("default", {}), ("torch", get_framework("torch").env)):
        out = subprocess.run([sys.executable, "-c", THREAD_STEPS], capture_output=True, text=True, timeout=60,
                             env={**env, **extra})
        assert out.returncode == 0, out.stderr[-3000:]
        faults[name] = json.loads(out.stdout.splitlines()[-1])
    assert min(faults["default"][1:]) > 4_000, faults  # 8 192 pages, faulted in again every time
    assert max(faults["torch"][1:]) < 1_000, faults


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
    """Two ranks without Ray, sharing memory, rank 0 prints one JSON line per epoch."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
         "-m", "cluster.pytorch.loop", "--data", data_dir(prepared), "--epochs", "3", "--lr", "0.01",
         "--batch-size", "32", "--checkpoints", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert ("2 workers x 16 per worker (gradients averaged through shared memory, each worker stepping 1/2 of the "
            "parameters)") in out.stdout
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
    assert len(list((tmp_path / "ckpt").iterdir())) == 3
    for name in ("model.pt", "optimizer.pt"):  # the tensors' own bytes, not the shared segment they live in
        path = next((tmp_path / "ckpt").iterdir()) / name
        saved = torch.load(path, weights_only=True)
        tensors = saved.values() if name == "model.pt" else [t for s in saved["state"].values() for t in s.values()]
        assert path.stat().st_size < 1.05 * sum(t.numel() * t.element_size() for t in tensors) + 65536


@pytest.fixture(scope="module", params=["pixels", "encoded"])
def sharded(tmp_path_factory, request) -> str:
    """The `prepared` fixture's kind of dataset, cut into shards of 40 images: pixels, or the encoded files."""
    import cluster.data
    from tasks.ingest import ingest
    from tasks.preprocess import PreprocessConfig, preprocess
    from tests.conftest import write_class_folders

    root = tmp_path_factory.mktemp("sharded")
    write_class_folders(root / "images", classes=3, per_class=80, size=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cluster.data, "SHARD_BYTES", 16 * 16 * 3 * 40)
        ref = preprocess(ingest(f"folder:{root / 'images'}", root / "cache"),
                         PreprocessConfig(image_size=16, stored_as=request.param), str(root / "store"))
    return data_dir((str(root / "store"), ref))


def test_a_streamed_split_learns_and_a_resumed_run_ends_bit_identical(sharded, tmp_path):
    import torch

    from cluster.data import read_manifest

    assert len(read_manifest(Path(sharded)).split_shards("train")) > 4
    cfg = TrainLoopConfig(data_dir=sharded, epochs=4, lr=0.01, batch_size=16, in_memory_mb=0, precision="fp32")
    whole = train_loop(cfg, LocalContext(tmp_path / "whole"))
    assert whole[-1]["train_loss"] < 0.6 * whole[0]["train_loss"] and whole[-1]["val_accuracy"] > 0.9
    train_loop(TrainLoopConfig(**{**cfg.to_dict(), "epochs": 2}), LocalContext(tmp_path / "parts"))
    resumed = train_loop(cfg, LocalContext(tmp_path / "parts"))
    numbers = lambda history: [(m["train_loss"], m["val_loss"], m["val_accuracy"]) for m in history]  # noqa: E731
    assert numbers(resumed) == numbers(whole)
    weights = [torch.load(tmp_path / run / "epoch_0004" / "model.pt", weights_only=True) for run in ("whole", "parts")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
