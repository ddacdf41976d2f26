"""Schedules: step -> value (a target sparsity, or RigL's drop fraction), pure functions of the step.

A pruner accepts any callable `step -> float` as its schedule; a number means `Constant`.
`step` counts optimizer steps done (0 before the first one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

Schedule = Callable[[int], float]


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dynasparse.pruning: {name} must be in [0, 1), got {value!r}")


def _check_window(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"dynasparse.pruning: a schedule needs 0 <= start < end, got start={start}, end={end}")


@dataclasses.dataclass(frozen=True)
class Constant:
    """The same value at every step."""

    value: float

    def __post_init__(self):
        _check_fraction("value", self.value)

    def __call__(self, step: int) -> float:
        return self.value


@dataclasses.dataclass(frozen=True)
class _Ramp:
    final: float
    end: int
    initial: float = 0.0
    start: int = 0

    def __post_init__(self):
        _check_fraction("final", self.final)
        _check_fraction("initial", self.initial)
        _check_window(self.start, self.end)

    def _progress(self, step: int) -> float:
        return min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)


class Cubic(_Ramp):
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3 for t0 <= t <= t1,
    s_i before t0, s_f after t1. Prunes fast early, when there are many redundant weights."""

    def __call__(self, step: int) -> float:
        return self.final + (self.initial - self.final) * (1.0 - self._progress(step)) ** 3


class Linear(_Ramp):
    """s_i before `start`, s_f after `end`, a straight line between."""

    def __call__(self, step: int) -> float:
        return self.initial + (self.final - self.initial) * self._progress(step)


@dataclasses.dataclass(frozen=True)
class CosineDecay:
    """RigL's drop fraction: f(t) = alpha / 2 * (1 + cos(pi * t / end)) until `end`, 0 after
    (no more drop-and-grow)."""

    end: int
    alpha: float = 0.3

    def __post_init__(self):
        _check_window(0, self.end)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"dynasparse.pruning: alpha must be in [0, 1], got {self.alpha!r}")

    def __call__(self, step: int) -> float:
        if step > self.end:
            return 0.0
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / self.end))


def as_schedule(schedule: Schedule | float) -> Schedule:
    """A number becomes `Constant(number)`; a callable is used as it is."""
    if isinstance(schedule, (int, float)):
        return Constant(float(schedule))
    if not callable(schedule):
        raise TypeError(f"dynasparse.pruning: a schedule is a number or a callable step -> float, got "
                        f"{type(schedule).__name__}")
    return schedule
