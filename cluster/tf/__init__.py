"""TensorFlow: the model, the per-worker loop under MultiWorkerMirroredStrategy, and its Ray Train backend."""
