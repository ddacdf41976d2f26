"""Pruning and dynamic sparse training on dynasparse's sparse layers, optimizers and top-k ops.

    pruner = dynasparse.pruning.create("dpf", model, sparsity=0.9, total_steps=1000, exclude=["conv1", "fc"])
    optimizer = dynasparse.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)                       # registers the masks, initializes them
    for x, y in batches:
        ...; optimizer.step(); pruner.step()
    pruner.finalize(); print(pruner.report())

`available()` lists the algorithms, `describe(name)` their options. See pruner.py for the API
and its hooks, registry.py for adding an algorithm.
"""

from .distributions import ERK, Distribution, Global, Uniform
from .pruner import LayerReport, Pruner, PruningReport
from .registry import available, create, describe, register
from .schedules import Constant, CosineDecay, Cubic, Linear, as_schedule
from .selection import LayerUnits

# Each algorithm registers itself on import, in the order available() lists them.
from .dpf import DPF  # noqa: E402  isort: skip
from .magnitude import GradualMagnitude, OneShotMagnitude  # noqa: E402  isort: skip
from .random_pruning import RandomPruning  # noqa: E402  isort: skip
from .rigl import RigL  # noqa: E402  isort: skip
from .set_training import SET  # noqa: E402  isort: skip
from .snip import SNIP  # noqa: E402  isort: skip
from .dnw import DNW  # noqa: E402  isort: skip
from .imp import IMP  # noqa: E402  isort: skip
from .early_frozen import FrozenDNW, FrozenRigL  # noqa: E402  isort: skip
from .structured_dpf import StructuredDPF  # noqa: E402  isort: skip
from .variational_dropout import VariationalDropout  # noqa: E402  isort: skip
from .obd import OBD, OBDSD  # noqa: E402  isort: skip
from . import neurons  # noqa: E402  isort: skip  (neuron scores, selection and merging)

__all__ = ["Constant", "CosineDecay", "Cubic", "DNW", "DPF", "Distribution", "ERK", "FrozenDNW", "FrozenRigL",
           "Global", "GradualMagnitude", "IMP", "LayerReport", "LayerUnits", "Linear", "OBD", "OBDSD",
           "OneShotMagnitude", "Pruner", "PruningReport", "RandomPruning", "RigL", "SET", "SNIP", "StructuredDPF",
           "Uniform", "VariationalDropout", "as_schedule", "available", "create", "describe", "neurons", "register"]
