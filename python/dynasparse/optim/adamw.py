"""AdamW with dynasparse's fused step: torch.optim.AdamW plus masks, statistics and error norms."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.optim.adam import adam as torch_adam
from torch.optim.optimizer import _get_scalar_dtype

from .. import ops
from ._sparse import SparseOptimizerMixin, reject_unsupported, split_params


class AdamW(SparseOptimizerMixin, torch.optim.AdamW):
    """Drop-in torch.optim.AdamW (same arguments, same state_dict: "step" a CPU scalar tensor,
    "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), plus masks, statistics and error norms as in
    dynasparse.optim.SGD. `foreach` and `fused` are accepted and ignored; capturable and
    differentiable are not supported."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 masks: Mapping[torch.Tensor, tuple] | None = None, statistic: str | None = None,
                 statistic_ema: float | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=None)
        self.defaults["fused"] = fused
        for group in self.param_groups:
            group["fused"] = fused
            reject_unsupported("AdamW", group)
        self._init_sparse(masks, statistic, statistic_ema)

    def _state_of(self, param: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[param]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            reject_unsupported("AdamW", group)
            amsgrad = group["amsgrad"]
            beta1, beta2 = (float(beta) for beta in group["betas"])
            lr = float(group["lr"])
            fused, plain = split_params(group["params"])
            for param in fused:
                self._state_of(param, amsgrad)["step"] += 1

            def call(params, grads, masks, feedback, statistics, packed, step):
                states = [self.state[param] for param in params]
                return ops.adamw_step(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                      [s["max_exp_avg_sq"] for s in states] if amsgrad else [], masks, feedback,
                                      statistics, lr=lr, step=step, beta1=beta1, beta2=beta2, eps=group["eps"],
                                      weight_decay=group["weight_decay"], amsgrad=amsgrad,
                                      maximize=group["maximize"], statistic=self.statistic,
                                      statistic_ema=self.statistic_ema, packed=packed)

            # Parameters that joined later (or were loaded so) count their own steps.
            self._fused_step(fused, call, key=lambda p: int(self.state[p]["step"].item()))
            if plain:
                self._before_plain_step(plain)
                states = [self._state_of(param, amsgrad) for param in plain]
                torch_adam(plain, [p.grad for p in plain], [s["exp_avg"] for s in states],
                                      [s["exp_avg_sq"] for s in states],
                                      [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                                      [s["step"] for s in states], foreach=False, decoupled_weight_decay=True,
                                      amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr,
                                      weight_decay=group["weight_decay"], eps=group["eps"],
                                      maximize=group["maximize"])
                self._after_plain_step(plain)
        return loss
