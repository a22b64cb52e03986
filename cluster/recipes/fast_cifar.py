"""A fast CIFAR-10 recipe, written after the public speed records (David Page's ResNet-9, hlb-CIFAR10,
airbench94): a small conv net whose first layer whitens 2x2 patches, batch norm with frozen scales,
identity-initialised convolutions, Nesterov SGD with a short warm-up and a linear decay, label smoothing,
lookahead, flip-and-translate per batch, and flip-and-shift at test time.

Each trick is a function or class of its own, tested on its own (tests/cluster/test_fast_cifar.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cluster.config import TrainLoopConfig
from cluster.recipes.schedules import warmup_linear_decay
from cluster.pytorch.model import TorchParts
from cluster.worker.checkpoint import ModelSpec

__all__ = ["FastNet", "Lookahead", "flip_and_translate", "init_whitening", "label_smoothed_loss",
           "mirrored", "optimizer", "patch_whitening", "torch_parts"]

WHITEN_PATCH = 2
LABEL_SMOOTHING = 0.2
BIAS_LR_SCALE = 64.0  # batch norm's biases learn this much faster than the weights
DECAY = 0.0153  # weight decay per step at batch 1024, in airbench's units (see optimizer)
TRANSLATE = 2  # pixels
LOOKAHEAD_EVERY = 5  # steps


class _BatchNorm(nn.BatchNorm2d):
    """Batch norm that learns only its shift: the scale stays 1 (the next conv can absorb one)."""

    def __init__(self, width: int) -> None:
        super().__init__(width, momentum=0.4, eps=1e-12)
        self.weight.requires_grad = False


class _Conv(nn.Conv2d):
    """3x3, no bias (batch norm follows), initialised to pass its input through on the first channels."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding="same", bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:cin])


class _ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(_Conv(cin, cout), nn.MaxPool2d(2), _BatchNorm(cout), nn.GELU(),
                         _Conv(cout, cout), _BatchNorm(cout), nn.GELU())


class FastNet(nn.Module):
    """Patch-whitening 2x2 conv (frozen; see init_whitening), then three conv-pool-norm groups, a global max
    pool and a linear layer. Images of at least 16 pixels a side (the three 2x2 pools)."""

    widths = (64, 256, 256)  # airbench94's

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        whitened = 2 * spec.in_channels * WHITEN_PATCH ** 2  # each eigenvector and its negation
        self.whiten = nn.Conv2d(spec.in_channels, whitened, WHITEN_PATCH)
        self.whiten.weight.requires_grad = False
        with torch.no_grad():
            self.whiten.bias.zero_()
        widths = (whitened, *self.widths)
        self.groups = nn.Sequential(*(_ConvGroup(a, b) for a, b in zip(widths, widths[1:])))
        self.head = nn.Linear(widths[-1], spec.num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) / 9  # the scale keeps early logits small


def patch_whitening(images: torch.Tensor, patch: int = WHITEN_PATCH,
                    eps: float = 5e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors, as conv filters (C*p*p, C, p, p), of the covariance of every
    ``patch`` x ``patch`` window of NCHW ``images``, the filters scaled by 1/sqrt(eigenvalue + eps): convolving with
    them maps patches onto uncorrelated unit-variance coordinates."""
    c = images.shape[1]
    windows = images.float().unfold(2, patch, 1).unfold(3, patch, 1)  # N, C, H', W', p, p
    flat = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * patch * patch)
    eigenvalues, eigenvectors = torch.linalg.eigh(flat.T @ flat / len(flat))
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    return eigenvalues, (eigenvectors / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, c, patch, patch)


def init_whitening(model: nn.Module, sample: torch.Tensor) -> None:
    """Set FastNet's first layer to the patch-whitening filters of ``sample`` (normalised NCHW), and their negatives."""
    _, filters = patch_whitening(sample)
    with torch.no_grad():
        model.whiten.weight.copy_(torch.cat([filters, -filters]))


def label_smoothed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against labels smoothed by LABEL_SMOOTHING (an overconfident net generalises worse)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=LABEL_SMOOTHING)


def mirrored(indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which of the training images ``indices`` are mirrored in ``epoch``: a fixed half of them in odd epochs, the
    other half in even ones (airbench's alternating flip: every image is seen both ways every two epochs, where
    random flips repeat one way a quarter of the time)."""
    half = ((indices * 2_654_435_761) >> 16) & 1  # Knuth's multiplicative hash: a fixed, well-mixed bit per image
    return half == epoch % 2


def flip_and_translate(x: torch.Tensor, indices: torch.Tensor, epoch: int, pixels: int = TRANSLATE) -> torch.Tensor:
    """NCHW images (the training set's ``indices``) mirrored left-right as :func:`mirrored` says for ``epoch``,
    and each moved by up to ``pixels`` in each direction, drawn per image from torch's global generator (the edge
    reflected into the gap). Shape and memory format are kept; labels are untouched."""
    n, _, h, w = x.shape
    flipped = torch.where(mirrored(indices, epoch).view(n, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(flipped, (pixels,) * 4, mode="reflect")
    rows = torch.empty_like(padded[..., :h, :])
    dy = torch.randint(0, 2 * pixels + 1, (n,), device=x.device)
    for shift in range(2 * pixels + 1):  # one masked copy per possible shift, not one per image
        chosen = (dy == shift).nonzero().squeeze(1)
        rows[chosen] = padded[chosen, :, shift:shift + h, :]
    out = torch.empty_like(x)
    dx = torch.randint(0, 2 * pixels + 1, (n,), device=x.device)
    for shift in range(2 * pixels + 1):
        chosen = (dx == shift).nonzero().squeeze(1)
        out[chosen] = rows[chosen, :, :, shift:shift + w]
    return out


class Lookahead:
    """Slow weights that the model is pulled back to every LOOKAHEAD_EVERY steps, with a pull that fades
    over training (airbench's schedule: 0.95^5 x progress^3 of the slow weights kept); at the last step the
    model becomes the slow weights. Covers every floating-point tensor of the state (batch-norm statistics too)."""

    def __init__(self, model: nn.Module) -> None:
        self.tensors = [t for t in model.state_dict().values() if t.dtype.is_floating_point]
        self.slow = [t.detach().clone() for t in self.tensors]

    def update(self, step: int, total: int) -> None:
        if step % LOOKAHEAD_EVERY and step != total:
            return
        keep = 1.0 if step == total else 0.95 ** 5 * (step / total) ** 3
        with torch.no_grad():
            for slow, now in zip(self.slow, self.tensors):
                slow.lerp_(now, 1 - keep)
                now.copy_(slow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): t for i, t in enumerate(self.slow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, slow in enumerate(self.slow):
            slow.copy_(state[str(i)])


def optimizer(model: nn.Module, lr: float, momentum: float, batch_size: int) -> torch.optim.SGD:
    """Nesterov SGD; batch norm's biases at BIAS_LR_SCALE x ``lr``. Weight decay is decoupled from the rate:
    every group shrinks its weights by the same share per step, DECAY x batch/1024 / (1 + 1/(1 - momentum))."""
    shrink = DECAY * batch_size / (1024 * (1 + 1 / (1 - momentum)))
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    norm_biases = [p for name, p in trained if _is_norm(model, name)]
    others = [p for name, p in trained if not _is_norm(model, name)]
    bias_lr = lr * BIAS_LR_SCALE
    return torch.optim.SGD([{"params": norm_biases, "lr": bias_lr, "weight_decay": shrink / bias_lr},
                            {"params": others, "lr": lr, "weight_decay": shrink / lr}],
                           lr=lr, momentum=momentum, nesterov=True)


def _is_norm(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name.rpartition(".")[0]), nn.BatchNorm2d)


def torch_parts(cfg: TrainLoopConfig) -> TorchParts:
    """The recipe with the run's learning rate (mean loss; ~1.5 at batch 1024), momentum and global batch."""
    return TorchParts(optimizer=lambda model, device: optimizer(model, cfg.lr, cfg.momentum, cfg.batch_size),
                      init=init_whitening, schedule=warmup_linear_decay(start=0.2, peak_at=0.23, end=0.07),
                      loss=label_smoothed_loss, augment=flip_and_translate, averager=Lookahead,
                      eval_views="flip_shift")
