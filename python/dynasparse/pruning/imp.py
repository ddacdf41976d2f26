"""IMP: iterative magnitude pruning with rewinding (lottery tickets; Frankle & Carbin 2019, Frankle et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from .magnitude import active_magnitude
from .pruner import Pruner
from .registry import register
from .schedules import check_int, check_real


@register("imp", "IMP / lottery tickets: rounds of training, prune 20% of the remaining |w| (global), rewind the "
          "survivors to step k (0: the initial weights), retrain",
          options={"prune_fraction": "fraction of the remaining weights pruned per round (0.2)",
                   "rewind_step": "the step whose weights the survivors are rewound to (0: initialization)",
                   "round_steps": "training steps per round (default: total_steps // (rounds + 1))"},
          common=("distribution", "include", "exclude", "granularity"), total_steps="optional")
class IMP(Pruner):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin, "The Lottery Ticket
    Hypothesis", ICLR 2019; rewinding to step k: Frankle et al., "Linear Mode Connectivity and
    the Lottery Ticket Hypothesis", ICML 2020).

    Round r (r = 1..R) ends at step r * round_steps: the smallest |w| among the active weights
    (one global threshold by default) are pruned so that round(n * (1 - prune_fraction)**r)
    stay, the last round exactly at `sparsity` (R is the fewest rounds reaching it); then every
    parameter of the model is rewound to its value at `rewind_step` (our definition: biases
    and unpruned layers too, as the lottery-ticket reset; buffers such as batch-norm
    statistics are not), pruned weights stay zero, and the optimizer state of every parameter
    is zeroed (a fresh start; a learning-rate schedule is the caller's to rewind, `round` is
    in `report().notes`). After round R the model trains to the end. Masked throughout; the
    rewind point is in `state_dict()`.
    """

    update_rule = "masked"
    state_attributes = ("rewind_point",)

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int | None = None, *,
                 prune_fraction: float = 0.2, rewind_step: int = 0, round_steps: int | None = None, **kwargs):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        check_real(owner, "sparsity", sparsity, "[0, 1)")
        check_real(owner, "prune_fraction", prune_fraction, "(0, 1)")
        check_int(owner, "rewind_step", rewind_step, 0)
        rounds, kept = 0, 1.0
        while kept > 1.0 - sparsity + 1e-12:
            kept, rounds = kept * (1.0 - prune_fraction), rounds + 1
        if round_steps is None:
            if total_steps is None:
                raise ValueError(f"{owner}: give total_steps (the rounds share it) or round_steps")
            check_int(owner, "total_steps", total_steps, 1)
            round_steps = total_steps // (rounds + 1)
            if round_steps < 1:
                raise ValueError(f"{owner}: total_steps={total_steps} is shorter than the {rounds + 1} rounds "
                                 f"(training and {rounds} prune-and-retrain rounds) that sparsity {sparsity} needs")
        check_int(owner, "round_steps", round_steps, 1)
        if rewind_step >= round_steps:
            raise ValueError(f"{owner}: rewind_step ({rewind_step}) must come before the first prune, at round_steps "
                             f"({round_steps})")
        self.final, self.prune_fraction, self.rewind_step = sparsity, prune_fraction, rewind_step
        self.rounds, self.round_steps = rounds, round_steps
        self.rewind_point: dict[str, torch.Tensor] | None = None
        super().__init__(model, sparsity, update_every=None, **kwargs)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        return cls(model, sparsity, total_steps, optimizer=optimizer, **options)

    def round_at(self, step: int) -> int:
        """Prune rounds completed at `step`."""
        return min(step // self.round_steps, self.rounds)

    def target_at(self, step: int) -> float:
        done = self.round_at(step)
        return self.final if done >= self.rounds else 1.0 - (1.0 - self.prune_fraction) ** done

    def due(self, step: int) -> bool:
        return not self.finalized and step % self.round_steps == 0 and 1 <= step // self.round_steps <= self.rounds

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        return active_magnitude(layer)

    def after_update(self, masks) -> None:
        if self.step_count == 0:
            if self.rewind_step == 0:
                self._keep_rewind_point()
        else:
            self._rewind()

    def after_step(self, step: int) -> None:
        if step == self.rewind_step:
            self._keep_rewind_point()

    def report_notes(self) -> dict[str, object]:
        return {"round": self.round_at(self.step_count), "rounds": self.rounds, "round_steps": self.round_steps}

    def _keep_rewind_point(self) -> None:
        self.rewind_point = {name: param.detach().clone() for name, param in self.model.named_parameters()}

    @torch.no_grad()
    def _rewind(self) -> None:
        params = dict(self.model.named_parameters())
        if self.rewind_point is None or set(self.rewind_point) != set(params):
            raise RuntimeError(f"dynasparse.pruning.{type(self).__name__}: no rewind point for the model's parameters "
                               f"(kept at step {self.rewind_step})")
        for name, param in params.items():
            param.copy_(self.rewind_point[name])
            if self.optimizer is not None and hasattr(self.optimizer, "reset_state") and self.optimizer.owns(param):
                self.optimizer.reset_state(param, torch.ones_like(param, dtype=torch.bool))
        for layer in self.layers.values():
            layer.weight.masked_fill_(~layer.mask, 0.0)
