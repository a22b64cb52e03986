"""The pipeline's parameters: one pydantic model with nested sections.

These render as the run form in the Prefect UI, so every field has a title,
a description and bounds; invalid values are rejected before a run starts.
Secrets never belong here: S3 credentials come from the environment.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.frameworks import FRAMEWORKS, get_framework
from cluster.precision import PRECISIONS
from cluster.models import plugin_models
from cluster.recipes import RECIPES, get_recipe
from cluster.execution.session import resolve_address
from cluster.execution.sweep import SEARCHABLE, SearchSpace, SweepSpec, check_spaces, parse_space
from tasks import sources
from tasks.preprocess import PreprocessConfig
from tasks.sources import SOURCES
from tasks.tracking import Tracking, check_reachable, tracking_for
from tasks.train import Resources, TrainLoopConfig


# the form's dataset choices: every registered source
SourceKind = Literal[tuple(SOURCES)]  # type: ignore[valid-type]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    kind: SourceKind = Field(
        "digits", title="Dataset", description="; ".join(f"{s.name}: {s.description}" for s in SOURCES.values()))
    path: str = Field("", title="Dataset path",
                      description="; ".join(f"Only for '{s.name}': {s.location_help}" for s in SOURCES.values()
                                            if s.needs_location))
    tfds_data_dir: str | None = Field(None, title="TFDS data dir",
                                      description="Only for 'tfds': the folder holding prepared TFDS datasets "
                                                  "(default $TFDS_DATA_DIR or TFDS's default ~/tensorflow_datasets)")
    tfds_download: bool = Field(False, title="Allow TFDS download",
                                description="Only for 'tfds': allow TFDS to download the dataset")
    image_size: int = Field(32, ge=8, le=512, title="Image size", description="Images are resized to this square")
    channels: Literal["auto", "rgb", "grayscale"] = Field("auto", title="Channels",
                                                          description="auto: grayscale only if every image is")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, title="Validation fraction", description="Cut from train")
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5, title="Test fraction",
                                 description="Only for datasets without a test split")
    seed: int = Field(0, ge=0, title="Split seed")
    limit_train: int | None = Field(None, ge=1, title="Train subset", description="Use a fixed random subset")
    limit_test: int | None = Field(None, ge=1, title="Test subset", description="Use a fixed random subset")
    skip_bad_images: bool = Field(False, title="Skip unreadable images",
                                  description="Leave out (and count) files that fail to decode instead of failing")
    stored_as: Literal["pixels", "encoded"] = Field(
        "pixels", title="Training images stored as",
        description="pixels: decoded once at the image size; encoded: the files themselves, decoded as training "
                    "reads them with a random-resized crop per image and epoch")
    max_side: int = Field(0, ge=0, le=8192, title="Encoded: longest side kept",
                          description="Only for 'encoded': larger images are shrunk to this side (0: twice the "
                                      "image size)")
    cache_dir: str | None = Field(None, title="Local cache",
                                  description="Raw-data cache (default $TRAINFLOW_CACHE_DIR or ~/.cache/trainflow)")

    @model_validator(mode="before")
    @classmethod
    def _from_source_string(cls, data: Any) -> Any:
        """Also accept the CLI's one-string form ``dataset`` (e.g. 'digits', 'folder:<path>', 'tfds:<name>')."""
        if isinstance(data, dict) and "dataset" in data:
            data = dict(data)
            spec = sources.parse(str(data.pop("dataset")))
            data.update(kind=spec.kind, path=spec.location,
                        **{f"{spec.kind}_{key}": value for key, value in spec.options.items()})
        return data

    @model_validator(mode="after")
    def _fields_go_with_kind(self) -> DataParams:
        """The path is set exactly when the source takes one; a source's own options only with that source."""
        source = SOURCES[self.kind]
        if source.needs_location and not self.path:
            raise ValueError(f"data.path is empty; a {self.kind!r} dataset needs {source.location_help}.")
        if not source.needs_location and self.path:
            takes = " or ".join(repr(s.name) for s in SOURCES.values() if s.needs_location)
            raise ValueError(f"data.path is set but data.kind is {self.kind!r}; clear the path or choose {takes}.")
        for other in SOURCES.values():
            for key in other.options:
                name = f"{other.name}_{key}"
                if other.name != self.kind and getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"data.{name} is set but data.kind is {self.kind!r}; clear it or choose "
                                     f"{other.name!r}.")
        sources.parse(self.dataset)  # the location's own syntax, e.g. a TFDS name
        return self

    @property
    def dataset(self) -> str:
        """The source string ingest takes, e.g. 'digits', 'folder:<path>' or 'tfds:<name>?data_dir=<dir>'."""
        options = {key: getattr(self, f"{self.kind}_{key}") for key in SOURCES[self.kind].options}
        return sources.source_string(self.kind, self.path, options)

    @property
    def label(self) -> str:
        """A short name for run names, e.g. the kind, or 'folder:' plus the folder's last path part."""
        return sources.label(sources.parse(self.dataset))

    def to_config(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size, channels=self.channels, val_fraction=self.val_fraction,
                                test_fraction=self.test_fraction, seed=self.seed, limit_train=self.limit_train,
                                limit_test=self.limit_test, skip_bad_images=self.skip_bad_images,
                                stored_as=self.stored_as, max_side=self.max_side)


class TrainParams(_Section):
    framework: Literal[tuple(FRAMEWORKS)] = Field(  # type: ignore[valid-type]  # choices from the registry
        "torch", title="Framework", description="; ".join(f"{f.name}: {f.summary}" for f in FRAMEWORKS.values()))
    recipe: Literal[tuple(RECIPES)] = Field(  # type: ignore[valid-type]  # choices from the registry
        "article", title="Recipe", description="; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()))
    model: str = Field("", max_length=200, title="Model",
                       description="Empty: the recipe's own network. torchvision:<name> (any of torchvision's "
                                   "classification models; torch), timm:<name> (torch; the timm extra), "
                                   "keras:<name> (a keras.applications model with a new head; TensorFlow), your "
                                   "builder as package.module:function, or one an installed package registers"
                                   + "".join(f"; {name}" for name in plugin_models()))
    weights: str = Field("", max_length=1000, title="Starting weights",
                         description="Empty: from scratch. A state dict (.pt, .pth, .safetensors; torch) or .keras "
                                     "file (TensorFlow) on this machine or at an s3:// URI, or model:NAME[@VERSION] "
                                     "of this store's registry (default: its champion), or torchvision:WEIGHTS "
                                     "(such as IMAGENET1K_V1, for a torchvision:<name> model; from $TORCH_HOME); "
                                     "the classification layer is replaced when the class count differs")
    epochs: int = Field(10, ge=1, le=1000, title="Epochs")
    batch_size: int = Field(64, ge=1, le=65536, title="Global batch size", description="Split evenly over workers")
    lr: float = Field(0.001, gt=0.0, le=10.0, title="Learning rate",
                      description="The optimizer's (peak) rate for the mean loss over a batch")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, title="Momentum")
    seed: int = Field(0, ge=0, title="Training seed")
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        "auto", title="Precision",
        description="auto: bf16 autocast + channels_last where each worker computes bf16 natively (CPUs with "
                    "AVX-512 BF16 or AMX, GPUs of compute capability 8.0+), else fp32; TensorFlow: always fp32. "
                    "The release's lineage and the run summary say which was used")
    channels_last: bool = Field(False, title="Channels-last memory format", description="auto turns it on with bf16")
    in_memory_mb: int = Field(2048, ge=0, le=1 << 20, title="Training data held in memory up to (MB)",
                              description="A training split of more decoded pixels streams from its shards, "
                                          "batch by batch, in an order drawn from the seed and epoch; 0 streams always")
    force: bool = Field(False, title="Retrain even if finished",
                        description="Off: a finished run with the same data and parameters is reused, an unfinished "
                                    "one resumes. On: train again from epoch 0 under a new run")

    def to_config(self) -> TrainLoopConfig:
        return TrainLoopConfig(data_dir="", framework=self.framework, recipe=self.recipe, model=self.model,
                               weights=self.weights,
                               epochs=self.epochs,
                               batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, seed=self.seed,
                               precision=self.precision, channels_last=self.channels_last,
                               in_memory_mb=self.in_memory_mb)


class ClusterParams(_Section):
    num_workers: int = Field(2, ge=1, le=4096, title="Ray workers")
    use_gpu: bool = Field(False, title="One GPU per worker")
    cpus_per_worker: int = Field(1, ge=1, le=256, title="CPUs per worker")
    ray_address: str | None = Field(None, title="Ray address",
                                    description="host:port or 'auto' of an existing cluster (the project's code "
                                                "travels with the run). Empty: $RAY_ADDRESS if set, else start Ray "
                                                "locally")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", title="Placement", description="PACK: as few nodes as possible; SPREAD: across nodes where possible; "
                                               "STRICT_SPREAD: each worker on its own node")
    wait_for_resources: float = Field(300.0, gt=0, le=86400, title="Wait for resources (s)",
                                      description="How long a worker group may wait for busy or lost resources "
                                                  "before the run fails")
    shared_folder_store: bool = Field(False, title="Folder store shared by every node",
                                      description="Allow a folder store on a cluster: every node mounts it at the "
                                                  "same path")
    node_cache_gb: float = Field(100.0, gt=0, le=1e6, title="Node cache per dataset (GB)",
                                 description="Training shards a node keeps of one dataset from an object store; a "
                                             "bigger training split streams from the store, re-read each epoch")
    max_failures: int = Field(2, ge=0, le=100, title="Worker-group restarts",
                              description="Ray restarts from the last checkpoint this many times")

    def to_resources(self) -> Resources:
        """Ray's side of these parameters; an empty address falls back to ``RAY_ADDRESS`` (read now)."""
        return Resources(num_workers=self.num_workers, use_gpu=self.use_gpu, cpus_per_worker=self.cpus_per_worker,
                         ray_address=resolve_address(self.ray_address), max_failures=self.max_failures,
                         placement_strategy=self.placement_strategy, wait_for_resources=self.wait_for_resources,
                         node_cache_gb=self.node_cache_gb)


class PublishParams(_Section):
    store: str = Field("./artifacts", title="Artifact store",
                       description="A directory, file:// URI or s3://bucket/prefix (credentials from the AWS "
                                   "environment, never from parameters)")
    model_name: str = Field("seed-cnn", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                            title="Registry name")
    min_improvement: float = Field(0.0, ge=0.0, le=1.0, title="Promotion margin",
                                   description="Test accuracy a new version must gain over the champion")


class TrackingParams(_Section):
    mlflow_uri: str | None = Field(None, max_length=1000, title="MLflow tracking URI",
                                   description="Track the run in MLflow there (credentials from the MLFLOW_TRACKING_* "
                                               "environment, never in the URI). Empty: $MLFLOW_TRACKING_URI if set, "
                                               "else no tracking")
    experiment: str = Field("trainflow", min_length=1, max_length=200, title="MLflow experiment")


class PipelineParams(_Section):
    data: DataParams = Field(default_factory=DataParams, title="Data")
    train: TrainParams = Field(default_factory=TrainParams, title="Training")
    cluster: ClusterParams = Field(default_factory=ClusterParams, title="Ray cluster")
    publish: PublishParams = Field(default_factory=PublishParams, title="Publishing")
    tracking: TrackingParams = Field(default_factory=TrackingParams, title="Tracking")


class SweepSection(_Section):
    search: list[str] = Field(
        default_factory=lambda: ["lr=loguniform:0.001:0.1"], min_length=1, max_length=len(SEARCHABLE),
        title="Search", description=f"NAME=SPACE, one per parameter searched: NAME is one of {', '.join(SEARCHABLE)}; "
                                    "SPACE is choice:a,b,c, uniform:lo:hi, loguniform:lo:hi or int:lo:hi (both ends "
                                    "in). The other parameters are the Training section's")
    trials: int = Field(8, ge=1, le=1000, title="Trials", description="How many sets of values to train")
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", title="Scheduler", description="asha: stop the trials that trail the others at 1, 2, 4, ... epochs; "
                                               "fifo: every trial runs every epoch")
    max_concurrent: int | None = Field(None, ge=1, le=1000, title="Trials at once",
                                       description="Empty: as many worker groups as the Ray cluster holds")

    @model_validator(mode="after")
    def _spaces_parse(self) -> SweepSection:
        names = [space.name for space in self.spaces]
        if len(set(names)) < len(names):
            raise ValueError(f"sweep.search names a parameter twice ({', '.join(names)}); give one space each.")
        return self

    @property
    def spaces(self) -> tuple[SearchSpace, ...]:
        return tuple(parse_space(text) for text in self.search)

    def to_spec(self, seed: int) -> SweepSpec:
        return SweepSpec(spaces=self.spaces, trials=self.trials, scheduler=self.scheduler,
                         max_concurrent=self.max_concurrent, seed=seed)


class SweepParams(PipelineParams):
    """The sweep flow's: a run's sections, whose training parameters the search starts from, and the search."""

    sweep: SweepSection = Field(default_factory=SweepSection, title="Sweep")


class PrepareParams(_Section):
    """``trainflow prepare``'s and the prepare-data flow's: the data options and where the prepared data goes."""

    data: DataParams = Field(default_factory=DataParams, title="Data")
    store: str = Field("./artifacts", title="Artifact store",
                       description="A directory, file:// URI or s3://bucket/prefix: training runs with the same "
                                   "store and data options find the prepared data there")
    ray_address: str | None = Field(None, title="Ray address",
                                    description="An existing cluster whose nodes decode a dataset in an object "
                                                "store. Empty: $RAY_ADDRESS if set, else this machine's cores")
    shared_folder_store: bool = Field(False, title="Folder store shared by every node",
                                      description="Allow a folder store with a cluster: every node mounts it at the "
                                                  "same path")


PRESETS: dict[str, dict[str, Any]] = {
    # The article's recipe as is: SGD lr 0.001, momentum 0.9, batch 64, on every training image (no validation split).
    "article": {"data": {"val_fraction": 0.0}},
    # The fast recipe within 11 minutes of training on two CPU cores (bf16 where the CPU has it): one Ray worker
    # using both cores, on every training image (--dataset folder:<cifar10-jpeg>). Its epochs are what fits:
    # five on images scaled down, growing from 20 to 28 pixels (45 to 93 s each here), then two at 32 (119 s each).
    "cifar10-fast-cpu": {"data": {"val_fraction": 0.0},
                         "train": {"recipe": "fast_cifar_muon", "epochs": 9, "batch_size": 1000, "lr": 0.24,
                                   "momentum": 0.85},
                         "cluster": {"num_workers": 1, "cpus_per_worker": 2},
                         "publish": {"model_name": "fast-cifar"}},
    # Tuned for the bundled digits: a 10x larger step passes 95 % test accuracy in about a minute.
    "digits-quickstart": {"data": {"kind": "digits"}, "train": {"epochs": 12, "lr": 0.01}},
    # The smallest real run: checks a deployment, a server or a cluster end to end in seconds of training.
    "smoke": {"data": {"kind": "digits", "image_size": 8}, "train": {"epochs": 1, "lr": 0.01},
              "cluster": {"num_workers": 1}},
}


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def build_params(preset: str | None = None, overrides: dict[str, Any] | None = None,
                 kind: type[PipelineParams] = PipelineParams) -> PipelineParams:
    """Parameters (of ``kind``: a run's or a sweep's) from a named preset plus nested overrides (e.g.
    ``{"train": {"epochs": 3}}``)."""
    from cluster.errors import UserError

    if preset is not None and preset not in PRESETS:
        raise UserError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}.")
    return kind.model_validate(_merge(PRESETS[preset] if preset else {}, overrides or {}))


def prepare_params(params: PipelineParams) -> PrepareParams:
    """The part of a pipeline's parameters that preparing its data takes."""
    return PrepareParams(data=params.data, store=params.publish.store, ray_address=params.cluster.ray_address,
                         shared_folder_store=params.cluster.shared_folder_store)


def preflight_prepare(params: PrepareParams) -> None:
    """Checks of the data and the store that need no server or cluster, run before either starts.

    Raises:
        UserError: for an unknown or missing dataset, an unusable store, or a folder store that the nodes
            of an existing cluster cannot see.
    """
    from cluster.errors import UserError
    from tasks.ingest import check_source
    from tasks.store import open_store

    check_source(params.data.dataset)
    store = open_store(params.store)
    address = resolve_address(params.ray_address)
    if address and store.is_local and not params.shared_folder_store:
        raise UserError(f"--store {params.store!r} is a folder on this machine, which the nodes of the Ray "
                        f"cluster at {address!r} cannot see; use an s3:// store, or pass --shared-folder-store if "
                        "every node mounts this folder at the same path.")
    store.check()


def ship_plugins(params: PipelineParams) -> None:
    """A model builder importable only on this machine (a module beside the user's code, not an installed
    package) goes to a cluster's nodes with the project's code; nodes use their own installed packages."""
    from cluster.execution import session
    from cluster.models import driver_only_modules

    session.ship_with_code(driver_only_modules([params.train.model]))


def tracking_of(params: PipelineParams) -> Tracking | None:
    """Where the run is tracked in MLflow (None: nowhere), its server asked before any work starts.

    Raises:
        UserError: credentials in the URI, the mlflow extra missing, or a server that does not answer.
    """
    tracking = tracking_for(params.tracking.mlflow_uri, params.tracking.experiment, params.model_dump(mode="json"))
    if tracking is not None:
        check_reachable(tracking)
    return tracking


def preflight(params: PipelineParams) -> Tracking | None:
    """Checks that need no server or cluster, run before either starts; returns where the run is tracked in
    MLflow (None: nowhere).

    Raises:
        UserError: for an unknown or missing dataset, an unusable store, a folder store that the nodes
            of an existing cluster cannot see, a framework that is not installed, or an MLflow tracking
            URI that cannot be used.
    """
    tracking = tracking_of(params)
    preflight_prepare(prepare_params(params))
    ship_plugins(params)
    get_recipe(params.train.recipe).check(params.train.framework, params.data.image_size)
    params.train.to_config().local_batch_size(params.cluster.num_workers)
    if params.train.weights:  # found, readable by the framework, and staged in the store before any work
        from tasks.store import open_store
        from tasks.weights import resolve_weights

        resolve_weights(params.train.weights, open_store(params.publish.store), params.train.framework,
                        params.train.model)
    if params.cluster.to_resources().ray_address is None:  # a local Ray runs this machine's packages; a
        get_framework(params.train.framework).check_installed()  # cluster's nodes are asked once Ray is up
    return tracking


def preflight_sweep(params: SweepParams) -> Tracking | None:
    """A run's checks (:func:`preflight`), and the search's: a validation split to choose by, and every value a
    trial can draw valid for the run; returns where the sweep is tracked in MLflow (None: nowhere).

    Raises:
        UserError: as :func:`preflight`, or for a search that cannot work.
    """
    from cluster.errors import UserError

    tracking = preflight(params)
    if params.data.val_fraction <= 0:
        raise UserError("a sweep chooses its best trial by validation accuracy, and data.val_fraction is 0; set "
                        "--val-fraction above 0 (for example 0.1).")
    check_spaces(params.train.to_config(), params.cluster.num_workers, params.sweep.spaces)
    return tracking
