"""Pruning and dynamic sparse training on dynasparse's sparse layers, optimizers and top-k ops.

    pruner = dynasparse.pruning.DPF(model, sparsity=0.9, total_steps=1000, exclude=["conv1", "fc"])
    optimizer = dynasparse.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    for x, y in batches:
        ...; optimizer.step(); pruner.step()
    pruner.finalize(); print(pruner.report())

See pruner.py for the API and where each algorithm plugs in.
"""

from .distributions import ERK, Distribution, Global, Uniform
from .dpf import DPF
from .magnitude import GradualMagnitude, OneShotMagnitude
from .pruner import LayerReport, Pruner, PruningReport
from .random_pruning import RandomPruning
from .schedules import Constant, CosineDecay, Cubic, Linear, as_schedule

__all__ = ["Constant", "CosineDecay", "Cubic", "DPF", "Distribution", "ERK", "Global", "GradualMagnitude",
           "LayerReport", "Linear", "OneShotMagnitude", "Pruner", "PruningReport", "RandomPruning", "Uniform",
           "as_schedule"]
