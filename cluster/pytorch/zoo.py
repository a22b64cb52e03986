"""torchvision's and timm's classification models as trainflow networks (``--model torchvision:<name>``,
``--model timm:<name>``)."""

from __future__ import annotations

import torchvision
from torch import nn

from cluster.errors import UserError
from cluster.worker.checkpoint import ModelSpec

__all__ = ["three_channels", "timm_model", "torchvision_model"]


def three_channels(net: nn.Module) -> nn.Module:
    """``net``, fed a one-channel batch repeated to three (a view, no copy) by a forward pre-hook: its parameters
    keep their names, so weights move between grayscale and colour runs of the same network."""
    net.register_forward_pre_hook(lambda module, args: (args[0].expand(-1, 3, -1, -1), *args[1:]))
    return net


def torchvision_model(spec: ModelSpec) -> nn.Module:
    """``torchvision.models.get_model(<name>, weights=None, num_classes=...)`` for the spec's classes and channels."""
    name = spec.name.partition(":")[2]
    available = torchvision.models.list_models(module=torchvision.models)  # classification only
    if name not in available:
        raise UserError(f"model='torchvision:{name}' is not one of torchvision's classification models; choose "
                        f"one of torchvision.models.list_models(), such as resnet18 or mobilenet_v3_small.")
    net = torchvision.models.get_model(name, weights=None, num_classes=spec.num_classes)
    return three_channels(net) if spec.in_channels == 1 else net


def timm_model(spec: ModelSpec) -> nn.Module:
    """``timm.create_model(<name>, pretrained=False, num_classes=...)`` for the spec's classes and channels (three
    channels, a grayscale batch repeated to them, as torchvision's: weights move between colour and gray runs)."""
    import timm

    name = spec.name.partition(":")[2]
    if not timm.is_model(name):
        raise UserError(f"model='timm:{name}' is not one of timm's models; choose one of timm.list_models(), such "
                        "as resnet18 or mobilenetv3_small_100.")
    net = timm.create_model(name, pretrained=False, num_classes=spec.num_classes, in_chans=3)
    return three_channels(net) if spec.in_channels == 1 else net
