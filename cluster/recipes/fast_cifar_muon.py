"""fast_cifar with Muon: the same network, initialisation, loss and augmentation, but the convolutions' filters
learn through Muon (Keller Jordan's orthogonalised momentum, as in airbench94_muon), the rate decays linearly
from the first step, there is no lookahead, and all but the last FULL_SIZE_EPOCHS see the images scaled down,
growing from 5/8 to 7/8 of their side (progressive resizing): on a CPU, where the convolutions' arithmetic is
the whole step, an epoch costs about in proportion to the images' pixels (see docs/performance.md).

Each piece is tested on its own in tests/cluster/test_fast_cifar_muon.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster.config import TrainLoopConfig
from cluster.recipes.fast_cifar import flip_and_translate, init_whitening, label_smoothed_loss
from cluster.recipes.schedules import linear_decay
from cluster.pytorch.model import TorchParts

__all__ = ["Muon", "REFERENCE_LR", "muon_optimizer", "orthogonalized", "progressive", "side_in_epoch", "torch_parts"]

REFERENCE_LR = 0.24  # airbench94_muon's rate for the filters; the other groups' rates scale with lr / this
MUON_MOMENTUM = 0.6
BIAS_LR_PER_IMAGE = 0.053  # airbench94_muon's rates for a summed loss: for the mean, x the batch
HEAD_LR_PER_IMAGE = 0.67 * 9 ** 2 / 256 ** 2  # its head divides by 256 and starts at std 1; FastNet's by 9
DECAY_PER_IMAGE = 2e-6  # share of the weights the SGD groups lose per step, per image of the batch
FULL_SIZE_EPOCHS = 2
SMALLEST, LARGEST = 0.625, 0.875  # the earlier epochs' sides, as shares of the images' (20 to 28 of 32)


def orthogonalized(g: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Roughly U V^T of ``g``'s SVD, ``g`` read as (output filters) x (everything else): Muon's quintic
    Newton-Schulz iteration, in bf16. Its coefficients trade exactness for speed: the singular values land
    spread around 1 (about 0.5 to 1.5) rather than on it, which trains as well."""
    x = g.reshape(len(g), -1).bfloat16()
    x = x / (x.norm() + 1e-7)  # the largest singular value at most 1
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    if tall:
        x = x.T
    return x.reshape(g.shape).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum. A group marked ``orthogonal`` steps by the :func:`orthogonalized` momentum (every
    direction of a filter bank's update at about the same size), its filters held at norm sqrt(filters) (batch
    norm follows each convolution, so only their direction counts). Other groups step as ``torch.optim.SGD``
    with Nesterov momentum and weight decay does."""

    def __init__(self, groups: list[dict], momentum: float) -> None:
        super().__init__(groups, {"lr": 0.0, "momentum": momentum, "weight_decay": 0.0, "orthogonal": False})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:  # as torch's optimizers: the closure recomputes the loss and its gradients
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                buffer = self.state[p].get("momentum_buffer")
                if buffer is None:  # as SGD: the first step's buffer is the gradient itself
                    buffer = self.state[p]["momentum_buffer"] = g.clone()
                else:
                    buffer.mul_(group["momentum"]).add_(g)
                g = g.add(buffer, alpha=group["momentum"])
                if group["orthogonal"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    g = orthogonalized(g)
                p.add_(g, alpha=-group["lr"])
        return loss


def muon_optimizer(model: nn.Module, lr: float, momentum: float, batch_size: int) -> Muon:
    """Muon at ``lr`` for the convolutions' filters (momentum MUON_MOMENTUM); Nesterov SGD at ``momentum`` for
    the biases and the head, at airbench94_muon's rates for the mean loss over ``batch_size`` images, scaled by
    lr / REFERENCE_LR, with weight decay."""
    trained = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trained if p.dim() == 4]
    head = [model.head.weight]
    biases = [p for p in trained if p.dim() != 4 and p is not model.head.weight]
    scale = lr / REFERENCE_LR
    bias_lr, head_lr = BIAS_LR_PER_IMAGE * batch_size * scale, HEAD_LR_PER_IMAGE * batch_size * scale
    shrink = DECAY_PER_IMAGE * batch_size
    return Muon([{"params": filters, "lr": lr, "momentum": MUON_MOMENTUM, "orthogonal": True},
                 {"params": biases, "lr": bias_lr, "weight_decay": shrink / bias_lr},
                 {"params": head, "lr": head_lr, "weight_decay": shrink / head_lr}], momentum=momentum)


def side_in_epoch(epoch: int, epochs: int, full: int) -> int:
    """The side the training images have in ``epoch`` of ``epochs``: ``full`` for the last FULL_SIZE_EPOCHS;
    before them a ramp in even sides from SMALLEST to LARGEST of ``full`` (never under 16, FastNet's smallest)."""
    ramp = epochs - FULL_SIZE_EPOCHS
    if epoch > ramp:
        return full
    share = SMALLEST + (LARGEST - SMALLEST) * ((epoch - 1) / (ramp - 1) if ramp > 1 else 1.0)
    return max(16, 2 * round(full * share / 2))


def progressive(augment: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                epochs: int) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``augment``, then each image scaled (bilinear, antialiased) to :func:`side_in_epoch`'s side."""

    def scaled(x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        x = augment(x, indices, epoch)
        side = side_in_epoch(epoch, epochs, x.shape[-1])
        if side == x.shape[-1]:
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)

    return scaled


def torch_parts(cfg: TrainLoopConfig) -> TorchParts:
    """The recipe with the run's rate for the filters (~0.24), momentum for the rest (~0.85) and global batch."""
    return TorchParts(optimizer=lambda model, device: muon_optimizer(model, cfg.lr, cfg.momentum, cfg.batch_size),
                      init=init_whitening, schedule=linear_decay, loss=label_smoothed_loss,
                      augment=progressive(flip_and_translate, cfg.epochs), eval_views="flip_shift")
