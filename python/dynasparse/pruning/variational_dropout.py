"""Sparse variational dropout as a pruning algorithm ("vd"; Molchanov, Ashukha & Vetrov 2017).

    pruner = pruning.create("vd", model, sparsity=0.0, total_steps=T)   # installs the VD layers
    optimizer = optim.SGD(model.parameters(), ...)                      # after: it must hold log_sigma2
    pruner.attach(optimizer)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + pruner.regularizer()     # beta * sum of the layers' KL
        ...; optimizer.step(); pruner.step()
    pruner.finalize()        # plain SparseLinear / SparseConv2d: an ordinary sparse model

At construction the prunable layers become VDLinear / VDConv2d / VDConv1d
(dynasparse.nn.variational), keeping their weights (theta), masks, grad mode and backend, with
log_sigma2 = -10. `regularizer()` is
`beta_at(step) * sum(KL)`, beta ramped linearly from 0 at the first step to `beta` (0.01) at
step `ramp_steps` - 1 (default: the whole run, Molchanov et al.'s and Honegger et al.'s
schedule when the run is the sparsification phase of a trained model) and constant after.
Every `update_every` steps (and at initialization) the mask is set by threshold: a weight is
kept while log_alpha < `threshold` (3), so both products of the training forward skip the
pruned weights (masked mode: they stay zero, and a zero theta has log_alpha at its clamp,
10, for any log_sigma2 above -26.8, so a pruned weight does not return). `trajectory` holds
[step, sparsity] at every update.
`finalize()` refreshes the mask once more and turns the VD layers into plain sparse layers
holding the eval forward (the same Parameter objects for weight and bias, so an attached
optimizer keeps fine-tuning them); the model's checkpoint is then that of an ordinary sparse
model (no log_sigma2), as the experiment store rebuilds it.

Not for DistributedDataParallel-wrapped models (the layers are replaced): create the pruner,
then wrap.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.convert import _replace
from ..nn.modules import SparseConv1d, SparseConv2d, SparseLinear
from ..nn.variational import LOG_SIGMA2_INIT, THRESHOLD, VD_MODULES, VDConv1d, VDConv2d, VDLinear
from .pruner import Pruner
from .registry import register
from .schedules import check_int, check_real


@register("vd", "sparse variational dropout (Molchanov et al. 2017): loss + beta * KL, beta ramped 0 -> 0.01, "
          "weights pruned at log_alpha >= 3",
          options={"beta": "the KL weight reached at the end of the ramp (0.01)",
                   "ramp_steps": "steps of the linear ramp of beta from 0 (None: total_steps)",
                   "threshold": "weights with log_alpha >= threshold are pruned (3.0)",
                   "log_sigma2": "initial log sigma^2 of every weight (-10.0)"},
          common=("include", "exclude", "update_every"))
class VariationalDropout(Pruner):
    """Sparse variational dropout (see the module docstring). `sparsity` must be 0: VD's
    sparsity is what its threshold gives, not a target."""

    update_rule = "masked"
    state_attributes = ("trajectory",)

    def __init__(self, model: nn.Module, total_steps: int, *, beta: float = 0.01, ramp_steps: int | None = None,
                 threshold: float = THRESHOLD, log_sigma2: float = LOG_SIGMA2_INIT, update_every: int | None = 16,
                 optimizer: torch.optim.Optimizer | None = None, **kwargs):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        check_int(owner, "total_steps", total_steps, 1)
        check_real(owner, "beta", beta, "[0, inf)")
        if ramp_steps is not None:
            check_int(owner, "ramp_steps", ramp_steps, 1)
        for name, value in (("threshold", threshold), ("log_sigma2", log_sigma2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < float("inf"):
                raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(f"{owner}: the VD layers replace the model's layers, which a DistributedDataParallel "
                             "wrapper would not see; create the pruner on the model, then wrap it")
        self.beta, self.threshold = float(beta), float(threshold)
        self.ramp_steps = total_steps if ramp_steps is None else ramp_steps
        self.trajectory: list[list] = []
        super().__init__(model, 0.0, update_every=update_every, **kwargs)
        for name, layer in list(self.layers.items()):
            self.layers[name] = self._install(name, layer, float(log_sigma2))
        if optimizer is not None:
            self.attach(optimizer)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        if sparsity != 0:
            raise ValueError(f"dynasparse.pruning.{cls.__name__}: sparsity must be 0 (VD's sparsity is what its "
                             f"threshold gives, not a target), got {sparsity!r}")
        return cls(model, total_steps, optimizer=optimizer, **options)

    def _install(self, name: str, layer: nn.Module, log_sigma2: float) -> nn.Module:
        if isinstance(layer, VD_MODULES):
            layer.threshold = self.threshold
            return layer
        options = dict(log_sigma2=log_sigma2, threshold=self.threshold, grad_mode=layer.grad_mode)
        if isinstance(layer, SparseConv2d):
            vd = VDConv2d.from_dense(layer, **options)
        elif isinstance(layer, SparseConv1d):
            vd = VDConv1d.from_dense(layer, **options)
        elif isinstance(layer, SparseLinear):
            vd = VDLinear.from_dense(layer, **options)
        else:
            raise ValueError(f"dynasparse.pruning.{type(self).__name__}: {name} is a {type(layer).__name__}, which has "
                             "no VD layer (VD has Linear, Conv1d and Conv2d layers); exclude it")
        vd.train(layer.training)
        _replace(self.model, name, vd)
        return vd

    # -- the KL term ---------------------------------------------------------------------------

    def beta_at(self, step: int) -> float:
        """The KL weight of training step `step` + 1 (steps done = `step`): 0 at the first,
        `beta` from step ramp_steps - 1 on."""
        return self.beta * min(1.0, step / max(self.ramp_steps - 1, 1))

    def regularizer(self) -> torch.Tensor | None:
        """beta_at(steps done) * the sum of the VD layers' KL terms; None once finalized."""
        if self.finalized:
            return None
        return self.beta_at(self.step_count) * sum(layer.kl() for layer in self.layers.values())

    # -- the threshold mask ----------------------------------------------------------------------

    def target_at(self, step: int) -> None:
        return None  # no target: the threshold decides

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        return -layer.log_alpha().detach()

    def select(self, scores: dict[str, torch.Tensor], target) -> dict[str, torch.Tensor]:
        # Kept: -log_alpha > -threshold, i.e. log_alpha < threshold.
        return self.select_masks(scores, threshold=-self.threshold)

    def after_update(self, masks: dict[str, torch.Tensor]) -> None:
        kept = sum(int(torch.count_nonzero(mask)) for mask in masks.values())
        total = sum(mask.numel() for mask in masks.values())
        self.trajectory.append([self.step_count, 1.0 - kept / total if total else 0.0])

    def report_notes(self) -> dict[str, object]:
        return {"beta": self.beta_at(self.step_count), "threshold": self.threshold,
                "trajectory": [list(point) for point in self.trajectory]}

    def finalize(self):
        """The last threshold mask, then plain sparse layers in place of the VD layers (see the
        module docstring), then the base finalize (masked mode, no more updates)."""
        self._require_initialized("finalize")
        if not self.finalized:
            if not (self.trajectory and self.trajectory[-1][0] == self.step_count):
                self.update()  # else the mask is this step's already
            for name, layer in list(self.layers.items()):
                sparse = layer.to_sparse()
                with torch.no_grad():
                    layer.weight.copy_(sparse.weight)
                sparse.weight = layer.weight
                if layer.bias is not None:
                    sparse.bias = layer.bias
                sparse.train(layer.training)
                _replace(self.model, name, sparse)
                self.layers[name] = sparse
        return super().finalize()
