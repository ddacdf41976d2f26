"""Benchmark cases of the sparse variational dropout layers (dynasparse.nn.variational).

One VD training step (zero_grad, the local-reparameterization forward, the loss plus 1e-4 *
KL, backward, AdamW step) of a layer whose weights are 90% pruned (log_alpha >= 3), the
layer's input requiring grad as a hidden layer's does. The baseline is a dense VD
implementation of the same layer, as Molchanov et al.'s code computes it: both products with
torch's dense F.linear / F.conv2d over all weights (theta * mask and alpha * theta**2 * mask,
so its values are the sparse layer's), torch.optim.AdamW (foreach). The variants are VDLinear /
VDConv2d with dynasparse.optim.AdamW driven by its mask (masked mode): "dynasparse" pinned to
the kernels (backend="sparse": both products and their backward on the masked kernels, a
convolution on the implicit-GEMM one), "dynasparse-auto" as the layers are built by default
(backend="auto": each call the faster of the kernels and torch's dense ops on the masked
weights, measured on its first call, which the harness's warm-up includes).

Sizes: a 4096 x 4096 layer at batch 128 (the issue's >= 3x target) and 1024 at batch 32
(quick), and the layers of the experiment's zoo CNNs: the 1-D CNN's middle convolution
(12 -> 12 channels, (1, 5) kernel, stride 2, MNIST-1D's 40 samples) and the paper's 2-D zoo
CNN's second convolution (8 -> 6 channels, 5 x 5, 12 x 12 maps) at batch 50.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dynasparse import optim as sparse_optim
from dynasparse.nn import sparse_masks
from dynasparse.nn.variational import EPS, VDConv2d, VDLinear, kl_approximation, log_alpha_of

from .harness import Case, register

SPARSITY = 0.9
KL_WEIGHT = 1e-4
VARIANTS = {"dynasparse": "sparse", "dynasparse-auto": "auto"}  # variant -> the VD layers' backend
LINEAR_SIZES = ((4096, 128, False), (1024, 32, True))  # (features, batch, quick)
# (name, in, out, kernel, stride, padding, input height, input width, batch)
CONV_SIZES = (("cnn1d-conv2", 12, 12, (1, 5), (1, 2), (0, 2), 1, 40, 50),
              ("zoo-cnn-conv2", 8, 6, (5, 5), (1, 1), (0, 0), 12, 12, 50))


class DenseVD(nn.Module):
    """The dense VD layer of a VD layer: the same theta, log_sigma2, bias and mask, both
    products with torch's dense linear / convolution over all weights."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.theta = nn.Parameter(layer.weight.detach().clone())
        self.log_sigma2 = nn.Parameter(layer.log_sigma2.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("mask", layer.mask.detach().clone())
        self.conv = ({"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
                     if isinstance(layer, nn.Conv2d) else None)

    def _product(self, x, weight, bias):
        return F.linear(x, weight, bias) if self.conv is None else F.conv2d(x, weight, bias, **self.conv)

    def kl(self) -> torch.Tensor:
        return kl_approximation(log_alpha_of(self.theta, self.log_sigma2)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_alpha = log_alpha_of(self.theta, self.log_sigma2)
        mean = self._product(x, self.theta * self.mask, self.bias)
        variance = self._product(x * x, torch.exp(log_alpha) * self.theta.square() * self.mask, None)
        return mean + torch.sqrt(variance + EPS) * torch.randn_like(mean)


def _pruned(layer: nn.Module, sparsity: float) -> nn.Module:
    """`layer` with log_sigma2 set so that a random `sparsity` of its weights have log_alpha >= 3
    (the rest at log_alpha -4), then its threshold mask."""
    with torch.no_grad():
        pruned = torch.rand(layer.weight.shape, device=layer.weight.device) < sparsity
        log_alpha = torch.where(pruned, 5.0, -4.0)
        layer.log_sigma2.copy_(log_alpha + 2 * torch.log(layer.weight.abs() + EPS))
    layer.refresh_mask()
    return layer


def _steps(sparse: nn.Module, x: torch.Tensor):
    dense = DenseVD(sparse)
    x = x.detach().requires_grad_()

    def step(model, optimizer):
        def run():
            optimizer.zero_grad()
            x.grad = None
            (model(x).square().mean() + KL_WEIGHT * model.kl()).backward()
            optimizer.step()
        return run

    variants = {}
    for variant, backend in VARIANTS.items():
        layer = copy.deepcopy(sparse)
        layer.backend = backend
        variants[variant] = step(layer, sparse_optim.AdamW(layer.parameters(), lr=1e-5, masks=sparse_masks(layer)))
    return step(dense, torch.optim.AdamW(dense.parameters(), lr=1e-5, foreach=True)), variants


def linear_workload(device: torch.device, features: int, batch: int, sparsity: float):
    torch.manual_seed(0)
    layer = _pruned(VDLinear(features, features, device=device), sparsity)
    return _steps(layer, torch.randn(batch, features, device=device))


def conv_workload(device: torch.device, channels_in: int, channels_out: int, kernel, stride, padding, height: int,
                  width: int, batch: int, sparsity: float):
    torch.manual_seed(0)
    layer = _pruned(VDConv2d(channels_in, channels_out, tuple(kernel), tuple(stride), tuple(padding), device=device),
                    sparsity)
    return _steps(layer, torch.randn(batch, channels_in, height, width, device=device))


def _register() -> None:
    for features, batch, quick in LINEAR_SIZES:
        register(Case("vd", f"linear{features}-train-b{batch}-s{SPARSITY}",
                      {"features": features, "batch": batch, "sparsity": SPARSITY}, linear_workload, quick=quick,
                      check=None))
    for name, cin, cout, kernel, stride, padding, height, width, batch in CONV_SIZES:
        params = {"channels_in": cin, "channels_out": cout, "kernel": list(kernel), "stride": list(stride),
                  "padding": list(padding), "height": height, "width": width, "batch": batch, "sparsity": SPARSITY}
        register(Case("vd", f"{name}-train-b{batch}-s{SPARSITY}", params, conv_workload, quick=True, check=None))


_register()
