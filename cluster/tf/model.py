"""TensorFlow pieces: the model, checkpoint files, predict.

Imported only by TensorFlow's training workers and evaluation's Ray task
(``cluster.frameworks`` names it), never by the flow: the Prefect process
imports no framework.

The model takes raw pixel values (float32 0..255, NHWC) and normalises them
itself (``Rescaling`` then ``Normalization`` with the training set's mean and
std), so a published ``.keras`` file predicts from images as they are, and
loads in a fresh process with ``safe_mode=True``: it holds standard layers only.
"""

from __future__ import annotations

from collections.abc import Callable
import re
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cluster.errors import UserError
from cluster.precision import Precision
from cluster.worker.checkpoint import ModelSpec, STATE_FILE, read_state, write_state

__all__ = ["MODEL_FILE", "OPTIM_FILE", "STATE_FILE", "TensorFlowParts", "build_model", "load_checkpoint",
           "load_starting_weights", "predict", "read_state", "save_checkpoint", "with_normalisation"]

MODEL_FILE = "model.keras"
OPTIM_FILE = "optimizer.npz"


@dataclass(frozen=True, kw_only=True)
class TensorFlowParts:
    """A recipe's TensorFlow side (``cluster.recipes``); the loop's loss is mean cross-entropy, its rate constant."""

    optimizer: Callable[[], keras.optimizers.Optimizer]  # called inside the strategy's scope


def with_normalisation(spec: ModelSpec, *stages, channels: int | None = None) -> keras.Model:
    """``stages`` (layers or models, applied in turn) behind Rescaling + Normalization (the training set's mean and
    std), taking raw pixels; a one-channel batch is repeated to ``channels`` where the network takes more. Each
    stage is one layer of the result, so starting weights move stage by stage (``cluster.tf.model``)."""
    layers = keras.layers
    inputs = keras.Input(shape=(spec.image_size, spec.image_size, spec.in_channels), name="pixels")
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    x = layers.Normalization(axis=-1, mean=list(spec.mean), variance=[s * s for s in spec.std])(x)
    if channels and channels != spec.in_channels:
        x = layers.Concatenate(axis=-1)([x] * channels)
    for stage in stages:
        x = stage(x)
    return keras.Model(inputs, x, name=re.sub(r"[^A-Za-z0-9_]+", "_", spec.name))


def build_model(spec: ModelSpec) -> keras.Model:
    """The source article's network, as ``cluster.pytorch.model.SeedCNN``: conv64-conv128-conv256 (each + 2x2
    max-pool), then fc1024-fc512-fc(classes), returning logits. Any image size >= 8, channel and class count."""
    layers = keras.layers
    convs = [layer for filters in (64, 128, 256)
             for layer in (layers.Conv2D(filters, 3, padding="same", activation="relu"), layers.MaxPooling2D(2))]
    return with_normalisation(spec, *convs, layers.Flatten(), layers.Dense(1024, activation="relu"),
                              layers.Dense(512, activation="relu"), layers.Dense(spec.num_classes, name="logits"))


def load_starting_weights(model: keras.Model, path: Path) -> list[str]:
    """Copy the trained layers of a ``.keras`` file (loaded with ``safe_mode=True``) into ``model``, layer by
    layer name; the normalising front keeps this dataset's statistics, and the classification layer stays freshly
    initialised where its shape differs (another class count). Returns the layers left fresh.

    Raises:
        UserError: when the file is no Keras model of this network.
    """
    try:
        source = keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as e:  # Keras's errors for a file that is not a safe .keras model
        raise UserError(f"weights {path.name} cannot be loaded as a Keras model with safe_mode ({e}); save them "
                        "with model.save('….keras').") from None
    theirs = {layer.name: layer for layer in source.layers if layer.trainable_weights}
    fresh = []
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        other = theirs.get(layer.name)
        shapes = [tuple(w.shape) for w in layer.weights]
        if other is not None and [tuple(w.shape) for w in other.weights] == shapes:
            layer.set_weights(other.get_weights())
        elif layer is model.layers[-1]:  # the classification layer, for another class count
            fresh.append(layer.name)
        else:
            raise UserError(f"weights {path.name} do not fit the network: its layer {layer.name!r} is "
                            f"{'missing' if other is None else 'of other shapes'} there; start from weights of the "
                            "same network.")
    return fresh


def save_checkpoint(directory: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer, spec: ModelSpec,
                    epoch: int, history: list[dict], workers: list[dict] | None = None,
                    precision: Precision | None = None) -> None:
    """The whole model as ``model.keras``, the optimizer's variables (momentum, step) as arrays, and the state."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / MODEL_FILE)
    np.savez(directory / OPTIM_FILE, *[np.asarray(v.numpy()) for v in optimizer.variables])
    write_state(directory, framework="tensorflow",
                versions={"tensorflow": tf.__version__, "keras": keras.__version__}, model_files=[MODEL_FILE],
                spec=spec, epoch=epoch, history=history, workers=workers, precision=precision)


def load_checkpoint(directory: Path, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """Restore weights and optimizer state into a model and optimizer built (in the strategy's scope) from the spec."""
    saved = keras.models.load_model(directory / MODEL_FILE, safe_mode=True, compile=False)
    model.set_weights(saved.get_weights())
    optimizer.build(model.trainable_variables)
    with np.load(directory / OPTIM_FILE) as arrays:
        values = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    if len(values) != len(optimizer.variables):
        raise ValueError(f"checkpoint {directory} holds {len(values)} optimizer variables, "
                         f"the optimizer has {len(optimizer.variables)}")
    for variable, value in zip(optimizer.variables, values):
        variable.assign(value)


def _logits(checkpoint_dir: Path, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The checkpoint's model's outputs (N x classes) for uint8 NHWC ``images``."""
    model = keras.models.load_model(checkpoint_dir / MODEL_FILE, safe_mode=True, compile=False)
    if len(images) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.concatenate([np.asarray(model(images[i:i + batch_size].astype(np.float32), training=False))
                           for i in range(0, len(images), batch_size)])


def predict(checkpoint_dir: Path, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class indices predicted for uint8 NHWC ``images`` by the checkpoint's model."""
    return np.argmax(_logits(checkpoint_dir, images, batch_size), axis=1).astype(np.int64)


def probabilities(checkpoint_dir: Path, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (softmax, N x classes) of uint8 NHWC ``images`` by the checkpoint's model."""
    return tf.nn.softmax(_logits(checkpoint_dir, images, batch_size), axis=1).numpy()
