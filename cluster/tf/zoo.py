"""Keras networks as trainflow networks: ``keras:<name>`` (keras.applications) and a user's builder.

Every TensorFlow model of trainflow takes raw pixels (0..255, NHWC) and normalises them itself, so that a
published ``.keras`` file predicts from images as they are: the builders' networks, which take the normalised
batch (the contract of ``cluster.models``), are wrapped in the same front as the built-in network's.
"""

from __future__ import annotations

import keras

from cluster.errors import UserError
from cluster.tf.model import with_normalisation
from cluster.worker.checkpoint import ModelSpec

__all__ = ["keras_application", "user_model"]

BATCH_NORM_MOMENTUM = 0.9  # the moving statistics follow the last ~10 batches, as torch's BatchNorm (0.1)


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
    # Keras's 0.99 leaves the moving statistics near their start for hundreds of steps, and a small dataset's
    # model then predicts one class at test time (docs/performance.md, MobileNetV2 on digits)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BATCH_NORM_MOMENTUM
    return with_normalisation(spec, backbone, keras.layers.Dense(spec.num_classes, name="logits"), channels=3)


def user_model(spec: ModelSpec) -> keras.Model:
    """A user's builder (``package.module:function``) behind the normalising front."""
    from cluster.models import from_import_path

    return with_normalisation(spec, from_import_path(spec))
