"""Layout-aware selection: scores -> kept masks, by a target sparsity, by counts or by a threshold.

A layer's selection *units* follow its layout and the pruner's granularity:
- weights (unstructured layers);
- blocks (block layers): a block's score is the L2 norm of its scores (`ops.block_scores`);
- rows (`granularity="row"`, output neurons / filters): the L2 norm of the row's scores;
- weights of a 2:4 layer, restricted to the 2 largest scores of every group of 4 (`ops.nm_mask`),
  so the layer holds at most half its weights: a count above that is met in 2:4 groups, capped.

Block and row scores are signed norms (`signed_norm`): units the masked algorithms mark pruned
with negative scores stay below every live unit.

Every selection is exact (dynasparse's top-k: ties to the lower flat index) and deterministic,
so every rank computes the same masks from the same scores (the pruner broadcasts them anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import ops


def signed_norm(norm: Callable[[torch.Tensor], torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """A unit's score (a row, a block): the L2 `norm` of its nonnegative scores minus that of
    its negative ones. For |w| that is the unit's L2 norm; units the masked algorithms mark as
    pruned (scores -1, see magnitude.active_magnitude) stay below every live one, where a
    plain norm would rank them among the largest and revive them."""
    return norm(scores.clamp(min=0)) - norm(scores.clamp(max=0))


class LayerUnits:
    """The selection units of one sparse layer (see the module docstring).

    `kind`: "weight", "block", "row" or "2:4"; `size`: weights per unit; `count`: units in the
    layer. `scores(s)` maps weight-shaped scores to unit scores, `candidates(c)` a weight-shaped
    bool mask to the units wholly inside it, `expand(u)` a unit mask to the layer's mask, and
    `spread(u)` unit scores to one score per weight (a block's score divided by the block size,
    the root mean square for |w|, so one global threshold compares it with single weights;
    rows stay rows: a distribution over rows shares rows)."""

    def __init__(self, layer: nn.Module, granularity: str):
        self.layer = layer
        numel = layer.weight.numel()
        if granularity == "row":
            self.kind, self.size = "row", numel // max(layer.weight.shape[0], 1)
        elif layer._layout_kind == "block":
            self.kind, self.size = "block", layer._block ** 2
        else:
            self.kind, self.size = ("2:4" if layer._layout_kind == "2:4" else "weight"), 1
        self.count = layer.weight.shape[0] if self.kind == "row" else numel // self.size

    def scores(self, scores: torch.Tensor) -> torch.Tensor:
        if self.kind == "row":
            return signed_norm(ops.row_scores, scores)
        if self.kind == "block":
            block = self.layer._block
            return signed_norm(lambda part: ops.block_scores(part, block), self.layer.as_matrix(scores))
        return self.layer.as_matrix(scores) if self.kind == "2:4" else scores

    def candidates(self, candidates: torch.Tensor) -> torch.Tensor:
        if self.kind == "row":
            return candidates.reshape(candidates.shape[0], -1).all(1)
        if self.kind == "block":
            block = self.layer._block
            tiles = self.layer.as_matrix(candidates)
            n, k = tiles.shape
            return tiles.reshape(n // block, block, k // block, block).all(3).all(1)
        return self.layer.as_matrix(candidates) if self.kind == "2:4" else candidates

    def layout_candidates(self, unit_scores: torch.Tensor) -> torch.Tensor | None:
        """The units the layout allows for these scores (2:4: the 2 largest of every group)."""
        return ops.nm_mask(unit_scores, 2, 4) if self.kind == "2:4" else None

    def expand(self, units: torch.Tensor) -> torch.Tensor:
        if self.kind == "row":
            return ops.expand_row_mask(units, self.layer.weight.shape).contiguous()
        if self.kind == "block":
            return self.layer._from_2d(ops.expand_block_mask(units, self.layer._block))
        return self.layer._from_2d(units) if self.kind == "2:4" else units

    def spread(self, unit_scores: torch.Tensor) -> torch.Tensor:
        if self.kind == "block":
            block = self.layer._block
            return self.layer._from_2d(ops.expand_block_mask(unit_scores / block, block))
        return unit_scores
