"""What the sweep's caller hears from Ray Tune while it runs, and what Tune asks of it when the sweep resumes.

Tune pickles its callbacks and scheduler with the experiment's state and brings
them back when the sweep resumes, in another driver process; so :class:`Watch`
and :class:`ResumingASHA` keep nothing of their own and call whatever listener
this process set with :func:`listening`. Tune calls them on the thread that runs
the sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ray import tune
from ray.tune.schedulers import ASHAScheduler

__all__ = ["ResumingASHA", "Watch", "listening", "trial_row"]

OnResult = Callable[[str, dict, dict], None]  # (trial id, the values it drew, one epoch's report)
OnChange = Callable[[list[dict]], None]  # every trial's row, when one starts, ends or fails
Reports = Callable[[str, dict], list[dict]]  # (trial id, the values it drew) -> the reports its run has made

_listener: tuple[OnResult, OnChange, Reports] | None = None


@contextmanager
def listening(on_result: OnResult, on_change: OnChange, reports: Reports = lambda trial_id, values: []
              ) -> Iterator[None]:
    """Route the sweep's events to the first two while the block runs (one sweep at a time in a process), and
    ask ``reports`` what a trial finished before the sweep resumed had reported, epoch by epoch."""
    global _listener
    _listener = (on_result, on_change, reports)
    try:
        yield
    finally:
        _listener = None


def trial_row(trial) -> dict:
    """One trial as the caller shows it: its id, drawn values, Tune's status and how far it got."""
    last = trial.last_result or {}
    best = (trial.metric_analysis.get("val_accuracy") or {}).get("max")
    return {"trial_id": trial.trial_id, "values": dict(trial.config), "status": trial.status,
            "epochs": int(last.get("epoch", 0)), "best_val_accuracy": best, "run_id": last.get("run_id")}


class Watch(tune.Callback):
    """Hands each trial's reports, and the table of trials as it changes, to the listener set here."""

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if _listener is not None:
            _listener[0](trial.trial_id, dict(trial.config), result)

    def _changed(self, trials, trial, status: str) -> None:
        """Tune calls these before it sets the trial's own status: ``status`` is the one it is taking."""
        if _listener is not None:
            _listener[1]([{**trial_row(t), **({"status": status} if t is trial else {})} for t in trials])

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._changed(trials, trial, "RUNNING")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._changed(trials, trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._changed(trials, trial, "ERROR")


class ResumingASHA(ASHAScheduler):
    """ASHA that, when a sweep resumes, learns again what its finished trials reported at each rung.

    Tune keeps no scheduler state with the experiment: the resumed sweep gets the scheduler as it was pickled
    when the sweep started, its rungs empty, and does not run a finished trial again. Without this the trials
    after a restart would be judged against one another only, and a trial that trails the finished ones could
    run every epoch. (Unfinished trials re-report their runs' epochs as they resume: ``sweep.run_trial``.)
    """

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.status == trial.TERMINATED and _listener is not None:
            for report in _listener[2](trial.trial_id, dict(trial.config)):
                super().on_trial_result(tune_controller, trial, report)  # its decisions were made before
