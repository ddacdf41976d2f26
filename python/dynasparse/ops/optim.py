"""Fused optimizer steps over every tensor of a parameter group: SGD and AdamW.

One pass per weight reads (weight, grad, optimizer state, mask) and writes the step, the
masking, an optional per-weight gradient statistic and the pruning error, where torch.optim
plus separate masking and statistics ops would make several passes. Per tensor:

- mask None: a plain dense step.
- mask and feedback=True (DPF): every weight is updated; the gradient, taken at m * w by the
  sparse module, trains the dense weights, so pruned weights can come back.
- mask and feedback=False (masked): active weights are updated; pruned weights and their
  state are set to exactly zero, also on the first step from a dense weight (so a fresh mask
  takes effect at once) and whatever weight decay, nesterov or momentum say.

Statistics (RigL growth, empirical Fisher) accumulate f(grad) at every position, pruned ones
included: "abs" |g| or "square" g^2 of the grad as given (before maximize and weight decay),
as a running sum (statistic_ema=None) or an EMA s = ema * s + (1 - ema) * f. The return value
is the fp32 per-tensor error norm ||w - m * w|| after the step (0 for dense tensors, and in
masked mode). Params and state must be fp32 and contiguous; grads fp32, bf16 or fp16.

`packed={i: (values, row_ptr, cols, panel)}` also writes the updated params[i], seen as
[size(0), numel / size(0)], at the nonzeros of the panel plan of its mask into `values`
(what pack_panels returns), so the masked matmul's next forward needs no packing pass: the CPU
kernel gathers them from each row right after updating it; CUDA and Triton run pack_panels
after the step. `dynasparse.optim` does this for every sparse layer whose plan uses panels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .. import checks
from ..reference import optim as reference
from ._registry import Op


def _norms_fake(params) -> torch.Tensor:
    return params[0].new_empty((len(params),), dtype=torch.float32)


def _sgd_step_fake(params, grads, momentum_buffers, masks, feedback, statistics, lr, momentum, dampening,
                   weight_decay, nesterov, maximize, first_step, statistic, statistic_ema, *packing):
    checks.check_step_inputs("sgd_step", params, grads, masks, feedback, statistics, statistic, statistic_ema)
    checks.check_sgd(params, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov)
    checks.check_step_packing("sgd_step", params, masks, *packing)
    return _norms_fake(params)


def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, feedback, statistics, lr, beta1,
                     beta2, eps, weight_decay, step, amsgrad, maximize, statistic, statistic_ema, *packing):
    checks.check_step_inputs("adamw_step", params, grads, masks, feedback, statistics, statistic, statistic_ema)
    checks.check_adamw(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                       amsgrad)
    checks.check_step_packing("adamw_step", params, masks, *packing)
    return _norms_fake(params)


# dynasparse.kernels needs triton: imported at the first Triton call, not before.
def _sgd_step_triton(*args):
    from dynasparse.kernels import optim as kernels

    return kernels.sgd_step(*args)


def _adamw_step_triton(*args):
    from dynasparse.kernels import optim as kernels

    return kernels.adamw_step(*args)


_sgd = Op("sgd_step", fake=_sgd_step_fake, reference=reference.sgd_step, triton=_sgd_step_triton)
_adamw = Op("adamw_step", fake=_adamw_step_fake, reference=reference.adamw_step, triton=_adamw_step_triton)


def _per_tensor(params, masks, feedback):
    n = len(params)
    masks = [None] * n if masks is None else list(masks)
    feedback = [False] * n if feedback is None else [bool(f) for f in feedback]
    return masks, feedback


PackedTargets = Mapping[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]


def _packing(packed: PackedTargets | None) -> tuple[list, list, list, list, list]:
    """{i: (values, row_ptr, cols, panel)} as the ops' five parallel lists."""
    packed = packed or {}
    indices = sorted(packed)
    return (indices, [packed[i][0] for i in indices], [packed[i][1] for i in indices],
            [packed[i][2] for i in indices], [int(packed[i][3]) for i in indices])


def _mark_written(*tensor_lists) -> None:
    # The native and Triton kernels write through data pointers, which version counters do not
    # see; caches keyed on them (a sparse layer's packed weight values) must see every step.
    if not torch.compiler.is_compiling():
        for tensors in tensor_lists:
            if tensors:
                torch.autograd.graph.increment_version(tensors)


def sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
             momentum_buffers: Sequence[torch.Tensor] = (), masks: Sequence[torch.Tensor | None] | None = None,
             feedback: Sequence[bool] | None = None, statistics: Sequence[torch.Tensor] = (), *, lr: float,
             momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
             maximize: bool = False, first_step: bool = False, statistic: str = "none",
             statistic_ema: float | None = None, packed: PackedTargets | None = None,
             backend: str | None = None) -> torch.Tensor:
    """torch.optim.SGD's step on `params` in place (see the module docstring for masks and
    `packed`).

    `momentum_buffers`: one fp32 buffer per param when momentum != 0, else empty;
    `first_step=True` initializes them from this step's update, as torch does on a step
    with no buffer yet (their contents are ignored then). Returns the error norms.
    """
    if not params:
        return torch.empty(0)
    masks, feedback = _per_tensor(params, masks, feedback)
    packing = _packing(packed)
    norms = _sgd(list(params), list(grads), list(momentum_buffers), masks, feedback, list(statistics), float(lr),
                 float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize),
                 bool(first_step), statistic, statistic_ema, *packing, backend=backend)
    _mark_written(list(params), list(momentum_buffers), list(statistics), packing[1])
    return norms


def adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[torch.Tensor] = (),
               masks: Sequence[torch.Tensor | None] | None = None, feedback: Sequence[bool] | None = None,
               statistics: Sequence[torch.Tensor] = (), *, lr: float, step: int, beta1: float = 0.9,
               beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False,
               maximize: bool = False, statistic: str = "none", statistic_ema: float | None = None,
               packed: PackedTargets | None = None, backend: str | None = None) -> torch.Tensor:
    """torch.optim.AdamW's step on `params` in place; `step` counts this step (1 on the first);
    masks and `packed` as in the module docstring.

    `max_exp_avg_sqs`: one per param when amsgrad, else empty. Returns the error norms.
    """
    if not params:
        return torch.empty(0)
    masks, feedback = _per_tensor(params, masks, feedback)
    packing = _packing(packed)
    norms = _adamw(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), masks,
                   feedback, list(statistics), float(lr), float(beta1), float(beta2), float(eps),
                   float(weight_decay), int(step), bool(amsgrad), bool(maximize), statistic, statistic_ema,
                   *packing, backend=backend)
    _mark_written(list(params), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs), list(statistics),
                  packing[1])
    return norms
