"""RigL: Rigging the Lottery (Evci et al., ICML 2020), drop-and-grow sparse training."""

from __future__ import annotations

import torch
from torch import nn

from .pruner import Pruner
from .registry import register
from .schedules import CosineDecay, check_int, check_real
from .selection import LayerUnits


@register("rigl", "RigL (Evci et al. 2020): ERK random sparse init; every 100 steps until 75% of training drop the "
          "smallest |w|, grow the largest |dense gradient|",
          options={"drop_fraction": "alpha of the cosine-decayed drop fraction (0.3)",
                   "end": "fraction of total_steps of the last drop-and-grow update (0.75)"},
          common=("distribution", "include", "exclude", "update_every", "seed"))
class RigL(Pruner):
    """RigL (Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020).

    Initialization: a random mask at `sparsity` with ERK layer densities (`distribution`,
    drawn from the pruner's seeded generator). Every `update_every` (100) steps until `end`
    (0.75) of `total_steps`, per layer: drop the `k = round(f(t) * n_active)` active weights of
    smallest |w| and grow the `k` weights inactive before the drop with the largest |gradient|
    of the current batch (so no weight is dropped and grown at once), with the drop fraction
    `f(t) = drop_fraction / 2 * (1 + cos(pi * t / t_end))` (`schedules.CosineDecay`); the
    rounding of k and "inactive before the drop" are our definitions, as in `ops.rigl_update`.
    Grown weights and their optimizer state start at zero. Between updates the updates are
    masked and the weight gradients nonzero-only; the backward of an update step computes the
    dense weight gradient (`report().dense_gradient_steps` counts those steps). Call
    `pruner.step()` after `optimizer.step()` and before the next `zero_grad()`: it reads the
    step's gradient.

    An unstructured layer's drop and grow is one pass over it (`Pruner.drop_and_grow`) and its
    new mask is installed touching only the changed weights. Layouts: a block layer drops and
    grows whole blocks (scored by the L2 norm of |w| and of the gradient), a 2:4 layer keeps
    at most 2 of every 4 weights (growth fills the groups' free places).
    """

    update_rule = "masked"

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int, *, drop_fraction: float = 0.3,
                 end: float = 0.75, update_every: int = 100, distribution="erk", **kwargs):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        check_real(owner, "sparsity", sparsity, "[0, 1)")
        check_int(owner, "total_steps", total_steps, 1)
        check_real(owner, "drop_fraction", drop_fraction, "[0, 1]")
        check_real(owner, "end (a fraction of training)", end, "(0, 1]")
        check_int(owner, "update_every", update_every, 1)
        self.total_steps = total_steps
        self.drop_schedule = CosineDecay(end=max(1, round(end * total_steps)), alpha=drop_fraction)
        super().__init__(model, sparsity, update_every=update_every, update_until=self.drop_schedule.end,
                         distribution=distribution, **kwargs)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        return cls(model, sparsity, total_steps, optimizer=optimizer, **options)

    def due(self, step: int) -> bool:
        # Only whole periods: at the schedule's end the drop fraction is already 0.
        return not self.finalized and 0 < step <= self.update_until and step % self.update_every == 0

    def weight_grad_at(self, step: int) -> str | None:
        return "dense" if self.due(step) else super().weight_grad_at(step)

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        """The weights themselves: the drop ranks them by magnitude (|w|, in `select`)."""
        return layer.weight.detach()

    def growth_scores(self) -> dict[str, torch.Tensor]:
        """What grows, ranked by magnitude: the gradient of the current batch per layer (dense
        on update steps)."""
        grown = {}
        for name, layer in self.layers.items():
            if layer.weight.grad is None:
                raise RuntimeError(f"dynasparse.pruning.{type(self).__name__}: {name}.weight has no gradient at the "
                                   f"update of step {self.step_count}; call pruner.step() after optimizer.step() and "
                                   "before the next zero_grad()")
            grown[name] = layer.weight.grad.detach()
        return grown

    def select(self, scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        if not self.initialized:
            draws = {name: torch.rand(layer.weight.shape, generator=self.generator).to(layer.weight.device)
                     for name, layer in self.layers.items()}
            return self.select_masks(draws, sparsity=target)
        fraction = self.drop_schedule(self.step_count)
        growth = self.growth_scores()
        masks, counts = {}, {}
        for name, layer in self.layers.items():
            size = self.unit_size(name)
            units = self.active_weights(name) // size
            dropped = min(round(fraction * units), layer.weight.numel() // size - units)
            if LayerUnits(layer, self.granularity).kind == "weight":
                masks[name] = self.drop_and_grow(name, dropped, growth[name].to(layer.weight.dtype))
            else:
                counts[name] = (units * size, (units - dropped) * size)
        if counts:
            # Blocks and 2:4 groups: the kept units first, then the growth among the inactive ones.
            current = {name: self.layers[name].mask.clone() for name in counts}
            kept = self.select_masks({name: scores[name].abs() for name in counts},
                                     counts={name: keep for name, (_, keep) in counts.items()}, candidates=current)
            # The kept weights rank first, so a 2:4 group's free places go to the largest growth scores.
            ranked = {name: torch.where(kept[name], torch.inf, growth[name].abs().float()) for name in counts}
            masks.update(self.select_masks(ranked, counts={name: active for name, (active, _) in counts.items()},
                                           candidates={name: kept[name] | ~current[name] for name in counts}))
        return masks
