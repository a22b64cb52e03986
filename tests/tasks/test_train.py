"""The training run's identity: every field that changes what a run learns is in it."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from cluster.config import TrainLoopConfig
from tasks.train import NOT_IDENTITY, run_identity

FINGERPRINT = "f" * 64  # the prepared data's
BASE = TrainLoopConfig(data_dir="/here")
# A different value for every field; a new TrainLoopConfig field fails this test until it is listed here
# and either changes the identity or is declared speed/placement-only in NOT_IDENTITY.
OTHER = {"data_dir": "/elsewhere", "framework": "tensorflow", "recipe": "fast_cifar", "epochs": 11, "batch_size": 32,
         "lr": 0.01, "momentum": 0.5, "seed": 1, "precision": "bf16", "channels_last": True, "use_gpu": True,
         "in_memory_mb": 0, "model": "torchvision:resnet18", "weights": "/elsewhere/start.pt",
         "weights_sha256": "ab" * 32}


def test_every_config_field_is_classified():
    assert {f.name for f in fields(TrainLoopConfig)} == set(OTHER)


@pytest.mark.parametrize("name", sorted(OTHER))
def test_a_field_changes_the_identity_unless_it_only_changes_speed_or_placement(name):
    changed = run_identity(FINGERPRINT, replace(BASE, **{name: OTHER[name]})) != run_identity(FINGERPRINT, BASE)
    assert changed == (name not in NOT_IDENTITY), name


def test_precision_after_fp32_is_a_new_run():
    assert run_identity(FINGERPRINT, replace(BASE, precision="bf16")) != run_identity(FINGERPRINT, BASE)


def test_the_data_fingerprint_changes_the_identity():
    assert run_identity("e" * 64, BASE) != run_identity(FINGERPRINT, BASE)


def test_the_recipes_own_network_keeps_the_identity_runs_had_before_models_could_be_named():
    """An empty ``model`` or ``weights_sha256`` is left out of the identity, so a run finished before the fields
    existed is reused."""
    import hashlib
    import json

    left_out = NOT_IDENTITY | {"model", "weights_sha256"}
    identity = {f.name: getattr(BASE, f.name) for f in fields(BASE) if f.name not in left_out}
    blob = json.dumps({"data": FINGERPRINT, **identity}, sort_keys=True)
    assert run_identity(FINGERPRINT, BASE) == f"seed_cnn-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    assert run_identity(FINGERPRINT, replace(BASE, model="torchvision:resnet18")).startswith("torchvision-resnet18-")
