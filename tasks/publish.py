"""Stage 5, publish: a new model version in the registry (``tasks.registry``), then the promotion gate.

The version's files go up first and its manifest last; the champion pointer
moves only after that, by compare-and-swap, and only if the gate says so.

Publishing is idempotent: a model that already is a version (the same
training run and the same checkpoint, as a re-run over unchanged data
reuses it) is not published again; publish returns that version, says so,
and writes nothing. A forced retrain is another run, published anew.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata

import numpy as np
from prefect import get_run_logger, task

from cluster.errors import UserError
from cluster.frameworks import get_framework
from cluster.worker.checkpoint import ONNX_FILE, PREDICTIONS_FILE, PREPROCESSING_FILE
from tasks.common import in_prefect_run, retry_unless_user_error
from tasks.refs import Evaluation, PreparedData, Release, TrainedModel
from tasks.registry import (MANIFEST, claim_version, move_champion, published_versions, read_champion,
                            versions_prefix)
from tasks.store import Store, open_store

_PACKAGES = ("trainflow", "ray", "prefect", "numpy", "scikit-learn", "pillow", "pydantic")


def gate(accuracy: float, champion: dict | None, min_improvement: float) -> tuple[bool, str]:
    """Promote when there is no champion, or when accuracy beats it by at least ``min_improvement``."""
    if champion is None:
        return True, "first version: no champion yet"
    delta = accuracy - champion["test_accuracy"]
    verdict = delta > 0 and delta >= min_improvement - 1e-9  # accuracies are ratios: 0.85 - 0.80 < 0.05 in floats
    comparison = f"test accuracy {accuracy:.4f} vs champion v{champion['version']} {champion['test_accuracy']:.4f}"
    return verdict, f"{comparison} (delta {delta:+.4f}, needed > 0 and >= {min_improvement:g})"


def package_versions(framework: str) -> dict[str, str | None]:
    """Installed versions (here, where publish runs) of the project's packages and the framework's."""
    found = {}
    for package in (*_PACKAGES, *get_framework(framework).packages):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def data_source(params: dict) -> str:
    """What the card says the model was trained on: the dataset kind, or the folder's path."""
    data = params.get("data", {})
    return str(data.get("path") or data.get("kind"))


def model_card(name: str, version: int, model: TrainedModel, evaluation: Evaluation, prepared: PreparedData,
               source: str) -> str:
    rows = "\n".join(f"| {c.name} | {c.precision:.4f} | {c.recall:.4f} | {c.f1:.4f} | {c.support} |"
                     for c in evaluation.per_class)
    last = model.history[-1]
    return f"""# {name} v{version}

A `{model.model}` image classifier ({model.framework}) trained on `{source}`
({prepared.counts.get('train', 0)} train / {prepared.counts.get('val', 0)} val / {evaluation.test_size} test images,
{prepared.image_size}x{prepared.image_size}, {prepared.channels} channel(s)) over {len(model.history)} epochs
on {model.num_workers} Ray workers. Final train loss {last.train_loss:.4f}.

{evaluation.metrics_markdown()}

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

Data fingerprint `{prepared.fingerprint}`; training run `{model.run_id}`.
"""


def version_files(model: TrainedModel, evaluation: Evaluation, prepared: PreparedData, params: dict,
                  store: Store, name: str, version: int) -> dict[str, bytes]:
    """Every file of a version, by file name."""
    checkpoint = store.key_of(model.checkpoint_uri)
    state_json = store.get_bytes(f"{checkpoint}/state.json")
    state = json.loads(state_json)
    lineage = {
        "name": name, "version": version, "created_at": datetime.now(timezone.utc).isoformat(),
        "framework": model.framework, "framework_versions": state.get("versions", {}),
        "data_fingerprint": prepared.fingerprint, "prepared_uri": prepared.uri, "run_id": model.run_id,
        "checkpoint_uri": model.checkpoint_uri, "workers": [w.model_dump() for w in model.workers],
        "worker_group_restarts": [{"resumed_after_epoch": epoch} for epoch in model.restarts],
        "precision": model.precision.model_dump() if model.precision else None,  # auto as the workers resolved it
        "starting_weights": ({"origin": model.weights_origin, "sha256": model.weights_sha256}
                             if model.weights_sha256 else None),
        "parameters": params, "packages": package_versions(model.framework),
        "python": platform.python_version(), "git_commit": git_commit(),
    }
    # the files the framework's checkpoint lists as its model (weights, or a whole saved model); its
    # optimizer state stays with the checkpoint
    model_files = {name: store.get_bytes(f"{checkpoint}/{name}") for name in state.get("model_files", ["model.pt"])}
    return {
        **model_files,
        "state.json": state_json,
        "metrics.json": evaluation.model_dump_json(indent=2).encode(),
        "lineage.json": json.dumps(lineage, indent=2, default=str).encode(),
        "card.md": model_card(name, version, model, evaluation, prepared, data_source(params)).encode(),
        "confusion.png": store.get_bytes(store.key_of(evaluation.confusion_png_uri)),
    }


ONNX_AGREEMENT = 0.999  # the least share of the test split on which onnxruntime's class must be the framework's


def onnx_files(store: Store, model: TrainedModel) -> dict[str, bytes]:
    """The final checkpoint's ONNX model and its preprocessing, once onnxruntime's classes for the test split
    (made where the model trained) agree with the framework's on at least ONNX_AGREEMENT of it; none when the
    checkpoint holds no ONNX model (written where onnxruntime was missing).

    Raises:
        UserError: when they agree on less, naming both counts: nothing is published.
    """
    checkpoint = store.key_of(model.checkpoint_uri)
    if not store.exists(f"{checkpoint}/{ONNX_FILE}"):
        return {}
    with np.load(io.BytesIO(store.get_bytes(f"{checkpoint}/{PREDICTIONS_FILE}"))) as stored:
        # the framework's own classes, in fp32 where its predictions rounded to bf16 (the graph computes in fp32)
        y_pred = stored["y_exact"] if "y_exact" in stored.files else stored["y_pred"]
        y_onnx = stored["y_onnx"]
    agree = int(np.sum(y_pred == y_onnx))
    if len(y_pred) and agree < ONNX_AGREEMENT * len(y_pred):
        raise UserError(f"the ONNX export of {model.run_id} agrees with {model.framework} on {agree} of "
                        f"{len(y_pred)} test images (at least {ONNX_AGREEMENT:.1%} needed), so nothing is "
                        "published; report it with the model's name, or train with another --model.")
    return {name: store.get_bytes(f"{checkpoint}/{name}") for name in (ONNX_FILE, PREPROCESSING_FILE)}


def already_published(store: Store, name: str, model: TrainedModel) -> int | None:
    """The version of ``name`` that already holds ``model``'s checkpoint, or None.

    The same training run (``run_id`` in the version's lineage) and the same checkpoint: the version's
    ``state.json``, copied from the checkpoint, has the checkpoint's bytes (its epoch and its per-epoch
    history, timings included, so another training of the same run differs). Newest version first.
    """
    checkpoint_state = store.get_bytes(f"{store.key_of(model.checkpoint_uri)}/state.json")
    wanted = hashlib.sha256(checkpoint_state).hexdigest()
    for version in reversed(published_versions(store, name)):
        prefix = f"{versions_prefix(name)}/{version}"
        listed = {f["name"]: f["sha256"] for f in json.loads(store.get_bytes(f"{prefix}/{MANIFEST}"))["files"]}
        if listed.get("state.json") != wanted:
            continue
        if json.loads(store.get_bytes(f"{prefix}/lineage.json")).get("run_id") == model.run_id:
            return version
    return None


def publish(model: TrainedModel, evaluation: Evaluation, prepared: PreparedData, params: dict, store_uri: str,
            name: str, min_improvement: float = 0.0) -> Release:
    """Write a new version (manifest last), then run the promotion gate with compare-and-swap.

    When ``model`` already is a version of ``name``, write nothing and return that version (``reused``).
    """
    if not name or "/" in name:
        raise UserError(f"model_name={name!r} is not usable; choose a non-empty name without '/'.")
    store = open_store(store_uri)
    existing = already_published(store, name, model)
    if existing is not None:
        champion_version = (read_champion(store, name)[1] or {}).get("version")
        stays = f"v{champion_version}" if champion_version else "unset"
        return Release(name=name, version=existing, uri=store.child_uri(f"{versions_prefix(name)}/{existing}"),
                       promoted=False, champion_version=champion_version, reused=True,
                       reason=f"already published as v{existing} (training run {model.run_id}, same checkpoint); "
                              f"nothing written, the champion stays {stays}")
    exported = onnx_files(store, model)  # checked before a version number is claimed
    version = claim_version(store, name)
    prefix = f"{versions_prefix(name)}/{version}"
    files = {**version_files(model, evaluation, prepared, params, store, name, version), **exported}
    for file_name, data in files.items():
        store.put_bytes(f"{prefix}/{file_name}", data)
    manifest = {"name": name, "version": version,
                "files": [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                          for n, d in sorted(files.items())]}
    store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=2).encode())
    while True:
        raw, champion = read_champion(store, name)
        promoted, reason = gate(evaluation.accuracy, champion, min_improvement)
        if not promoted or move_champion(store, name, version, evaluation.accuracy, "gate", reason, raw):
            break  # else another publisher moved the pointer: judge again against the new champion
    return Release(name=name, version=version, uri=store.child_uri(prefix), promoted=promoted,
                   champion_version=version if promoted else (champion or {}).get("version"), reason=reason)


@task(name="publish", task_run_name="publish {name}", retries=3, retry_delay_seconds=[2, 8, 30],
      retry_condition_fn=retry_unless_user_error)
def publish_task(model: TrainedModel, evaluation: Evaluation, prepared: PreparedData, params: dict, store: str,
                 name: str, min_improvement: float = 0.0) -> Release:
    """Prefect task: publish a version and apply the promotion gate (or find the model already published)."""
    release = publish(model, evaluation, prepared, params, store, name, min_improvement)
    if release.reused and in_prefect_run():
        get_run_logger().info(release.reason)
    return release
