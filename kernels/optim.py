"""Triton kernels of the fused optimizer steps (sgd_step, adamw_step; contract in csrc/ops.cpp).

One launch per tensor of the call (the tensors differ in size and grad dtype; a launch per
tensor keeps each kernel a flat elementwise pass). Each program does the whole step for
BLOCK weights in one pass and writes its fp32 share of ||w - m * w||^2 to its slot of a
(tensors, programs) buffer, which is summed in float64 per row afterwards: no atomics, so
the norms are the same on every run.

Absent operands (no momentum, no mask, no statistic, no amsgrad) are 0/1 flags, not
specializations: their loads and stores are masked off (offsets < numel * flag, which the
interpreter also accepts, unlike a tensor & scalar mask), so they cost no memory traffic,
and each kernel compiles once per grad dtype. Their pointer arguments then receive a
placeholder tensor that is never touched.
"""

import math

import torch
import triton
import triton.language as tl

from dynasparse import checks
from dynasparse.reference.optim import pack_after_step

BLOCK = 1024
NUM_WARPS = 4

_STATISTIC_KIND = {"none": 0, "abs": 1, "square": 2}
# Ints equal to 1 would otherwise be specialized away (and differ from AOT_SPECS).
_SGD_INTS = ["numel", "has_momentum", "has_mask", "feedback", "nesterov", "first_step", "statistic_kind"]
_ADAMW_INTS = ["numel", "has_mask", "feedback", "amsgrad", "statistic_kind"]


@triton.jit
def _update_statistic(statistic_ptr, offsets, numel, grad, statistic_kind, keep, add):
    gathering = offsets < numel * tl.minimum(statistic_kind, 1)
    statistic = tl.load(statistic_ptr + offsets, mask=gathering, other=0.0)
    value = tl.where(statistic_kind == 1, tl.abs(grad), grad * grad)
    tl.store(statistic_ptr + offsets, keep * statistic + add * value, mask=gathering)


@triton.jit(do_not_specialize=_SGD_INTS)
def _sgd_step_kernel(weight_ptr, grad_ptr, buffer_ptr, mask_ptr, statistic_ptr, partial_ptr, numel, lr, momentum,
                     dampening_keep, weight_decay, grad_sign, statistic_keep, statistic_add, has_momentum, has_mask,
                     feedback, nesterov, first_step, statistic_kind, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    _update_statistic(statistic_ptr, offsets, numel, grad, statistic_kind, statistic_keep, statistic_add)
    kept = tl.load(mask_ptr + offsets, mask=offsets < numel * has_mask, other=1) != 0
    active = kept | (feedback != 0)
    weight = tl.load(weight_ptr + offsets, mask=in_bounds, other=0.0)
    # Same order of operations as csrc/optim_math.h (torch.optim's).
    direction = grad_sign * grad + weight_decay * weight
    with_momentum = offsets < numel * has_momentum
    buffer = tl.load(buffer_ptr + offsets, mask=with_momentum, other=0.0)
    buffer = tl.where(first_step != 0, direction, momentum * buffer + dampening_keep * direction)
    tl.store(buffer_ptr + offsets, tl.where(active, buffer, 0.0), mask=with_momentum)
    momentum_direction = tl.where(nesterov != 0, direction + momentum * buffer, buffer)
    direction = tl.where(has_momentum != 0, momentum_direction, direction)
    weight = tl.where(active, weight - lr * direction, 0.0)
    tl.store(weight_ptr + offsets, weight, mask=in_bounds)
    error = tl.where(kept | ~in_bounds, 0.0, weight * weight)
    tl.store(partial_ptr + program, tl.sum(error, axis=0))


@triton.jit(do_not_specialize=_ADAMW_INTS)
def _adamw_step_kernel(weight_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, mask_ptr,
                       statistic_ptr, partial_ptr, numel, one_minus_beta1, beta2, one_minus_beta2, eps, decay_factor,
                       step_size, bias_correction2_sqrt, grad_sign, statistic_keep, statistic_add, has_mask, feedback,
                       amsgrad, statistic_kind, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    raw_grad = tl.load(grad_ptr + offsets, mask=in_bounds, other=0.0).to(tl.float32)
    _update_statistic(statistic_ptr, offsets, numel, raw_grad, statistic_kind, statistic_keep, statistic_add)
    kept = tl.load(mask_ptr + offsets, mask=offsets < numel * has_mask, other=1) != 0
    active = kept | (feedback != 0)
    grad = grad_sign * raw_grad
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=in_bounds, other=0.0)
    exp_avg = tl.where(one_minus_beta1 < 0.5, exp_avg + one_minus_beta1 * (grad - exp_avg),
                       grad - (grad - exp_avg) * (1.0 - one_minus_beta1))
    exp_avg_sq = beta2 * tl.load(exp_avg_sq_ptr + offsets, mask=in_bounds, other=0.0) + one_minus_beta2 * grad * grad
    with_max = offsets < numel * amsgrad
    max_exp_avg_sq = tl.maximum(tl.load(max_exp_avg_sq_ptr + offsets, mask=with_max, other=0.0), exp_avg_sq)
    tl.store(max_exp_avg_sq_ptr + offsets, tl.where(active, max_exp_avg_sq, 0.0), mask=with_max)
    second_moment = tl.where(amsgrad != 0, max_exp_avg_sq, exp_avg_sq)
    # IEEE sqrt and division, as on the CPU and in torch (Triton's defaults are approximate).
    denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    weight = tl.load(weight_ptr + offsets, mask=in_bounds, other=0.0)
    weight = tl.where(active, weight * decay_factor - step_size * tl.div_rn(exp_avg, denom), 0.0)
    tl.store(exp_avg_ptr + offsets, tl.where(active, exp_avg, 0.0), mask=in_bounds)
    tl.store(exp_avg_sq_ptr + offsets, tl.where(active, exp_avg_sq, 0.0), mask=in_bounds)
    tl.store(weight_ptr + offsets, weight, mask=in_bounds)
    error = tl.where(kept | ~in_bounds, 0.0, weight * weight)
    tl.store(partial_ptr + program, tl.sum(error, axis=0))


def _statistic_coefficients(statistic_ema):
    return (1.0, 1.0) if statistic_ema is None else (statistic_ema, 1.0 - statistic_ema)


def _launch_each(params, launch) -> torch.Tensor:
    """launch(i, grid, partial_row) per non-empty tensor; returns the per-tensor error norms."""
    programs = [triton.cdiv(param.numel(), BLOCK) for param in params]
    partials = torch.zeros((len(params), max(programs)), dtype=torch.float32, device=params[0].device)
    for i, count in enumerate(programs):
        if count:
            launch(i, (count,), partials[i])
    return partials.double().sum(dim=1).sqrt().float()


def _mask_arguments(masks, feedback, placeholder):
    return [(placeholder, 0, 0) if mask is None else (mask.contiguous().view(torch.uint8), 1, int(feedback[i]))
            for i, mask in enumerate(masks)]


def _pack_after_step(*packing) -> None:
    # The flat step kernels do not know where a row's plan nonzeros start: the packed values
    # come from the pack_panels op (CUDA C++) after the step, on the same stream.
    pack_after_step(*packing, pack=torch.ops.dynasparse.pack_panels)


def sgd_step(params, grads, momentum_buffers, masks, feedback, statistics, lr, momentum, dampening, weight_decay,
             nesterov, maximize, first_step, statistic, statistic_ema, packed_params, packed_values, packed_row_ptrs,
             packed_cols, packed_panels):
    checks.check_step_inputs("sgd_step", params, grads, masks, feedback, statistics, statistic, statistic_ema)
    checks.check_sgd(params, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov)
    checks.check_step_packing("sgd_step", params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                              packed_panels)
    checks.check_step_packing_values("sgd_step", params, packed_params, packed_row_ptrs, packed_cols, packed_panels)
    placeholder = torch.ones(1, dtype=torch.uint8, device=params[0].device)
    mask_args = _mask_arguments(masks, feedback, placeholder)
    keep, add = _statistic_coefficients(statistic_ema)

    def launch(i, grid, partial_row):
        weight = params[i]
        mask, has_mask, tensor_feedback = mask_args[i]
        _sgd_step_kernel[grid](
            weight, grads[i].contiguous(), momentum_buffers[i] if momentum_buffers else weight, mask,
            statistics[i] if statistics else weight, partial_row, weight.numel(), lr, momentum, 1.0 - dampening,
            weight_decay, -1.0 if maximize else 1.0, keep, add, int(bool(momentum_buffers)), has_mask,
            tensor_feedback, int(nesterov), int(first_step), _STATISTIC_KIND[statistic],
            BLOCK=BLOCK, num_warps=NUM_WARPS)

    norms = _launch_each(params, launch)
    _pack_after_step(params, packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels)
    return norms


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, feedback, statistics, lr, beta1, beta2,
               eps, weight_decay, step, amsgrad, maximize, statistic, statistic_ema, packed_params, packed_values,
               packed_row_ptrs, packed_cols, packed_panels):
    checks.check_step_inputs("adamw_step", params, grads, masks, feedback, statistics, statistic, statistic_ema)
    checks.check_adamw(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                       amsgrad)
    checks.check_step_packing("adamw_step", params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                              packed_panels)
    checks.check_step_packing_values("adamw_step", params, packed_params, packed_row_ptrs, packed_cols, packed_panels)
    placeholder = torch.ones(1, dtype=torch.uint8, device=params[0].device)
    mask_args = _mask_arguments(masks, feedback, placeholder)
    keep, add = _statistic_coefficients(statistic_ema)
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)

    def launch(i, grid, partial_row):
        weight = params[i]
        mask, has_mask, tensor_feedback = mask_args[i]
        _adamw_step_kernel[grid](
            weight, grads[i].contiguous(), exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else weight,
            mask, statistics[i] if statistics else weight, partial_row, weight.numel(), 1.0 - beta1, beta2,
            1.0 - beta2, eps, 1.0 - lr * weight_decay, step_size, bias_correction2_sqrt, -1.0 if maximize else 1.0,
            keep, add, has_mask, tensor_feedback, int(amsgrad), _STATISTIC_KIND[statistic],
            BLOCK=BLOCK, num_warps=NUM_WARPS)

    norms = _launch_each(params, launch)
    _pack_after_step(params, packed_params, packed_values, packed_row_ptrs, packed_cols, packed_panels)
    return norms


def _specs(kernel, pointers: list[str], floats: list[str], flags: list[str]) -> list[dict]:
    # One compile per grad dtype and per width Triton gives numel (i32 below 2**31, else i64).
    return [
        {
            "kernel": kernel,
            "signature": {**{name: "*fp32" for name in pointers}, "grad_ptr": grad_type, "mask_ptr": "*u8",
                          "partial_ptr": "*fp32", "numel": numel_type, **{name: "fp32" for name in floats},
                          **{name: "i32" for name in flags}},
            "constexprs": {"BLOCK": BLOCK},
            "options": {"num_warps": NUM_WARPS},
        }
        for grad_type in ("*fp32", "*bf16", "*fp16")
        for numel_type in ("i32", "i64")
    ]


# Every kernel of this module with every config it is launched with (format: kernels/bitmask.py).
AOT_SPECS = [
    *_specs(
        _sgd_step_kernel, ["weight_ptr", "buffer_ptr", "statistic_ptr"],
        ["lr", "momentum", "dampening_keep", "weight_decay", "grad_sign", "statistic_keep", "statistic_add"],
        ["has_momentum", "has_mask", "feedback", "nesterov", "first_step", "statistic_kind"]),
    *_specs(
        _adamw_step_kernel, ["weight_ptr", "exp_avg_ptr", "exp_avg_sq_ptr", "max_exp_avg_sq_ptr", "statistic_ptr"],
        ["one_minus_beta1", "beta2", "one_minus_beta2", "eps", "decay_factor", "step_size", "bias_correction2_sqrt",
         "grad_sign", "statistic_keep", "statistic_add"],
        ["has_mask", "feedback", "amsgrad", "statistic_kind"]),
]
