"""Frozen references that travel between the pipeline's stages.

Each stage hands the next a small JSON-serialisable description of where its
output lives plus a content fingerprint, never the data itself. Prefect hashes
these for cache keys, so a fingerprint change is what invalidates a cache.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from cluster.precision import Precision


class _Ref(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RawData(_Ref):
    """Raw image files in class folders, on local disk or in an object store.

    ``splits`` maps a split name (``train``/``test``, or ``all`` when the
    source has no test split) to the directory holding its class folders, or
    to an s3:// prefix under ``origin`` for a dataset read in place.
    """

    source: str
    fingerprint: str
    splits: dict[str, str]
    classes: tuple[str, ...]
    counts: dict[str, int]
    ignored_files: int = 0
    # the s3:// prefix of a dataset read in place: the decoding workers (on any node) read its objects
    origin: str | None = None


class PreparedData(_Ref):
    """Decoded uint8 NHWC arrays per split plus ``meta.json``, in the store."""

    uri: str
    fingerprint: str
    classes: tuple[str, ...]
    image_size: int
    channels: int
    counts: dict[str, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped_images: int = 0  # files that failed to decode and were left out (skip_bad_images)
    reused: bool = False  # True when identical prepared data was already in the store


class EpochMetrics(_Ref):
    """What every epoch reports (averaged over all workers)."""

    epoch: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    epoch_seconds: float
    train_images_per_s: float


class WorkerPlacement(_Ref):
    """Where one rank of the worker group that trained the final epoch ran."""

    rank: int
    node_id: str | None  # None outside Ray (one process, torchrun)
    node_ip: str | None
    hostname: str
    device: str


class TrainingPrecision(_Ref):
    """What the worker group that trained the final epoch computed in: ``auto`` as its workers resolved it."""

    requested: str  # the parameter: auto, fp32 or bf16
    dtype: str  # fp32 or bf16
    channels_last: bool
    reason: str

    @property
    def label(self) -> str:
        """e.g. 'bf16 + channels_last' or 'fp32', worded as the workers' log words it."""
        return Precision(**self.model_dump()).label


class TrainedModel(_Ref):
    """A finished training run: its final checkpoint and how it got there."""

    checkpoint_uri: str
    framework: str
    model: str
    run_id: str
    history: tuple[EpochMetrics, ...]
    num_workers: int
    resumed_from_epoch: int = 0
    reused: bool = False
    restarts: tuple[int, ...] = ()  # each time Ray restarted the worker group in this run: the epoch it resumed after
    workers: tuple[WorkerPlacement, ...] = ()
    precision: TrainingPrecision | None = None  # None: a checkpoint written before precision was recorded
    weights_origin: str | None = None  # the starting weights as given (a registry reference with its version)
    weights_sha256: str | None = None  # and their bytes' hash; None: trained from scratch

    @property
    def node_count(self) -> int:
        """How many Ray nodes the final worker group spanned."""
        return len({w.node_id or w.hostname for w in self.workers})


class ClassMetrics(_Ref):
    name: str
    precision: float
    recall: float
    f1: float
    support: int


class Evaluation(_Ref):
    """Test-set metrics of one trained model."""

    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]
    confusion_png_uri: str
    test_size: int

    def metrics_markdown(self) -> str:
        """The headline test metrics as a markdown table (model card and Prefect artifact)."""
        return "\n".join([
            "| test metric | value |", "|---|---|",
            f"| accuracy | {self.accuracy:.4f} |",
            f"| precision (macro) | {self.precision_macro:.4f} |",
            f"| recall (macro) | {self.recall_macro:.4f} |",
            f"| F1 (macro) | {self.f1_macro:.4f} |",
            f"| test images | {self.test_size} |",
        ])


class Release(_Ref):
    """A published model version and the promotion decision made for it.

    ``reused``: the model was already this version, so publishing wrote nothing and judged nothing.
    """

    name: str
    version: int
    uri: str
    promoted: bool
    champion_version: int | None
    reason: str
    reused: bool = False


class Trial(_Ref):
    """One trial of a sweep: the values it drew, its training run and how far it got."""

    trial_id: str
    run_id: str
    values: dict[str, float | int]
    epochs: int  # epochs its run trained (fewer than the sweep's when the scheduler stopped it)
    best_val_accuracy: float | None
    last_val_accuracy: float | None
    stopped_early: bool
    error: str | None = None  # why it failed; None when it did not


class SweepResult(_Ref):
    """A finished sweep: every trial, and the best one's run as the model that evaluate and publish take."""

    sweep_id: str
    trials: tuple[Trial, ...]
    best_trial_id: str
    model: TrainedModel
    reused: bool = False  # the sweep had finished before: no trial ran in this call

    @property
    def best(self) -> Trial:
        return next(t for t in self.trials if t.trial_id == self.best_trial_id)
