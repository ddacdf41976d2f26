"""Argument checks shared by the Python-side backends (fake, Triton, reference).

The C++ backends run the same checks in csrc/<family>.h with the same messages and
exception types, so a bad input fails alike whichever backend a call lands on. Plain
raises rather than torch._check: dynamo traces them without graph breaks.
"""

import torch

BITS_PER_WORD = 32


def words_per_row(k: int) -> int:
    return (k + BITS_PER_WORD - 1) // BITS_PER_WORD


def _dtype_name(dtype: torch.dtype) -> str:
    # The C++ checks print c10's names (Float, Int); match them.
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int32: "Int", torch.int64: "Long", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool"}.get(dtype, str(dtype))


def check_pack_mask(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"dynasparse.pack_mask: mask must be torch.bool, got {_dtype_name(mask.dtype)} "
                        "(masks are explicit bool tensors; never derive one from weight == 0)")
    if mask.dim() < 1:
        raise ValueError("dynasparse.pack_mask: mask must have at least one dimension "
                         "(packing runs along the last one), got a 0-d tensor")


def check_unpack_mask(packed: torch.Tensor, k: int) -> None:
    if packed.dtype != torch.int32:
        raise TypeError("dynasparse.unpack_mask: packed must be torch.int32 (as returned by pack_mask), "
                        f"got {_dtype_name(packed.dtype)}")
    if packed.dim() < 1:
        raise ValueError("dynasparse.unpack_mask: packed must have at least one dimension")
    if k < 0:
        raise ValueError(f"dynasparse.unpack_mask: k must be >= 0, got {k}")
    if packed.shape[-1] != words_per_row(k):
        raise ValueError(f"dynasparse.unpack_mask: a row of {k} mask elements packs into {words_per_row(k)} "
                         f"int32 words, but packed has {packed.shape[-1]} in its last dimension")


# Fused optimizer steps (csrc/optim.h): lists of per-parameter tensors.

STATISTICS = ("none", "abs", "square")
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_same_layout(op: str, name: str, i: int, tensor: torch.Tensor, param: torch.Tensor) -> None:
    if tensor.device != param.device:
        raise ValueError(f"dynasparse.{op}: {name}[{i}] is on {tensor.device} but params[{i}] is on {param.device}")
    if tensor.shape != param.shape:
        raise ValueError(f"dynasparse.{op}: {name}[{i}] has shape {list(tensor.shape)} "
                         f"but params[{i}] has shape {list(param.shape)}")


def _check_state_list(op: str, name: str, tensors, params, used: bool, used_when: str) -> None:
    expected = len(params) if used else 0
    if len(tensors) != expected:
        raise ValueError(f"dynasparse.{op}: {name} must hold {expected} tensors (one per param{used_when}), "
                         f"got {len(tensors)}")
    for i, (tensor, param) in enumerate(zip(tensors, params)):
        if tensor.dtype != torch.float32:
            raise TypeError(f"dynasparse.{op}: {name}[{i}] must be torch.float32, got {_dtype_name(tensor.dtype)}")
        _check_same_layout(op, name, i, tensor, param)
        if not tensor.is_contiguous():
            raise ValueError(f"dynasparse.{op}: {name}[{i}] must be contiguous (it is updated in place)")


def check_step_inputs(op: str, params, grads, masks, feedback, statistics, statistic: str,
                      statistic_ema: float | None) -> None:
    n = len(params)
    if not (len(grads) == n and len(masks) == n and len(feedback) == n):
        raise ValueError(f"dynasparse.{op}: params, grads, masks and feedback must have the same length, "
                         f"got {n}, {len(grads)}, {len(masks)} and {len(feedback)}")
    for i, (param, grad, mask) in enumerate(zip(params, grads, masks)):
        if param.dtype != torch.float32:
            raise TypeError(f"dynasparse.{op}: params[{i}] must be torch.float32, got {_dtype_name(param.dtype)}")
        if not param.is_contiguous():
            raise ValueError(f"dynasparse.{op}: params[{i}] must be contiguous (it is updated in place)")
        if param.device != params[0].device:
            raise ValueError(f"dynasparse.{op}: all params must be on one device, "
                             f"got {params[0].device} and {param.device}")
        if grad.dtype not in GRAD_DTYPES:
            raise TypeError(f"dynasparse.{op}: grads[{i}] must be torch.float32, bfloat16 or float16, "
                            f"got {_dtype_name(grad.dtype)}")
        _check_same_layout(op, "grads", i, grad, param)
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"dynasparse.{op}: masks[{i}] must be torch.bool, got {_dtype_name(mask.dtype)} "
                                "(masks are explicit bool tensors; never derive one from weight == 0)")
            _check_same_layout(op, "masks", i, mask, param)
    if statistic not in STATISTICS:
        raise ValueError(f"dynasparse.{op}: statistic must be 'none', 'abs' or 'square', got '{statistic}'")
    _check_state_list(op, "statistics", statistics, params, statistic != "none", " when statistic is set, else none")
    if statistic_ema is not None and not 0.0 <= statistic_ema < 1.0:
        raise ValueError(f"dynasparse.{op}: statistic_ema must be in [0, 1), got {statistic_ema}")


def check_sgd(params, momentum_buffers, lr: float, momentum: float, dampening: float, weight_decay: float,
              nesterov: bool) -> None:
    if lr < 0.0:
        raise ValueError(f"dynasparse.sgd_step: lr must be >= 0, got {lr}")
    if momentum < 0.0:
        raise ValueError(f"dynasparse.sgd_step: momentum must be >= 0, got {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"dynasparse.sgd_step: weight_decay must be >= 0, got {weight_decay}")
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("dynasparse.sgd_step: nesterov needs momentum > 0 and dampening == 0")
    _check_state_list("sgd_step", "momentum_buffers", momentum_buffers, params, momentum != 0.0,
                      " when momentum != 0, else none")


def check_adamw(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, step: int, amsgrad: bool) -> None:
    if lr < 0.0:
        raise ValueError(f"dynasparse.adamw_step: lr must be >= 0, got {lr}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"dynasparse.adamw_step: betas must be in [0, 1), got ({beta1}, {beta2})")
    if eps < 0.0:
        raise ValueError(f"dynasparse.adamw_step: eps must be >= 0, got {eps}")
    if weight_decay < 0.0:
        raise ValueError(f"dynasparse.adamw_step: weight_decay must be >= 0, got {weight_decay}")
    if step < 1:
        raise ValueError(f"dynasparse.adamw_step: step (the count including this one) must be >= 1, got {step}")
    _check_state_list("adamw_step", "exp_avgs", exp_avgs, params, True, "")
    _check_state_list("adamw_step", "exp_avg_sqs", exp_avg_sqs, params, True, "")
    _check_state_list("adamw_step", "max_exp_avg_sqs", max_exp_avg_sqs, params, amsgrad, " when amsgrad, else none")


# Top-k family (csrc/topk.h). Checks that need the data (NaN among the candidates, k
# against the number of candidates when a candidates mask is given) run in the backends,
# with the messages built here.
SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_score_dtype(op: str, name: str, scores: torch.Tensor) -> None:
    if scores.dtype not in SCORE_DTYPES:
        raise TypeError(f"dynasparse.{op}: {name} must be float32, float16, bfloat16 or float64, "
                        f"got {_dtype_name(scores.dtype)}")


def nan_message(op: str, name: str, among_candidates: bool) -> str:
    return (f"dynasparse.{op}: {name} contains NaN{' among the candidates' if among_candidates else ''} "
            "(NaN has no rank)")


def check_k_in_range(op: str, k: int, candidates: int) -> None:
    if k < 0:
        raise ValueError(f"dynasparse.{op}: k must be >= 0, got {k}")
    if k > candidates:
        raise ValueError(f"dynasparse.{op}: k ({k}) exceeds the number of candidates ({candidates})")


def check_topk_mask(scores: torch.Tensor, k: int, candidates: torch.Tensor | None) -> None:
    check_score_dtype("topk_mask", "scores", scores)
    if candidates is None:
        check_k_in_range("topk_mask", k, scores.numel())
        return
    if candidates.dtype != torch.bool:
        raise TypeError(f"dynasparse.topk_mask: candidates must be torch.bool, got {_dtype_name(candidates.dtype)}")
    if candidates.shape != scores.shape:
        raise ValueError(f"dynasparse.topk_mask: candidates must have scores' shape {list(scores.shape)}, "
                         f"got {list(candidates.shape)}")
    if candidates.device != scores.device:
        raise ValueError(f"dynasparse.topk_mask: candidates must be on scores' device ({scores.device}), "
                         f"got {candidates.device}")
    if k < 0:
        raise ValueError(f"dynasparse.topk_mask: k must be >= 0, got {k}")


def check_topk_mask_global(scores: list[torch.Tensor], k: int) -> None:
    for i, tensor in enumerate(scores):
        name = f"scores[{i}]"
        check_score_dtype("topk_mask_global", name, tensor)
        if tensor.dtype != scores[0].dtype:
            raise TypeError(f"dynasparse.topk_mask_global: all scores must have one dtype, but scores[0] is "
                            f"{_dtype_name(scores[0].dtype)} and {name} is {_dtype_name(tensor.dtype)}")
        if tensor.device != scores[0].device:
            raise ValueError(f"dynasparse.topk_mask_global: all scores must be on one device, but scores[0] is on "
                             f"{scores[0].device} and {name} on {tensor.device}")
    check_k_in_range("topk_mask_global", k, sum(tensor.numel() for tensor in scores))


def check_nm_mask(scores: torch.Tensor, n: int, m: int) -> None:
    check_score_dtype("nm_mask", "scores", scores)
    if scores.dim() < 1:
        raise ValueError("dynasparse.nm_mask: scores must have at least one dimension "
                         "(groups run along the last one), got a 0-d tensor")
    if m < 1:
        raise ValueError(f"dynasparse.nm_mask: m must be >= 1, got {m}")
    if not 0 <= n <= m:
        raise ValueError(f"dynasparse.nm_mask: n must be in [0, m] = [0, {m}], got {n}")
    if scores.shape[-1] % m != 0:
        raise ValueError(f"dynasparse.nm_mask: the last dimension ({scores.shape[-1]}) must be a multiple of m ({m})")
