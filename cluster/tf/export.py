"""A checkpoint's Keras model as ONNX (tf2onnx): raw pixels in (uint8 NHWC), class probabilities out.

The saved model already starts from raw pixels (its Rescaling and Normalization layers); the graph adds the
cast from uint8 and the softmax, so any ONNX runtime predicts as ``cluster.tf.model.probabilities`` does.
"""

from __future__ import annotations

from pathlib import Path

import keras
import onnx
import tensorflow as tf
import tf2onnx
from onnx import numpy_helper

from cluster.tf.model import MODEL_FILE
from cluster.worker.checkpoint import read_state

__all__ = ["export_onnx"]

OPSET = 18


def export_onnx(checkpoint_dir: Path, path: Path) -> None:
    """Write the checkpoint's model to ``path`` as ONNX: input ``pixels`` (N, size, size, channels) uint8, output
    ``probabilities`` (N, classes) float32, any N."""
    spec, _, _ = read_state(checkpoint_dir)
    model = keras.models.load_model(checkpoint_dir / MODEL_FILE, safe_mode=True, compile=False)
    signature = [tf.TensorSpec([None, spec.image_size, spec.image_size, spec.in_channels], tf.uint8, name="pixels")]

    @tf.function(input_signature=signature)
    def serve(pixels):
        return {"probabilities": tf.nn.softmax(model(tf.cast(pixels, tf.float32), training=False), axis=-1)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=OPSET)
    # Constants the function captures rather than holds (the Normalization layer's mean and variance) come out
    # of tf2onnx as graph inputs: put their values in the graph instead.
    concrete = serve.get_concrete_function()
    captured = {inner.name: outer.numpy() for outer, inner in
                zip(concrete.captured_inputs, concrete.graph.internal_captures) if outer.dtype != tf.resource}
    graph = proto.graph
    kept = [value for value in graph.input if value.name not in captured]
    graph.initializer.extend(numpy_helper.from_array(captured[value.name], value.name)
                             for value in graph.input if value.name in captured)
    del graph.input[:]
    graph.input.extend(kept)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
