"""PyTorch pieces: the model, one train step, one eval pass, checkpoint files.

Imported lazily (only by training workers, evaluation and benchmarks), so the
flow can be imported and deployed without loading torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster import precision as prec
from cluster.errors import UserError
from cluster import models
from cluster.recipes.schedules import constant
from cluster.worker.checkpoint import ModelSpec, STATE_FILE, read_state, write_state

__all__ = ["EXTRA_FILE", "MODEL_FILE", "OPTIM_FILE", "STATE_FILE", "ModelSpec", "Normalizer", "SeedCNN", "TorchParts",
           "build_model", "eval_pass", "load_weights", "predict", "read_state", "resolve_precision", "save_checkpoint",
           "train_step", "view_logits"]

MODEL_FILE = "model.pt"
OPTIM_FILE = "optimizer.pt"
EXTRA_FILE = "extra.pt"  # a recipe's own training state besides the optimizer's (e.g. lookahead's slow weights)
INIT_IMAGES = 5000  # the leading training images a data-dependent initialisation sees (TorchParts.init)


@dataclass(frozen=True, kw_only=True)
class TorchParts:
    """A recipe's PyTorch side (``cluster.recipes``), built once per worker from the run's config.

    Every callable that draws random numbers draws them from torch's global generator, which the loop seeds
    per (seed, epoch, rank): a resumed epoch draws what the interrupted one would have.
    """

    optimizer: Callable[[nn.Module, torch.device], torch.optim.Optimizer]
    # data-dependent initialisation: (model, the first INIT_IMAGES training images, normalised NCHW on the CPU),
    # the same on every rank
    init: Callable[[nn.Module, torch.Tensor], None] | None = None
    schedule: Callable[[int, int], float] = constant  # (step, total steps) -> factor on each group's base lr
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy  # (logits, labels) -> mean loss
    # (normalised NCHW batch, the images' indices in the training set, epoch) -> same shape; labels are kept
    augment: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    # weight averaging bound to the model (e.g. lookahead), updated after each optimizer step and saved with
    # each checkpoint
    averager: Callable[[nn.Module], WeightAverager] | None = None
    eval_views: str = "plain"  # test-time augmentation: a key of VIEWS


class WeightAverager(Protocol):
    """A running average of a model's weights that the model itself is moved to now and then."""

    def update(self, step: int, total: int) -> None:
        """Called after optimizer step ``step`` (1-based) of ``total``."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class SeedCNN(nn.Module):
    """The source article's network: conv64-conv128-conv256 (each + 2x2 max-pool),
    then fc1024-fc512-fc(classes). The classifier's input width follows from the
    configured image size, so any size >= 8 works."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        in_channels, num_classes, image_size = spec.in_channels, spec.num_classes, spec.image_size
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv3 = nn.Conv2d(128, 256, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        side = image_size // 2 // 2 // 2
        self.fc1 = nn.Linear(256 * side * side, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.pool(F.relu(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build_model(spec: ModelSpec) -> nn.Module:
    """The network ``spec`` names (``cluster.models``), freshly initialised."""
    return models.build(spec, "torch")


def load_starting_weights(model: nn.Module, path: Path, num_classes: int) -> list[str]:
    """Load a state dict saved by ``torch.save`` (read with ``weights_only=True``) or as safetensors
    (``*.safetensors``) into ``model``; returns the names of the tensors left freshly initialised: the
    classification head, where the class count differs.

    Raises:
        UserError: when the file is no state dict of this network (other tensor names, or other shapes
            anywhere but a head of ``num_classes`` rows).
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle's, torch's and safetensors' errors for a file that is not a plain state dict
        raise UserError(f"weights {path.name} cannot be read as a state dict ({e}); save them with "
                        "torch.save(model.state_dict(), path) or safetensors.torch.save_file.") from None
    own = model.state_dict()
    if not isinstance(state, dict) or state.keys() != own.keys():
        names = set(state) if isinstance(state, dict) else set()
        raise UserError(f"weights {path.name} do not fit the network: {len(own.keys() - names)} of its tensors "
                        f"missing (such as {sorted(own.keys() - names)[:2]}), {len(names - own.keys())} unknown "
                        f"(such as {sorted(names - own.keys())[:2]}); start from weights of the same network.")
    head = [name for name, tensor in own.items() if tensor.shape != state[name].shape]
    for name in head:
        if own[name].shape[:1] != (num_classes,) or own[name].shape[1:] != state[name].shape[1:]:
            raise UserError(f"weights {path.name} do not fit the network: {name} is {tuple(state[name].shape)} "
                            f"there and {tuple(own[name].shape)} here; start from weights of the same network.")
    model.load_state_dict({name: own[name] if name in head else tensor for name, tensor in state.items()})
    return head


class Normalizer:
    """uint8 NHWC batches → float NCHW, normalised, as a few tensor ops on the batch's device."""

    def __init__(self, spec: ModelSpec, device: torch.device, channels_last: bool) -> None:
        shape = (1, spec.in_channels, 1, 1)
        self.scale = (1.0 / (255.0 * torch.tensor(spec.std))).view(shape).to(device)
        self.shift = (torch.tensor(spec.mean) / torch.tensor(spec.std)).view(shape).to(device)
        self.channels_last = channels_last

    def __call__(self, batch_nhwc: torch.Tensor) -> torch.Tensor:
        x = batch_nhwc.permute(0, 3, 1, 2)  # a free view: NCHW shape with channels-last strides
        if self.channels_last:
            x = x.float()
        else:
            # a fresh NCHW buffer: .contiguous() is a no-op for one channel and would keep odd strides
            x = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)
        return x.mul_(self.scale).sub_(self.shift)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               autocast: torch.autocast, loss_fn: Callable = F.cross_entropy) -> torch.Tensor:
    """One optimizer step on ``loss_fn`` (a mean over the batch); returns the (detached) summed loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(y)


@torch.no_grad()
def eval_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Normalizer,
              autocast: torch.autocast, batch_size: int = 512) -> tuple[float, int, int]:
    """Summed loss, number correct and number seen over uint8 images ``x``."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = normalize(x[i:i + batch_size]), y[i:i + batch_size]
        with autocast:
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train()
    return loss_sum, correct, len(y)


def resolve_precision(requested: str, channels_last: bool, device: torch.device) -> prec.Precision:
    """``precision`` (auto, fp32 or bf16) as this process trains it on ``device``: reads the hardware, then
    leaves the choice to :func:`cluster.precision.resolve`."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return prec.resolve(requested, channels_last, framework="torch", device_type=device.type,
                        cpu_flags=prec.cpu_flags() if device.type == "cpu" else frozenset(),
                        cuda_capability=capability)


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, spec: ModelSpec,
                    epoch: int, history: list[dict], workers: list[dict] | None = None,
                    precision: prec.Precision | None = None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write model weights, optimizer state and progress; ``model`` must already be unwrapped from DDP.

    ``workers`` records where each rank of the group that trained this epoch ran, ``precision`` what it trained in,
    ``extra`` the recipe's own state (a weight averager's).
    """
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: _own_bytes(v) for k, v in model.state_dict().items()}, directory / MODEL_FILE)
    optim = optimizer.state_dict()
    optim["state"] = {i: {k: _own_bytes(v) for k, v in s.items()} for i, s in optim["state"].items()}
    torch.save(optim, directory / OPTIM_FILE)
    if extra is not None:
        torch.save(extra, directory / EXTRA_FILE)
    write_state(directory, framework="torch", versions={"torch": torch.__version__}, model_files=[MODEL_FILE],
                spec=spec, epoch=epoch, history=history, workers=workers, precision=precision)


def _own_bytes(value):
    """A tensor that is a view into a larger buffer (sharded steps keep the parameters and the optimizer's state
    in one shared segment) as a copy of its own: ``torch.save`` writes a view's whole buffer."""
    if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() > value.numel() * value.element_size():
        return value.clone()
    return value


def load_weights(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 averager: WeightAverager | None = None) -> None:
    # weights_only: a checkpoint is data, never code
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(directory / OPTIM_FILE, map_location="cpu", weights_only=True))
    if averager is not None:
        averager.load_state_dict(torch.load(directory / EXTRA_FILE, map_location="cpu", weights_only=True))


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """NCHW ``x`` moved by (dy, dx) pixels, the edge reflected into the gap."""
    pad = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


# test-time augmentation: name → (weight, dy, dx, mirrored) per view; weights sum to 1
VIEWS: dict[str, tuple[tuple[float, int, int, bool], ...]] = {
    "plain": ((1.0, 0, 0, False),),
    "flip": ((0.5, 0, 0, False), (0.5, 0, 0, True)),
    # as airbench: the image and its mirror count half, both moved one pixel up-left and down-right the rest
    "flip_shift": ((0.25, 0, 0, False), (0.25, 0, 0, True), (0.125, -1, -1, False), (0.125, -1, -1, True),
                   (0.125, 1, 1, False), (0.125, 1, 1, True)),
}


def view_logits(model: nn.Module, x: torch.Tensor, views: str = "plain") -> torch.Tensor:
    """The model's logits for normalised NCHW ``x``, averaged over the test-time ``views`` (a key of VIEWS)."""
    total = None
    for weight, dy, dx, mirrored in VIEWS[views]:
        view = _shifted(x, dy, dx) if dy or dx else x
        logits = model(view.flip(-1) if mirrored else view).float() * weight
        total = logits if total is None else total + logits
    return total


def _inference_precision(checkpoint_dir: Path, exact: bool = False) -> prec.Precision:
    """bf16 + channels_last where the checkpoint trained in bf16 and this CPU computes it natively, else fp32.

    (A recipe's test-time views multiply inference; in fp32 they took a large share of a CIFAR-10 run on a
    CPU: see docs/performance.md.)
    """
    trained = json.loads((checkpoint_dir / STATE_FILE).read_text()).get("precision") or {}
    return resolve_precision("auto" if trained.get("dtype") == "bf16" and not exact else "fp32", channels_last=False,
                             device=torch.device("cpu"))


def _logits(checkpoint_dir: Path, images: np.ndarray, batch_size: int, exact: bool = False) -> torch.Tensor:
    """The checkpoint's model's outputs (N x classes) for uint8 NHWC ``images``, on the CPU (``exact``: in fp32)."""
    spec, _, _ = read_state(checkpoint_dir)
    model = build_model(spec)
    load_weights(checkpoint_dir, model)
    model.eval()
    precision = _inference_precision(checkpoint_dir, exact)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    normalize = Normalizer(spec, torch.device("cpu"), channels_last=precision.channels_last)
    x = torch.from_numpy(np.ascontiguousarray(images))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.dtype == "bf16"):
        return torch.cat([view_logits(model, normalize(x[i:i + batch_size]), spec.eval_views)
                          for i in range(0, len(x), batch_size)] or [torch.zeros(0, spec.num_classes)])


def predict(checkpoint_dir: Path, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class indices predicted for uint8 NHWC ``images`` by the checkpoint's model, on the CPU."""
    return _logits(checkpoint_dir, images, batch_size).argmax(1).numpy()


def predict_exact(checkpoint_dir: Path, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """As :func:`predict`, in fp32 whatever the checkpoint trained in: what its ONNX export is held to."""
    return _logits(checkpoint_dir, images, batch_size, exact=True).argmax(1).numpy()


def probabilities(checkpoint_dir: Path, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (softmax, N x classes) of uint8 NHWC ``images`` by the checkpoint's model, on the CPU."""
    return torch.softmax(_logits(checkpoint_dir, images, batch_size), dim=1).numpy()
