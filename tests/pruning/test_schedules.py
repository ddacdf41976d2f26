"""Schedule formulas against direct float64 evaluations of the papers' definitions."""

import math
import random

import pytest
import torch

from dynasparse.pruning import Constant, CosineDecay, Cubic, Linear, as_schedule
from dynasparse.pruning.schedules import sparsity_at


def _cubic_oracle(t, s_i, s_f, t0, t1):
    if t < t0:
        return s_i
    if t > t1:
        return s_f
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3


@pytest.mark.parametrize("trial", range(5))
def test_cubic_matches_zhu_gupta(trial):
    rng = random.Random(trial)
    s_i, s_f = rng.uniform(0, 0.5), rng.uniform(0.5, 0.99)
    t0 = rng.randint(0, 50)
    t1 = t0 + rng.randint(1, 300)
    schedule = Cubic(s_f, end=t1, initial=s_i, start=t0)
    for t in list(range(0, t1 + 20, 3)) + [t0, t1, t0 - 1, t1 + 1]:
        assert schedule(t) == pytest.approx(_cubic_oracle(t, s_i, s_f, t0, t1), abs=1e-12)
    assert schedule(t0) == pytest.approx(s_i) and schedule(t1) == pytest.approx(s_f)
    values = [schedule(t) for t in range(t0, t1 + 1)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone towards s_f


def test_linear_and_constant():
    schedule = Linear(0.8, end=110, initial=0.2, start=10)
    assert schedule(0) == 0.2 and schedule(10) == 0.2 and schedule(200) == 0.8
    assert schedule(60) == pytest.approx(0.5) and schedule(35) == pytest.approx(0.35)
    assert Constant(0.3)(0) == Constant(0.3)(10**6) == 0.3


def test_cosine_drop_fraction():
    schedule = CosineDecay(end=1000, alpha=0.3)
    for t in (0, 1, 250, 500, 999, 1000):
        assert schedule(t) == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * t / 1000)), abs=1e-12)
    assert schedule(0) == pytest.approx(0.3) and schedule(1000) == pytest.approx(0.0, abs=1e-12)
    assert schedule(1001) == 0.0


def test_as_schedule_and_bad_arguments():
    assert as_schedule(0.5) == Constant(0.5)
    custom = lambda step: 0.1  # noqa: E731
    assert as_schedule(custom) is custom
    with pytest.raises(TypeError, match="callable"):
        as_schedule("cubic")
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        Cubic(1.0, end=10)
    with pytest.raises(ValueError, match="start < end"):
        Cubic(0.9, end=5, start=5)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        Constant(-0.1)


@pytest.mark.parametrize("value,error", [(1.5, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                         (-1e-9, ValueError), (float("inf"), ValueError), (None, TypeError),
                                         ("0.5", TypeError), (True, TypeError), (torch.tensor([0.1, 0.2]), TypeError)])
def test_a_schedule_value_outside_0_1_is_an_error_naming_schedule_and_step(value, error):
    schedule = Linear(0.5, end=10)
    bad = lambda step: schedule(step) if step != 7 else value  # noqa: E731
    assert [sparsity_at(bad, step) for step in range(7)] == [schedule(step) for step in range(7)]
    with pytest.raises(error, match=r"the schedule <function .*<lambda> at 0x[0-9a-f]+> returned .* at step 7"):
        sparsity_at(bad, 7)


def test_a_schedule_may_return_any_real_number_type():
    assert sparsity_at(lambda step: torch.tensor(0.25), 3) == 0.25
    assert sparsity_at(lambda step: 0, 3) == 0.0
    assert isinstance(sparsity_at(Cubic(0.9, end=10), 5), float)


@pytest.mark.parametrize("build,error,message", [
    (lambda: Cubic(0.9, end="10"), TypeError, "end must be an int"),
    (lambda: Cubic(0.9, end=10.5), TypeError, "end must be an int"),
    (lambda: Linear(0.9, end=10, start=-1), ValueError, "start must be >= 0"),
    (lambda: Linear(0.9, end=10, start=True), TypeError, "start must be an int"),
    (lambda: Cubic(float("nan"), end=10), ValueError, r"final must be a number in \[0, 1\)"),
    (lambda: Cubic(0.9, end=10, initial="0"), TypeError, "initial must be a number"),
    (lambda: CosineDecay(end=0), ValueError, "end must be >= 1"),
    (lambda: CosineDecay(end=10, alpha=float("nan")), ValueError, r"alpha must be a number in \[0, 1\]"),
    (lambda: Constant(None), TypeError, "value must be a number"),
    (lambda: as_schedule(True), TypeError, "callable"),
])
def test_schedule_arguments_are_checked(build, error, message):
    with pytest.raises(error, match=message):
        build()
