"""A hyperparameter sweep on Ray Tune: one Train run per trial, the losers stopped early by ASHA.

Ray 2.60's pattern for Train V2 under Tune: Tune runs a driver function per
trial (:func:`run_trial`, on a Ray worker with no resources of its own) that
builds and fits the trial's trainer (:func:`cluster.execution.trainer.fit`)
and hands Tune each epoch's report as the run's Train callback delivers it
(``ray.tune.report``), so the scheduler sees every epoch and can stop a trial
between two. A trial's Train run is named by the identity of its values (the
data's fingerprint and the trial's loop config) and the trial, so its checkpoints
sit in the store beside every other run's, and a trial started again (a re-run
of the sweep after its driver died, found by ``Tuner.restore``) resumes from its
last checkpoint; a trial whose run already finished is not trained again, its
history is reported as it stands.

The search spaces are parsed here without Ray (the flow's form checks them):
``choice:a,b,c``, ``uniform:lo:hi``, ``loguniform:lo:hi``, ``int:lo:hi`` (both ends in).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from cluster.config import TrainLoopConfig, run_identity
from cluster.errors import UserError
from cluster.execution.nodecache import StoredData, StoredFile
from cluster.execution.placement import Resources

__all__ = ["SEARCHABLE", "SearchSpace", "SweepSpec", "TrialPlan", "check_spaces", "concurrency", "parse_space",
           "run_trial", "tune_sweep"]

METRIC = "val_accuracy"  # what the search maximises: every epoch's validation accuracy
TIME_ATTR = "epoch"  # ASHA's clock: epochs, which a resumed trial reports as they were (not Tune's iterations)

# What a trial's driver function holds while its run trains: memory only. Tune needs it to hold something, and
# any share of a CPU would leave a node one short for the worker groups that concurrency() counted on.
TRIAL_DRIVER = {"memory": 256 * 2**20}

# The loop's fields a sweep may search, and the type of their values
SEARCHABLE: dict[str, type] = {"lr": float, "momentum": float, "batch_size": int, "seed": int}


@dataclass(frozen=True)
class SearchSpace:
    """One parameter's space: ``kind`` (choice, uniform, loguniform, int) and its values or bounds."""

    name: str
    kind: str
    values: tuple = ()  # choice
    low: float = 0.0  # the others: both ends included
    high: float = 0.0

    def __str__(self) -> str:
        body = ",".join(map(str, self.values)) if self.kind == "choice" else f"{self.low:g}:{self.high:g}"
        return f"{self.name}={self.kind}:{body}"

    @property
    def corners(self) -> tuple:
        """The values that bound what a trial can draw: every choice, or both ends."""
        return self.values if self.kind == "choice" else (SEARCHABLE[self.name](self.low),
                                                         SEARCHABLE[self.name](self.high))

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper end is left out
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(self.low, self.high)


def parse_space(text: str) -> SearchSpace:
    """``NAME=SPACE`` as the CLI and the form take it, e.g. ``lr=loguniform:0.001:0.1``.

    Raises:
        UserError: naming the part that is wrong and the forms that are right.
    """
    forms = "choice:a,b,c, uniform:lo:hi, loguniform:lo:hi or int:lo:hi"
    name, sep, space = text.partition("=")
    name, space = name.strip(), space.strip()
    if not sep or not name or not space:
        raise UserError(f"--search {text!r} is not NAME=SPACE; write for example lr=loguniform:0.001:0.1.")
    if name not in SEARCHABLE:
        raise UserError(f"--search {name!r} cannot be searched; choose one of {', '.join(SEARCHABLE)}.")
    kind, _, body = space.partition(":")
    kind_of = SEARCHABLE[name]
    try:
        if kind == "choice":
            values = tuple(kind_of(v.strip()) for v in body.split(","))
            if not body or len(set(values)) < 1:
                raise ValueError
            return SearchSpace(name, kind, values=values)
        if kind in ("uniform", "loguniform", "int"):
            low, high = (float(v) for v in body.split(":"))
            if kind == "int" and (kind_of is not int or low != int(low) or high != int(high)):
                raise ValueError
            if kind == "loguniform" and low <= 0:
                raise ValueError
            if not math.isfinite(low) or not math.isfinite(high) or low >= high:
                raise ValueError
            return SearchSpace(name, kind, low=low, high=high)
    except ValueError:
        pass
    raise UserError(f"--search {text!r}: {space!r} is not a space of {kind_of.__name__} values for {name}; write "
                    f"{forms} (lo < hi, loguniform's lo > 0, int only for whole-number parameters).")


@dataclass(frozen=True, kw_only=True)
class TrialPlan:
    """What every trial shares: the loop config the search varies, where the data and checkpoints are."""

    base: TrainLoopConfig
    resources: Resources
    data: StoredData
    fingerprint: str
    storage_path: str  # the store's checkpoints, as Ray Train's storage
    storage_filesystem: Any = None
    weights: StoredFile | None = None

    def config_of(self, values: Mapping[str, Any]) -> TrainLoopConfig:
        """The loop config of a trial that drew ``values``."""
        return replace(self.base, **values)

    def run_name(self, values: Mapping[str, Any], trial_id: str) -> str:
        """The training run of trial ``trial_id``: the identity of its values, and the trial (random search
        can draw the same values twice, and two runs of one name at once would share their checkpoints)."""
        return f"{run_identity(self.fingerprint, self.config_of(values))}-trial-{trial_id}"

    def reports(self, values: Mapping[str, Any], trial_id: str) -> list[dict]:
        """What trial ``trial_id``'s run has reported, epoch by epoch, up to its latest checkpoint."""
        done = latest_state(self.storage_filesystem, f"{self.storage_path}/{self.run_name(values, trial_id)}")
        return (done or {}).get("history", [])


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """The search: its spaces, how many trials, which scheduler, how many at once, and its seed."""

    spaces: tuple[SearchSpace, ...]
    trials: int
    scheduler: str = "asha"  # or "fifo": every trial runs every epoch
    max_concurrent: int | None = None  # None: as many as the cluster holds (resolved by the caller)
    seed: int = 0


def check_spaces(base: TrainLoopConfig, num_workers: int, spaces: tuple[SearchSpace, ...],
                 train_images: int | None = None) -> None:
    """Every value a trial can draw makes a valid run: checked on the driver, before any trial starts
    (``train_images``, once the data is prepared: no batch may be larger).

    Raises:
        UserError: a value out of the parameter's range, a batch that does not split over the workers, or
            one larger than the training set.
    """
    for space in spaces:
        for value in space.corners:
            try:
                cfg = replace(base, **{space.name: value})
                cfg.local_batch_size(num_workers)
                if train_images is not None and cfg.batch_size > train_images:
                    raise UserError(f"batch_size={cfg.batch_size} is larger than the training set ({train_images} "
                                    "images).")
            except UserError as exc:
                raise UserError(f"--search {space}: a trial could draw {space.name}={value}, and then {exc}") \
                    from None


def concurrency(resources: Resources, asked: int | None, nodes: list[dict[str, float]]) -> int:
    """How many trials run at once: as many worker groups as the live ``nodes`` hold together, at most ``asked``."""
    slots = sum(int(min(node.get(name, 0.0) // amount for name, amount in resources.bundle.items()))
                for node in nodes)
    fits = max(1, slots // resources.num_workers)
    return min(fits, asked) if asked else fits


def latest_state(filesystem, run_path: str) -> dict | None:
    """The state.json of the most advanced checkpoint Ray Train stored for the run at ``run_path``, or None."""
    import pyarrow.fs

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    found = [info for info in fs.get_file_info(pyarrow.fs.FileSelector(run_path, allow_not_found=True))
             if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")]
    best: dict | None = None
    for info in found:
        try:
            with fs.open_input_stream(f"{info.path}/state.json") as stream:
                state = json.loads(stream.read())
        except (FileNotFoundError, OSError):
            continue  # a checkpoint being written, or one Ray dropped
        if best is None or state["epoch"] > best["epoch"]:
            best = state
    return best


def run_trial(values: dict, plan: TrialPlan) -> None:
    """Tune's driver function of one trial: its Train run, each epoch's report handed to Tune."""
    from ray import tune

    from cluster.execution.trainer import fit

    cfg = plan.config_of(values)
    trial_id = tune.get_context().get_trial_id()
    name = plan.run_name(values, trial_id)

    def report(metrics: Mapping) -> None:
        tune.report({**{k: v for k, v in metrics.items() if v is not None}, "run_id": name})

    trained = plan.reports(values, trial_id)
    for metrics in trained:  # what the run has already trained: the scheduler's view
        report(metrics)
    if trained and trained[-1]["epoch"] >= cfg.epochs:
        return
    fit(cfg, plan.resources, data=plan.data, run_name=name, storage_path=plan.storage_path,
        storage_filesystem=plan.storage_filesystem, on_report=report, weights=plan.weights)


def trial_dirname(trial) -> str:
    """A trial's folder in the sweep's storage: its id (Tune's default also spells out the drawn values)."""
    return trial.trial_id


def tune_sweep(plan: TrialPlan, spec: SweepSpec, *, name: str, storage_path: str, storage_filesystem=None,
               on_result: Callable[[str, dict, dict], None] = lambda trial, values, metrics: None,
               on_change: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Run (or resume) the sweep ``name``; returns one row per trial: its id, drawn values, the epochs Tune saw it
    report (a stopped trial's run may have trained on for a moment before it was stopped) and error (or None).

    The experiment's state is kept under ``storage_path/name``: called again after its driver died, the
    sweep goes on from there (finished trials are not run again; unfinished ones resume from their runs'
    checkpoints). On this thread, ``on_result(trial id, values, metrics)`` hears each epoch's report of
    every trial, and ``on_change(rows)`` every trial's row (``sweep_watch.trial_row``) when one starts,
    ends or fails.
    """
    import functools

    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cluster.execution.sweep_watch import ResumingASHA, Watch, listening

    trainable = tune.with_resources(functools.partial(run_trial, plan=plan), TRIAL_DRIVER)
    path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage_filesystem):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_filesystem)
    else:
        scheduler = (ResumingASHA(time_attr=TIME_ATTR, max_t=plan.base.epochs, grace_period=1, reduction_factor=2)
                     if spec.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable, param_space={s.name: s.to_tune() for s in spec.spaces},
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=spec.trials, scheduler=scheduler,
                                        # its own limit: Tune ignores max_concurrent_trials beside a search_alg
                                        search_alg=BasicVariantGenerator(random_state=spec.seed,
                                                                         max_concurrent=spec.max_concurrent or 0),
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                      callbacks=[Watch()], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
    with listening(on_result, on_change, lambda trial_id, values: plan.reports(values, trial_id)):
        grid = tuner.fit()
    return [{"trial_id": result.path.rstrip("/").rsplit("/", 1)[-1],
             "values": {k: result.config[k] for k in sorted(result.config)},
             "epochs": int((result.metrics or {}).get(TIME_ATTR, 0)),
             "error": None if result.error is None else " ".join(str(result.error).split())[:300]}
            for result in grid]

