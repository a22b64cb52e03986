"""PyTorch: the model and its steps, the per-worker loop, its Ray Train backend, and shared-memory speed-ups."""
