"""Neuron-level pruning: score output units (neurons, filters), select the kept ones, merge similar ones.

    scores = neurons.score(model, "fc1", "obd", batches=batches)       # one score per unit, higher = more important
    keep = neurons.select(model, 0.5, "l2", example_input=x)           # {layer: sorted kept indices}
    small = dynasparse.nn.shrink.shrink(model, keep, example_input=x)  # the physically smaller network
    merged = neurons.merge(model, 0.5, batches=batches)                # Srinivas & Babu merging, shrunk

What removing a unit means (as in dynasparse.nn.shrink): its contribution to every consumer is
gone, i.e. the input columns / channels it feeds in the next weight layers are zeroed. The
data-based scores gate the unit exactly there: a gate g_j (1 = present, 0 = removed) multiplies
the unit's positions in the input of every consumer weight layer (through a flatten: all its
flattened features), so that g_j = 0 is the shrunk network, also when a BatchNorm follows the
layer (zeroing the layer's output would leave the BatchNorm's shift).

Methods of `score`:
- "random": uniform draws from `generator` (None: torch's global generator).
- "l2": the L2 norm of the unit's incoming weights and its bias, sqrt(||W_j||**2 + b_j**2)
  (a sparse layer's effective weights w * m).
- "obd": neuron OBD. The second-order Taylor estimate of the loss change when the gate g_j goes
  from 1 to 0: -dL/dg_j + (1/2) d2L/dg_j**2, L the mean loss over every example of `batches`;
  the first derivative exact (autograd), the second by dynasparse.pruning.saliency's Hessian
  diagonal (option `hessian`: "fisher" (the empirical Fisher, the default), "hutchinson" or
  "exact"; `hessian_options` passed to it, e.g. {"probes": 64}).
- "damage": dropout-based damage. `K` (default 64) Monte-Carlo passes, each with every unit of
  the layer removed independently with probability `p` (default 0.5; removed = gate 0, the kept
  ones not rescaled), each pass computing the mean loss over all of `batches`; a unit's damage is
  the mean loss over the passes where it was removed minus that over the passes where it was
  kept. A unit never removed or never kept in the K passes has no estimate: an error (raise K).

Data-based methods take `batches`, an iterable of (inputs, targets) pairs, and `loss(outputs,
targets)` (a batch's mean loss; default F.cross_entropy); they run on a copy of the model in eval
mode (sparse layers as their dense w * m), the model itself untouched. `generator` draws the
random scores and the damage passes' masks.

The layers: by default every nn.Linear / nn.Conv whose units shrink can remove, i.e. whose
output reaches only consumers it can narrow (`prunable_layers`): not the classifier (its units
are the model's outputs), not a convolution feeding a residual addition alone.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.convert import densify
from ..nn.modules import SPARSE_MODULES
from ..nn.shrink import (WEIGHT_LAYERS, NotShrinkable, Traced, apply_plan, check_layer, plan, units_of,
                         weight_layer_names)
from . import saliency
from .schedules import check_int, check_real

_OWNER = "dynasparse.pruning.neurons"
METHODS = ("random", "l2", "obd", "damage")
DATA_METHODS = ("obd", "damage")
_GATE = "_dynasparse_neuron_gate"

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"{_OWNER}: unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_OWNER}: generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_batches(batches, method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if batches is None:
        raise ValueError(f"{_OWNER}: method {method!r} needs data: pass batches, an iterable of (inputs, targets)")
    return saliency.check_batches(_OWNER, batches)


def _consumers(traced: Traced, name: str, count: int) -> list[tuple[str, int, torch.Tensor]]:
    """(consumer weight layer, dimension, unit of each input position) of layer `name`'s units."""
    result = plan(traced, {name: torch.arange(count)})
    return [(consumer, state.dim, state.units) for consumer, state in result.inputs.items()
            if isinstance(traced.modules[consumer], WEIGHT_LAYERS)]


def _gated_copy(model: nn.Module, name: str, example_input) -> tuple[nn.Module, nn.Parameter]:
    """An eval-mode dense copy of `model` whose parameter `_GATE` (ones, one per unit of
    layer `name`) multiplies the unit's positions in every consumer's input."""
    count = units_of(check_layer(model, name, "layer_name"))
    consumers = _consumers(Traced(model, example_input), name, count)
    work = copy.deepcopy(model)
    densify(work)
    work.eval()
    for parameter in work.parameters():
        parameter.requires_grad_(False)
    reference = work.get_submodule(name).weight
    work.register_parameter(_GATE, nn.Parameter(torch.ones(count, dtype=reference.dtype, device=reference.device)))
    for consumer, dim, units in consumers:
        units = units.to(reference.device)

        def gate_input(module, args, dim=dim, units=units):
            x = args[0]
            shape = [1] * x.dim()
            shape[dim] = -1
            # Read through the module tree, so that torch.func.functional_call's substitute is used.
            return (x * getattr(work, _GATE)[units].reshape(shape), *args[1:])

        work.get_submodule(consumer).register_forward_pre_hook(gate_input)
    return work, getattr(work, _GATE)


def _mean_loss(work: nn.Module, checked, loss: Loss) -> torch.Tensor:
    total = sum(len(x) for x, _ in checked)
    return sum(saliency._loss_value(_OWNER, loss, work(x), y) * (len(x) / total) for x, y in checked)


def _obd(model, name, checked, loss, hessian: str = "fisher", hessian_options: Mapping | None = None):
    if hessian not in saliency.ESTIMATORS:
        raise ValueError(f"{_OWNER}: hessian must be one of {', '.join(saliency.ESTIMATORS)}, got {hessian!r}")
    work, gate = _gated_copy(model, name, checked[0][0])
    with torch.enable_grad():
        gradient, = torch.autograd.grad(_mean_loss(work, checked, loss), gate)
    estimate = saliency.hessian_diagonal(work, checked, hessian, params=[_GATE], loss=loss,
                                         **dict(hessian_options or {}))
    return -gradient + estimate.mean[_GATE] / 2


def _damage(model, name, checked, loss, generator, K: int = 64, p: float = 0.5):
    check_int(_OWNER, "K", K, 2)
    check_real(_OWNER, "p", p, "(0, 1)")
    work, gate = _gated_copy(model, name, checked[0][0])
    count = gate.numel()
    removed_sum = torch.zeros(count, dtype=torch.float64)
    kept_sum = torch.zeros(count, dtype=torch.float64)
    removed_passes = torch.zeros(count, dtype=torch.int64)
    with torch.no_grad():
        for _ in range(K):
            removed = torch.rand(count, generator=generator) < p
            gate.copy_((~removed).to(gate.dtype))
            value = float(_mean_loss(work, checked, loss))
            removed_sum += removed.double() * value
            kept_sum += (~removed).double() * value
            removed_passes += removed
    kept_passes = K - removed_passes
    missing = ((removed_passes == 0) | (kept_passes == 0)).nonzero().flatten()
    if len(missing):
        raise ValueError(f"{_OWNER}: damage: units {missing[:8].tolist()} of {name!r} were never removed or never kept "
                         f"in K={K} passes at p={p}: raise K")
    return (removed_sum / removed_passes - kept_sum / kept_passes).to(gate.dtype)


def _l2(module: nn.Module) -> torch.Tensor:
    weight = module.masked_weight() if isinstance(module, SPARSE_MODULES) else module.weight
    squares = weight.detach().reshape(weight.shape[0], -1).square().sum(1)
    if module.bias is not None:
        squares = squares + module.bias.detach().square()
    return squares.sqrt()


def score(model: nn.Module, layer_name: str, method: str, *, batches: Iterable | None = None,
          generator: torch.Generator | None = None, **options) -> torch.Tensor:
    """One score per output unit of layer `layer_name`, higher = more important (see the module
    docstring for the methods). Options: `loss` (obd, damage); `hessian`, `hessian_options`
    (obd); `K`, `p` (damage)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be an nn.Module, got {type(model).__name__}")
    _check_method(method)
    _check_generator(generator)
    module = check_layer(model, layer_name, "layer_name")
    allowed = {"random": (), "l2": (), "obd": ("loss", "hessian", "hessian_options"), "damage": ("loss", "K", "p")}
    unknown = sorted(set(options) - set(allowed[method]))
    if unknown:
        raise TypeError(f"{_OWNER}: method {method!r} takes no option(s) {', '.join(unknown)}; its options are "
                        f"{', '.join(allowed[method]) or 'none'}")
    if method == "random":
        return torch.rand(units_of(module), generator=generator)
    if method == "l2":
        return _l2(module)
    checked = _check_batches(batches, method)
    loss = options.pop("loss", None) or F.cross_entropy
    if method == "obd":
        return _obd(model, layer_name, checked, loss, **options)
    return _damage(model, layer_name, checked, loss, generator, **options)


def prunable_layers(model: nn.Module, *, example_input=None) -> list[str]:
    """The weight layers whose units shrink can remove (each alone); see the module docstring."""
    traced = Traced(model, example_input)
    names = []
    for name in weight_layer_names(model):
        module = traced.modules[name]
        if isinstance(module, SPARSE_MODULES) and module._layout_kind != "unstructured" \
                or getattr(module, "groups", 1) != 1:
            continue
        try:
            plan(traced, {name: torch.arange(units_of(module))})
        except NotShrinkable:
            continue
        names.append(name)
    return names


def _layers(model: nn.Module, layers, fraction, example_input) -> list[str]:
    if layers is None and isinstance(fraction, Mapping):
        layers = list(fraction)
    if layers is None:
        found = prunable_layers(model, example_input=example_input)
        if not found:
            raise ValueError(f"{_OWNER}: the model has no layer whose units can be removed (see "
                             "dynasparse.nn.shrink for what is supported)")
        return found
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise TypeError(f"{_OWNER}: layers must be a list of layer names, got {layers!r}")
    for name in layers:
        check_layer(model, name, "layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{_OWNER}: layers names a layer twice: {list(layers)}")
    return list(layers)


def _fractions(fraction, layers: list[str]) -> dict[str, float]:
    if isinstance(fraction, Mapping):
        extra = sorted(set(fraction) - set(layers))
        missing = sorted(set(layers) - set(fraction))
        if extra or missing:
            raise ValueError(f"{_OWNER}: fraction is a dict whose keys must be the layers; "
                             f"{'not in layers: ' + ', '.join(extra) if extra else ''}"
                             f"{' missing: ' + ', '.join(missing) if missing else ''}")
        values = dict(fraction)
    else:
        values = {name: fraction for name in layers}
    for name, value in values.items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise TypeError(f"{_OWNER}: fraction must be a number in [0, 1) (or a dict of them), got {value!r}")
        check_real(_OWNER, f"fraction for {name!r}", value, "[0, 1)")
    return values


def removed_count(fraction: float, units: int) -> int:
    """Units removed at `fraction` of `units`: round(fraction * units), at most units - 1
    (a layer keeps at least one unit)."""
    return min(round(fraction * units), units - 1)


def _example(batches: list | None, example_input):
    # Checked batches (a list of pairs) give their first inputs.
    if example_input is not None or not batches:
        return example_input
    return batches[0][0]


def select(model: nn.Module, fraction, method: str, *, layers: Sequence[str] | None = None,
           batches: Iterable | None = None, generator: torch.Generator | None = None,
           **options) -> dict[str, torch.Tensor]:
    """{layer: sorted int64 indices of the KEPT units}: per layer the units with the highest
    `score`, removing `removed_count(fraction, units)` of them (ties: the lower index stays).
    `fraction`: the fraction of units removed, a number in [0, 1) or {layer: number};
    `layers`: default `prunable_layers` (or the keys of a dict `fraction`). Options: those of
    `score`, and `example_input` (the forward's input, for the shapes of a flatten; by default
    the first batch's inputs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be an nn.Module, got {type(model).__name__}")
    _check_method(method)
    _check_generator(generator)
    if method in DATA_METHODS or batches is not None:
        batches = _check_batches(batches, method)
    example_input = _example(batches, options.pop("example_input", None))
    names = _layers(model, layers, fraction, example_input)
    fractions = _fractions(fraction, names)
    kept = {}
    for name in names:
        scores = score(model, name, method, batches=batches, generator=generator, **options)
        if bool(torch.isnan(scores).any()):
            raise ValueError(f"{_OWNER}: method {method!r} gave NaN scores for layer {name!r}")
        keep = len(scores) - removed_count(fractions[name], len(scores))
        order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
        kept[name] = torch.sort(order[:keep]).values
    return kept


def _outgoing(module: nn.Module, units: torch.Tensor) -> torch.Tensor:
    """The consumer's weight as [input positions, ...]: row k holds the weights reading position k."""
    if isinstance(module, SPARSE_MODULES):
        raise NotShrinkable(f"{_OWNER}: merge adds outgoing weights, which a sparse consumer's mask may not hold; "
                            "densify the model first")
    return module.weight.detach().transpose(0, 1)


def _merge_layer(model: nn.Module, name: str, fraction: float, example_input) -> nn.Module:
    module = check_layer(model, name, "layers")
    count = units_of(module)
    traced = Traced(model, example_input)
    result = plan(traced, {name: torch.arange(count)})
    passed = [other for other in result.inputs if not isinstance(traced.modules[other], WEIGHT_LAYERS)]
    if passed:
        raise NotShrinkable(f"{_OWNER}: merge of {name!r}: its units pass through {', '.join(passed)} (per-channel "
                            "parameters) before their consumers, so merged units would not compute alike")
    work = copy.deepcopy(model)
    consumers = [(work.get_submodule(consumer), state.units) for consumer, state in result.inputs.items()]
    outgoing = [(_outgoing(consumer, units), units.to(consumer.weight.device)) for consumer, units in consumers]
    weight = module.masked_weight() if isinstance(module, SPARSE_MODULES) else module.weight
    theta = weight.detach().reshape(count, -1).double()
    if module.bias is not None:
        theta = torch.cat([theta, module.bias.detach().double()[:, None]], 1)
    distance = torch.cdist(theta, theta, compute_mode="donot_use_mm_for_euclid_dist").square()
    positions = [[(units == unit).nonzero().flatten() for unit in range(count)] for _, units in outgoing]

    def mean_square(unit: int) -> torch.Tensor:
        parts = [weights[rows[unit]].double().square() for (weights, _), rows in zip(outgoing, positions)]
        return sum(part.sum() for part in parts) / sum(part.numel() for part in parts)

    squares = torch.stack([mean_square(unit) for unit in range(count)])
    cost = squares[None, :] * distance
    cost.fill_diagonal_(float("inf"))
    alive = torch.ones(count, dtype=torch.bool, device=distance.device)
    with torch.no_grad():
        for _ in range(removed_count(fraction, count)):
            target, source = divmod(int(torch.argmin(cost)), count)
            for (weights, _), rows in zip(outgoing, positions):
                weights[rows[target]] += weights[rows[source]]
            alive[source] = False
            cost[source, :] = float("inf")
            cost[:, source] = float("inf")
            cost[:, target] = torch.where(alive, mean_square(target) * distance[:, target], float("inf"))
            cost[target, target] = float("inf")
    # The consumers' weights were changed in place through their transposed views.
    return apply_plan(work, plan(Traced(work, example_input), {name: alive.nonzero().flatten().cpu()}))


def merge(model: nn.Module, fraction, *, layers: Sequence[str] | None = None, batches: Iterable | None = None,
          example_input=None) -> nn.Module:
    """Srinivas & Babu (2015) neuron merging, returning the physically smaller model (the model
    itself untouched). For units i, j of a layer, the cost of removing j into i is
    <a_j**2> * ||[W_i, b_i] - [W_j, b_j]||**2: [W, b] a unit's incoming weights (effective
    weights of a sparse layer) and bias, and <a_j**2> the mean of the squares of every outgoing
    weight of j, over all its consumers' weights that read its positions (all output units, all
    kernel taps, all flattened features of a filter). Greedily, the cheapest pair is merged (ties: the
    lowest i, then j): i's outgoing weights += j's, j removed (<a_i**2> recomputed), until
    `removed_count(fraction, units)` units are gone. Layers one after the other in the order
    given (default `prunable_layers`); `fraction` a number in [0, 1) or {layer: number}.
    `batches` (or `example_input`) give the shapes a flatten needs. Refused (NotShrinkable): a
    layer whose units pass through a BatchNorm (its per-channel parameters make merged units
    differ), sparse consumers (their masks)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be an nn.Module, got {type(model).__name__}")
    if batches is not None:
        batches = saliency.check_batches(_OWNER, batches)
    example_input = _example(batches, example_input)
    names = _layers(model, layers, fraction, example_input)
    fractions = _fractions(fraction, names)
    merged = model
    for name in names:
        merged = _merge_layer(merged, name, fractions[name], example_input)
    return merged


__all__ = ["DATA_METHODS", "METHODS", "merge", "prunable_layers", "removed_count", "score", "select"]
