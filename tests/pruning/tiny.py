"""Tiny models, data, a training loop and float64 selection references shared by the algorithm tests."""

import collections
import io
import math

import torch
from torch import nn

from dynasparse import optim, pruning


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(collections.OrderedDict([
        ("conv", nn.Conv2d(2, 4, 3, padding=1)), ("relu0", nn.ReLU()), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(4 * 4 * 4, 24)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(24, 16)), ("relu2", nn.ReLU()),
        ("out", nn.Linear(16, 3))]))


def tiny_data(seed=0, n=64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def batch(step, data, size=8):
    x, y = data
    index = torch.arange(step * size, step * size + size) % len(y)
    return x[index], y[index]


def train(model, optimizer, pruner, steps, *, start=0, data=None, before_step=None, after_step=None):
    """`steps` training steps from `start`; `before_step(t)` runs after optimizer.step() of step t
    and before pruner.step() (the state an update sees), `after_step(t)` after it."""
    data = tiny_data() if data is None else data
    for step in range(start, start + steps):
        x, y = batch(step, data)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if before_step is not None:
            before_step(step + 1)
        pruner.step()
        if after_step is not None:
            after_step(step + 1)


def build(name, model_seed=0, *, sparsity=0.8, total_steps=40, optimizer_cls=optim.SGD, calibration_seed=5, **options):
    """A tiny model, `create(name, ...)`, calibrated where needed, with an attached optimizer."""
    model = tiny_model(model_seed)
    pruner = pruning.create(name, model, sparsity=sparsity, total_steps=total_steps, **options)
    if pruner.needs_data:
        pruner.calibrate([batch(0, tiny_data(calibration_seed))])
    kwargs = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4} if optimizer_cls is optim.SGD else {"lr": 1e-2}
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    pruner.attach(optimizer)
    return model, optimizer, pruner


def checkpoint(model, optimizer, pruner):
    """The three state_dicts through torch.save / torch.load, as a resumed run reads them."""
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict()},
               buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def topk_reference(scores, k, candidates=None):
    """The k largest of `scores` in float64 (among `candidates`), ties to the lower flat index."""
    flat = scores.detach().double().flatten()
    if candidates is not None:
        flat = torch.where(candidates.flatten(), flat, -math.inf)
        assert k <= int(candidates.sum())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return chosen.reshape(scores.shape)


def global_topk_reference(scores, k, candidates=None):
    """The k largest over a list of tensors (one threshold), ties to the earlier tensor, then the lower index."""
    flat = torch.cat([s.detach().double().flatten() for s in scores])
    chosen = topk_reference(flat, k, None if candidates is None else torch.cat([c.flatten() for c in candidates]))
    return [part.reshape(s.shape) for part, s in zip(torch.split(chosen, [s.numel() for s in scores]), scores)]


def erk_counts_reference(shapes, sparsity):
    """ERK keep counts (Evci et al. 2020) in float64: density proportional to sum(shape) / prod(shape),
    scaled to the global target, layers over density 1 kept dense; largest-remainder rounding."""
    sizes = [math.prod(shape) for shape in shapes]
    total = round(sum(sizes) * (1 - sparsity))
    raw = [sum(shape) / math.prod(shape) for shape in shapes]
    dense = set()
    while True:
        scale = (total - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in range(len(sizes))
                                                           if i not in dense)
        over = [i for i in range(len(sizes)) if i not in dense and scale * raw[i] > 1]
        if not over:
            break
        dense.add(max(over, key=lambda i: (raw[i], -i)))
    shares = [sizes[i] if i in dense else scale * raw[i] * sizes[i] for i in range(len(sizes))]
    counts = [math.floor(share) for share in shares]
    for i in sorted(range(len(shares)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))[:total - sum(counts)]:
        counts[i] += 1
    return counts


def masks_of(pruner):
    return {name: layer.mask.clone() for name, layer in pruner.layers.items()}
