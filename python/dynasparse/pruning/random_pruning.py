"""Random pruning: the control every pruning criterion must beat."""

from __future__ import annotations

import torch
from torch import nn

from .pruner import Pruner
from .registry import register
from .schedules import check_real


@register("random", "random pruning at initialization (the control; seeded), then masked training",
          common=("distribution", "include", "exclude", "granularity", "seed"), total_steps="unused")
class RandomPruning(Pruner):
    """Prunes uniformly at random (scores drawn from the pruner's own generator, seeded by
    `seed`, saved in its state_dict) among the active weights, so with a rising schedule a
    pruned weight never returns; masked mode. The schedule is any `schedules` object or a
    number (one-shot at initialization when `update_every=None`). `create("random", ...)`
    prunes once, at initialization, to `sparsity`."""

    update_rule = "masked"

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        check_real("dynasparse.pruning.create('random')", "sparsity", sparsity, "[0, 1)")
        return cls(model, sparsity, update_every=None, optimizer=optimizer, **options)

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        draws = torch.rand(layer.weight.shape, generator=self.generator).to(layer.weight.device)
        return torch.where(layer.mask, draws, -1.0)
