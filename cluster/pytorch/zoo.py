"""torchvision's classification models as trainflow networks (``--model torchvision:<name>``)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from cluster.errors import UserError
from cluster.worker.checkpoint import ModelSpec

__all__ = ["ThreeChannels", "torchvision_model"]


class ThreeChannels(nn.Module):
    """Feeds a network that takes three channels with a one-channel batch, repeated (a view, no copy)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1))


def torchvision_model(spec: ModelSpec) -> nn.Module:
    """``torchvision.models.get_model(<name>, weights=None, num_classes=...)`` for the spec's classes and channels."""
    name = spec.name.partition(":")[2]
    available = torchvision.models.list_models(module=torchvision.models)  # classification only
    if name not in available:
        raise UserError(f"model='torchvision:{name}' is not one of torchvision's classification models; choose "
                        f"one of torchvision.models.list_models(), such as resnet18 or mobilenet_v3_small.")
    net = torchvision.models.get_model(name, weights=None, num_classes=spec.num_classes)
    return ThreeChannels(net) if spec.in_channels == 1 else net
