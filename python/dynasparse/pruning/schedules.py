"""Schedules: step -> value (a target sparsity, or RigL's drop fraction), pure functions of the step.

A pruner accepts any callable `step -> float` as its schedule; a number means `Constant`.
`step` counts optimizer steps done (0 before the first one). A pruner evaluates its schedule
through `sparsity_at`, so a schedule returning anything but a number in [0, 1) is an error
naming the schedule and the step, not a silently wrong mask.

`check_int` and `check_real` are the argument checks of the schedules and the pruners.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import torch

Schedule = Callable[[int], float]

_OWNER = "dynasparse.pruning"


def check_int(owner: str, name: str, value, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}: {name} must be {bound}, got {value}")


def check_real(owner: str, name: str, value, interval: str) -> None:
    """`value` a real number in `interval`, written as "[0, 1)", "(0, 1]" or "[0, 1]" (NaN is in none)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number in {interval}, got {type(value).__name__} {value!r}")
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = low <= value if interval[0] == "[" else low < value
    below = value <= high if interval[-1] == "]" else value < high
    if not (above and below):
        raise ValueError(f"{owner}: {name} must be a number in {interval}, got {value!r}")


def _check_window(start: int, end: int) -> None:
    check_int(_OWNER, "start", start, 0)
    check_int(_OWNER, "end", end, 1)
    if not start < end:
        raise ValueError(f"{_OWNER}: a schedule needs 0 <= start < end, got start={start}, end={end}")


@dataclasses.dataclass(frozen=True)
class Constant:
    """The same value at every step."""

    value: float

    def __post_init__(self):
        check_real(_OWNER, "value", self.value, "[0, 1)")

    def __call__(self, step: int) -> float:
        return self.value


@dataclasses.dataclass(frozen=True)
class _Ramp:
    final: float
    end: int
    initial: float = 0.0
    start: int = 0

    def __post_init__(self):
        check_real(_OWNER, "final", self.final, "[0, 1)")
        check_real(_OWNER, "initial", self.initial, "[0, 1)")
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
        check_real(_OWNER, "alpha", self.alpha, "[0, 1]")

    def __call__(self, step: int) -> float:
        if step > self.end:
            return 0.0
        return self.alpha / 2.0 * (1.0 + math.cos(math.pi * step / self.end))


def as_schedule(schedule: Schedule | float) -> Schedule:
    """A number becomes `Constant(number)`; a callable is used as it is."""
    if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
        return Constant(float(schedule))
    if not callable(schedule):
        raise TypeError(f"dynasparse.pruning: a schedule is a number or a callable step -> float, got "
                        f"{type(schedule).__name__}")
    return schedule


def sparsity_at(schedule: Schedule, step: int) -> float:
    """The schedule's target sparsity at `step`, checked: a number in [0, 1)."""
    value = schedule(step)
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (number or isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point):
        raise TypeError(f"{_OWNER}: the schedule {schedule!r} returned {value!r} at step {step}, not a number")
    target = float(value)
    if not 0.0 <= target < 1.0:
        raise ValueError(f"{_OWNER}: the schedule {schedule!r} returned {value!r} at step {step}; a target sparsity "
                         "must be in [0, 1)")
    return target
