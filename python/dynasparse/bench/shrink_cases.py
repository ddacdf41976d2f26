"""Benchmark cases of physical shrinking (dynasparse.nn.shrink) against sparse kernels, registered on import.

Inference (no_grad, eval mode) of the MNIST-1D models (inputs [1, 40], 10 classes): the MLP
40-512-512-10 and the 1-D CNN (32, 32, 32 filters), with half of the units of every hidden layer
removed (the lowest L2 norms, dynasparse.pruning.neurons.select).

- "<model>-neurons-...": the baseline is the dense model with the removed units zeroed (their
  rows and biases: with ReLU that removes their contribution); variants: "shrunk", the smaller
  dense model; "sparse-row", the shrunk layers sparse (unstructured layout) with the removed
  units' rows masked (row granularity, 50% of each layer's weights); "sparse-neurons", sparse
  layers whose masks keep exactly the weights the shrunk model has (rows and the consumers'
  columns). All compute the baseline's function (checked).
- "<model>-unstructured-...": the baseline is the dense model; the variant "sparse-unstructured"
  prunes 50% of the weights of the same hidden layers by magnitude (another function: only
  shapes are checked). Its ratio next to "shrunk"'s is the choice between the two at 50%.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynasparse.experiments import models
from dynasparse.nn import sparsify
from dynasparse.nn.shrink import Traced, plan, shrink
from dynasparse.pruning import neurons

from .harness import Case, register
from .nn_cases import _same_shape

MODELS = {"mlp": {"hidden": [512, 512]}, "cnn1d": {}}
SIZES = ((256, False), (32, True))  # (batch, quick)
FRACTION = 0.5
INPUT_SHAPE = (1, 40)


def _model(name: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return models.build(name, input_shape=INPUT_SHAPE, classes=10, **MODELS[name]).to(device).eval()


def _forward(model: nn.Module, x: torch.Tensor):
    @torch.no_grad()
    def run():
        return model(x)
    return run


def neurons_workload(device: torch.device, model: str, batch: int, fraction: float):
    dense = _model(model, device)
    x = torch.randn(batch, *INPUT_SHAPE, device=device)
    keep = neurons.select(dense, fraction, "l2", example_input=x)
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for name, kept in keep.items():
            layer = masked.get_submodule(name)
            removed = torch.ones(layer.weight.shape[0], dtype=torch.bool, device=device)
            removed[kept.to(device)] = False
            layer.weight[removed] = 0
            layer.bias[removed] = 0
    shrunk = shrink(masked, keep, example_input=x)
    layers = plan(Traced(masked, x), keep)
    variants = {"shrunk": _forward(shrunk, x)}
    for variant, narrowed in (("sparse-row", {}), ("sparse-neurons", layers.inputs)):
        sparse = copy.deepcopy(masked)
        names = sorted(set(layers.outputs) | set(narrowed))
        sparsify(sparse, 0.0, include=names, strict=True, backend="sparse")
        for name in names:
            layer = sparse.get_submodule(name)
            mask = torch.zeros_like(layer.mask)
            rows = layers.outputs.get(name, torch.arange(mask.shape[0])).to(device)
            columns = (narrowed[name].keep if name in narrowed else torch.arange(mask.shape[1])).to(device)
            mask[rows[:, None], columns] = True
            layer.set_mask(mask)
        variants[variant] = _forward(sparse, x)
    return _forward(masked, x), variants


def unstructured_workload(device: torch.device, model: str, batch: int, fraction: float):
    dense = _model(model, device)
    x = torch.randn(batch, *INPUT_SHAPE, device=device)
    sparse = copy.deepcopy(dense)
    sparsify(sparse, fraction, include=neurons.prunable_layers(dense, example_input=x), strict=True,
             backend="sparse")
    return _forward(dense, x), {"sparse-unstructured": _forward(sparse, x)}


def _close(output, expected):
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)


def _register() -> None:
    for model in MODELS:
        for batch, quick in SIZES:
            params = {"model": model, "batch": batch, "fraction": FRACTION}
            register(Case("shrink", f"{model}-neurons-b{batch}-f{FRACTION}", params, neurons_workload, quick=quick,
                          check=_close))
            register(Case("shrink", f"{model}-unstructured-b{batch}-s{FRACTION}", params, unstructured_workload,
                          quick=quick, check=_same_shape))


_register()
