"""Benchmark cases of dynamic sparse training (dynasparse.pruning), registered on import.

RigL (`pruning.create("rigl", ...)`, masked updates, ERK densities) against dense training of
the same model on the same batch: the baseline is one dense training step (zero_grad with
torch's default set_to_none=True, forward, backward of the mean square of the output, torch's
foreach SGD with momentum). Models: a 4096-wide MLP (three Linear(4096, 4096) layers with
ReLUs between them, batch 128, every layer pruned), the ResNet-style CIFAR net of the models
family (`experiments.models.resnet`, depth 8, width 64, batch 32; its first convolution and
classifier stay dense), and a 256-wide MLP at batch 32 (quick: the smoke run's case).

Cases, at sparsity 0.9:
- "train": one RigL step between mask updates (masked update, weight gradient at the
  nonzeros only, then `pruner.step()`, which does not update);
- "update": a mask-update step. Variant "rigl-update-step" is the whole step (the backward
  computes the dense weight gradient RigL grows by, then the drop-and-grow of every layer in
  `pruner.step()`); variant "rigl-selection" is the mask update alone (`pruner.update()`: the
  scores, the drop and grow selection of every layer, installing the masks with their plans,
  zeroing the grown weights and their optimizer state), against the same dense step: the
  issue's target is a ratio >= 10 (under 10% of a dense step);
- "amortized100": one update period, 100 steps of which the last updates the masks (RigL's
  default `update_every`), against 100 dense steps (the issue's target: >= 2x for the 4096
  MLP). A call is a whole period, so this case runs long: `--repeats 1` keeps it to three
  periods per variant.

Variants "rigl" and "rigl-update-step" run the layers pinned to the kernels
(backend="sparse"); "rigl-auto" as layers are built by default (backend="auto": per call the
faster of the kernels and dense on w * m, measured during the harness's warm-up; not in the
quick model's amortized case, whose period would be mostly that measuring). Nothing is
comparable between a dense and a sparse model's outputs, so no output is checked (correctness
is tested in tests/pruning).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynasparse import optim as sparse_optim
from dynasparse import pruning
from dynasparse.experiments import models
from dynasparse.nn import sparsify

from .harness import Case, register

SPARSITY = 0.9
PERIOD = 100
# Long enough that the cosine drop fraction stays at its start (0.3) and updates never end.
TOTAL_STEPS = 10**9
# (name, quick); MLPs: (features, batch, layers)
MODELS = (("mlp4096", False), ("resnet", False), ("mlp256", True))
MLPS = {"mlp4096": (4096, 128, 3), "mlp256": (256, 32, 3)}
QUICK = {model for model, quick in MODELS if quick}
BACKENDS = {"rigl": "sparse", "rigl-auto": "auto"}


def _model(name: str, device: torch.device):
    """The dense model, its input batch and the layers RigL keeps dense."""
    torch.manual_seed(0)
    if name in MLPS:
        features, batch, depth = MLPS[name]
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(features, features), nn.ReLU()]
        model, x, dense = nn.Sequential(*layers[:-1]), torch.randn(batch, features), []
    else:
        model, x = models.resnet((3, 32, 32), 10, depth=8, width=64), torch.randn(32, 3, 32, 32)
        dense = list(model.dense_layers)
    return model.to(device).train(), x.to(device), dense


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, pruner=None):
    def run():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
    return run


def _rigl(dense: nn.Module, exclude: list[str], sparsity: float, backend: str, update_every: int):
    model = copy.deepcopy(dense)
    sparsify(model, 0.0, exclude=exclude, backend=backend)
    pruner = pruning.create("rigl", model, sparsity=sparsity, total_steps=TOTAL_STEPS, update_every=update_every,
                            exclude=exclude)
    optimizer = sparse_optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    pruner.attach(optimizer)
    return model, optimizer, pruner


def _periods(step, count: int):
    def run():
        for _ in range(count):
            step()
    return run


def rigl_workload(device: torch.device, model: str, mode: str, sparsity: float):
    dense, x, exclude = _model(model, device)
    dense_step = _step(dense, torch.optim.SGD(dense.parameters(), lr=1e-4, momentum=0.9, foreach=True), x)
    if mode == "train":
        # No update is ever due: every step trains between two updates.
        variants = {}
        for variant, backend in BACKENDS.items():
            sparse, optimizer, pruner = _rigl(dense, exclude, sparsity, backend, TOTAL_STEPS)
            variants[variant] = _step(sparse, optimizer, x, pruner)
        return dense_step, variants
    if mode == "update":
        sparse, optimizer, pruner = _rigl(dense, exclude, sparsity, "sparse", 1)
        step = _step(sparse, optimizer, x, pruner)
        step()  # leaves this step's dense weight gradients for the selection alone
        return dense_step, {"rigl-update-step": step, "rigl-selection": pruner.update}
    variants = {}
    # The smoke run's model times a period with the kernels alone: "auto" measures its choices first.
    for variant, backend in (BACKENDS if model not in QUICK else {"rigl": "sparse"}).items():
        sparse, optimizer, pruner = _rigl(dense, exclude, sparsity, backend, PERIOD)
        variants[variant] = _periods(_step(sparse, optimizer, x, pruner), PERIOD)
    return _periods(dense_step, PERIOD), variants


def _register() -> None:
    for model, quick in MODELS:
        for mode in ("train", "update", f"amortized{PERIOD}"):
            params = {"model": model, "mode": mode, "sparsity": SPARSITY}
            register(Case("pruning", f"rigl-{model}-{mode}-s{SPARSITY}", params, rigl_workload, quick=quick,
                          check=None))


_register()
