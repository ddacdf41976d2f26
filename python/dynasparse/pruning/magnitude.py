"""Magnitude pruning: one-shot (optionally fine-tuned with the mask fixed) and gradual (Zhu & Gupta)."""

from __future__ import annotations

import torch
from torch import nn

from .pruner import Pruner
from .registry import register
from .schedules import Cubic, check_int, check_real


def active_magnitude(layer: nn.Module) -> torch.Tensor:
    """|w| on active weights, -1 on pruned ones: below every magnitude, so a weight once pruned
    is never chosen again while the target keeps rising (ties among zeros cannot revive one)."""
    return torch.where(layer.mask, layer.weight.detach().abs(), -1.0)


@register("oneshot", "one-shot magnitude pruning at initialization (global |w|), then masked fine-tuning",
          common=("distribution", "include", "exclude", "granularity", "seed"), total_steps="unused")
class OneShotMagnitude(Pruner):
    """Magnitude pruning (our definition for the Model Zoo Twins comparison): at
    initialization, keep the largest |w| under one global threshold over the prunable conv and
    linear weights (biases excluded), prune the rest to zero. Then train on for masked
    fine-tuning (pruned weights and their optimizer state stay zero), or evaluate at once for
    no fine-tuning."""

    update_rule = "masked"

    def __init__(self, model: nn.Module, sparsity: float, **kwargs):
        check_real(f"dynasparse.pruning.{type(self).__name__}", "sparsity", sparsity, "[0, 1)")
        super().__init__(model, sparsity, update_every=None, **kwargs)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        return cls(model, sparsity, optimizer=optimizer, **options)


@register("gradual", "gradual magnitude pruning (Zhu & Gupta 2017): masked, cubic ramp, pruned weights never return",
          options={"start": "fraction of total_steps where the ramp starts (0.0)",
                   "end": "fraction of total_steps where it reaches the target; the mask is fixed after (0.75)"},
          common=("distribution", "include", "exclude", "update_every", "granularity", "seed"))
class GradualMagnitude(Pruner):
    """Gradual magnitude pruning (Zhu & Gupta 2017) in masked mode: every `update_every` steps
    from `start` to `end` (fractions of `total_steps`), the active weights of smallest |w| are
    pruned up to the cubic schedule's sparsity; a pruned weight never returns. The mask is
    fixed after `end`."""

    update_rule = "masked"

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int, *, start: float = 0.0,
                 end: float = 0.75, update_every: int = 16, **kwargs):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        check_real(owner, "sparsity", sparsity, "[0, 1)")
        check_int(owner, "total_steps", total_steps, 1)
        check_real(owner, "start (a fraction of training)", start, "[0, 1]")
        check_real(owner, "end (a fraction of training)", end, "[0, 1]")
        if not start < end:
            raise ValueError(f"{owner}: need 0 <= start < end <= 1 (fractions of training), got start={start!r}, "
                             f"end={end!r}")
        first, last = round(start * total_steps), max(round(end * total_steps), round(start * total_steps) + 1)
        super().__init__(model, Cubic(sparsity, end=last, start=first), update_every=update_every,
                         update_until=last, **kwargs)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        return cls(model, sparsity, total_steps, optimizer=optimizer, **options)

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        return active_magnitude(layer)
