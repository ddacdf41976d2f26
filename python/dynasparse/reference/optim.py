"""Pure-PyTorch fused optimizer steps: the fallback on any device, written op by op like torch.optim.

Same contract as the kernels (see csrc/ops.cpp): fp32 params and state updated in place,
fp32/bf16/fp16 grads, per-tensor mask (None: dense) and feedback flag, optional gradient
statistic, returns the fp32 norms ||w - m * w|| after the step, and writes the packed values
asked for after the step.
"""

import math

import torch

from .. import checks
from . import matmul


def update_statistics(statistics, grads, statistic: str, statistic_ema: float | None) -> None:
    for buffer, grad in zip(statistics, grads):
        value = grad.float().abs() if statistic == "abs" else grad.float().square()
        if statistic_ema is None:
            buffer.add_(value)
        else:
            buffer.mul_(statistic_ema).add_(value, alpha=1.0 - statistic_ema)


def _pruned(mask, feedback: bool):
    """Positions the step must zero (masked mode), or None."""
    return None if mask is None or feedback else ~mask


def error_norms(params, masks) -> torch.Tensor:
    norms = [torch.zeros((), dtype=torch.float64, device=params[0].device) if mask is None
             else param.double().masked_fill(mask, 0.0).square().sum().sqrt()
             for param, mask in zip(params, masks)]
    return torch.stack(norms).float()


def pack_after_step(params, packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels,
                    pack=matmul.pack_panels) -> None:
    """The updated params' packed values, by `pack` (pack_panels' signature) after the step."""
    for i, values, row_ptr, cols, panel in zip(packed_params, packed_values, packed_row_ptrs, packed_cols,
                                               packed_panels):
        param = params[i]
        values.copy_(pack(param.view(checks.packed_matrix_shape(param)), row_ptr, cols, panel))


def sgd_step(params, grads, momentum_buffers, masks, feedback, statistics, lr, momentum, dampening, weight_decay,
             nesterov, maximize, first_step, statistic, statistic_ema, packed_params, packed_values, packed_row_ptrs,
             packed_cols, packed_panels):
    checks.check_step_inputs("sgd_step", params, grads, masks, feedback, statistics, statistic, statistic_ema)
    checks.check_sgd(params, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov)
    checks.check_step_packing("sgd_step", params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                              packed_panels)
    checks.check_step_packing_values("sgd_step", params, packed_params, packed_row_ptrs, packed_cols, packed_panels)
    update_statistics(statistics, grads, statistic, statistic_ema)
    for i, (param, grad, mask) in enumerate(zip(params, grads, masks)):
        direction = grad.float()
        direction = -direction if maximize else direction
        direction = direction.add(param, alpha=weight_decay)
        if momentum != 0.0:
            buffer = momentum_buffers[i]
            if first_step:
                buffer.copy_(direction)
            else:
                buffer.mul_(momentum).add_(direction, alpha=1.0 - dampening)
            direction = direction.add(buffer, alpha=momentum) if nesterov else buffer
        param.add_(direction, alpha=-lr)
        pruned = _pruned(mask, feedback[i])
        if pruned is not None:
            param.masked_fill_(pruned, 0.0)
            if momentum != 0.0:
                momentum_buffers[i].masked_fill_(pruned, 0.0)
    pack_after_step(params, packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels)
    return error_norms(params, masks) if params else torch.empty(0)


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, feedback, statistics, lr, beta1, beta2,
               eps, weight_decay, step, amsgrad, maximize, statistic, statistic_ema, packed_params, packed_values,
               packed_row_ptrs, packed_cols, packed_panels):
    checks.check_step_inputs("adamw_step", params, grads, masks, feedback, statistics, statistic, statistic_ema)
    checks.check_adamw(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                       amsgrad)
    checks.check_step_packing("adamw_step", params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                              packed_panels)
    checks.check_step_packing_values("adamw_step", params, packed_params, packed_row_ptrs, packed_cols, packed_panels)
    update_statistics(statistics, grads, statistic, statistic_ema)
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    for i, (param, grad, mask) in enumerate(zip(params, grads, masks)):
        grad = -grad.float() if maximize else grad.float()
        param.mul_(1.0 - lr * weight_decay)
        exp_avgs[i].lerp_(grad, 1.0 - beta1)
        exp_avg_sqs[i].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        second_moment = exp_avg_sqs[i]
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sqs[i], out=max_exp_avg_sqs[i])
            second_moment = max_exp_avg_sqs[i]
        param.addcdiv_(exp_avgs[i], (second_moment.sqrt() / bias_correction2_sqrt).add_(eps), value=-step_size)
        pruned = _pruned(mask, feedback[i])
        if pruned is not None:
            for tensor in (param, exp_avgs[i], exp_avg_sqs[i], *([max_exp_avg_sqs[i]] if amsgrad else [])):
                tensor.masked_fill_(pruned, 0.0)
    pack_after_step(params, packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels)
    return error_norms(params, masks) if params else torch.empty(0)
