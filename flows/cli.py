"""The ``trainflow`` command.

    trainflow run [--preset NAME] [--dataset ...] [--epochs N] [--workers N] [--gpu] [--force] ...
    trainflow prepare [--preset NAME] [--dataset ...] [--image-size N] [--store ...] [--json]
    trainflow sweep [run options] --search NAME=SPACE ... [--trials N] [--scheduler asha|fifo] [--max-concurrent K]
    trainflow submit --address http://HEAD:8265 [run options]
    trainflow presets
    trainflow up [--prefect-port 4200] [--cpus N] | trainflow down
    trainflow serve [--every SECONDS]
    trainflow models list|show NAME [VERSION]|promote NAME VERSION [--store ...]
    trainflow predict IMAGE|FOLDER... [--model NAME] [--version N] [--store ...] [--runtime onnx] [--json]

Mistakes a user can fix are printed as one line (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import NoReturn

from cluster.errors import UserError

# CLI option → (section, field) in PipelineParams
_OPTIONS: dict[str, tuple[str, str, type]] = {
    "dataset": ("data", "dataset", str),
    "tfds_data_dir": ("data", "tfds_data_dir", str),
    "image_size": ("data", "image_size", int),
    "limit_train": ("data", "limit_train", int),
    "limit_test": ("data", "limit_test", int),
    "val_fraction": ("data", "val_fraction", float),
    "stored_as": ("data", "stored_as", str),
    "max_side": ("data", "max_side", int),
    "epochs": ("train", "epochs", int),
    "batch_size": ("train", "batch_size", int),
    "lr": ("train", "lr", float),
    "momentum": ("train", "momentum", float),
    "framework": ("train", "framework", str),
    "recipe": ("train", "recipe", str),
    "model": ("train", "model", str),
    "weights": ("train", "weights", str),
    "precision": ("train", "precision", str),
    "seed": ("train", "seed", int),
    "in_memory_mb": ("train", "in_memory_mb", int),
    "workers": ("cluster", "num_workers", int),
    "cpus_per_worker": ("cluster", "cpus_per_worker", int),
    "max_failures": ("cluster", "max_failures", int),
    "node_cache_gb": ("cluster", "node_cache_gb", float),
    "ray_address": ("cluster", "ray_address", str),
    "placement_strategy": ("cluster", "placement_strategy", str),
    "wait_for_resources": ("cluster", "wait_for_resources", float),
    "store": ("publish", "store", str),
    "model_name": ("publish", "model_name", str),
    "min_improvement": ("publish", "min_improvement", float),
    "mlflow_uri": ("tracking", "mlflow_uri", str),
    "mlflow_experiment": ("tracking", "experiment", str),
}
# CLI flag → (section, field, help)
_FLAGS: dict[str, tuple[str, str, str]] = {
    "gpu": ("cluster", "use_gpu", "one GPU per Ray worker"),
    "skip_bad_images": ("data", "skip_bad_images", "leave out (and count) images that fail to decode"),
    "tfds_download": ("data", "tfds_download", "let TFDS download a tfds: dataset that is not prepared yet"),
    "force": ("train", "force", "retrain even if an identical run already finished"),
    "shared_folder_store": ("cluster", "shared_folder_store", "a folder --store that every Ray node mounts"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="trainflow", description="Train image classifiers as a Prefect + Ray pipeline.")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_run_options(sub.add_parser("run", help="run the whole pipeline once, here"))
    _add_run_options(sub.add_parser("prepare", help="ingest and preprocess only: prepared data in the store, which "
                                                    "runs with the same data options and store then reuse"),
                     PREPARE_OPTIONS)
    sweep = _add_run_options(sub.add_parser("sweep", help="search training parameters on Ray Tune (takes run's "
                                                          "options), then evaluate and publish the best trial"))
    sweep.add_argument("--search", action="append", metavar="NAME=SPACE",
                       help="a parameter's space, once per parameter: lr, momentum, batch_size or seed = choice:a,b,c, "
                            "uniform:lo:hi, loguniform:lo:hi or int:lo:hi (default lr=loguniform:0.001:0.1)")
    sweep.add_argument("--trials", type=int, help="how many sets of values to train (default 8)")
    sweep.add_argument("--scheduler", choices=("asha", "fifo"),
                       help="asha (default): stop trials that trail the others early; fifo: run every trial to the end")
    sweep.add_argument("--max-concurrent", dest="max_concurrent", type=int,
                       help="trials at once (default: as many worker groups as the Ray cluster holds)")
    submit = sub.add_parser("submit", help="run the pipeline as a Ray job on a cluster (takes run's options)")
    submit.add_argument("--address", required=True, help="the Ray head's dashboard, http://HEAD:8265")
    submit.add_argument("--no-wait", action="store_true", help="return once the job is accepted")
    sub.add_parser("presets", help="list the named parameter presets, the recipes and the models (installed "
                                   "packages' included)")
    up = sub.add_parser("up", help="start a Prefect server (UI on 127.0.0.1:4200) and a Ray head that runs use")
    up.add_argument("--prefect-port", type=int, default=4200)
    up.add_argument("--cpus", type=int, default=None, help="CPUs the Ray head offers (default: all)")
    sub.add_parser("down", help="stop what `trainflow up` started")
    serve = sub.add_parser("serve", help="register the deployments with PREFECT_API_URL and run them until stopped")
    serve.add_argument("--every", type=float, default=None, metavar="SECONDS",
                       help="also serve an interval-scheduled deployment (smoke preset)")
    serve.add_argument("--store", default=None, help="default store of the deployments' runs")
    models = sub.add_parser("models", help="read the model registry; promote by hand").add_subparsers(
        dest="action", required=True)
    for action, help_text in (("list", "every model, its versions and champion"),
                              ("show", "one version's metrics, lineage and promotions (default: the champion)"),
                              ("promote", "make a published version the champion, bypassing the gate")):
        cmd = models.add_parser(action, help=help_text)
        cmd.add_argument("--store", default="./artifacts", help="directory, file:// URI or s3://bucket/prefix")
        if action != "list":
            cmd.add_argument("name")
            cmd.add_argument("version", type=int, nargs="?" if action == "show" else None)
        if action == "promote":
            cmd.add_argument("--reason", default="promoted by hand")
    predict = sub.add_parser("predict", help="classify images with a published model (default: the champion)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders searched recursively")
    predict.add_argument("--model", help="registry name (default: the store's only model, else publish's default)")
    predict.add_argument("--version", type=int, help="a published version (default: the champion)")
    predict.add_argument("--store", default="./artifacts", help="directory, file:// URI or s3://bucket/prefix")
    predict.add_argument("--runtime", choices=("framework", "onnx"), default="framework",
                         help="framework: the version's own (torch or TensorFlow); onnx: onnxruntime on its "
                              "model.onnx, loading neither")
    predict.add_argument("--json", action="store_true", help="print the predictions as JSON")
    return ap


class _Parser(argparse.ArgumentParser):
    """Options only as spelled (its subcommands' parsers are of this class too): with argparse's prefix matching,
    ``--model`` was taken for ``--model-name``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)


PREPARE_OPTIONS = frozenset(["dataset", "tfds_data_dir", "image_size", "limit_train", "limit_test", "val_fraction",
                             "stored_as", "max_side", "ray_address", "store", "skip_bad_images", "tfds_download",
                             "shared_folder_store"])


def _add_run_options(run: argparse.ArgumentParser, only: frozenset[str] | None = None) -> argparse.ArgumentParser:
    """``trainflow run``'s options, or those of them named in ``only``."""
    run.add_argument("--preset", help="named parameter set (see `trainflow presets`)")
    from tasks.sources import forms  # the registry of sources: its forms are the choices

    from cluster.recipes import RECIPES

    helps = {"dataset": forms(), "tfds_data_dir": "where prepared TFDS datasets are (default $TFDS_DATA_DIR)",
             "recipe": f"how the model learns: {' | '.join(RECIPES)} (default article)",
             "model": "the network, instead of the recipe's own: torchvision:<name>, timm:<name>, keras:<name> or "
                      "package.module:function",
             "weights": "start from these weights: a .pt/.pth/.safetensors state dict or .keras file, an s3:// URI "
                        "of one, model:NAME[@VERSION] of the store's registry, or torchvision:WEIGHTS (such as "
                        "IMAGENET1K_V1) for a torchvision:<name> model",
             "stored_as": "the training images as pixels (default) or encoded: the files, decoded with a "
                          "random-resized crop per image and epoch",
             "max_side": "encoded: shrink larger images to this longest side (default twice --image-size)",
             "mlflow_uri": "track the run in MLflow there (default $MLFLOW_TRACKING_URI; credentials from the "
                           "MLFLOW_TRACKING_* environment)",
             "mlflow_experiment": "the MLflow experiment of the run (default trainflow)"}
    for option, (_, _, kind) in _OPTIONS.items():
        if only is None or option in only:
            run.add_argument(f"--{option.replace('_', '-')}", dest=option, type=kind, help=helps.get(option))
    for flag, (_, _, help_text) in _FLAGS.items():
        if only is None or flag in only:
            run.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action="store_true", help=help_text)
    run.add_argument("--json", action="store_true", help="print the summary as JSON (and progress as plain lines)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show Prefect's and Ray's own log lines instead of progress bars")
    return run


def overrides_from(args: argparse.Namespace) -> dict:
    nested: dict[str, dict] = {}
    for option, (section, field, _) in _OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None:
            nested.setdefault(section, {})[field] = value
    for flag, (section, field, _) in _FLAGS.items():
        if getattr(args, flag, False):
            nested.setdefault(section, {})[field] = True
    return nested


def sweep_overrides(args: argparse.Namespace) -> dict:
    """``trainflow sweep``'s own options as the sweep section of its parameters."""
    given = {name: getattr(args, name, None) for name in ("search", "trials", "scheduler", "max_concurrent")}
    return {"sweep": {name: value for name, value in given.items() if value is not None}}


def format_trials(summary) -> str:
    """A sweep's trials as a table, the best marked."""
    names = sorted({name for trial in summary.trials for name in trial.values})
    lines = ["", f"sweep {summary.sweep_id}: {len(summary.trials)} trial(s)",
             "  " + "  ".join([f"{'trial':<12}", *(f"{n:>10}" for n in names), "best val", "epochs", "outcome"])]
    for t in summary.trials:
        values = [f"{t.values[n]:>10.4g}" if isinstance(t.values[n], float) else f"{t.values[n]:>10}" for n in names]
        best = "-" if t.best_val_accuracy is None else f"{t.best_val_accuracy:.4f}"
        outcome = (f"failed: {t.error}" if t.error else "stopped early" if t.stopped_early else "finished") + (
            "  <- best, published" if t.trial_id == summary.best_trial_id else "")
        lines.append("  " + "  ".join([f"{t.trial_id:<12}", *values, f"{best:>8}", f"{t.epochs:>6}", outcome]))
    return "\n".join(lines)


def format_summary(summary, wall_seconds: float, title: str = "trainflow run summary") -> str:
    lines = ["", title, "-" * 52]
    from flows.console import stage_line

    lines += [f"  {stage_line(**stage.model_dump())}" for stage in summary.stages]
    lines += [
        "-" * 52,
        f"  wall time       {wall_seconds:8.1f} s   (training epochs {summary.training_seconds:.1f} s, "
        f"{summary.epochs_trained} epoch(s) run on {summary.nodes} node(s) in {summary.precision}"
        + (f", resumed after epoch {summary.resumed_from_epoch})" if summary.resumed_from_epoch else ")"),
        *([f"  restarts        Ray restarted the worker group {len(summary.restarts)} time(s), resuming after "
           f"epoch(s) {', '.join(map(str, summary.restarts))} (0: from scratch)"] if summary.restarts else []),
        f"  test accuracy   {summary.accuracy:8.4f}   macro F1 {summary.f1_macro:.4f} on {summary.test_size} images",
        f"  data            {summary.ignored_files} non-image file(s) ignored, "
        f"{summary.skipped_images} undecodable image(s) skipped",
        f"  published       {summary.model_name} v{summary.version}: "
        + ("already published, nothing written" if summary.already_published
           else "promoted to champion" if summary.promoted else "not promoted"),
        f"  gate            {summary.reason}",
        f"  stored at       {summary.release_uri}",
        *([f"  tracked         MLflow run {summary.mlflow_run_id}"] if summary.mlflow_run_id else []),
    ]
    return "\n".join(lines)


class _NoUserErrorTraceback(logging.Filter):
    """Keep Prefect's one-line failure records but drop the traceback when the cause is a UserError.

    The CLI prints that error as one sentence; a stack trace would only bury it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def _run(args: argparse.Namespace) -> int:
    """``trainflow run``, and ``trainflow sweep``."""
    from flows import services

    if (found := services.running()) is not None:
        services.use_prefect(found)
    from flows.params import SweepParams, build_params, preflight, preflight_sweep

    sweeping = args.command == "sweep"
    if sweeping:
        params = build_params(args.preset, {**overrides_from(args), **sweep_overrides(args)}, SweepParams)
        preflight_sweep(params)
    else:
        params = build_params(args.preset, overrides_from(args))
        preflight(params)
    # SIGTERM stops a run as Ctrl-C does, through the cleanup below (inside a flow run Prefect's own handler
    # raises TerminationSignal instead), so that neither Ray nor Prefect's temporary server outlives the run
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    from prefect.exceptions import TerminationSignal

    from cluster.execution import session as runtime
    from cluster.execution.placement import check_placement

    resources = params.cluster.to_resources()
    runtime.show_worker_logs(args.verbose)
    if found is not None:
        used = [f"Prefect server {found.ui_url} (UI)"] if os.environ.get("PREFECT_API_URL") == found.prefect_url else []
        if resources.ray_address is None:
            runtime.use_local_head(found.ray_address, found.token_file)
            used.append(f"Ray head {found.ray_address}")
        if used:
            print(f"trainflow: using `trainflow up`'s {' and '.join(used)}", file=sys.stderr)
    try:
        with _console(args):  # from here on, Prefect's log lines (its temporary server's first) are the console's
            # Ray takes seconds to start: overlap that with our imports. (Without PREFECT_API_URL, Prefect itself
            # starts its temporary server at the flow's first call to its API, and stops it at exit.)
            runtime.prestart(resources.ray_address)
            if resources.ray_address:  # an existing cluster answers at once: refuse a placement it can never hold
                with runtime.ray_session(resources.ray_address):
                    check_placement(resources)
            from flows.pipeline import train_pipeline
            from flows.sweep import sweep_pipeline

            for name in ("prefect.flow_runs", "prefect.task_runs"):  # where Prefect's engines log run failures
                logging.getLogger(name).addFilter(_NoUserErrorTraceback())
            summary = (sweep_pipeline if sweeping else train_pipeline)(params)
    except (KeyboardInterrupt, TerminationSignal):
        print("trainflow: stopped; a re-run with the same parameters resumes from the last checkpoint",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        runtime.shutdown()
    wall = time.perf_counter() - started
    if args.json:
        print(summary.model_dump_json(indent=2))
    else:
        print(format_trials(summary) + format_summary(summary, wall, "trainflow sweep summary: the best trial's run")
              if sweeping else format_summary(summary, wall))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """Ingest and preprocess only, then print the prepared data's reference."""
    from flows import services

    if (found := services.running()) is not None:
        services.use_prefect(found)
    from flows.params import build_params, prepare_params, preflight_prepare

    params = prepare_params(build_params(args.preset, overrides_from(args)))
    preflight_prepare(params)
    signal.signal(signal.SIGTERM, _interrupt)
    from prefect.exceptions import TerminationSignal

    try:
        with _console(args):
            from flows.pipeline import prepare_data

            prepared = prepare_data(params)
    except (KeyboardInterrupt, TerminationSignal):
        print("trainflow: stopped; nothing was recorded as prepared", file=sys.stderr)
        return 128 + signal.SIGTERM
    if args.json:
        print(prepared.model_dump_json(indent=2))
    else:
        counts = ", ".join(f"{split} {n}" for split, n in prepared.counts.items())
        print(f"prepared {prepared.uri}\n  {len(prepared.classes)} classes, {prepared.image_size} px, "
              f"{prepared.channels} channel(s); {counts}; fingerprint {prepared.fingerprint[:16]}"
              + ("; already in the store" if prepared.reused else ""))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _console(args: argparse.Namespace):
    """Progress bars on a terminal, plain lines elsewhere (and with --json); today's log lines with -v."""
    if args.verbose:
        return contextlib.nullcontext()
    from flows.console import run_console

    return run_console(bars=sys.stderr.isatty() and not args.json)


def _submit(args: argparse.Namespace, run_args: list[str]) -> int:
    """Check the run's options here, then hand them to ``trainflow run`` in a Ray job on the cluster."""
    from cluster.execution.jobs import submit_run
    from flows.params import build_params, ship_plugins

    run_parser = _add_run_options(_Parser(prog="trainflow submit"))
    ship_plugins(build_params((options := run_parser.parse_args(run_args)).preset, overrides_from(options)))
    env_vars = {name: os.environ[name] for name in ("PREFECT_API_URL",) if os.environ.get(name)}
    return submit_run(args.address, run_args, env_vars=env_vars, follow=not args.no_wait)


def _services(args: argparse.Namespace) -> int:
    from flows import services

    if args.command == "down":
        stopped = services.down()
        print(f"trainflow: stopped {', '.join(stopped)}" if stopped else "trainflow: nothing to stop")
        return 0
    found = services.running()
    started = found or services.up(prefect_port=args.prefect_port, ray_cpus=args.cpus)
    print(f"trainflow: {'already up' if found else 'up'}: {started.describe()}; `trainflow run` uses them, "
          "`trainflow down` stops them")
    return 0


def _models(args: argparse.Namespace) -> int:
    from tasks import registry
    from tasks.store import open_store

    store = open_store(args.store)
    store.check()
    if args.action == "list":
        rows = [{"name": name, "versions": registry.published_versions(store, name),
                 "champion": (registry.read_champion(store, name)[1] or {}).get("version")}
                for name in registry.model_names(store)]
        print(json.dumps(rows, indent=2))
    elif args.action == "show":
        version = args.version
        if version is None:
            champion = registry.read_champion(store, args.name)[1]
            published = registry.published_versions(store, args.name)
            version = champion["version"] if champion else (published[-1] if published else 0)
        print(json.dumps(registry.read_version(store, args.name, version), indent=2))
    else:
        print(json.dumps(registry.promote(store, args.name, args.version, args.reason), indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    """Classify images with a published version; every mistake is found before the model's framework loads."""
    from flows.params import PublishParams
    from tasks import predict
    from tasks.store import open_store

    files, ignored = predict.image_files(args.images)
    store = open_store(args.store)
    store.check()
    name = predict.choose_model(store, args.model, PublishParams.model_fields["model_name"].default)
    chosen = predict.choose_version(store, name, args.version)
    results = predict.predict(store, chosen, files, predict.load_images(files, chosen), args.runtime)
    if args.json:
        rows = [{"path": r.path, "class": r.label, "index": r.index, "probability": r.probability} for r in results]
        print(json.dumps({"model": chosen.name, "version": chosen.version, "champion": chosen.champion,
                          "framework": chosen.framework, "runtime": args.runtime, "uri": chosen.uri,
                          "ignored_files": ignored,
                          "predictions": rows}, indent=2))
        return 0
    runtime = "onnxruntime" if args.runtime == "onnx" else chosen.framework
    print(f"{chosen.name} v{chosen.version} ({'the champion' if chosen.champion else 'not the champion'}, "
          f"{runtime}) from {chosen.uri}: {len(results)} image(s)"
          + (f", {ignored} non-image file(s) ignored" if ignored else ""), file=sys.stderr)
    for r in results:
        print(f"{r.path}\t{r.label}\t{r.probability:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command != "submit":
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL a run starts Prefect's temporary server and waits for it, 20 s by default: too short
    # on a small machine whose cores Ray and the run's imports keep busy at the same time
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        if args.command == "presets":
            from cluster.models import plugin_models
            from cluster.recipes import MODELS, RECIPES
            from flows.params import PRESETS

            print(json.dumps({"presets": PRESETS, "recipes": {r.name: r.summary for r in RECIPES.values()},
                              "models": {**{name: "built-in" for name in MODELS}, **plugin_models()}}, indent=2))
            return 0
        if args.command == "serve":
            from flows.deployments import serve_all

            serve_all(args.every, args.store)
            return 0
        if args.command == "submit":
            return _submit(args, extra)
        if args.command in ("up", "down"):
            return _services(args)
        if args.command == "predict":
            return _predict(args)
        if args.command == "prepare":
            return _prepare(args)
        return _models(args) if args.command == "models" else _run(args)
    except UserError as exc:
        print(f"trainflow: error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, always
        return 2
    except Exception as exc:
        from pydantic import ValidationError

        if not isinstance(exc, ValidationError):
            raise
        print(f"trainflow: error: {_describe(exc)}", file=sys.stderr)
        return 2


def _describe(exc) -> str:
    """A pydantic ValidationError as one line: our own validators' sentences as they are, field errors by path."""
    own = [str(e["ctx"]["error"]) for e in exc.errors() if isinstance(e.get("ctx", {}).get("error"), ValueError)]
    if own:
        return " ".join(own)
    return "invalid parameters: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def console_main() -> NoReturn:
    """The ``trainflow`` command: :func:`main`, then Python's own exit less its last step.

    That exit waits for the threads that are not daemons, with Prefect's drains of its log and event queues to
    its API; then runs the exit handlers (Ray's disconnect, the stop of Prefect's temporary server); then frees
    every module, which for Prefect's, Ray's and pandas' takes 0.8 s on a 2-core machine, and which the
    operating system does at once. An exception leaves as it would from ``main()``.
    """
    code = main()
    threading._shutdown()  # what the interpreter's exit calls first (private, no public equivalent)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
