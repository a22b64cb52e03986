"""Keras networks as trainflow networks: ``keras:<name>`` (keras.applications) and a user's builder.

Every TensorFlow model of trainflow takes raw pixels (0..255, NHWC) and normalises them itself, so that a
published ``.keras`` file predicts from images as they are: the builders' networks, which take the normalised
batch (the contract of ``cluster.models``), are wrapped in the same front as the built-in network's.
"""

from __future__ import annotations

import re

import keras

from cluster.errors import UserError
from cluster.worker.checkpoint import ModelSpec

__all__ = ["keras_application", "user_model", "with_normalisation"]


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


def keras_application(spec: ModelSpec) -> keras.Model:
    """``keras.applications.<name>`` without its top, freshly initialised, global average pooling and a new
    classification layer, for three channels (a grayscale batch repeated)."""
    name = spec.name.partition(":")[2]
    build = getattr(keras.applications, name, None)
    if not callable(build) or not name[:1].isupper():
        raise UserError(f"model='keras:{name}' is not a keras.applications model; choose one such as "
                        "MobileNetV2, ResNet50 or EfficientNetB0 (the names are case-sensitive).")
    shape = (spec.image_size, spec.image_size, 3)
    try:
        backbone = build(include_top=False, weights=None, input_shape=shape, pooling="avg")
    except ValueError as e:
        raise UserError(f"model='keras:{name}' cannot take images of {spec.image_size} pixels ({e}); "
                        "prepare the data with a larger image_size.") from None
    return with_normalisation(spec, backbone, keras.layers.Dense(spec.num_classes, name="logits"), channels=3)


def user_model(spec: ModelSpec) -> keras.Model:
    """A user's builder (``package.module:function``) behind the normalising front."""
    from cluster.models import from_import_path

    return with_normalisation(spec, from_import_path(spec))
