"""What ``trainflow run`` shows while it runs: bars on a terminal, one line per stage and epoch elsewhere.

The run's events (``tasks.events``) drive it. Prefect's and Ray's own log
lines stay out of the way unless asked for (``-v``): only warnings and errors
reach the console, as one line each; every record still goes to the Prefect
API, so the UI keeps the whole log.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from tasks.events import listening
from tasks.train import format_epoch


def stage_line(name: str, seconds: float, skipped: bool, note: str) -> str:
    """A finished stage as the plain console and the run's summary print it."""
    return f"{name:<11}{seconds:8.1f} s" + (f"   skipped ({note})" if skipped else "")


class PlainConsole:
    """Lines for a log file or a pipe: one per finished stage, one per epoch, one per note."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, kind: str, fields: dict) -> None:
        line = None
        if kind == "stage_finished":
            line = stage_line(**fields)
        elif kind == "training_started":
            line = (f"training {fields['epochs']} epoch(s) on {fields['workers']} Ray worker(s), "
                    f"global batch {fields['batch_size']}")
        elif kind == "epoch_finished":
            line = format_epoch(fields["metrics"], fields["epochs"])
        elif kind == "note":
            line = fields["text"]
        if line is not None:
            self.say(line)

    def say(self, line: str) -> None:
        # not print(): inside a flow run with log_prints, Prefect turns print() into a log record
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class BarConsole:
    """Rich progress bars: one per stage, and while training one per epoch (images, images/s, ETA, val accuracy)."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        self.progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.description:<14}"),
                                 BarColumn(bar_width=30), TextColumn("{task.fields[detail]}"),
                                 console=Console(file=stream), redirect_stdout=False, redirect_stderr=False)
        self.stages: dict[str, object] = {}
        self.epochs: dict[int, object] = {}
        self.last_val: str = ""
        self.progress.start()

    def __call__(self, kind: str, fields: dict) -> None:
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(**fields)

    def _on_stage_started(self, name: str) -> None:
        self.stages[name] = self.progress.add_task(name, total=None, detail="")

    def _on_stage_finished(self, name: str, seconds: float, skipped: bool, note: str) -> None:
        detail = f"{seconds:.1f} s" + (f"  skipped ({note})" if skipped else "")
        self.progress.update(self.stages[name], total=1, completed=1, detail=detail)

    def _on_training_started(self, epochs: int, workers: int, batch_size: int) -> None:
        self.progress.update(self.stages["train"], detail=f"{epochs} epoch(s) on {workers} Ray worker(s), "
                                                          f"global batch {batch_size}")

    def _epoch_bar(self, epoch: int, epochs: int, total: int | None):
        if epoch not in self.epochs:
            self.epochs[epoch] = self.progress.add_task(f"  epoch {epoch}/{epochs}", total=total, detail="")
        return self.epochs[epoch]

    def _on_epoch_progress(self, epoch: int, epochs: int, done: int, total: int, seconds: float) -> None:
        rate = done / seconds if seconds > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        self.progress.update(self._epoch_bar(epoch, epochs, total), total=total, completed=done,
                             detail=f"{done}/{total} img  {rate:.0f} img/s  ETA {eta:.0f} s{self.last_val}")

    def _on_epoch_finished(self, epochs: int, metrics: dict) -> None:
        if metrics["val_accuracy"] is not None:
            self.last_val = f"  val_acc {metrics['val_accuracy']:.4f}"
        bar = self._epoch_bar(metrics["epoch"], epochs, None)
        total = self.progress.tasks[self._index(bar)].total or 1
        self.progress.update(bar, total=total, completed=total,
                             detail=f"{metrics['epoch_seconds']:.1f} s  {metrics['train_images_per_s']:.0f} img/s  "
                                    f"loss {metrics['train_loss']:.4f}{self.last_val}")

    def _index(self, task_id) -> int:
        return next(i for i, task in enumerate(self.progress.tasks) if task.id == task_id)

    def _on_note(self, text: str) -> None:
        self.say(text)

    def say(self, line: str) -> None:
        self.progress.console.print(line, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()


class _ToConsole(logging.Handler):
    """Warnings and errors of Prefect's and our loggers as one plain line on the console."""

    def __init__(self, console: PlainConsole | BarConsole) -> None:
        super().__init__(level=logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(record.getMessage().split())
        self.console.say(f"{record.levelname.lower()}: {text}")


@contextmanager
def run_console(*, bars: bool, stream: TextIO = sys.stderr) -> Iterator[PlainConsole | BarConsole]:
    """Show the run's events on ``stream`` (bars or lines) and only warnings and errors of its logs."""
    from prefect.logging.handlers import PrefectConsoleHandler

    console = BarConsole(stream) if bars else PlainConsole(stream)
    root = logging.getLogger()
    # Prefect logs to the console through a handler on the root logger; everything also goes to its API.
    replaced = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    for handler in replaced:
        root.removeHandler(handler)
    ours = _ToConsole(console)
    root.addHandler(ours)
    try:
        with listening(console):
            yield console
    finally:
        console.close()
        root.removeHandler(ours)
        for handler in replaced:  # back, for warnings only: "Stopping temporary server" at exit is no news
            handler.setLevel(max(handler.level, logging.WARNING))
            root.addHandler(handler)
