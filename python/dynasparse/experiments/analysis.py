"""Analyses of trained models and populations: plain functions on tensors, masks and numbers.

Outputs are logits [N, C] or predicted labels [N]; masks are bool tensors (kept = True) or
dicts layer name -> mask, as `masks(model_or_checkpoint)` returns them.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import ops
from ..nn import load
from ..nn.modules import SPARSE_MODULES

_OWNER = "dynasparse.experiments.analysis"
Masks = torch.Tensor | Mapping[str, torch.Tensor]


def logits(model: nn.Module, inputs: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs on `inputs` in eval mode, without gradients, in chunks; the
    model's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if len(inputs) == 0:
                return model(inputs)
            return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])
    finally:
        model.train(was_training)


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The sparse layers of `model` by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, SPARSE_MODULES)}


def _labels(name: str, outputs: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"{_OWNER}: {name} must be a tensor, got {type(outputs).__name__}")
    if outputs.dim() == 2:
        return outputs.argmax(1)
    if outputs.dim() == 1 and not outputs.is_floating_point():
        return outputs
    raise ValueError(f"{_OWNER}: {name} must be logits [N, C] or integer labels [N], got a "
                     f"{outputs.dtype} tensor of shape {list(outputs.shape)}")


def _paired(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _labels(name_a, a), _labels(name_b, b)
    if len(a) != len(b):
        raise ValueError(f"{_OWNER}: {name_a} has {len(a)} examples, {name_b} {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{_OWNER}: {name_a} and {name_b} hold no examples")
    return a, b.to(a.device)


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose prediction (argmax of logits, or the label given) is the label."""
    predicted, labels = _paired("outputs", outputs, "labels", labels)
    return float((predicted == labels).double().mean())


def agreement(outputs_a: torch.Tensor, outputs_b: torch.Tensor) -> float:
    """Fraction of inputs on which two models predict the same class (our definition for the
    Model Zoo Twins: argmax equality)."""
    a, b = _paired("outputs_a", outputs_a, "outputs_b", outputs_b)
    return float((a == b).double().mean())


def correlations(x: Sequence[float], y: Sequence[float]) -> dict:
    """Pearson and Spearman correlation of two paired samples (scipy.stats) with their
    two-sided p-values. Either is NaN when a sample is constant (undefined)."""
    from scipy import stats

    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"{_OWNER}: x has {len(x)} values, y {len(y)}")
    if len(x) < 3:
        raise ValueError(f"{_OWNER}: a correlation needs at least 3 pairs, got {len(x)}")
    if not all(math.isfinite(v) for v in x + y):
        raise ValueError(f"{_OWNER}: x and y must be finite numbers")
    if len(set(x)) == 1 or len(set(y)) == 1:
        return {"n": len(x), "pearson": math.nan, "pearson_p": math.nan, "spearman": math.nan,
                "spearman_p": math.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {"n": len(x), "pearson": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
            "spearman": float(spearman.statistic), "spearman_p": float(spearman.pvalue)}


# -- masks ---------------------------------------------------------------------------------

def masks(source: nn.Module | str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks of the sparse layers, by layer name: from a model, a dynasparse checkpoint
    path, or a state_dict (its "<layer>.mask" entries)."""
    if isinstance(source, nn.Module):
        return {name: module.mask.detach().clone() for name, module in sparse_layers(source).items()}
    if isinstance(source, (str, os.PathLike)):
        source = load(None, source)
    if not isinstance(source, Mapping):
        raise TypeError(f"{_OWNER}: source must be a model, a checkpoint path or a state_dict, got "
                        f"{type(source).__name__}")
    return {key[:-len(".mask")] if key.endswith(".mask") else "": value for key, value in source.items()
            if (key == "mask" or key.endswith(".mask")) and value.dtype == torch.bool}


def _mask_pairs(a: Masks, b: Masks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        pairs = [("mask", a, b)]
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise ValueError(f"{_OWNER}: the masks are of different layers: {sorted(a)} vs {sorted(b)}")
        pairs = [(name, a[name], b[name]) for name in sorted(a)]
    else:
        raise TypeError(f"{_OWNER}: masks must be two bool tensors or two dicts of them, got "
                        f"{type(a).__name__} and {type(b).__name__}")
    for name, x, y in pairs:
        if x.dtype != torch.bool or y.dtype != torch.bool:
            raise TypeError(f"{_OWNER}: mask {name!r} must be bool, got {x.dtype} and {y.dtype}")
        if x.shape != y.shape:
            raise ValueError(f"{_OWNER}: mask {name!r} has shapes {list(x.shape)} and {list(y.shape)}")
    return [(x, y.to(x.device)) for _, x, y in pairs]


def mask_iou(a: Masks, b: Masks) -> float:
    """Intersection over union of the kept weights of two masks (over all layers of two mask
    dicts): 1.0 when both keep nothing (equal empty sets)."""
    pairs = _mask_pairs(a, b)
    both = sum(int((x & y).sum()) for x, y in pairs)
    either = sum(int((x | y).sum()) for x, y in pairs)
    return both / either if either else 1.0


def flip_rate(a: Masks, b: Masks) -> float:
    """Fraction of positions whose mask bit differs between two masks (0 for empty masks)."""
    pairs = _mask_pairs(a, b)
    total = sum(x.numel() for x, _ in pairs)
    return sum(int((x != y).sum()) for x, y in pairs) / total if total else 0.0


def flip_rates(sequence: Sequence[Masks]) -> list[float]:
    """Flip rate between each mask of a sequence (e.g. the masks at successive updates) and the next."""
    return [flip_rate(a, b) for a, b in zip(sequence[:-1], sequence[1:])]


def layer_sparsity(layer_masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of pruned weights per layer (0 for an empty layer)."""
    return {name: int((~mask).sum()) / mask.numel() if mask.numel() else 0.0 for name, mask in layer_masks.items()}


def sparsity_distribution(population: Sequence[Mapping[str, float]]) -> dict[str, dict]:
    """Per layer, the mean, standard deviation (n - 1), min and max of its sparsity over a
    population of `layer_sparsity` dicts (every layer present in all of them)."""
    if not population:
        raise ValueError(f"{_OWNER}: the population is empty")
    names = set(population[0])
    if any(set(entry) != names for entry in population):
        raise ValueError(f"{_OWNER}: the models of the population have different layers")
    result = {}
    for name in sorted(names):
        values = [float(entry[name]) for entry in population]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        result[name] = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}
    return result


# -- pruning further and size --------------------------------------------------------------

def further_pruning_curve(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor],
                          fractions: Sequence[float]) -> list[dict]:
    """Accuracy after pruning a further fraction q of the remaining weights without retraining
    (Van Gelder et al.'s robustness experiment): for each q, on a copy of the model, the
    active weights of smallest |w| under one global threshold over the sparse layers are
    pruned, round(q * active) of them. Returns [{"fraction": q, "sparsity", "accuracy"}]."""
    for q in fractions:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
            raise ValueError(f"{_OWNER}: fractions must be numbers in [0, 1], got {q!r}")
    if not sparse_layers(model):
        raise ValueError(f"{_OWNER}: the model has no sparse layers to prune further (a dense model: sparsify it "
                         "first, or prune it with a method)")
    inputs, labels = split
    curve = []
    for q in fractions:
        pruned = copy.deepcopy(model)
        layers = list(sparse_layers(pruned).values())
        active = sum(int(layer.mask.sum()) for layer in layers)
        numel = sum(layer.mask.numel() for layer in layers)
        keep = active - round(q * active)
        scores = [torch.where(layer.mask, layer.weight.detach().abs(), -1.0).float() for layer in layers]
        kept, _ = ops.topk_mask_global(scores, keep)
        with torch.no_grad():
            for layer, mask in zip(layers, kept):
                layer.set_mask(mask & layer.mask)
        curve.append({"fraction": float(q), "sparsity": 1.0 - keep / numel if numel else 0.0,
                      "accuracy": accuracy(logits(pruned, inputs), labels)})
    return curve


INDEX_CODES = ("position", "bitmask")


def size_in_bits(model: nn.Module, *, value_bits: int = 32, index: str = "position") -> int:
    """Storage of the model's parameters: dense tensors numel x value_bits; a sparse layer's
    weight nonzeros x (value_bits + index bits), the index of a kept weight being its flat
    position, ceil(log2(numel)) bits ("position", the rule of Harang & Sanders' size
    comparison), or one bit per weight for the whole layer ("bitmask": numel + nonzeros x
    value_bits). Buffers (masks, batch-norm statistics) are not counted."""
    if isinstance(value_bits, bool) or not isinstance(value_bits, int) or value_bits < 1:
        raise ValueError(f"{_OWNER}: value_bits must be an int >= 1, got {value_bits!r}")
    if index not in INDEX_CODES:
        raise ValueError(f"{_OWNER}: index must be one of {', '.join(INDEX_CODES)}, got {index!r}")
    sparse = {id(layer.weight): layer.mask for layer in sparse_layers(model).values()}
    bits = 0
    for parameter in model.parameters():
        mask = sparse.get(id(parameter))
        if mask is None:
            bits += parameter.numel() * value_bits
            continue
        numel, nonzero = mask.numel(), int(mask.sum())
        if index == "bitmask":
            bits += numel + nonzero * value_bits
        else:
            bits += nonzero * (value_bits + max(1, math.ceil(math.log2(numel))))
    return bits
