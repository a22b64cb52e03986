"""Learning-rate schedules: pure functions of the step, so a resumed run continues exactly where it stopped.

Each returns the factor on an optimizer group's base learning rate after ``step`` of ``total`` steps
(``step`` counts from 0, the first step's rate).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["constant", "linear_decay", "warmup_cosine", "warmup_linear_decay"]


def constant(step: int, total: int) -> float:
    """The base rate throughout (the article's)."""
    return 1.0


def linear_decay(step: int, total: int) -> float:
    """From the base rate at the first step linearly down to 0 after the last."""
    return (total - step) / total


def warmup_linear_decay(start: float, peak_at: float, end: float = 0.0) -> Callable[[int, int], float]:
    """From ``start`` up to 1 over the first ``peak_at`` of the steps, then linearly down to ``end`` at the last.

    Raises:
        ValueError: for a start or end outside [0, 1] or a peak outside (0, 1).
    """
    if not 0 <= start <= 1 or not 0 <= end <= 1 or not 0 < peak_at < 1:
        raise ValueError(f"warmup_linear_decay(start={start}, peak_at={peak_at}, end={end}): need start and end in "
                         "[0, 1] and 0 < peak_at < 1")

    def schedule(step: int, total: int) -> float:
        peak = peak_at * total
        if step < peak:
            return start + (1 - start) * step / peak
        return end + (1 - end) * max(0.0, (total - step) / (total - peak))

    return schedule


def warmup_cosine(start: float, warmup: float) -> Callable[[int, int], float]:
    """From ``start`` up to 1 over the first ``warmup`` of the steps, then down to 0 along a half cosine.

    Raises:
        ValueError: for a start outside [0, 1] or a warm-up outside [0, 1).
    """
    if not 0 <= start <= 1 or not 0 <= warmup < 1:
        raise ValueError(f"warmup_cosine(start={start}, warmup={warmup}): need start in [0, 1] and 0 <= warmup < 1")

    def schedule(step: int, total: int) -> float:
        peak = warmup * total
        if step < peak:
            return start + (1 - start) * step / peak
        return 0.5 * (1 + math.cos(math.pi * (step - peak) / (total - peak)))

    return schedule
