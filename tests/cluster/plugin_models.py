"""A user's network builder, named by import path in tests (``--model tests.cluster.plugin_models:tiny_net``)."""

from __future__ import annotations


def tiny_net(num_classes: int, in_channels: int, image_size: int):
    """Conv, pool, linear: the smallest network the contract allows, for torch."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))
