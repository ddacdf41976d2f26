"""Structured DPF: DPF pruning whole filters / output neurons (Lin et al., ICLR 2020, structured variant)."""

from __future__ import annotations

import torch
from torch import nn

from .dpf import DPF
from .registry import register


@register("dpf_structured", "structured DPF (Lin et al. 2020): whole filters / output neurons by L2 norm, feedback, "
          "cubic ramp", options={"ramp_end": "fraction of total_steps where the cubic ramp reaches the target (0.75)"},
          common=("distribution", "include", "exclude", "update_every", "update_until", "seed"))
class StructuredDPF(DPF):
    """DPF with whole rows as units: a filter (conv) or output neuron (linear) is kept or pruned
    by the L2 norm of its dense weights, under DPF's feedback rule and cubic ramp (the DPF
    paper's structured variant). `kept_rows()` names the surviving rows, so the layers can be
    shrunk physically after `finalize()`. `sparsity` is a fraction of the rows (of all rows
    under the default global distribution, of each layer's under "uniform"): the fraction of
    weights follows from the sizes of the rows kept. Unstructured layers only (blocks and 2:4
    groups are not rows)."""

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int, **kwargs):
        super().__init__(model, sparsity, total_steps, granularity="row", **kwargs)

    def kept_rows(self) -> dict[str, torch.Tensor]:
        """{layer name: bool per output row / filter, True where kept}."""
        return {name: layer.mask.reshape(layer.mask.shape[0], -1).any(1) for name, layer in self.layers.items()}
