"""A checkpoint's model as ONNX: raw pixels in (uint8 NHWC), class probabilities out, everything between inside.

The graph holds the normalisation, the grayscale-to-colour repeat of a zoo network and the recipe's test-time
views, so any ONNX runtime predicts as ``cluster.pytorch.model.probabilities`` does, with no trainflow code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from cluster.pytorch.model import Normalizer, build_model, load_weights, view_logits
from cluster.worker.checkpoint import ModelSpec, read_state

__all__ = ["export_onnx"]

OPSET = 18


class _RawPixels(nn.Module):
    """uint8 NHWC pixels → softmax over the spec's classes, the views averaged as the logits are."""

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        self.normalize = Normalizer(spec, torch.device("cpu"), channels_last=True)  # the loop's and predict's own

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(view_logits(self.model, self.normalize(pixels), self.spec.eval_views), dim=1)


def export_onnx(checkpoint_dir: Path, path: Path) -> None:
    """Write the checkpoint's model to ``path`` as ONNX: input ``pixels`` (N, size, size, channels) uint8, output
    ``probabilities`` (N, classes) float32, any N."""
    spec, _, _ = read_state(checkpoint_dir)
    model = build_model(spec)
    load_weights(checkpoint_dir, model)
    wrapper = _RawPixels(model.eval(), spec).eval()
    example = torch.zeros((2, spec.image_size, spec.image_size, spec.in_channels), dtype=torch.uint8)
    with warnings.catch_warnings():  # torch 2.14's TorchScript-based exporter says it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["pixels"], output_names=["probabilities"],
                          dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}})
