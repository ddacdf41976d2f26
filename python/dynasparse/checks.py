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


def packed_matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """A param with packed values, seen as the [N, K] matrix its panel plan describes."""
    n = param.shape[0]
    k = 1
    for size in param.shape[1:]:
        k *= size
    return n, k


def check_step_packing(op: str, params, masks, packed_params, packed_values, packed_row_ptrs, packed_cols,
                       packed_panels) -> None:
    count = len(packed_params)
    if not (len(packed_values) == count and len(packed_row_ptrs) == count and len(packed_cols) == count
            and len(packed_panels) == count):
        raise ValueError(f"dynasparse.{op}: packed_params, packed_values, packed_row_ptrs, packed_cols and "
                         f"packed_panels must have the same length, got {count}, {len(packed_values)}, "
                         f"{len(packed_row_ptrs)}, {len(packed_cols)} and {len(packed_panels)}")
    listed = set()
    for j, i in enumerate(packed_params):
        if not 0 <= i < len(params):
            raise ValueError(f"dynasparse.{op}: packed_params[{j}] = {i} is not the index of a param "
                             f"(there are {len(params)})")
        if i in listed:
            raise ValueError(f"dynasparse.{op}: params[{i}] is listed twice in packed_params")
        listed.add(i)
        if masks[i] is None:
            raise ValueError(f"dynasparse.{op}: params[{i}] has packed values but no mask "
                             "(they are packed by the plan of its mask)")
        param = params[i]
        if param.dim() < 1:
            raise ValueError(f"dynasparse.{op}: params[{i}] is 0-d; packed values need a param seen as "
                             "[size(0), numel / size(0)]")
        n, k = packed_matrix_shape(param)
        check_panel_plan(op, packed_row_ptrs[j], packed_cols[j], packed_panels[j], n, k, param, "the param")
        values = packed_values[j]
        if values.dtype != torch.float32:
            raise TypeError(f"dynasparse.{op}: packed_values[{j}] must be torch.float32 (the param's dtype), "
                            f"got {_dtype_name(values.dtype)}")
        _check_panel_values(op, values, packed_cols[j])
        if not values.is_contiguous():
            raise ValueError(f"dynasparse.{op}: packed_values[{j}] must be contiguous (it is written in place)")


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


def check_rigl_masks(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, k: int) -> None:
    check_score_dtype("rigl_masks", "weight", weight)
    if mask.dtype != torch.bool:
        raise TypeError(f"dynasparse.rigl_masks: mask must be torch.bool, got {_dtype_name(mask.dtype)}")
    if grad.dtype != weight.dtype:
        raise TypeError(f"dynasparse.rigl_masks: grad must have weight's dtype ({_dtype_name(weight.dtype)}), got "
                        f"{_dtype_name(grad.dtype)}")
    for name, tensor in (("mask", mask), ("grad", grad)):
        if tensor.shape != weight.shape:
            raise ValueError(f"dynasparse.rigl_masks: {name} must have weight's shape {list(weight.shape)}, got "
                             f"{list(tensor.shape)}")
        if tensor.device != weight.device:
            raise ValueError(f"dynasparse.rigl_masks: {name} must be on weight's device ({weight.device}), got "
                             f"{tensor.device}")
    if k < 0:
        raise ValueError(f"dynasparse.rigl_masks: k must be >= 0, got {k}")


def check_rigl_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, state) -> None:
    """rigl_update's own arguments (rigl_masks checks the rest): the optimizer state it zeroes
    has the weight's shape."""
    if mask.dtype != torch.bool:
        raise TypeError(f"dynasparse.rigl_update: mask must be torch.bool, got {_dtype_name(mask.dtype)}")
    for name, tensor in [("mask", mask), ("grad", grad)] + [(f"state[{i}]", s) for i, s in enumerate(state)]:
        if tensor.shape != weight.shape:
            raise ValueError(f"dynasparse.rigl_update: {name} must have weight's shape {list(weight.shape)}, "
                             f"got {list(tensor.shape)}")


# Masked matmul (csrc/matmul.h): plans, packed values and products.

MAX_PANEL = 65536
MATMUL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def panel_count(k: int, panel: int) -> int:
    return ceil_div(k, panel)


def check_plan_mask(op: str, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"dynasparse.{op}: mask must be torch.bool, got {_dtype_name(mask.dtype)} "
                        "(masks are explicit bool tensors; never derive one from weight == 0)")
    if mask.dim() != 2:
        raise ValueError(f"dynasparse.{op}: mask must be 2-D [N, K], got {mask.dim()}-D")


def check_panel(op: str, panel: int) -> None:
    if not 1 <= panel <= MAX_PANEL:
        raise ValueError(f"dynasparse.{op}: panel must be in [1, {MAX_PANEL}] "
                         f"(columns are 16-bit offsets inside a panel), got {panel}")


def check_block(op: str, block: int) -> None:
    if block < 1:
        raise ValueError(f"dynasparse.{op}: block must be >= 1, got {block}")


def _check_size(op: str, name: str, size: int) -> None:
    if size < 0:
        raise ValueError(f"dynasparse.{op}: {name} must be >= 0, got {size}")


def _check_same_device(op: str, name: str, tensor: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"dynasparse.{op}: {name} is on {tensor.device} but {ref_name} is on {ref.device}")


def _check_index(op: str, name: str, tensor: torch.Tensor, dtype: torch.dtype, ref: torch.Tensor,
                 ref_name: str) -> None:
    if tensor.dtype != dtype:
        raise TypeError(f"dynasparse.{op}: {name} must be {_dtype_name(dtype)} (as built by the plan ops), "
                        f"got {_dtype_name(tensor.dtype)}")
    if tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(f"dynasparse.{op}: {name} must be a contiguous 1-D tensor (as built by the plan ops)")
    _check_same_device(op, name, tensor, ref, ref_name)


def check_panel_plan(op: str, row_ptr: torch.Tensor, cols: torch.Tensor, panel: int, n: int, k: int,
                     ref: torch.Tensor, ref_name: str) -> None:
    check_panel(op, panel)
    _check_index(op, "row_ptr", row_ptr, torch.int64, ref, ref_name)
    _check_index(op, "cols", cols, torch.int16, ref, ref_name)
    expected = panel_count(k, panel) * n + 1
    if row_ptr.numel() != expected:
        raise ValueError(f"dynasparse.{op}: row_ptr has {row_ptr.numel()} entries, but a panel plan of an "
                         f"[{n}, {k}] mask with panel {panel} has {expected} "
                         "(a plan built for another shape or panel width)")


def check_block_plan(op: str, row_ptr: torch.Tensor, cols: torch.Tensor, block: int, n: int,
                     ref: torch.Tensor, ref_name: str) -> None:
    check_block(op, block)
    _check_index(op, "row_ptr", row_ptr, torch.int64, ref, ref_name)
    _check_index(op, "cols", cols, torch.int32, ref, ref_name)
    expected = ceil_div(n, block) + 1
    if row_ptr.numel() != expected:
        raise ValueError(f"dynasparse.{op}: row_ptr has {row_ptr.numel()} entries, but a block plan with block "
                         f"{block} over {n} rows has {expected} (a plan built for another shape or block size)")


# Plan values (csrc/matmul.h, "plan values"): the shape checks above cannot see them, so the
# backends that read through a plan check its values too, against the matrix they run on.
# The fakes cannot (no data); the reference and the Triton launchers call these. A valid plan
# costs a few whole-tensor ops and one synchronization (on a GPU); an invalid one raises its
# first violation in index order, with the C++ backends' message. Under torch.compile (the
# reference traced into a graph, where data cannot steer Python) the same condition becomes
# a runtime assert with a summary message.

_AS_BUILT = " (row_ptr and cols as built by the plan ops)"


def _first(condition: torch.Tensor) -> int:
    return int(condition.nonzero()[0, 0])


def _check_row_ptr_values(op: str, row_ptr: torch.Tensor, nnz: int) -> None:
    segments = row_ptr.numel() - 1
    start, end = int(row_ptr[0]), int(row_ptr[-1])
    if start != 0:
        raise ValueError(f"dynasparse.{op}: row_ptr[0] must be 0, got {start}{_AS_BUILT}")
    if end != nnz:
        raise ValueError(f"dynasparse.{op}: row_ptr[{segments}] must be cols.numel() = {nnz}, got {end}{_AS_BUILT}")
    drops = row_ptr[1:] < row_ptr[:-1]
    if drops.any():
        s = _first(drops)
        raise ValueError(f"dynasparse.{op}: row_ptr must not decrease, but row_ptr[{s}] = {int(row_ptr[s])} > "
                         f"row_ptr[{s + 1}] = {int(row_ptr[s + 1])}")


def _entry_segments(row_ptr: torch.Tensor, nnz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each plan entry's segment and whether the entry opens it: by a search that stays in
    range whatever row_ptr holds, and is meaningful once row_ptr is valid."""
    index = torch.arange(nnz, device=row_ptr.device)
    segment = (torch.searchsorted(row_ptr, index, right=True) - 1).clamp(0, max(row_ptr.numel() - 2, 0))
    return segment, row_ptr[segment] == index


def _check_plan(op: str, row_ptr: torch.Tensor, nnz: int, outside: torch.Tensor, unordered: torch.Tensor,
                summary: str, describe) -> None:
    """row_ptr from 0 to nnz, never decreasing, and no entry outside its range (IndexError)
    or not above its predecessor (ValueError); describe(i, outside) words entry i's fault."""
    faults = outside | unordered
    valid = (row_ptr[0] == 0) & (row_ptr[-1] == nnz) & (row_ptr[1:] >= row_ptr[:-1]).all() & ~faults.any()
    if torch.compiler.is_compiling():
        torch._assert_async(valid, f"dynasparse.{op}: {summary} (the eager call names the first violation)")
        return
    if bool(valid):
        return
    _check_row_ptr_values(op, row_ptr, nnz)
    i = _first(faults)
    if bool(outside[i]):
        raise IndexError(f"dynasparse.{op}: {describe(i, True)}")
    raise ValueError(f"dynasparse.{op}: {describe(i, False)}")


def check_panel_plan_values(op: str, row_ptr: torch.Tensor, cols: torch.Tensor, panel: int, n: int, k: int) -> None:
    """A panel plan of an [n, k] matrix (shapes already checked): row_ptr from 0 to
    cols.numel(), never decreasing; inside each (panel, row) segment, ascending column
    offsets (cols read as uint16) below the panel's width."""
    nnz = cols.numel()
    segment, opens = _entry_segments(row_ptr, nnz)
    offsets = cols.to(torch.int64) & 0xFFFF
    panel_index = segment // max(n, 1)
    width = (k - panel_index * panel).clamp(max=panel)
    previous = offsets.roll(1)

    def describe(i: int, outside: bool) -> str:
        p, row = int(panel_index[i]), int(segment[i]) % max(n, 1)
        if outside:
            return (f"cols[{i}] = {int(offsets[i])} is outside panel {p} of row {row}, whose column offsets are in "
                    f"[0, {int(width[i])}) (a panel plan of an [{n}, {k}] matrix with panel {panel})")
        return (f"cols[{i}] = {int(offsets[i])} follows cols[{i - 1}] = {int(previous[i])} in panel {p} of row {row}: "
                "column offsets must ascend inside a (panel, row) segment")

    _check_plan(op, row_ptr, nnz, offsets >= width, ~opens & (offsets <= previous),
                   f"row_ptr and cols are not a panel plan of an [{n}, {k}] matrix with panel {panel}", describe)


def check_step_packing_values(op: str, params, packed_params, packed_row_ptrs, packed_cols, packed_panels) -> None:
    """The values of an optimizer step's packing plans (their shapes checked by
    check_step_packing), before the step writes anything: a bad plan fails the step whole."""
    for j, i in enumerate(packed_params):
        check_panel_plan_values(op, packed_row_ptrs[j], packed_cols[j], packed_panels[j],
                                *packed_matrix_shape(params[i]))


def check_block_plan_values(op: str, row_ptr: torch.Tensor, cols: torch.Tensor, block: int, n: int, k: int) -> None:
    """A block plan of an [n, k] matrix (shapes already checked): row_ptr as for panel plans;
    inside each block row, ascending block columns below ceil(k / block)."""
    nnz = cols.numel()
    segment, opens = _entry_segments(row_ptr, nnz)
    columns = cols.to(torch.int64)
    block_cols = ceil_div(k, block)
    previous = columns.roll(1)

    def describe(q: int, outside: bool) -> str:
        if outside:
            return (f"cols[{q}] = {int(columns[q])} is outside block row {int(segment[q])}, whose block columns are in "
                    f"[0, {block_cols}) (a block plan of an [{n}, {k}] matrix with block {block})")
        return (f"cols[{q}] = {int(columns[q])} follows cols[{q - 1}] = {int(previous[q])} in block row "
                f"{int(segment[q])}: block columns must ascend inside a block row")

    _check_plan(op, row_ptr, nnz, (columns < 0) | (columns >= block_cols), ~opens & (columns <= previous),
                   f"row_ptr and cols are not a block plan of an [{n}, {k}] matrix with block {block}", describe)


def _check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in MATMUL_DTYPES:
        raise TypeError(f"dynasparse.{op}: {name} must be float32, float64, float16 or bfloat16, "
                        f"got {_dtype_name(tensor.dtype)}")


def _check_weight(op: str, weight: torch.Tensor) -> None:
    _check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"dynasparse.{op}: weight must be 2-D [N, K], got {weight.dim()}-D")


def _check_same_dtype(op: str, name: str, tensor: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if tensor.dtype != ref.dtype:
        raise TypeError(f"dynasparse.{op}: {name} is {_dtype_name(tensor.dtype)} but {ref_name} is "
                        f"{_dtype_name(ref.dtype)} (one dtype per product)")


def _check_operand(op: str, name: str, tensor: torch.Tensor, ref: torch.Tensor, ref_name: str,
                   size: int | None = None) -> None:
    """An activation-like operand (..., size) of ref's dtype and device (any width when size is None)."""
    _check_float(op, name, tensor)
    if tensor.dim() < 1:
        raise ValueError(f"dynasparse.{op}: {name} must have at least one dimension")
    if size is not None and tensor.shape[-1] != size:
        raise ValueError(f"dynasparse.{op}: {name} must have {size} elements in its last dimension, "
                         f"got {tensor.shape[-1]}")
    _check_same_dtype(op, name, tensor, ref, ref_name)
    _check_same_device(op, name, tensor, ref, ref_name)


def _check_bias(op: str, bias: torch.Tensor | None, n: int, x: torch.Tensor) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != n:
        raise ValueError(f"dynasparse.{op}: bias must have shape [{n}], got {list(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"dynasparse.{op}: bias is {_dtype_name(bias.dtype)} but x is {_dtype_name(x.dtype)}")
    _check_same_device(op, "bias", bias, x, "x")


def _check_panel_values(op: str, values: torch.Tensor, cols: torch.Tensor) -> None:
    _check_float(op, "values", values)
    if values.dim() != 1 or values.numel() != cols.numel():
        raise ValueError(f"dynasparse.{op}: values must be 1-D with one entry per plan nonzero ({cols.numel()}), "
                         f"got shape {list(values.shape)}")
    _check_same_device(op, "values", values, cols, "cols")


def _check_block_values(op: str, values: torch.Tensor, cols: torch.Tensor) -> int:
    _check_float(op, "values", values)
    if not (values.dim() == 3 and values.shape[0] == cols.numel() and values.shape[1] == values.shape[2]
            and values.shape[1] >= 1):
        raise ValueError(f"dynasparse.{op}: values must be [{cols.numel()}, b, b] (one b x b block per plan "
                         f"block), got shape {list(values.shape)}")
    _check_same_device(op, "values", values, cols, "cols")
    return values.shape[1]


def check_plan_panels(mask: torch.Tensor, panel: int) -> None:
    check_plan_mask("plan_panels", mask)
    check_panel("plan_panels", panel)


def check_plan_blocks(mask: torch.Tensor, block: int) -> None:
    check_plan_mask("plan_blocks", mask)
    check_block("plan_blocks", block)


def check_pack_panels(weight, row_ptr, cols, panel: int) -> None:
    _check_weight("pack_panels", weight)
    check_panel_plan("pack_panels", row_ptr, cols, panel, weight.shape[0], weight.shape[1], weight, "weight")


def check_pack_blocks(weight, mask, row_ptr, cols, block: int) -> None:
    _check_weight("pack_blocks", weight)
    check_plan_mask("pack_blocks", mask)
    if mask.shape != weight.shape:
        raise ValueError(f"dynasparse.pack_blocks: mask has shape {list(mask.shape)} "
                         f"but weight has shape {list(weight.shape)}")
    _check_same_device("pack_blocks", "mask", mask, weight, "weight")
    check_block_plan("pack_blocks", row_ptr, cols, block, weight.shape[0], weight, "weight")


def check_unpack_panels(values, row_ptr, cols, panel: int, n: int, k: int) -> None:
    _check_size("unpack_panels", "n", n)
    _check_size("unpack_panels", "k", k)
    check_panel_plan("unpack_panels", row_ptr, cols, panel, n, k, values, "values")
    _check_panel_values("unpack_panels", values, cols)


def check_unpack_blocks(values, row_ptr, cols, n: int, k: int) -> int:
    _check_size("unpack_blocks", "n", n)
    _check_size("unpack_blocks", "k", k)
    block = _check_block_values("unpack_blocks", values, cols)
    check_block_plan("unpack_blocks", row_ptr, cols, block, n, values, "values")
    return block


def check_spmm_panels(x, values, row_ptr, cols, panel: int, n: int, bias) -> None:
    _check_size("spmm_panels", "n", n)
    _check_float("spmm_panels", "x", x)
    if x.dim() < 1:
        raise ValueError("dynasparse.spmm_panels: x must have at least one dimension")
    check_panel_plan("spmm_panels", row_ptr, cols, panel, n, x.shape[-1], x, "x")
    _check_panel_values("spmm_panels", values, cols)
    _check_same_dtype("spmm_panels", "values", values, x, "x")
    _check_bias("spmm_panels", bias, n, x)


def check_spmm_blocks(x, values, row_ptr, cols, n: int, bias) -> int:
    _check_size("spmm_blocks", "n", n)
    _check_float("spmm_blocks", "x", x)
    if x.dim() < 1:
        raise ValueError("dynasparse.spmm_blocks: x must have at least one dimension")
    block = _check_block_values("spmm_blocks", values, cols)
    check_block_plan("spmm_blocks", row_ptr, cols, block, n, x, "x")
    _check_same_dtype("spmm_blocks", "values", values, x, "x")
    _check_bias("spmm_blocks", bias, n, x)
    return block


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _check_conv_param(op: str, name: str, param, minimum: int) -> None:
    if len(param) != 2 or param[0] < minimum or param[1] < minimum:
        raise ValueError(f"dynasparse.{op}: {name} must be two integers >= {minimum}, got {list(param)}")


def _check_conv_params(op: str, kernel_size, stride, padding, dilation) -> None:
    _check_conv_param(op, "kernel_size", kernel_size, 1)
    _check_conv_param(op, "stride", stride, 1)
    _check_conv_param(op, "padding", padding, 0)
    _check_conv_param(op, "dilation", dilation, 1)


def _check_conv_reach(op: str, x, kernel_size, padding, dilation) -> None:
    """x's padded size holds the dilated kernel in both spatial dimensions (>= 1 output pixel)."""
    for d in range(2):
        padded, reach = x.shape[2 + d] + 2 * padding[d], dilation[d] * (kernel_size[d] - 1) + 1
        if padded < reach:
            raise ValueError(f"dynasparse.{op}: x's padded size {padded} in dimension {2 + d} "
                             f"is smaller than the dilated kernel's {reach}")


def check_conv2d_panels(x, values, row_ptr, cols, panel: int, n: int, kernel_size, stride, padding, dilation,
                        bias) -> None:
    op = "conv2d_panels"
    _check_size(op, "n", n)
    _check_float(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"dynasparse.conv2d_panels: x must be 4-D [B, C, H, W], got {x.dim()}-D")
    _check_conv_params(op, kernel_size, stride, padding, dilation)
    check_panel_plan(op, row_ptr, cols, panel, n, x.shape[1] * kernel_size[0] * kernel_size[1], x, "x")
    _check_panel_values(op, values, cols)
    _check_same_dtype(op, "values", values, x, "x")
    _check_bias(op, bias, n, x)
    _check_conv_reach(op, x, kernel_size, padding, dilation)


def check_conv2d_sddmm_panels(grad_out, x, row_ptr, cols, panel: int, kernel_size, stride, padding,
                              dilation) -> None:
    """grad_out [B, N, OH, OW] of x [B, C, H, W]'s convolution; the plan is of the
    [N, C * kh * kw] weight gradient."""
    op = "conv2d_sddmm_panels"
    _check_float(op, "x", x)
    if x.dim() != 4:
        raise ValueError(f"dynasparse.{op}: x must be 4-D [B, C, H, W], got {x.dim()}-D")
    _check_operand(op, "grad_out", grad_out, x, "x")
    if grad_out.dim() != 4:
        raise ValueError(f"dynasparse.{op}: grad_out must be 4-D [B, N, OH, OW], got {grad_out.dim()}-D")
    _check_conv_params(op, kernel_size, stride, padding, dilation)
    _check_conv_reach(op, x, kernel_size, padding, dilation)
    out_h, out_w = (conv_output_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d])
                    for d in range(2))
    if grad_out.shape[0] != x.shape[0] or grad_out.shape[2] != out_h or grad_out.shape[3] != out_w:
        raise ValueError(f"dynasparse.{op}: grad_out must be [{x.shape[0]}, N, {out_h}, {out_w}] (the convolution "
                         f"output of x {list(x.shape)} with this geometry), got {list(grad_out.shape)}")
    check_panel_plan(op, row_ptr, cols, panel, grad_out.shape[1], x.shape[1] * kernel_size[0] * kernel_size[1], x,
                     "x")


def _check_sddmm_operands(op: str, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    # Their widths are N and K themselves; the plan (and sddmm_blocks' mask) is checked against them.
    _check_float(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"dynasparse.{op}: x must have at least one dimension")
    _check_operand(op, "grad_out", grad_out, x, "x")
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"dynasparse.{op}: grad_out {list(grad_out.shape)} and x {list(x.shape)} "
                         "must have the same leading dimensions")


def check_sddmm_panels(grad_out, x, row_ptr, cols, panel: int) -> None:
    _check_sddmm_operands("sddmm_panels", grad_out, x)
    check_panel_plan("sddmm_panels", row_ptr, cols, panel, grad_out.shape[-1], x.shape[-1], x, "x")


def check_sddmm_blocks(grad_out, x, mask, row_ptr, cols, block: int) -> None:
    _check_sddmm_operands("sddmm_blocks", grad_out, x)
    check_plan_mask("sddmm_blocks", mask)
    if mask.shape[0] != grad_out.shape[-1] or mask.shape[1] != x.shape[-1]:
        raise ValueError(f"dynasparse.sddmm_blocks: mask must be [{grad_out.shape[-1]}, {x.shape[-1]}], "
                         f"got {list(mask.shape)}")
    _check_same_device("sddmm_blocks", "mask", mask, x, "x")
    check_block_plan("sddmm_blocks", row_ptr, cols, block, grad_out.shape[-1], x, "x")


def _check_mask_words(op: str, mask_words, n: int, k: int, ref, ref_name: str) -> None:
    if mask_words.dtype != torch.int32:
        raise TypeError(f"dynasparse.{op}: mask_words must be torch.int32 (pack_mask of the mask), "
                        f"got {_dtype_name(mask_words.dtype)}")
    if mask_words.dim() != 2 or mask_words.shape[0] != n or mask_words.shape[1] != words_per_row(k):
        raise ValueError(f"dynasparse.{op}: mask_words must be [{n}, {words_per_row(k)}] (pack_mask of an "
                         f"[{n}, {k}] mask), got {list(mask_words.shape)}")
    _check_same_device(op, "mask_words", mask_words, ref, ref_name)


def check_masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile: int, bias) -> None:
    _check_weight("masked_mm", weight)
    _check_operand("masked_mm", "x", x, weight, "weight", size=weight.shape[1])
    _check_mask_words("masked_mm", mask_words, weight.shape[0], weight.shape[1], weight, "weight")
    check_block_plan("masked_mm", tile_ptr, tile_cols, tile, weight.shape[0], weight, "weight")
    _check_bias("masked_mm", bias, weight.shape[0], x)


def check_masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile: int) -> None:
    _check_sddmm_operands("masked_sddmm", grad_out, x)
    _check_mask_words("masked_sddmm", mask_words, grad_out.shape[-1], x.shape[-1], x, "x")
    check_block_plan("masked_sddmm", tile_ptr, tile_cols, tile, grad_out.shape[-1], x, "x")
