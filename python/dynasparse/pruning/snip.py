"""SNIP: Single-shot Network Pruning based on connection sensitivity (Lee, Ajanthan, Torr, ICLR 2019)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .pruner import Pruner
from .registry import register
from .schedules import check_real


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise TypeError("dynasparse.pruning.SNIP.calibrate: a batch is (inputs, targets) for the default cross-entropy "
                        f"loss, got {type(batch).__name__}; pass loss=lambda model, batch: ...")
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


@register("snip", "SNIP (Lee et al. 2019): saliency |g * w| on calibration batches at initialization, keep the top-k "
          "(global), train masked", common=("distribution", "include", "exclude", "granularity"), total_steps="unused")
class SNIP(Pruner):
    """SNIP (Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity",
    ICLR 2019): before training, the saliency |g * w| of every weight, g the dense gradient of
    the loss (our definition for several batches: the gradient of their mean loss); keep the
    largest under one global threshold (`distribution`), prune the rest, train masked.

        pruner = pruning.create("snip", model, sparsity=0.9)
        pruner.calibrate([(x, y)])            # one batch, as the paper; initializes the mask
    """

    update_rule = "masked"
    needs_data = True

    def __init__(self, model: nn.Module, sparsity: float, **kwargs):
        check_real(f"dynasparse.pruning.{type(self).__name__}", "sparsity", sparsity, "[0, 1)")
        self._saliency: dict[str, torch.Tensor] | None = None
        super().__init__(model, sparsity, update_every=None, **kwargs)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        return cls(model, sparsity, optimizer=optimizer, **options)

    def calibrate(self, batches: Iterable, loss: Callable[[nn.Module, object], torch.Tensor] | None = None) -> None:
        """Saliencies from `batches` (an iterable of (inputs, targets) for the default
        cross-entropy, or anything `loss(model, batch)` takes), then `initialize()`. The
        parameters' .grad are left as they were."""
        owner = f"dynasparse.pruning.{type(self).__name__}.calibrate"
        if self.initialized:
            raise RuntimeError(f"{owner}: the pruner is already initialized")
        loss = _default_loss if loss is None else loss
        params = list(self.model.parameters())
        saved = [param.grad for param in params]
        summed = {name: torch.zeros_like(layer.weight, dtype=torch.float32) for name, layer in self.layers.items()}
        count = 0
        try:
            for layer in self.layers.values():
                layer.weight_grad = "dense"
            for batch in batches:
                for param in params:
                    param.grad = None
                with torch.enable_grad():
                    value = loss(self.model, batch)
                    if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.requires_grad):
                        raise TypeError(f"{owner}: the loss must be a differentiable scalar tensor, got "
                                        f"{type(value).__name__} {getattr(value, 'shape', '')}")
                    value.backward()
                for name, layer in self.layers.items():
                    if layer.weight.grad is None:
                        raise RuntimeError(f"{owner}: the loss does not depend on {name}.weight; exclude that layer")
                    summed[name] += layer.weight.grad.float()
                count += 1
        finally:
            for param, grad in zip(params, saved):
                param.grad = grad
            for layer in self.layers.values():
                layer.weight_grad = None
        if count == 0:
            raise ValueError(f"{owner}: batches is empty")
        self._saliency = {name: (summed[name] / count * self.layers[name].weight.detach().float()).abs()
                          for name in self.layers}
        try:
            self.initialize()
        finally:
            self._saliency = None

    def _calibrated(self) -> bool:
        return self._saliency is not None

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        return self._saliency[name]
