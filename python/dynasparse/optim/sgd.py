"""SGD with dynasparse's fused step: torch.optim.SGD plus masks, statistics and error norms."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.optim.sgd import sgd as torch_sgd

from .. import ops
from ._sparse import SparseOptimizerMixin, reject_unsupported, split_params


class SGD(SparseOptimizerMixin, torch.optim.SGD):
    """Drop-in torch.optim.SGD (same arguments, same state_dict), plus:

    masks: {param: (bool mask, "masked" | "feedback"[, packing_plan])}; more later with `set_mask`
        (dynasparse.nn.sparse_masks(model) gives those of a model's sparse layers).
    statistic: None, "abs" or "square": gather |g| or g^2 per weight of every fp32 parameter
        (`statistics(param)`), as a running sum or, with statistic_ema=beta, an EMA.
    `foreach` and `fused` are accepted and ignored: the step is always one fused pass.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None,
                 masks: Mapping[torch.Tensor, tuple] | None = None, statistic: str | None = None,
                 statistic_ema: float | None = None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=False)
        self.defaults["fused"] = fused
        for group in self.param_groups:
            group["fused"] = fused
            reject_unsupported("SGD", group)
        self._init_sparse(masks, statistic, statistic_ema)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            reject_unsupported("SGD", group)
            lr, momentum = float(group["lr"]), float(group["momentum"])
            fused, plain = split_params(group["params"])

            def call(params, grads, masks, feedback, statistics, packed, first_step):
                buffers = []
                if momentum != 0.0:
                    for param in params:
                        state = self.state[param]
                        if state.get("momentum_buffer") is None:
                            state["momentum_buffer"] = torch.zeros_like(param)
                        buffers.append(state["momentum_buffer"])
                return ops.sgd_step(params, grads, buffers, masks, feedback, statistics, lr=lr, momentum=momentum,
                                    dampening=group["dampening"], weight_decay=group["weight_decay"],
                                    nesterov=group["nesterov"], maximize=group["maximize"], first_step=first_step,
                                    statistic=self.statistic, statistic_ema=self.statistic_ema, packed=packed)

            self._fused_step(fused, call, key=lambda p: momentum != 0.0
                             and self.state[p].get("momentum_buffer") is None)
            if plain:
                self._before_plain_step(plain)
                buffers = [self.state[p].get("momentum_buffer") for p in plain]
                torch_sgd(plain, [p.grad for p in plain], buffers, foreach=False,
                                    weight_decay=group["weight_decay"], momentum=momentum, lr=lr,
                                    dampening=group["dampening"], nesterov=group["nesterov"],
                                    maximize=group["maximize"])
                if momentum != 0.0:
                    for param, buffer in zip(plain, buffers):
                        self.state[param]["momentum_buffer"] = buffer
                self._after_plain_step(plain)
        return loss
