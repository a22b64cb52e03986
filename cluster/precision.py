"""Which numeric precision a worker trains in: ``precision="auto"`` resolved against its hardware.

The choice is a pure function of what the worker's hardware offers (the CPU's
flags, the GPU's compute capability) and of what the framework implements, so
it can be tested with any flags; :func:`cpu_flags` reads them on the worker,
where the hardware is known (a GPU worker on another node may differ from the
driver). Framework code (reading a GPU's capability) stays in each framework's folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cluster.frameworks import get_framework

__all__ = ["BF16_CPU_FLAGS", "PRECISIONS", "Precision", "agree", "cpu_flags", "describe", "resolve"]

PRECISIONS = ("auto", "fp32", "bf16")
# Native bf16 arithmetic: AVX-512 BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later) or AMX's bf16 tiles.
# Without either, oneDNN emulates bf16 and autocast is slower than fp32.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
BF16_CUDA_CAPABILITY = (8, 0)  # Ampere and later compute in bf16 natively


@dataclass(frozen=True, kw_only=True)
class Precision:
    """What a worker group trained in, and why; recorded in each checkpoint's ``state.json``."""

    requested: str  # the parameter as given: auto, fp32 or bf16
    dtype: str  # what was used: fp32 or bf16
    channels_last: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """e.g. 'bf16 + channels_last' or 'fp32'."""
        return self.dtype + (" + channels_last" if self.channels_last else "")


def describe(precision: Precision) -> str:
    """One line for a worker's log, e.g. 'precision bf16 + channels_last (auto: CPU with avx512_bf16: native bf16)'."""
    return f"precision {precision.label} ({precision.requested}: {precision.reason})"


def resolve(requested: str, channels_last: bool, *, framework: str, device_type: str,
            cpu_flags: frozenset[str] = frozenset(), cuda_capability: tuple[int, int] | None = None) -> Precision:
    """The precision to train in on one worker.

    ``auto`` picks bf16 with channels_last where the device computes bf16 natively (a CPU with one of
    :data:`BF16_CPU_FLAGS`, a GPU of compute capability 8.0 or later) and the framework implements
    both, else fp32 (with ``channels_last`` as given); it never fails. An explicit ``fp32`` or ``bf16``
    is used as given (the config already refused what the framework lacks).

    Args:
        requested: auto, fp32 or bf16.
        channels_last: the channels_last parameter; ``auto`` turns it on with bf16.
        framework: a registered framework's name; its ``options`` say what it implements.
        device_type: "cpu" or "cuda", the device this worker trains on.
        cpu_flags: this machine's CPU flags (see :func:`cpu_flags`); used for a CPU device.
        cuda_capability: the GPU's (major, minor) compute capability; used for a CUDA device.
    """
    if requested != "auto":
        return Precision(requested=requested, dtype=requested, channels_last=channels_last, reason="as requested")
    options = get_framework(framework).options
    if not {"precision=bf16", "channels_last"} <= options:
        return Precision(requested="auto", dtype="fp32", channels_last=False,
                         reason=f"framework {framework} trains in fp32 only")
    if device_type == "cuda":
        native = cuda_capability is not None and tuple(cuda_capability) >= BF16_CUDA_CAPABILITY
        device = f"GPU of compute capability {'.'.join(map(str, cuda_capability or ('?',)))}"
    else:
        native = bool(BF16_CPU_FLAGS & cpu_flags)
        device = f"CPU with {'/'.join(sorted(BF16_CPU_FLAGS & cpu_flags))}" if native else "CPU"
    if native:
        return Precision(requested="auto", dtype="bf16", channels_last=True, reason=f"{device}: native bf16")
    return Precision(requested="auto", dtype="fp32", channels_last=channels_last, reason=f"{device}: no native bf16")


def agree(choices: list[Precision]) -> Precision:
    """One precision for a worker group whose ranks resolved ``choices`` (in rank order).

    The ranks of a heterogeneous group (nodes of different CPUs or GPUs) may resolve ``auto``
    differently; the group then trains in fp32, since the rank without native bf16 would emulate it
    and every step waits for the slowest rank.
    """
    first = choices[0]
    if all(c.dtype == first.dtype for c in choices):
        return first
    slow = [rank for rank, c in enumerate(choices) if c.dtype == "fp32"]
    fallback = next(c for c in choices if c.dtype == "fp32")
    return Precision(requested=first.requested, dtype="fp32", channels_last=fallback.channels_last,
                     reason=f"rank(s) {', '.join(map(str, slow))} without native bf16 ({fallback.reason})")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This machine's CPU flags (the first processor's ``flags`` line); empty where the file is absent (macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()
