"""Saliency estimators: the diagonal of the loss's Hessian with respect to chosen parameters,
and the OBD saliency built on it (LeCun, Denker, Solla, "Optimal Brain Damage", 1990).

    estimate = saliency.fisher_diagonal(model, batches)                  # empirical Fisher (the default)
    estimate = saliency.hutchinson_diagonal(model, batches, probes=64, generator=g)
    estimate = saliency.exact_diagonal(model, batches)                   # tiny models: the test oracle
    estimate.mean["fc1.weight"]       # diag(H) estimate, shaped like the parameter
    estimate.stderr["fc1.weight"]     # its standard error
    estimate.samples["fc1.weight"]    # one estimate per batch, [B, *shape]
    scores = saliency.obd_saliency(model, estimate)                      # h_kk * w_k**2 / 2

This API is stable (the pruners and the neuron-level methods build on it).

The loss. `batches` is an iterable of (inputs, targets) pairs; `loss(outputs, targets)` (default
`F.cross_entropy`) returns the mean loss of a batch. The loss estimated is the mean over every
example of every batch, L = sum_b n_b L_b / N (n_b examples in batch b, N in all), and a
batch's sample is the estimate for its own L_b; `mean` is the n_b-weighted mean of the samples.

The estimators (h_k: the k-th diagonal entry of the Hessian of L):
- "fisher" (`fisher_diagonal`, labels="empirical"): the empirical Fisher, the mean of the
  per-example squared gradients (1/N) sum_n (dl_n/dtheta_k)**2, from per-example gradients by
  torch.func (functional_call + vmap(grad)) over chunks of `chunk_size` examples; its standard
  error is that of a mean over the N examples. labels="model" (cross-entropy only) takes the
  expectation over the model's own predictive distribution exactly, sum_c p(c|x) (d log p(c|x) /
  dtheta_k)**2 (the "true" Fisher): it equals the diagonal of the Gauss-Newton matrix, hence the
  Hessian's for a model linear in its parameters (softmax regression).
- "hutchinson" (`hutchinson_diagonal`): E[z * Hz] over Rademacher probes z (z_k**2 = 1, so each
  probe gives h_k plus zero-mean noise sum_{j != k} z_k z_j H_kj), `probes` per batch, Hessian-
  vector products by torch.func (a vjp of the gradient: double backward), vmapped over
  `probe_chunk` probes; the standard error is the probes' sample standard deviation over sqrt(probes),
  combined over the batches with their weights n_b / N.
- "exact" (`exact_diagonal`): the diagonal of the full Hessian (torch.func.jacrev of jacrev) of
  each batch's loss over the flattened chosen parameters (their count squared in memory: at most `limit` parameters);
  standard error 0.

Parameters. `params` names the parameters differentiated (e.g. ["fc1.weight"]); by default the
weight of every nn.Linear, nn.Conv1d/2d/3d and dynasparse sparse layer. Every other parameter
is held fixed. The model runs in eval mode (dropout off, batch-norm running statistics: the
curvature of the function the model computes at inference), restored afterwards; no `.grad`
is touched.

Sparse layers (dynasparse.nn.SparseLinear / SparseConv2d / SparseTransposedLinear) run as
torch ops on w * m during an estimate (backend "dense"). The derivatives of a sparse layer's
weight are taken with respect to its effective weight w * m (the weights the layer computes
with), at every position, whatever the layer's grad mode: a
pruned position's entry is the curvature of re-growing that weight from 0. The OBD saliency of
a pruned weight is 0 (`obd_saliency` uses w * m); the pruners rank only the active ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp, vmap

from ..nn.modules import SPARSE_MODULES
from ..nn.quantize import weight_layers
from .schedules import check_int

_OWNER = "dynasparse.pruning.saliency"
LABELS = ("empirical", "model")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A Hessian-diagonal estimate, per parameter name.

    method: "fisher", "fisher-model", "hutchinson" or "exact".
    mean: the estimate of diag(H) of the mean loss over all examples, shaped like the parameter.
    stderr: its standard error (0 for "exact"), or None where undefined (fewer than 2 examples).
    samples: each batch's own estimate stacked, [B, *shape]; `mean` is their mean weighted by `counts`.
    counts: the examples of each batch."""

    method: str
    mean: dict[str, torch.Tensor]
    stderr: dict[str, torch.Tensor] | None
    samples: dict[str, torch.Tensor]
    counts: tuple[int, ...]


def weight_names(model: nn.Module) -> list[str]:
    """The default parameters: "<layer>.weight" of every linear, convolutional and sparse layer
    (`nn.quantize.weight_layers`)."""
    return [f"{name}.weight" if name else "weight" for name in weight_layers(model)]


def _resolve_params(owner: str, model: nn.Module, params: Sequence[str] | None) -> dict[str, torch.Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    if params is None:
        names = weight_names(model)
        if not names:
            raise ValueError(f"{owner}: the model has no linear or convolutional layer; name the parameters in params")
    else:
        if isinstance(params, str) or not all(isinstance(name, str) for name in params):
            raise TypeError(f"{owner}: params must be a list of parameter names, got {params!r}")
        names = list(dict.fromkeys(params))
        if not names:
            raise ValueError(f"{owner}: params is empty")
        unknown = [name for name in names if name not in named]
        if unknown:
            raise ValueError(f"{owner}: {unknown} are not parameters of the model (it has {sorted(named)})")
    for name in names:
        if not named[name].is_floating_point():
            raise TypeError(f"{owner}: parameter {name} is {named[name].dtype}, not floating point")
    return {name: named[name].detach() for name in names}


def _fixed(model: nn.Module, chosen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters not chosen, detached: held fixed, no graph is built through them."""
    return {name: value.detach() for name, value in model.named_parameters() if name not in chosen}


def check_batches(owner: str, batches: Iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`batches` as a list of (inputs, targets) pairs, each with examples; else an error naming `owner`."""
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor):
        raise TypeError(f"{owner}: batches is a list of (inputs, targets) pairs; wrap a single batch as [batch]")
    checked = []
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(part, torch.Tensor) for part in batch)):
            raise TypeError(f"{owner}: batch {i} must be an (inputs, targets) pair of tensors, got "
                            f"{type(batch).__name__}")
        inputs, targets = batch
        if inputs.dim() == 0 or targets.dim() == 0 or len(inputs) != len(targets):
            raise ValueError(f"{owner}: batch {i} has inputs {list(inputs.shape)} and targets {list(targets.shape)}: "
                             "they need the same leading (example) dimension")
        if len(inputs) == 0:
            raise ValueError(f"{owner}: batch {i} holds no examples")
        checked.append((inputs, targets))
    if not checked:
        raise ValueError(f"{owner}: batches is empty")
    return checked


@contextlib.contextmanager
def _estimating(model: nn.Module):
    """Eval mode; every sparse layer's weight gradient dense (straight through its mask, so
    derivatives are those of the effective weight at every position) and its backend "dense"
    (torch ops on w * m, the same values: the transforms need no kernel support, and no call is
    timed for the cost model); all restored after."""
    sparse = [module for module in model.modules() if isinstance(module, SPARSE_MODULES)]
    saved = [(module.weight_grad, module.backend) for module in sparse]
    was_training = model.training
    model.eval()
    try:
        for module in sparse:
            module.weight_grad, module.backend = "dense", "dense"
        with torch.enable_grad():
            yield
    finally:
        for module, (weight_grad, backend) in zip(sparse, saved):
            module.weight_grad, module.backend = weight_grad, backend
        model.train(was_training)


def _loss_value(owner: str, loss: Loss, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    value = loss(outputs, targets)
    if not (isinstance(value, torch.Tensor) and value.numel() == 1):
        raise TypeError(f"{owner}: loss(outputs, targets) must return a scalar tensor (the batch's mean loss), got "
                        f"{type(value).__name__} {getattr(value, 'shape', '')}")
    return value.reshape(())


def _per_example_losses(owner: str, model: nn.Module, fixed: dict, loss: Loss):
    def example_loss(params, inputs, target):
        outputs = functional_call(model, (fixed, params), (inputs.unsqueeze(0),))
        return _loss_value(owner, loss, outputs, target.unsqueeze(0))

    return example_loss


def _stacked(per_batch: list[dict[str, torch.Tensor]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([sample[name] for sample in per_batch]) for name in names}


def _weighted_mean(samples: dict[str, torch.Tensor], counts: Sequence[int]) -> dict[str, torch.Tensor]:
    weights = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    return {name: torch.tensordot(weights.to(value.device, value.dtype), value, dims=1)
            for name, value in samples.items()}


def fisher_diagonal(model: nn.Module, batches: Iterable, *, params: Sequence[str] | None = None,
                    loss: Loss | None = None, chunk_size: int = 256, labels: str = "empirical") -> Estimate:
    """The Fisher estimate of the Hessian diagonal (module docstring): labels="empirical" the
    mean of the per-example squared gradients of `loss` at the observed targets; labels="model"
    (cross-entropy on logits [N, C]; the targets are not read) the exact expectation over the
    model's predictive distribution. `chunk_size`: examples per vmapped per-example-gradient call (memory: chunk_size
    x the chosen parameters, times the classes for labels="model"); the result does not depend on
    it beyond float rounding."""
    owner = f"{_OWNER}.fisher_diagonal"
    check_int(owner, "chunk_size", chunk_size, 1)
    if labels not in LABELS:
        raise ValueError(f"{owner}: labels must be one of {', '.join(LABELS)}, got {labels!r}")
    if labels == "model" and loss is not None:
        raise ValueError(f"{owner}: labels='model' takes the expectation of the cross-entropy under the model's own "
                         "softmax; it has no meaning for a custom loss")
    chosen = _resolve_params(owner, model, params)
    checked = check_batches(owner, batches)
    loss = F.cross_entropy if loss is None else loss
    names, fixed = list(chosen), _fixed(model, chosen)
    if labels == "empirical":
        per_example = vmap(grad(_per_example_losses(owner, model, fixed, loss)), in_dims=(None, 0, 0))
    else:
        def log_probabilities(params, inputs):
            outputs = functional_call(model, (fixed, params), (inputs.unsqueeze(0),))
            if outputs.dim() != 2:
                raise ValueError(f"{owner}: labels='model' needs logits [N, C], the model returns "
                                 f"{list(outputs.shape)} for one example")
            return torch.log_softmax(outputs, dim=-1)[0]

        def expected_square(params, inputs):
            # The Jacobian of log p(.|x): one gradient per class, weighted by p(c|x).
            jacobian = jacrev(log_probabilities)(params, inputs)
            probabilities = log_probabilities(params, inputs).detach().exp()
            return {name: torch.tensordot(probabilities, value.square(), dims=1) for name, value in jacobian.items()}

        per_example = vmap(expected_square, in_dims=(None, 0))

    per_batch, counts = [], []
    # Over every example: the sum of its squared gradients, and of their squares (for the stderr).
    summed = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in chosen.items()}
    summed_squares = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in chosen.items()}
    with _estimating(model):
        for inputs, targets in checked:
            batch_sum = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in chosen.items()}
            for start in range(0, len(inputs), chunk_size):
                x, y = inputs[start:start + chunk_size], targets[start:start + chunk_size]
                if labels == "empirical":
                    values = {name: g.square() for name, g in per_example(chosen, x, y).items()}
                else:
                    values = per_example(chosen, x)  # the targets play no part: the model's own labels
                for name in names:
                    value = values[name].double()
                    batch_sum[name] += value.sum(0)
                    summed[name] += value.sum(0)
                    summed_squares[name] += value.square().sum(0)
            per_batch.append({name: (batch_sum[name] / len(inputs)).to(chosen[name].dtype) for name in names})
            counts.append(len(inputs))
    total = sum(counts)
    samples = _stacked(per_batch, names)
    mean = {name: (summed[name] / total).to(chosen[name].dtype) for name in names}
    stderr = None
    if total >= 2:
        stderr = {}
        for name in names:
            average = summed[name] / total
            variance = ((summed_squares[name] - total * average.square()) / (total - 1)).clamp(min=0.0)
            stderr[name] = (variance / total).sqrt().to(chosen[name].dtype)
    return Estimate("fisher" if labels == "empirical" else "fisher-model", mean, stderr, samples, tuple(counts))


def _batch_loss(owner: str, model: nn.Module, fixed: dict, loss: Loss, inputs: torch.Tensor,
                targets: torch.Tensor):
    def batch_loss(params):
        return _loss_value(owner, loss, functional_call(model, (fixed, params), (inputs,)), targets)

    return batch_loss


def hutchinson_diagonal(model: nn.Module, batches: Iterable, *, probes: int = 32,
                        generator: torch.Generator | None = None, params: Sequence[str] | None = None,
                        loss: Loss | None = None, probe_chunk: int = 8) -> Estimate:
    """Hutchinson's estimate E[z * Hz] of the Hessian diagonal (module docstring): `probes`
    Rademacher probes per batch (>= 2, for the standard error), drawn on the CPU from
    `generator` (a torch.Generator; None: torch's global one), `probe_chunk` Hessian-vector
    products vmapped at a time. A batch's sample is the mean over its probes."""
    owner = f"{_OWNER}.hutchinson_diagonal"
    check_int(owner, "probes", probes, 2)
    check_int(owner, "probe_chunk", probe_chunk, 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    chosen = _resolve_params(owner, model, params)
    checked = check_batches(owner, batches)
    loss = F.cross_entropy if loss is None else loss
    names, fixed = list(chosen), _fixed(model, chosen)
    per_batch, variances, counts = [], [], []
    with _estimating(model):
        for inputs, targets in checked:
            gradient = grad(_batch_loss(owner, model, fixed, loss, inputs, targets))

            # Reverse over reverse (a vjp of the gradient: H z, H symmetric); forward-over-reverse
            # fails inside some losses' double-backward formulas (mse_loss: "ZeroTensors are immutable").
            _, probe = vjp(gradient, chosen)

            sums = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in chosen.items()}
            squares = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in chosen.items()}
            for start in range(0, probes, probe_chunk):
                size = min(probe_chunk, probes - start)
                z = {name: (torch.randint(0, 2, (size, *value.shape), generator=generator) * 2 - 1).to(value)
                     for name, value in chosen.items()}
                (products,) = vmap(probe)(z)
                for name in names:
                    value = (z[name] * products[name]).double()
                    sums[name] += value.sum(0)
                    squares[name] += value.square().sum(0)
            means = {name: sums[name] / probes for name in names}
            per_batch.append({name: means[name].to(chosen[name].dtype) for name in names})
            variances.append({name: ((squares[name] - probes * means[name].square()) / (probes - 1)).clamp(min=0.0)
                              for name in names})
            counts.append(len(inputs))
    total = sum(counts)
    samples = _stacked(per_batch, names)
    weights = [count / total for count in counts]
    stderr = {name: sum(w * w * v[name] for w, v in zip(weights, variances)).div(probes).sqrt().to(chosen[name].dtype)
              for name in names}
    return Estimate("hutchinson", _weighted_mean(samples, counts), stderr, samples, tuple(counts))


def exact_diagonal(model: nn.Module, batches: Iterable, *, params: Sequence[str] | None = None,
                   loss: Loss | None = None, limit: int = 4096) -> Estimate:
    """The exact Hessian diagonal (module docstring), from the full Hessian of each batch's
    loss over the chosen parameters flattened: for tiny models (at most `limit` parameters)."""
    owner = f"{_OWNER}.exact_diagonal"
    check_int(owner, "limit", limit, 1)
    chosen = _resolve_params(owner, model, params)
    checked = check_batches(owner, batches)
    loss = F.cross_entropy if loss is None else loss
    names, fixed = list(chosen), _fixed(model, chosen)
    sizes = [chosen[name].numel() for name in names]
    if sum(sizes) > limit:
        raise ValueError(f"{owner}: {sum(sizes)} parameters chosen, more than limit={limit} (the full Hessian is "
                         "their count squared): use fisher_diagonal or hutchinson_diagonal, or raise limit")
    flat = torch.cat([chosen[name].reshape(-1) for name in names])
    per_batch, counts = [], []
    with _estimating(model):
        for inputs, targets in checked:
            batch_loss = _batch_loss(owner, model, fixed, loss, inputs, targets)

            def flat_loss(vector):
                parts = vector.split(sizes)
                return batch_loss({name: part.reshape(chosen[name].shape) for name, part in zip(names, parts)})

            diagonal = jacrev(jacrev(flat_loss))(flat).diagonal().split(sizes)
            per_batch.append({name: part.reshape(chosen[name].shape) for name, part in zip(names, diagonal)})
            counts.append(len(inputs))
    samples = _stacked(per_batch, names)
    mean = _weighted_mean(samples, counts)
    return Estimate("exact", mean, {name: torch.zeros_like(value) for name, value in mean.items()}, samples,
                    tuple(counts))


ESTIMATORS = {"fisher": fisher_diagonal, "hutchinson": hutchinson_diagonal, "exact": exact_diagonal}


def hessian_diagonal(model: nn.Module, batches: Iterable, estimator: str = "fisher", **options) -> Estimate:
    """The estimator by name ("fisher", "hutchinson", "exact") with its keyword options."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"{_OWNER}: estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    return ESTIMATORS[estimator](model, batches, **options)


def effective_value(model: nn.Module, name: str) -> torch.Tensor:
    """The value parameter `name` computes with: w * m for a sparse layer's weight, else itself."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, SPARSE_MODULES) and attribute == "weight":
        return module.masked_weight().detach()
    return getattr(module, attribute).detach()


def obd_saliency(model: nn.Module, estimate: Estimate, *, per_batch: bool = False) -> dict[str, torch.Tensor]:
    """OBD saliency h_kk * w_k**2 / 2 of every parameter of `estimate` (w: the effective value,
    see `effective_value`; 0 at a sparse layer's pruned weights): from the estimate's mean, or
    with per_batch=True one saliency per batch, [B, *shape]."""
    if not isinstance(estimate, Estimate):
        raise TypeError(f"{_OWNER}.obd_saliency: estimate must be an Estimate, got {type(estimate).__name__}")
    named = dict(model.named_parameters())
    result = {}
    for name, value in (estimate.samples if per_batch else estimate.mean).items():
        if name not in named or named[name].shape != value.shape[per_batch:]:
            raise ValueError(f"{_OWNER}.obd_saliency: the estimate's {name} does not match a parameter of the model")
        weight = effective_value(model, name).to(value.dtype)
        result[name] = value * weight.square() / 2
    return result


__all__ = ["ESTIMATORS", "Estimate", "LABELS", "check_batches", "effective_value",
           "exact_diagonal", "fisher_diagonal", "hessian_diagonal", "hutchinson_diagonal", "obd_saliency",
           "weight_names"]
