"""Random pruning: the control every pruning criterion must beat."""

from __future__ import annotations

import torch
from torch import nn

from .pruner import Pruner


class RandomPruning(Pruner):
    """Prunes uniformly at random (scores drawn from the pruner's own generator, seeded by
    `seed`, saved in its state_dict) among the active weights, so with a rising schedule a
    pruned weight never returns; masked mode. The schedule is any `schedules` object or a
    number (one-shot at construction when `update_every=None`)."""

    grad_mode = "masked"

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        draws = torch.rand(layer.weight.shape, generator=self.generator).to(layer.weight.device)
        return torch.where(layer.mask, draws, -1.0)
