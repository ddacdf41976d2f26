"""Benchmark cases of the sparse modules, registered on import.

The baseline is the dense torch module doing the same work: `nn.Linear` / `nn.Conv2d`
forward (inference, under no_grad), or one training step (zero_grad with torch's default
set_to_none=True, forward, backward, SGD step with momentum, torch.optim foreach) of the
layer as a hidden layer: its input requires grad, so the backward computes the input
gradient as well as the weight gradient. The variants are sparsified copies of the same module, with
dynasparse.optim.SGD driven by the layers' masks, in feedback mode (DPF: dense weight gradient)
or masked mode (sparse weight gradient, pruned weights and state kept at zero): "dynasparse"
pinned to the kernels (backend="sparse"), "dynasparse-auto" as layers are built by default
(backend="auto": the faster of the kernels and dense on w * m for each call shape, measured
on its first call, which the harness's warm-up includes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynasparse import optim as sparse_optim
from dynasparse.nn import SparseConv2d, SparseLinear, sparse_masks

from .harness import Case, register

LINEAR_SIZES = ((4096, 128, False), (1024, 32, True))  # (features, batch, quick)
CONV_SIZES = ((256, 32, 8, False), (64, 16, 2, True))  # (channels, spatial, batch, quick)
SPARSITY = 0.9


VARIANTS = {"dynasparse": "sparse", "dynasparse-auto": "auto"}  # variant -> the layers' backend


def _pair(dense: nn.Module, sparse_cls, sparsity: float, grad_mode: str):
    """The dense model and, per variant, its sparse copy."""
    sparse = {variant: nn.Sequential(sparse_cls.from_dense(copy.deepcopy(dense), sparsity=sparsity,
                                                           grad_mode=grad_mode, backend=backend))
              for variant, backend in VARIANTS.items()}
    return nn.Sequential(dense), sparse


def _inference(dense, sparse, x):
    def run(model):
        @torch.no_grad()
        def forward():
            return model(x)
        return forward

    return run(dense), {variant: run(model) for variant, model in sparse.items()}


def _training(dense, sparse, x):
    dense_optimizer = torch.optim.SGD(dense.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    x = x.detach().requires_grad_()

    def step(model, optimizer):
        def run():
            optimizer.zero_grad()
            x.grad = None
            model(x).square().mean().backward()
            optimizer.step()
        return run

    return step(dense, dense_optimizer), {
        variant: step(model, sparse_optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, masks=sparse_masks(model)))
        for variant, model in sparse.items()}


def linear_workload(device: torch.device, features: int, batch: int, mode: str, sparsity: float):
    torch.manual_seed(0)
    dense = nn.Linear(features, features, device=device)
    dense_model, sparse_model = _pair(dense, SparseLinear, sparsity, "masked" if mode == "train-masked" else "feedback")
    x = torch.randn(batch, features, device=device)
    return _inference(dense_model, sparse_model, x) if mode == "inference" else _training(dense_model, sparse_model, x)


def conv_workload(device: torch.device, channels: int, spatial: int, batch: int, sparsity: float):
    torch.manual_seed(0)
    dense = nn.Conv2d(channels, channels, 3, padding=1, device=device)
    dense_model, sparse_model = _pair(dense, SparseConv2d, sparsity, "feedback")
    x = torch.randn(batch, channels, spatial, spatial, device=device)
    return _inference(dense_model, sparse_model, x)


def _register() -> None:
    for features, batch, quick in LINEAR_SIZES:
        for mode in ("inference", "train-feedback", "train-masked"):
            params = {"features": features, "batch": batch, "mode": mode, "sparsity": SPARSITY}
            register(Case("nn", f"linear{features}-{mode}-b{batch}-s{SPARSITY}", params, linear_workload, quick=quick,
                          check=_same_shape if mode == "inference" else None))
    for channels, spatial, batch, quick in CONV_SIZES:
        params = {"channels": channels, "spatial": spatial, "batch": batch, "sparsity": SPARSITY}
        register(Case("nn", f"conv3x3-{channels}ch-{spatial}px-b{batch}-s{SPARSITY}", params, conv_workload,
                      quick=quick, check=_same_shape))


def _same_shape(output, expected):
    # The dense baseline computes with the unpruned weight: outputs differ by design; only
    # shapes and dtypes must agree (the values are tested in tests/nn).
    assert output.shape == expected.shape and output.dtype == expected.dtype


_register()
