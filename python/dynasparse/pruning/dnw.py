"""DNW: Discovering Neural Wirings (Wortsman, Farhadi, Rastegari, NeurIPS 2019)."""

from __future__ import annotations

from torch import nn

from .pruner import Pruner
from .registry import register
from .schedules import check_real


@register("dnw", "DNW (Wortsman et al. 2019): per-layer top-|w| mask recomputed at every step, constant sparsity, "
          "feedback updates", common=("distribution", "include", "exclude"), total_steps="unused")
class DNW(Pruner):
    """DNW (Wortsman et al., "Discovering Neural Wirings", NeurIPS 2019), as read by Van Gelder
    et al. 2020: the mask of every layer is its top-k by |w| (uniform per-layer `sparsity`, or
    `distribution`'s counts), recomputed after every optimizer step so that every forward uses
    the current top-k, constant sparsity from the start, feedback updates (the gradient at
    m * w updates every weight: DPF's rule at constant sparsity with layer-wise selection)."""

    update_rule = "feedback"

    def __init__(self, model: nn.Module, sparsity: float, *, distribution="uniform", **kwargs):
        check_real(f"dynasparse.pruning.{type(self).__name__}", "sparsity", sparsity, "[0, 1)")
        super().__init__(model, sparsity, update_every=1, distribution=distribution, **kwargs)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        return cls(model, sparsity, optimizer=optimizer, **options)
