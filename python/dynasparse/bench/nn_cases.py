"""Benchmark cases of the sparse modules, registered on import.

The baseline is the dense torch module on the pruned weights (w * m: the values the sparse
copies compute with, at dense speed, since dense kernels do not skip zeros) doing the same
work: `nn.Linear` / `nn.Conv2d` forward (inference, under no_grad); forward and backward
("fwd-bwd-masked": the step the peer below also runs, no optimizer); or one training step
(zero_grad with torch's default set_to_none=True, forward, backward, SGD step with momentum,
torch.optim foreach). In the last two the layer is a hidden layer: its input requires grad,
so the backward computes the input gradient as well as the weight gradient. The variants
are sparse copies of the same module with the same mask, with dynasparse.optim.SGD driven
by the layers' masks, in feedback mode (DPF: dense weight gradient) or masked mode (sparse
weight gradient, pruned weights and state kept at zero): "dynasparse" pinned to the kernels
(backend="sparse"), "dynasparse-auto" as layers are built by default (backend="auto": the
faster of the kernels and dense on w * m for each call shape, measured on its first call,
which the harness's warm-up includes).

The peer, where it is installed (CPU only): SparseProp (`pip install sparseprop`, Nikdan et
al., ICML 2023), the sparse-training library with CPU kernels, built from the same pruned
weights, in the forward-and-backward cases. Its weight gradient exists only at the nonzeros,
so it is compared with masked mode. "sparseprop" is its layers as `from_dense` builds them
(convolution vectorized over the batch), "sparseprop-over-on" its convolution vectorized over
the output width; its own `sparsify_conv2d_auto` picks between the two from one timed call.

The layer sweep (`sweep-linear<width>-<mode>-b<batch>`): square Linear layers 128 to 4096
wide at batch 1, 32 and 256, inference and a feedback training step, where "dynasparse-auto"
must never be slower than dense (the kernels where they win, else dense on w * m).

Every variant's first output, and in training its input gradient, must equal the baseline's
to fp32 rounding, so a peer or kernel computing something else is an error, not a speed-up.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import weakref

import torch
from torch import nn

from dynasparse import optim as sparse_optim
from dynasparse.nn import SparseConv2d, SparseLinear, sparse_masks

from .harness import Case, register

LINEAR_SIZES = ((4096, 128, False), (1024, 32, True))  # (features, batch, quick)
LINEAR_MODES = ("inference", "train-feedback", "train-masked", "fwd-bwd-masked")
# (channels, spatial, batch, quick, mode). The forward-and-backward shapes are the first and
# third stage of a CIFAR ResNet-18; their batches are multiples of 8, as SparseProp's
# batch-vectorized convolution forward needs (otherwise it drops terms, see _peer_layers).
CONV_SIZES = ((256, 32, 8, False, "inference"), (64, 16, 2, True, "inference"),
              (64, 32, 32, False, "fwd-bwd-masked"), (256, 8, 32, False, "fwd-bwd-masked"),
              (32, 8, 8, True, "fwd-bwd-masked"))
SPARSITY = 0.9
PEER = "sparseprop"
# The layer sweep: every square Linear width at batch 1, 32 and 256, inference and a feedback
# training step (the target: no size or batch below 0.95x, through the dense way where
# the kernels lose).
SWEEP_WIDTHS = (128, 256, 512, 1024, 2048, 4096)
SWEEP_BATCHES = (1, 32, 256)
SWEEP_MODES = ("inference", "train-feedback")

VARIANTS = {"dynasparse": "sparse", "dynasparse-auto": "auto"}  # variant -> the layers' backend


def _peer_installed() -> bool:
    # CI does not install SparseProp: there the cases run without its variants.
    return importlib.util.find_spec(PEER) is not None


def _peer_layers(pruned: nn.Module, device: torch.device) -> dict[str, nn.Module]:
    """SparseProp's layers holding the nonzeros of `pruned` (w * m), by variant name."""
    if device.type != "cpu" or not _peer_installed():  # its kernels take NumPy arrays
        return {}
    from sparseprop.modules import SparseConv2d as PeerConv2d
    from sparseprop.modules import SparseLinear as PeerLinear

    if isinstance(pruned, nn.Linear):
        return {PEER: PeerLinear.from_dense(pruned)}
    # Its batch-vectorized forward (stride 1) adds, when the batch is not a multiple of 8,
    # the remainder of only the first of each 4 output columns: the output check shows it.
    return {PEER: PeerConv2d.from_dense(pruned, vectorizing_over_on=False),
            f"{PEER}-over-on": PeerConv2d.from_dense(pruned, vectorizing_over_on=True)}


def _models(dense: nn.Module, sparse_cls, sparsity: float, grad_mode: str, device: torch.device, peer: bool):
    """The dense model on w * m and, per variant, a sparse model with the same mask and values."""
    (first, first_backend), *rest = VARIANTS.items()
    layer = sparse_cls.from_dense(dense, sparsity=sparsity, grad_mode=grad_mode, backend=first_backend)
    layers = {first: layer} | {variant: sparse_cls.from_dense(dense, mask=layer.mask, grad_mode=grad_mode,
                                                              backend=backend)
                               for variant, backend in rest}
    pruned = layer.to_dense()
    if peer:
        layers.update(_peer_layers(pruned, device))
    return nn.Sequential(pruned), {variant: nn.Sequential(layer) for variant, layer in layers.items()}


def _inference(dense, sparse, x):
    def run(model):
        @torch.no_grad()
        def forward():
            return model(x)
        return forward

    return run(dense), {variant: run(model) for variant, model in sparse.items()}


def _step(model, x, optimizer=None):
    """forward, backward and (given an optimizer) its step; returns the output and the input
    gradient, which the output check compares."""
    parameters = list(model.parameters())

    def run():
        if optimizer is not None:
            optimizer.zero_grad()
        else:
            for parameter in parameters:
                parameter.grad = None
        x.grad = None
        output = model(x)
        output.square().mean().backward()
        if optimizer is not None:
            optimizer.step()
        return output.detach(), x.grad

    return run


def _forward_backward(dense, sparse, x):
    x = x.detach().requires_grad_()
    return _step(dense, x), {variant: _step(model, x) for variant, model in sparse.items()}


def _training(dense, sparse, x):
    x = x.detach().requires_grad_()
    dense_optimizer = torch.optim.SGD(dense.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    return _step(dense, x, dense_optimizer), {
        variant: _step(model, x, sparse_optim.SGD(model.parameters(), lr=1e-4, momentum=0.9,
                                                  masks=sparse_masks(model)))
        for variant, model in sparse.items()}


_RUNS = {"inference": _inference, "fwd-bwd-masked": _forward_backward,
         "train-feedback": _training, "train-masked": _training}


def _workload(dense, sparse_cls, x, mode: str, sparsity: float, device: torch.device):
    grad_mode = "masked" if mode.endswith("masked") else "feedback"
    dense_model, sparse_models = _models(dense, sparse_cls, sparsity, grad_mode, device,
                                         peer=mode == "fwd-bwd-masked")
    return _RUNS[mode](dense_model, sparse_models, x)


def linear_workload(device: torch.device, features: int, batch: int, mode: str, sparsity: float):
    torch.manual_seed(0)
    dense = nn.Linear(features, features, device=device)
    return _workload(dense, SparseLinear, torch.randn(batch, features, device=device), mode, sparsity, device)


def loaded_linear_workload(device: torch.device, features: int, batch: int, mode: str, sparsity: float,
                           competitors: int):
    """linear_workload while `competitors` other processes spin on the CPU: a thread of the
    kernel's team may wait for a core (how a shared machine runs). They live as long as the
    workload's callables and die with them (or with this process)."""
    workload = linear_workload(device, features, batch, mode, sparsity)
    for _ in range(competitors):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        weakref.finalize(workload[0], spinner.kill)
    return workload


def conv_workload(device: torch.device, channels: int, spatial: int, batch: int, mode: str, sparsity: float):
    torch.manual_seed(0)
    dense = nn.Conv2d(channels, channels, 3, padding=1, device=device)
    x = torch.randn(batch, channels, spatial, spatial, device=device)
    return _workload(dense, SparseConv2d, x, mode, sparsity, device)


def same_values(output, expected):
    """Each tensor equal to the baseline's up to fp32 rounding, relative to its largest
    element: both are fp32 sums of hundreds of products taken in different orders (the
    kernels skip the zeros; even torch's own dense product of the same weights rounds
    differently when they sit at another address), which differ by up to about 1e-4 of the
    largest element. A kernel that computes something else (a dropped term, a wrong index)
    is off by far more; exact values are tested against float64 in tests/."""
    outputs, expecteds = (output, expected) if isinstance(expected, tuple) else ((output,), (expected,))
    assert len(outputs) == len(expecteds), (len(outputs), len(expecteds))
    for got, want in zip(outputs, expecteds):
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * scale)


def _same_shape(output, expected):
    # For cases whose dense baseline computes with the unpruned weight (shrink_cases'
    # unstructured ones): outputs differ by design; only shapes and dtypes must agree (the
    # values are tested in tests/nn).
    assert output.shape == expected.shape and output.dtype == expected.dtype


def _register() -> None:
    for features, batch, quick in LINEAR_SIZES:
        for mode in LINEAR_MODES:
            params = {"features": features, "batch": batch, "mode": mode, "sparsity": SPARSITY}
            register(Case("nn", f"linear{features}-{mode}-b{batch}-s{SPARSITY}", params, linear_workload, quick=quick,
                          check=same_values))
    for features in SWEEP_WIDTHS:
        for batch in SWEEP_BATCHES:
            for mode in SWEEP_MODES:
                params = {"features": features, "batch": batch, "mode": mode, "sparsity": SPARSITY}
                register(Case("nn", f"sweep-linear{features}-{mode}-b{batch}-s{SPARSITY}", params, linear_workload,
                              quick=features == SWEEP_WIDTHS[0] and batch == 1, check=same_values))
    # The 2-thread forward of a small layer with one core taken by another process: compare its
    # ratio with the idle case's above (the target: within 20%).
    params = {"features": 1024, "batch": 32, "mode": "inference", "sparsity": SPARSITY, "competitors": 1}
    register(Case("nn", f"linear1024-inference-b32-s{SPARSITY}-one-core-busy", params, loaded_linear_workload,
                  devices=("cpu",), check=same_values))
    for channels, spatial, batch, quick, mode in CONV_SIZES:
        params = {"channels": channels, "spatial": spatial, "batch": batch, "mode": mode, "sparsity": SPARSITY}
        # The inference cases keep their names (committed results, scripts/gpu_check.sh).
        middle = "" if mode == "inference" else f"-{mode}"
        register(Case("nn", f"conv3x3-{channels}ch-{spatial}px{middle}-b{batch}-s{SPARSITY}", params, conv_workload,
                      quick=quick, check=same_values))


_register()
