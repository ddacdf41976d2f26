"""DPF: Dynamic Model Pruning with Feedback (Lin et al., ICLR 2020)."""

from __future__ import annotations

from torch import nn

from .pruner import Pruner
from .registry import register
from .schedules import Cubic, check_int, check_real


@register("dpf", "DPF (Lin et al. 2020): feedback training, global |w| mask every 16 steps, cubic ramp to 75% of "
          "training", options={"ramp_end": "fraction of total_steps where the cubic ramp reaches the target (0.75)"})
class DPF(Pruner):
    """w_{t+1} = w_t - lr * g(m_t * w_t): the gradient taken at the pruned model updates the
    dense weights (feedback mode; momentum and weight decay act on the dense weights), so
    pruned weights keep learning and come back when they grow past the threshold.

    The mask keeps the largest |w| of the dense weights under one global threshold (default
    distribution) across the prunable layers, recomputed every `update_every` (16) steps;
    the sparsity follows the cubic ramp from 0 to `sparsity`, ending at `ramp_end` (a fraction
    of `total_steps`, 0.75), and the mask keeps being recomputed at `sparsity` after that.
    Call `finalize()` at the end for the hard-pruned model m_T * w_T (further training then
    fine-tunes with the mask fixed). `granularity="row"` is the structured variant (filters
    scored by their L2 norm; registered as "dpf_structured").
    """

    update_rule = "feedback"

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int, *, ramp_end: float = 0.75,
                 update_every: int = 16, **kwargs):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        check_real(owner, "sparsity", sparsity, "[0, 1)")
        check_int(owner, "total_steps", total_steps, 1)
        check_real(owner, "ramp_end (a fraction of training)", ramp_end, "(0, 1]")
        schedule = Cubic(sparsity, end=max(1, round(ramp_end * total_steps)))
        super().__init__(model, schedule, update_every=update_every, **kwargs)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        return cls(model, sparsity, total_steps, optimizer=optimizer, **options)
