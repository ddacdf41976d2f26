"""Sparsity distributions: how one global target sparsity is shared among the prunable layers.

A distribution turns scores (one tensor per layer, in selection units: weights, or rows for
structured pruning) and a global target sparsity into the kept masks. The total number kept is
always exactly `round(n_total * (1 - sparsity))` for `Global` and `ERK`; `Uniform` is exact per
layer (`round(n_layer * (1 - sparsity))` each). Selection is dynasparse's top-k: exact counts,
ties to the lower flat index (then the earlier layer for `Global`), deterministic everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import ops


def _kept_total(sizes: Sequence[int], sparsity: float) -> int:
    return round(sum(sizes) * (1.0 - sparsity))


def _largest_remainder(shares: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    """Integers near `shares`, each within [0, cap], summing exactly to `total` (<= sum(caps)):
    floors first, then one more to the largest remainders (lower layer index on ties)."""
    counts = [min(math.floor(share), cap) for share, cap in zip(shares, caps)]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    missing = total - sum(counts)
    while missing > 0:
        progressed = False
        for i in order:
            if missing and counts[i] < caps[i]:
                counts[i] += 1
                missing -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"dynasparse.pruning: cannot keep {total} units in layers of sizes {list(caps)}")
    return counts


class Distribution:
    """Base: per-layer keep counts from `keep_counts`, then a top-k per layer. Override
    `keep_counts` for another per-layer rule, or `select` for another kind of selection."""

    name = "custom"

    def keep_counts(self, sizes: Sequence[int], shapes: Sequence[torch.Size], sparsity: float) -> list[int]:
        """How many units to keep per layer: `sizes` are the numbers of selection units
        (weights, or rows for structured pruning), `shapes` the layers' weight shapes."""
        raise NotImplementedError

    def select(self, scores: Sequence[torch.Tensor], shapes: Sequence[torch.Size],
               sparsity: float) -> list[torch.Tensor]:
        """Kept masks (bool, shaped like each score tensor)."""
        counts = self.keep_counts([score.numel() for score in scores], shapes, sparsity)
        return [ops.topk_mask(score, k)[0] for score, k in zip(scores, counts)]


class Global(Distribution):
    """One threshold over all layers (`ops.topk_mask_global`): layer sparsities emerge."""

    name = "global"

    def select(self, scores, shapes, sparsity):
        masks, _ = ops.topk_mask_global(list(scores), _kept_total([s.numel() for s in scores], sparsity))
        return masks


class Uniform(Distribution):
    """Every layer at the target sparsity."""

    name = "uniform"

    def keep_counts(self, sizes, shapes, sparsity):
        return [round(size * (1.0 - sparsity)) for size in sizes]


class ERK(Distribution):
    """Erdos-Renyi-Kernel (Evci et al. 2020): the density of a layer with weight shape
    [n_out, n_in, k_h, k_w] (or [n_out, n_in]) is proportional to
    (n_in + n_out + k_h + k_w) / (n_in * n_out * k_h * k_w), rescaled so that the total hits the
    target; a layer that would exceed density 1 is kept dense and the rest rescaled again.
    Counts are rounded by largest remainder so that the total is exact. Structured units
    (rows) are shared in the same proportions."""

    name = "erk"

    def keep_counts(self, sizes, shapes, sparsity):
        raw = [sum(shape) / math.prod(shape) for shape in shapes]
        total = _kept_total(sizes, sparsity)
        dense: set[int] = set()
        while True:
            budget = total - sum(sizes[i] for i in dense)
            weight = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
            scale = budget / weight if weight > 0 else 0.0
            over = [i for i in range(len(sizes)) if i not in dense and scale * raw[i] > 1.0]
            if not over:
                break
            dense.add(max(over, key=lambda i: (raw[i], -i)))
        shares = [sizes[i] if i in dense else scale * raw[i] * sizes[i] for i in range(len(sizes))]
        return _largest_remainder(shares, sizes, total)


DISTRIBUTIONS = {cls.name: cls for cls in (Global, Uniform, ERK)}


def as_distribution(distribution: Distribution | str) -> Distribution:
    if isinstance(distribution, Distribution):
        return distribution
    if distribution in DISTRIBUTIONS:
        return DISTRIBUTIONS[distribution]()
    raise ValueError(f"dynasparse.pruning: unknown distribution {distribution!r}; choose one of "
                     f"{', '.join(DISTRIBUTIONS)} or pass a Distribution")
