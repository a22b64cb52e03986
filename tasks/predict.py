"""Predictions from a published model (``trainflow predict``): which version, which images, which classes.

Not a pipeline stage: it reads the registry (``tasks.registry``) and never
writes. Images are found the way ingest finds them (by suffix; other files
are ignored and counted) and decoded and resized by preprocess's own
functions, so a model sees the pixels it was trained on. The version's files
are fetched into a temporary folder and checked against its manifest before
the framework it was trained with (and only that one) loads them, safely:
torch with ``weights_only``, Keras with ``safe_mode``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster.errors import UserError
from cluster.frameworks import get_framework, load
from cluster.worker.checkpoint import ONNX_FILE
from tasks import registry
from tasks.ingest import IMAGE_SUFFIXES
from tasks.images import to_channels
from tasks.preprocess import decode_images
from tasks.store import Store

__all__ = ["Chosen", "Prediction", "choose_model", "choose_version", "fetch_model", "image_files",
           "load_images", "onnx_probabilities", "predict", "verified_file"]


@dataclass(frozen=True, kw_only=True)
class Chosen:
    """A published version to predict with, and what its ``state.json`` says about its inputs."""

    name: str
    version: int
    champion: bool
    uri: str
    framework: str
    image_size: int
    channels: int
    classes: tuple[str, ...]
    manifest: dict


@dataclass(frozen=True, kw_only=True)
class Prediction:
    path: str
    label: str  # the class's name
    index: int
    probability: float


def image_files(arguments: list[str]) -> tuple[list[Path], int]:
    """The image files named by ``arguments`` (files, or folders searched recursively) and how many others were ignored.

    Raises:
        UserError: for a path that does not exist, a file that is not an image, or a folder without images.
    """
    files: list[Path] = []
    ignored = 0
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise UserError(f"{argument}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                                "give an image or a folder of images.")
            files += images
            ignored += len(found) - len(images)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{argument} is not an image: expected one of {', '.join(sorted(IMAGE_SUFFIXES))}.")
            files.append(path)
        else:
            raise UserError(f"{argument}: no such file or folder.")
    return list(dict.fromkeys(files)), ignored  # a file named twice is predicted once


def choose_model(store: Store, name: str | None, default: str) -> str:
    """``name`` if given; else the store's only model, else ``default`` when the store holds it.

    Raises:
        UserError: for an empty registry, a name it does not hold, or several models and no name.
    """
    names = registry.model_names(store)
    if not names:
        raise UserError(f"the store {store.uri} holds no published model; publish one with `trainflow run`, or "
                        "pass the --store that holds it.")
    if name is not None and name not in names:
        raise UserError(f"model {name!r} is not in the store {store.uri}; it holds {', '.join(names)}.")
    if name is not None:
        return name
    if len(names) == 1:
        return names[0]
    if default in names:
        return default
    raise UserError(f"the store {store.uri} holds several models ({', '.join(names)}); choose one with --model.")


def choose_version(store: Store, name: str, version: int | None) -> Chosen:
    """The named version of ``name``, else its champion (else its latest version), with its input spec.

    Raises:
        UserError: for a version that is not published, or one whose framework is not installed here.
    """
    champion = registry.read_champion(store, name)[1]
    if version is None:
        version = champion["version"] if champion else registry.published_versions(store, name)[-1]
    info = registry.read_version(store, name, version)  # UserError when it is not published
    state = json.loads(store.get_bytes(f"{registry.versions_prefix(name)}/{version}/state.json"))
    spec = state["spec"]
    get_framework(state.get("framework", "torch")).check_installed()
    return Chosen(name=name, version=version, champion=bool(champion) and champion["version"] == version,
                  uri=info["uri"], framework=state.get("framework", "torch"), image_size=spec["image_size"],
                  channels=spec["in_channels"], classes=tuple(spec["classes"]), manifest=info["manifest"])


def load_images(files: list[Path], chosen: Chosen) -> np.ndarray:
    """Decode and resize ``files`` as preprocess did for the chosen model: uint8 NHWC at its size and channels.

    Raises:
        UserError: naming up to ten files that could not be decoded.
    """
    images, _, bad = decode_images([str(p) for p in files], chosen.image_size)
    if bad:
        raise UserError(f"{len(bad)} image(s) could not be decoded, e.g. {', '.join(w for _, w in bad[:10])}; "
                        "remove or fix them.")
    return to_channels(images, chosen.channels)


def fetch_model(store: Store, chosen: Chosen, dest: Path) -> None:
    """Copy the version's ``state.json`` and model files into ``dest``, each checked against the manifest.

    Raises:
        UserError: when a file is missing from the manifest or its bytes differ from what the manifest lists.
    """
    state = verified_file(store, chosen, "state.json")
    (dest / "state.json").write_bytes(state)
    for file_name in json.loads(state).get("model_files", ["model.pt"]):
        (dest / file_name).write_bytes(verified_file(store, chosen, file_name))


def verified_file(store: Store, chosen: Chosen, file_name: str) -> bytes:
    """One file of the chosen version, its bytes checked against the manifest.

    Raises:
        UserError: when the file is missing from the manifest or its bytes differ from what the manifest lists.
    """
    listed = {entry["name"]: entry["sha256"] for entry in chosen.manifest["files"]}
    data = store.get_bytes(f"{registry.versions_prefix(chosen.name)}/{chosen.version}/{file_name}") \
        if file_name in listed else b""
    if listed.get(file_name) != hashlib.sha256(data).hexdigest():
        raise UserError(f"{chosen.uri}/{file_name} does not match the version's manifest; the version is "
                        "damaged: publish it again or choose another --version.")
    return data


def predict(store: Store, chosen: Chosen, files: list[Path], images: np.ndarray,
            runtime: str = "framework") -> list[Prediction]:
    """Class and probability of each image, by the chosen version, in this process.

    With ``runtime="framework"``, imports the one framework the version was trained with (TensorFlow after
    torch in one process has segfaulted the other way round, so a process must never hold both); with
    ``"onnx"``, neither: onnxruntime runs the version's ``model.onnx``.

    Raises:
        UserError: when the version's files are damaged, or it holds no ONNX model for ``runtime="onnx"``.
    """
    if runtime == "onnx":
        probabilities = onnx_probabilities(store, chosen, images)
    else:
        framework = get_framework(chosen.framework)
        os.environ.update(framework.env)  # e.g. KERAS_BACKEND=tensorflow, before the backend imports keras
        with tempfile.TemporaryDirectory(prefix="trainflow-predict-") as tmp:
            fetch_model(store, chosen, Path(tmp))
            probabilities = np.asarray(load(framework.probabilities)(Path(tmp), images))
    indices = probabilities.argmax(axis=1)
    return [Prediction(path=str(path), label=chosen.classes[i], index=int(i), probability=float(p[i]))
            for path, i, p in zip(files, indices, probabilities)]


def onnx_probabilities(store: Store, chosen: Chosen, images: np.ndarray) -> np.ndarray:
    """(N, classes) softmax of uint8 NHWC ``images`` by the version's ``model.onnx``, in onnxruntime.

    Raises:
        UserError: when the version holds no ONNX model, or it is damaged.
    """
    import onnxruntime

    if ONNX_FILE not in {entry["name"] for entry in chosen.manifest["files"]}:
        raise UserError(f"{chosen.uri} holds no {ONNX_FILE} (published before ONNX export, or trained where "
                        "onnxruntime was missing); use --runtime framework, or choose another --version.")
    session = onnxruntime.InferenceSession(verified_file(store, chosen, ONNX_FILE),
                                           providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"pixels": np.ascontiguousarray(images)})[0]
