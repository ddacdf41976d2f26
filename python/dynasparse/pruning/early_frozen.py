"""Early-frozen RigL and DNW: mask updates only early in training, then sparse-only training.

Van Gelder, Wortsman, Ehsani ("Deconstructing the Structure of Sparse Neural Networks", 2020)
find the structure mostly determined after one epoch; their efficient algorithm is, in our
definition (ALGORITHMS.md), RigL or DNW with mask updates only during the first epoch (the
`freeze_after` step: one epoch's steps, or any other), then the mask frozen: masked updates
and nonzero-only weight gradients to the end. The report counts the dense-gradient steps the
unfrozen algorithm would have taken since the freeze (`notes["dense_gradient_steps_saved"]`).
"""

from __future__ import annotations

from torch import nn

from .dnw import DNW
from .registry import register
from .rigl import RigL
from .schedules import check_int, check_real

_FREEZE = {"freeze_after": "the step of the last mask update, e.g. the steps of one epoch (required)"}


@register("rigl_frozen", "RigL with mask updates only until freeze_after (e.g. one epoch), then the mask frozen and "
          "training sparse-only",
          options={"drop_fraction": "alpha of the cosine-decayed drop fraction (0.3)", **_FREEZE},
          common=("distribution", "include", "exclude", "update_every", "seed"))
class FrozenRigL(RigL):
    """RigL whose drop-and-grow schedule ends at `freeze_after` (the cosine drop fraction
    decays to 0 there), then frozen. The saved dense-gradient steps are those of RigL with the
    same `update_every` and its default end (0.75 of `total_steps`) after the freeze."""

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int, *, freeze_after: int,
                 update_every: int = 100, **kwargs):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        check_real(owner, "sparsity", sparsity, "[0, 1)")
        check_int(owner, "total_steps", total_steps, 1)
        check_int(owner, "freeze_after", freeze_after, 1, total_steps)
        check_int(owner, "update_every", update_every, 1)
        if update_every > freeze_after:
            raise ValueError(f"{owner}: update_every ({update_every}) > freeze_after ({freeze_after}) leaves no mask "
                             "update before the freeze; lower update_every")
        self.freeze_after = freeze_after
        self.unfrozen_end = max(1, round(0.75 * total_steps))
        super().__init__(model, sparsity, total_steps, end=freeze_after / total_steps, update_every=update_every,
                         **kwargs)

    def report_notes(self) -> dict[str, object]:
        last = min(self.step_count, self.unfrozen_end)
        saved = max(0, last // self.update_every - self.freeze_after // self.update_every)
        return {"frozen": self.step_count >= self.freeze_after, "dense_gradient_steps_saved": saved}


@register("dnw_frozen", "DNW with mask updates only until freeze_after (e.g. one epoch), then the mask frozen and "
          "training masked and sparse-only", options=dict(_FREEZE), common=("distribution", "include", "exclude"),
          total_steps="unused")
class FrozenDNW(DNW):
    """DNW until `freeze_after`; then the mask is frozen and the update rule masked (the pruned
    weights and their optimizer state are zeroed at the freeze and stay zero), so every later
    step saves DNW's dense weight gradient."""

    masks_later = True

    def __init__(self, model: nn.Module, sparsity: float, *, freeze_after: int, **kwargs):
        check_int(f"dynasparse.pruning.{type(self).__name__}", "freeze_after", freeze_after, 1)
        self.freeze_after = freeze_after
        super().__init__(model, sparsity, **kwargs)

    def due(self, step: int) -> bool:
        return step <= self.freeze_after and super().due(step)

    def after_update(self, masks) -> None:
        if self.step_count == self.freeze_after:
            self.set_update_rule("masked")

    def report_notes(self) -> dict[str, object]:
        return {"frozen": self.step_count >= self.freeze_after,
                "dense_gradient_steps_saved": max(0, self.step_count - self.freeze_after)}
