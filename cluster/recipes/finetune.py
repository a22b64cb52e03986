"""A general recipe for any network, pretrained or not: AdamW, a warm-up then a cosine decay, label smoothing,
random flips and small translations, and, when the run starts from weights, a tenth of the rate for everything
but the network's last linear layer (the head, new when the class count changed).

Data stored as its encoded originals (``--stored-as encoded``) is also cropped and resized at random as it is
read (``cluster.worker.stream``); this recipe adds its flips and shifts on top. PyTorch only for now.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster.config import TrainLoopConfig
from cluster.pytorch.model import TorchParts
from cluster.recipes.fast_cifar import flip_and_translate
from cluster.recipes.schedules import warmup_cosine

__all__ = ["head_parameters", "optimizer", "torch_parts"]

BACKBONE_LR_SCALE = 0.1  # a pretrained backbone moves this much slower than its new head
WEIGHT_DECAY = 0.05  # AdamW's, on weight matrices and filters only (not on biases or normalisation)
LABEL_SMOOTHING = 0.1
WARMUP = 0.05  # the share of the steps the rate rises over, from WARMUP_START of it
WARMUP_START = 0.1


def head_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters of ``model``'s last linear layer, its classifier head (every torchvision
    classifier and the built-in networks end with one).

    Raises:
        ValueError: for a model without a linear layer.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer to treat as its head")
    return {id(p) for p in linears[-1].parameters()}


def optimizer(model: nn.Module, lr: float, pretrained: bool, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with the head at ``lr`` and the rest at ``lr`` x BACKBONE_LR_SCALE when ``pretrained``; weight decay
    on parameters of two or more dimensions."""
    head = head_parameters(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head, p.ndim >= 2), []).append(p)
    backbone_lr = lr * BACKBONE_LR_SCALE if pretrained else lr
    return torch.optim.AdamW([{"params": params, "lr": lr if is_head else backbone_lr,
                               "weight_decay": WEIGHT_DECAY if decays else 0.0}
                              for (is_head, decays), params in sorted(groups.items())], lr=lr, fused=fused)


def _flip_and_shift(x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mirrored per image and epoch, and moved by up to 1/16 of the side (2 pixels at 32)."""
    return flip_and_translate(x, indices, epoch, pixels=max(1, x.shape[-1] // 16))


def torch_parts(cfg: TrainLoopConfig) -> TorchParts:
    """The recipe at the run's rate (AdamW's: about 1e-3 from scratch, the head's when fine-tuning)."""
    return TorchParts(
        optimizer=lambda model, device: optimizer(model, cfg.lr, pretrained=bool(cfg.weights_sha256),
                                                  fused=device.type in ("cpu", "cuda")),
        schedule=warmup_cosine(start=WARMUP_START, warmup=WARMUP),
        loss=lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=LABEL_SMOOTHING),
        augment=_flip_and_shift, eval_views="flip")
