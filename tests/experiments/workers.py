"""Hooks for the runner tests, importable by worker processes (a test module is not)."""

import os
import signal

import torch

from dynasparse.experiments import Hook, transforms


class _KillOnce(Hook):
    def __init__(self, marker: str, at_step: int):
        self.marker, self.at_step = marker, at_step

    def on_step(self, state):
        if state.step == self.at_step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


class _Threads(Hook):
    def on_end(self, state):
        state.metrics["worker"] = {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                                   "cores": len(os.sched_getaffinity(0)), "pid": os.getpid()}


def kill_once(marker: str, victim: str, at_step: int, spec):
    """Hooks factory (bind the first three with functools.partial): the run `victim` kills
    its own worker process at `at_step`, the first time only (`marker` records it); every run
    records its worker's thread counts and cores."""
    return [_Threads()] + ([_KillOnce(marker, at_step)] if spec.run_id == victim else [])


@transforms.register("test-negate", "tests: the parent's model with every parameter negated")
def negate(ctx):
    """Registered here so that worker processes (which import this module to unpickle a task's
    hooks) know it."""
    with torch.no_grad():
        for parameter in ctx.parent.parameters():
            parameter.neg_()
    return ctx.parent


def no_hooks(spec):
    """A hooks factory that adds none: it makes the workers import this module."""
    return []


def fail_run(victim: str, spec):
    """Hooks factory (bind `victim` with functools.partial): run `victim` raises at its first step."""
    return [_Fail()] if spec.run_id == victim else []


class _Fail(Hook):
    def on_step(self, state):
        raise RuntimeError("the test's planned failure")
