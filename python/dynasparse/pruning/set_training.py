"""SET: Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018)."""

from __future__ import annotations

import torch

from .registry import register
from .rigl import RigL


@register("set", "SET (Mocanu et al. 2018): RigL's schedule, random regrowth (seeded, the same on every rank)",
          options={"drop_fraction": "alpha of the cosine-decayed drop fraction (0.3)",
                   "end": "fraction of total_steps of the last drop-and-grow update (0.75)"},
          common=("distribution", "include", "exclude", "update_every", "seed"))
class SET(RigL):
    """SET (Mocanu et al., "Scalable training of artificial neural networks with adaptive
    sparse connectivity inspired by network science", 2018), on RigL's schedule as in the RigL
    paper's comparison (our definition): ERK random init, the cosine-decayed drop of the
    smallest |w| every `update_every` steps until `end` of training, and regrowth at random
    among the weights inactive before the drop, drawn from the pruner's seeded generator
    (identical on every rank). No step needs a dense gradient."""

    def weight_grad_at(self, step: int) -> str | None:
        return self.weight_grad

    def growth_scores(self) -> dict[str, torch.Tensor]:
        return {name: torch.rand(layer.weight.shape, generator=self.generator).to(layer.weight.device)
                for name, layer in self.layers.items()}
