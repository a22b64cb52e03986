"""The source article's recipe: SGD at a constant learning rate with momentum, plain cross-entropy, no
augmentation, every epoch checkpointed. The network is ``seed_cnn``.

Each framework's parts are built in a function that imports only that framework, when a worker of that
framework calls it (a module that imported both would load TensorFlow and torch into one process).
"""

from __future__ import annotations

from typing import Any

from cluster.config import TrainLoopConfig

__all__ = ["tensorflow_parts", "torch_parts"]


def torch_parts(cfg: TrainLoopConfig) -> Any:
    """SGD (lr, momentum from ``cfg``), constant rate, mean cross-entropy."""
    import torch

    from cluster.pytorch.model import TorchParts

    def optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
        # fused: one kernel updates all parameters (the per-step cost every DDP rank pays in full is lower)
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               fused=device.type in ("cpu", "cuda"))

    return TorchParts(optimizer=optimizer)


def tensorflow_parts(cfg: TrainLoopConfig) -> Any:
    """Keras's SGD (lr, momentum from ``cfg``) at a constant rate; the loop's loss is mean cross-entropy."""
    import keras

    from cluster.tf.model import TensorFlowParts

    return TensorFlowParts(optimizer=lambda: keras.optimizers.SGD(learning_rate=cfg.lr, momentum=cfg.momentum))
