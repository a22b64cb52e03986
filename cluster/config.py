"""Typed configuration of a training run, as it crosses into the workers.

Ray's ``train_loop_config`` is a plain dict; it is built from
:class:`TrainLoopConfig` on the driver and rebuilt into one on each worker's
first line, so a typo or a bad value fails on the driver, before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields

from cluster.errors import UserError
from cluster.frameworks import get_framework
from cluster.models import check_model
from cluster.precision import PRECISIONS
from cluster.recipes import get_recipe


@dataclass(frozen=True, kw_only=True)
class TrainLoopConfig:
    """Everything one worker needs to train; the data is a local directory."""

    data_dir: str
    framework: str = "torch"
    recipe: str = "article"  # a key of cluster.recipes.RECIPES: the network, optimizer, schedule, loss, augmentation
    model: str = ""  # a network of cluster.models instead of the recipe's own; empty: the recipe's
    epochs: int = 10
    batch_size: int = 64  # global: split evenly across workers
    lr: float = 0.001
    momentum: float = 0.9
    seed: int = 0
    precision: str = "auto"  # resolved on each worker, where the hardware is known (cluster.precision)
    channels_last: bool = False  # auto turns it on with bf16
    use_gpu: bool = False
    in_memory_mb: int = 2048  # a training split up to this many MB of pixels is held in memory; larger ones stream
    # starting weights: on the driver, the user's reference (a file, s3:// URI or model:NAME[@VERSION]; resolved by
    # tasks.weights, whose sha256 it records); on a worker, the node's verified local copy. Empty: from scratch
    weights: str = ""
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        framework = get_framework(self.framework)
        recipe = get_recipe(self.recipe)
        recipe.check(self.framework)
        if self.model:
            recipe.check_model(self.model)
        check_model(self.network, self.framework)
        if self.epochs < 1:
            raise UserError(f"epochs={self.epochs} must be at least 1.")
        if not 1 <= self.batch_size <= 65536:
            raise UserError(f"batch_size={self.batch_size} is out of range; choose 1 to 65536.")
        if not 0 < self.lr <= 10:
            raise UserError(f"lr={self.lr} is out of range; choose a learning rate in (0, 10].")
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum={self.momentum} must be in [0, 1).")
        if self.in_memory_mb < 0:
            raise UserError(f"in_memory_mb={self.in_memory_mb} must be 0 (always stream) or more.")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision={self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}.")
        asked = {"precision=bf16": self.precision == "bf16", "channels_last": self.channels_last}
        for option in sorted(name for name, on in asked.items() if on and name not in framework.options):
            raise UserError(f"{option} is not implemented for framework={self.framework!r}; turn it off or "
                            "choose a framework that has it.")

    @property
    def network(self) -> str:
        """The network this run trains: ``model``, or the recipe's own."""
        return self.model or get_recipe(self.recipe).model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainLoopConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def local_batch_size(self, world_size: int) -> int:
        """This worker's share of the global batch.

        Raises:
            UserError: when the global batch does not split evenly.
        """
        if self.batch_size % world_size:
            raise UserError(f"batch_size={self.batch_size} does not split evenly over {world_size} workers; "
                            f"use a multiple of {world_size}.")
        return self.batch_size // world_size


# Fields of TrainLoopConfig that change where or how fast a run trains, never what it learns. Every other
# field is part of the run's identity, so a new field changes the identity unless it is listed here.
# ``precision`` is in it as the parameter's value ("auto"), not as resolved: the workers resolve auto on their
# hardware after the identity is fixed, so a finished auto run trained in bf16 on one machine is reused (or
# resumed) on another that would have chosen fp32. That is accepted: bf16 is tested to stay within a point of
# fp32's test accuracy, and the checkpoint's state.json says what each run actually used.
NOT_IDENTITY = frozenset({"data_dir", "use_gpu", "weights"})  # weights: where; weights_sha256 is what


def run_identity(fingerprint: str, cfg: TrainLoopConfig) -> str:
    """A name for the training run of ``cfg`` on the prepared data of ``fingerprint``: the same whenever its
    result would be."""
    identity = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in NOT_IDENTITY}
    for added in ("model", "weights_sha256"):  # when unset, the identity a run had before the field existed
        if not identity[added]:
            del identity[added]
    blob = json.dumps({"data": fingerprint, **identity}, sort_keys=True)
    # the name is a folder of the run's storage and a Ray Train run name: torchvision:resnet18 → torchvision-resnet18
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', cfg.network)}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
