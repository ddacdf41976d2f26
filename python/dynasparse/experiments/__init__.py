"""Experiments: data sets, models, run specs, the trainer, the population runner and its
store, analyses and reports, and the registry of reproducible experiments (`dynasparse
reproduce`). The layer above `dynasparse.pruning`, below the CLI.

    spec = experiments.RunSpec(data="mnist1d", model="cnn1d", method="dpf", sparsity=0.9, steps=2000)
    result = experiments.train(spec)                 # one run: model, pruner, metrics
    population = experiments.run_population([spec.replace(seed=s) for s in range(5)], "runs/dpf")
    store = experiments.Store("runs/dpf")            # the run index and the trained models
"""

from . import analysis, data, models, reports, transforms
from .registry import Experiment, register, reproduce
from .runner import (InlineExecutor, Outcome, PopulationResult, ProcessExecutor, RayExecutor, Task, execute,
                     run_population)
from .spec import RunSpec
from .store import RunRecord, Store
from .trainer import Hook, TrainResult, TrainState, evaluate, train

__all__ = ["Experiment", "Hook", "InlineExecutor", "Outcome", "PopulationResult", "ProcessExecutor", "RayExecutor",
           "RunRecord", "RunSpec", "Store", "Task", "TrainResult", "TrainState", "analysis", "data", "evaluate",
           "execute", "models", "register", "reports", "reproduce", "run_population", "train", "transforms"]
