"""A run's progress as events, for whoever shows them (the CLI's console).

The flow and its tasks run in the process that called the flow, so a listener
registered there hears every event; with nobody listening, emitting costs a
list lookup. Events never carry secrets: names, counts, seconds and metrics.

Kinds and their fields:

- ``stage_started``: name
- ``stage_finished``: name, seconds, skipped, note
- ``training_started``: epochs, workers, batch_size
- ``epoch_progress``: epoch, epochs, done, total, seconds (images of this epoch done so far, over all ranks)
- ``epoch_finished``: epochs, metrics (an epoch's report, as ``cluster.worker.context.epoch_metrics`` makes it)
- ``note``: text (something a person should read: a resume, a reused run, a worker message)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[str, dict], None]

_listeners: list[Listener] = []


def emit(kind: str, **fields) -> None:
    for listener in tuple(_listeners):
        listener(kind, fields)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """``listener(kind, fields)`` hears every event emitted in this process while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
