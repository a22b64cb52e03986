"""A small trained model without Ray, for the evaluate and publish tests."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cluster.config import TrainLoopConfig
from cluster.pytorch.loop import LocalContext, train_loop
from tests.conftest import write_class_folders
from tasks.ingest import ingest
from tasks.preprocess import PreprocessConfig, preprocess
from tasks.refs import EpochMetrics, PreparedData, RawData, TrainedModel
from tasks.store import FileStore

EPOCHS = 3


@dataclass(frozen=True)
class Trained:
    store: FileStore
    raw: RawData
    prepared: PreparedData
    model: TrainedModel
    checkpoint_key: str
    cache_dir: Path


def train_small_model(root: Path, run_id: str = "seed_cnn-test") -> Trained:
    """Easy 3-class pattern images → prepared data in a FileStore → 3 epochs of train_loop → checkpoint in store."""
    images = write_class_folders(root / "images", classes=3, per_class=20, size=16)
    raw = ingest(f"folder:{images}", root / "cache" / "raw")
    store = FileStore(root / "store")
    prepared = preprocess(raw, PreprocessConfig(image_size=16, seed=0), store.uri)
    data_dir = store.local_dir(store.key_of(prepared.uri), root / "cache" / "prepared")
    ctx = LocalContext(root / "checkpoints")
    # one intra-op thread: this tiny model trains ~10x faster than with OpenMP threads fighting a busy CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = train_loop(TrainLoopConfig(data_dir=str(data_dir), epochs=EPOCHS, lr=0.01, batch_size=4), ctx)
    finally:
        torch.set_num_threads(threads)
    last = root / "checkpoints" / f"epoch_{EPOCHS:04d}"
    assert last.is_dir(), sorted(p.name for p in (root / "checkpoints").iterdir())
    checkpoint_key = f"checkpoints/{run_id}/checkpoint_{EPOCHS:06d}"
    for path in sorted(last.iterdir()):
        store.put_file(f"{checkpoint_key}/{path.name}", path)
    shutil.rmtree(root / "checkpoints")  # evaluation must read the store's copy, not the training folder
    model = TrainedModel(checkpoint_uri=store.child_uri(checkpoint_key), framework="torch", model="seed_cnn",
                         run_id=run_id, history=tuple(EpochMetrics(**m) for m in history), num_workers=1)
    return Trained(store=store, raw=raw, prepared=prepared, model=model, checkpoint_key=checkpoint_key,
                   cache_dir=root / "cache")
