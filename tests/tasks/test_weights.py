"""Starting weights (tasks.weights): found, checked for the framework, staged in the store once by sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cluster.errors import UserError
from tasks.store import open_store
from tasks.weights import resolve_weights


def test_a_local_file_is_staged_once_under_its_hash(tmp_path):
    weights = tmp_path / "start.pt"
    weights.write_bytes(b"not really a state dict")
    store = open_store(str(tmp_path / "store"))
    staged = resolve_weights(str(weights), store, "torch")
    digest = hashlib.sha256(b"not really a state dict").hexdigest()
    assert (staged.origin, staged.key, staged.sha256) == (str(weights), f"weights/{digest}/start.pt", digest)
    assert store.get_bytes(staged.key) == b"not really a state dict"
    assert resolve_weights(str(weights), store, "torch") == staged  # the same bytes: the same key, written once
    assert store.list("weights") == [staged.key]


@pytest.mark.parametrize(("reference", "framework", "message"), [
    ("missing.pt", "torch", r"weights='missing.pt' is not a file on this machine; give a file, an s3:// URI"),
    ("model.keras", "torch", r"framework='torch' loads .pt, .pth, .safetensors files"),
    ("model.pt", "tensorflow", r"framework='tensorflow' loads .keras files"),
    ("model:", "torch", r"weights='model:' names no model"),
    ("model:seed@x", "torch", r"the version must be a number"),
    ("model:nobody", "torch", r"model 'nobody' has no champion in .*; name a version"),
    ("model:nobody@2", "torch", r"model 'nobody' has no published version 2"),
])
def test_a_reference_that_cannot_be_used_is_one_sentence(tmp_path, reference, framework, message):
    for name in ("model.keras", "model.pt"):
        (tmp_path / name).write_bytes(b"x")
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(UserError, match=message):
        resolve_weights(str(tmp_path / reference) if reference.startswith("model.") else reference, store,
                        framework)
    assert not store.list("weights")  # nothing staged


def test_an_s3_object_is_staged_into_the_runs_store(s3_server, tmp_path):
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="shared/weights/resnet.pt", Body=b"weights bytes")
    store = open_store(str(tmp_path / "store"))
    staged = resolve_weights(f"s3://{s3_server.bucket}/shared/weights/resnet.pt", store, "torch")
    assert staged.sha256 == hashlib.sha256(b"weights bytes").hexdigest()
    assert store.get_bytes(staged.key) == b"weights bytes" and staged.file_name == "resnet.pt"
    with pytest.raises(UserError, match="does not exist; check the bucket and key"):
        resolve_weights(f"s3://{s3_server.bucket}/shared/weights/other.pt", store, "torch")


def test_torchvision_named_weights_come_from_torchs_cache(tmp_path, monkeypatch):
    """``torchvision:IMAGENET1K_V1`` for ``torchvision:resnet18``: the file torchvision keeps in
    $TORCH_HOME/hub/checkpoints, staged as any file (here a state dict of that network put there, as a machine
    without network gets it)."""
    import torch
    import torchvision

    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / Path(
        torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    store = open_store(str(tmp_path / "store"))
    staged = resolve_weights("torchvision:IMAGENET1K_V1", store, "torch", "torchvision:resnet18")
    assert staged.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert staged.key == f"weights/{staged.sha256}/{cached.name}" and store.exists(staged.key)
    with pytest.raises(UserError, match=r"torchvision could not provide them .*get_model_weights\('resnet18'\)"):
        resolve_weights("torchvision:IMAGENET1K_V9", store, "torch", "torchvision:resnet18")
    with pytest.raises(UserError, match="are torchvision's, for a torchvision network; set model"):
        resolve_weights("torchvision:IMAGENET1K_V1", store, "torch", "seed_cnn")
