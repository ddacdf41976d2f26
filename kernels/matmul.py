"""Triton kernels for the fused bitmask masked matmul (layouts: csrc/ops.cpp).

masked_mm:    y (..., N) = x (..., K) @ where(m, w, 0).T (+ bias)
masked_sddmm: dense [N, K] = where(m, grad_out.T @ x, 0), summed over the leading dims

w [N, K] is read in place with any strides (the input gradient passes w.T); m arrives only as
pack_mask(m) (int32 words, bit j of word i = column 32 * i + j) plus the block plan of m with
block `tile`, which lists per tile row the tile columns holding any active element. Each w
tile is masked in registers: the tile's words are loaded once per row and expanded by
`(word >> bit) & 1`, so w * m never exists in memory and a pruned inf or nan contributes nothing.

w and the weight gradient are walked in TILE x TILE tiles (TILE = tile = BLOCK_N = BLOCK_K; 32, 64 and
128 are supported). 64 is the default: it skips the blocks of a 64 x 64 block layout. An
unstructured mask leaves hardly any 64 x 64 tile empty, and 128 loads fewer bytes per
multiply-add there (a 128 x 128 output tile instead of 128 x 64); which is faster on a GPU
has not been measured.
- masked_mm: one program per (BLOCK_M batch rows, tile row of w), looping over that tile
  row's plan entries only, so empty tiles cost nothing.
- masked_sddmm: one program per output tile; a tile the plan does not list (found by binary
  search of its tile row's entries) is written as zeros without reading an operand, a listed
  one reduces over every batch row.
Both walk their grid in bands of GROUP rows for L2 reuse.
Accumulation is fp32 (fp64 for fp64 operands). fp32 operands use TF32 exactly when torch
would for its own matmul (torch.backends.cuda.matmul.allow_tf32). Under TRITON_INTERPRET=1,
bf16 is computed as on a GPU through two detours: operands upcast before tl.dot, fp32 results
rounded by torch (see _dot, _empty_output).

The launchers run the checks every backend runs (dynasparse.checks) before any launch, the
tile plan's values included: the kernels index x, w and the words through it unchecked. On a
GPU that check costs a few small torch ops and one synchronization per call.
"""

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from dynasparse.checks import check_block_plan_values, check_masked_mm, check_masked_sddmm

TILES = (32, 64, 128)
DEFAULT_TILE = 64
# Batch rows per masked_mm program and per masked_sddmm reduction step: 128 x TILE output
# tiles keep the tensor cores fed at tile 64 and below.
BLOCK_M = 128
# Program ordering (see _grouped_program): bands of 8 row blocks (masked_mm) or 8 tile rows
# (masked_sddmm), so that a wave of programs reads about as much x as w (grad_out) from memory.
GROUP = 8
MAX_STAGES = 3
# Shared memory the pipelined operand tiles may take: below the 163 KiB an sm_80 block can have
# (sm_90: 227 KiB), leaving room for the epilogue's layout conversion.
SHARED_MEMORY_BUDGET = 128 * 1024

_ACCUMULATOR = {torch.float32: tl.float32, torch.float16: tl.float32, torch.bfloat16: tl.float32,
                torch.float64: tl.float64}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def _launch_options(dtype: torch.dtype, tile: int, operand_rows: int) -> dict:
    """num_warps and num_stages for a kernel loading [operand_rows, tile] elements per step:
    as many stages (up to MAX_STAGES) as fit the shared memory budget, so fp64 and tile 128
    pipeline less deeply rather than fail to launch."""
    stage_bytes = operand_rows * tile * dtype.itemsize
    return {"num_warps": 8 if tile >= 128 else 4,
            "num_stages": max(1, min(MAX_STAGES, SHARED_MEMORY_BUDGET // stage_bytes))}


def _mm_options(dtype: torch.dtype, tile: int) -> dict:
    return _launch_options(dtype, tile, BLOCK_M + tile)  # an x tile and a w tile


def _sddmm_options(dtype: torch.dtype, tile: int) -> dict:
    return _launch_options(dtype, tile, 2 * BLOCK_M)  # a grad_out tile and an x tile


@triton.jit
def _tile_keep(words_ptr, rows, row_ok, words_per_row, tile_col, TILE: tl.constexpr):
    """The mask of one [TILE rows, TILE columns] tile as bools: rows are w's rows (int64
    indices), the columns those of tile column `tile_col`."""
    column = tl.arange(0, TILE)
    word_of_column = column // 32
    words = tl.zeros([TILE, TILE], dtype=tl.int32)
    # TILE // 32 word vectors, each loaded once per row and broadcast over its 32 columns.
    for j in tl.static_range(TILE // 32):
        # Clamped, not masked: a word past the row's last holds columns >= K, which both kernels
        # zero or drop through their own column bounds, so any valid word will do there.
        word_index = tl.minimum(tile_col * (TILE // 32) + j, words_per_row - 1)
        word = tl.load(words_ptr + rows * words_per_row + word_index, mask=row_ok, other=0)
        words = tl.where((word_of_column == j)[None, :], word[:, None], words)
    # The arithmetic shift copies the sign bit downwards; & 1 keeps only the wanted bit.
    return ((words >> (column % 32)[None, :]) & 1) != 0


@triton.jit
def _grouped_program(rows, cols, GROUP: tl.constexpr):
    """(row, column) of this program in a rows x cols grid, walked in bands of GROUP rows,
    column by column: programs running together share GROUP rows' and a few columns' operands
    in L2 instead of one row's and every column's."""
    pid = tl.program_id(0)
    programs_per_band = GROUP * cols
    first_row = (pid // programs_per_band) * GROUP
    band_rows = tl.minimum(rows - first_row, GROUP)
    return first_row + (pid % programs_per_band) % band_rows, (pid % programs_per_band) // band_rows


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr, ACC_DTYPE: tl.constexpr):
    if UPCAST_BF16:
        # Only under TRITON_INTERPRET=1, whose tl.dot returns garbage for bf16 operands.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _masked_mm_kernel(x_ptr, w_ptr, words_ptr, tile_ptr, tile_cols_ptr, bias_ptr, y_ptr,
                      M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, words_per_row,
                      BLOCK_M: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr, ACC_DTYPE: tl.constexpr):
    row_block, tile_row = _grouped_program(tl.cdiv(M, BLOCK_M), tl.cdiv(N, TILE), GROUP)

    # int64 indices throughout: rows * stride and features * words_per_row pass 2**31 on big operands.
    rows = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    features = tile_row.to(tl.int64) * TILE + tl.arange(0, TILE)
    column = tl.arange(0, TILE).to(tl.int64)
    row_ok = rows < M
    feature_ok = features < N
    x_tile = x_ptr + rows[:, None] * stride_xm + column[None, :] * stride_xk
    w_tile = w_ptr + features[:, None] * stride_wn + column[None, :] * stride_wk

    acc = tl.zeros([BLOCK_M, TILE], dtype=ACC_DTYPE)
    first = tl.load(tile_ptr + tile_row)
    last = tl.load(tile_ptr + tile_row + 1)
    for entry in range(first, last):
        tile_col = tl.load(tile_cols_ptr + entry).to(tl.int64)
        k_start = tile_col * TILE
        k_ok = (k_start + column) < K
        x = tl.load(x_tile + k_start * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_tile + k_start * stride_wk, mask=feature_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.where(_tile_keep(words_ptr, features, feature_ok, words_per_row, tile_col, TILE), w, 0.0)
        acc = _dot(x, tl.trans(w), acc, PRECISION, UPCAST_BF16, ACC_DTYPE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=feature_ok, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + rows[:, None] * N + features[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & feature_ok[None, :])


@triton.jit
def _masked_sddmm_kernel(grad_ptr, x_ptr, words_ptr, tile_ptr, tile_cols_ptr, out_ptr,
                         M, N, K, stride_gm, stride_gn, stride_xm, stride_xk, words_per_row,
                         BLOCK_M: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr,
                         PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr, ACC_DTYPE: tl.constexpr):
    tile_row, tile_col = _grouped_program(tl.cdiv(N, TILE), tl.cdiv(K, TILE), GROUP)
    tile_col = tile_col.to(tl.int64)
    features = tile_row.to(tl.int64) * TILE + tl.arange(0, TILE)
    columns = tile_col * TILE + tl.arange(0, TILE)
    feature_ok = features < N
    column_ok = columns < K

    # Is this tile in the plan? Binary search of the tile row's ascending column list.
    low = tl.load(tile_ptr + tile_row)
    high = tl.load(tile_ptr + tile_row + 1)
    end = high
    while low < high:
        middle = (low + high) // 2
        before = tl.load(tile_cols_ptr + middle) < tile_col
        low = tl.where(before, middle + 1, low)
        high = tl.where(before, high, middle)
    listed = tl.load(tile_cols_ptr + low, mask=low < end, other=-1) == tile_col

    acc = tl.zeros([TILE, TILE], dtype=ACC_DTYPE)
    if listed:
        grad_columns = grad_ptr + features[:, None] * stride_gn
        x_columns = x_ptr + columns[None, :] * stride_xk
        for start in range(0, M, BLOCK_M):
            # int64 rows: start is as wide as M, and rows * stride passes 2**31 on big batches.
            batch = start + tl.arange(0, BLOCK_M).to(tl.int64)
            batch_ok = batch < M
            # Loaded as grad_out.T tiles [TILE, BLOCK_M]: the dot's first operand as it is used.
            grad_t = tl.load(grad_columns + batch[None, :] * stride_gm, mask=feature_ok[:, None] & batch_ok[None, :],
                             other=0.0)
            x = tl.load(x_columns + batch[:, None] * stride_xm, mask=batch_ok[:, None] & column_ok[None, :], other=0.0)
            acc = _dot(grad_t, x, acc, PRECISION, UPCAST_BF16, ACC_DTYPE)
        acc = tl.where(_tile_keep(words_ptr, features, feature_ok, words_per_row, tile_col, TILE), acc, 0.0)
    tl.store(out_ptr + features[:, None] * K + columns[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=feature_ok[:, None] & column_ok[None, :])


def _check_tile(op: str, tile: int) -> None:
    if tile not in TILES:
        raise ValueError(f"dynasparse.{op}: the Triton kernels support tile in {TILES} (the block of the plan and "
                         f"the kernels' BLOCK_N = BLOCK_K), got {tile}; plan the mask with block {DEFAULT_TILE}")


def _interpreted_bf16(dtype: torch.dtype) -> bool:
    # Kernels are interpreted or compiled as a whole module, fixed at import.
    return dtype == torch.bfloat16 and isinstance(_masked_mm_kernel, InterpretedFunction)


def _dot_options(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    else:
        # Ignored for 16-bit operands; fp64 has no reduced-precision mode.
        precision = "ieee" if dtype == torch.float64 else "tf32"
    return {"PRECISION": precision, "ACC_DTYPE": _ACCUMULATOR[dtype], "UPCAST_BF16": _interpreted_bf16(dtype)}


def _empty_output(shape, like: torch.Tensor) -> torch.Tensor:
    """The kernels' output buffer. The interpreter converts fp32 to bf16 by truncation (a GPU
    rounds to nearest), so interpreted bf16 kernels write fp32 that torch then rounds."""
    return torch.empty(shape, dtype=torch.float32 if _interpreted_bf16(like.dtype) else like.dtype, device=like.device)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """(..., K) as [rows, K]: a view whenever the strides allow, since the kernels take strides."""
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


def masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile: int, bias=None) -> torch.Tensor:
    """x (..., K) @ where(m, weight, 0).T (+ bias) -> (..., N), m given as pack_mask(m) and the
    block plan of m with block `tile`. weight may be any strided [N, K] view (e.g. w.T)."""
    check_masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile, bias)
    _check_tile("masked_mm", tile)
    n, k = weight.shape
    check_block_plan_values("masked_mm", tile_ptr, tile_cols, tile, n, k)
    x2d = _rows(x)
    m = x2d.shape[0]
    y = _empty_output((m, n), x)
    if m and n:
        words = mask_words.contiguous()
        grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, tile),)
        _masked_mm_kernel[grid](
            x2d, weight, words, tile_ptr, tile_cols, x2d if bias is None else bias.contiguous(), y,
            m, n, k, x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), words.shape[1],
            BLOCK_M=BLOCK_M, TILE=tile, GROUP=GROUP, HAS_BIAS=bias is not None,
            **_dot_options(x.dtype), **_mm_options(x.dtype, tile))
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile: int) -> torch.Tensor:
    """Dense [N, K] = where(m, grad_out.T @ x, 0) over all leading dims; tiles the plan does not
    list are written as zeros without being computed."""
    check_masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile)
    _check_tile("masked_sddmm", tile)
    n, k = grad_out.shape[-1], x.shape[-1]
    check_block_plan_values("masked_sddmm", tile_ptr, tile_cols, tile, n, k)
    grad2d, x2d = _rows(grad_out), _rows(x)
    out = _empty_output((n, k), x)
    if n and k:
        words = mask_words.contiguous()
        grid = (triton.cdiv(n, tile) * triton.cdiv(k, tile),)
        _masked_sddmm_kernel[grid](
            grad2d, x2d, words, tile_ptr, tile_cols, out,
            x2d.shape[0], n, k, grad2d.stride(0), grad2d.stride(1), x2d.stride(0), x2d.stride(1), words.shape[1],
            BLOCK_M=BLOCK_M, TILE=tile, GROUP=GROUP, **_dot_options(x.dtype),
            **_sddmm_options(x.dtype, tile))
    return out.to(x.dtype)


def _spec(kernel, operand_types: dict[str, str], integers: list[str], constexprs: dict, options: dict) -> dict:
    # A stride of 1 is a constexpr in the launched variant (Triton specializes ints equal to 1);
    # every other argument is 16-aligned / a multiple of 16 at the GPU benchmark shapes.
    signature = {**operand_types, "words_ptr": "*i32", "tile_ptr": "*i64", "tile_cols_ptr": "*i32",
                 **{name: "i32" for name in integers if name not in constexprs}}
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs, "options": options,
            "divisible_by_16": list(signature)}


def _specs() -> list[dict]:
    # Sizes and strides as i32, as Triton types them below 2**31 (the kernels widen every index
    # to int64 themselves). Each tile, operand dtype, accumulator, bias flag and the ieee/tf32 dot
    # precisions compile at least once; the GPU default (bf16, tile 64) with the layouts a sparse
    # layer launches: forward (x, w contiguous), input gradient (w.T: unit stride along N) and
    # weight gradient. TF32 fp32 (only when torch allows it) differs from the listed ieee fp32
    # in the tl.dot precision alone.
    configs = [  # (operand dtype, tile, dot precision, masked_mm with bias, masked_mm unit strides)
        (torch.bfloat16, 64, "tf32", True, ("stride_xk", "stride_wk")),
        (torch.bfloat16, 64, "tf32", False, ("stride_xk", "stride_wn")),
        (torch.float16, 128, "tf32", False, ("stride_xk", "stride_wk")),
        (torch.float32, 32, "ieee", True, ("stride_xk", "stride_wk")),
        (torch.float64, 64, "ieee", False, ("stride_xk", "stride_wk")),
    ]
    specs, sddmm_configs = [], set()
    for dtype, tile, precision, has_bias, unit_strides in configs:
        operand = _POINTER_TYPES[dtype]
        dot = {"PRECISION": precision, "UPCAST_BF16": False, "ACC_DTYPE": _ACCUMULATOR[dtype]}
        specs.append(_spec(
            _masked_mm_kernel,
            {"x_ptr": operand, "w_ptr": operand, "bias_ptr": operand, "y_ptr": operand},
            ["M", "N", "K", "stride_xm", "stride_xk", "stride_wn", "stride_wk", "words_per_row"],
            {"BLOCK_M": BLOCK_M, "TILE": tile, "GROUP": GROUP, "HAS_BIAS": has_bias, **dot,
             **{stride: 1 for stride in unit_strides}},
            _mm_options(dtype, tile)))
        if (dtype, tile) in sddmm_configs:
            continue  # masked_sddmm has one layout (grad_out and x contiguous) and no bias
        sddmm_configs.add((dtype, tile))
        specs.append(_spec(
            _masked_sddmm_kernel,
            {"grad_ptr": operand, "x_ptr": operand, "out_ptr": operand},
            ["M", "N", "K", "stride_gm", "stride_gn", "stride_xm", "stride_xk", "words_per_row"],
            {"BLOCK_M": BLOCK_M, "TILE": tile, "GROUP": GROUP, **dot, "stride_gn": 1, "stride_xk": 1},
            _sddmm_options(dtype, tile)))
    return specs


# Every kernel of this module with its launch configs (see _specs); dynasparse.kernels.aot
# compiles each for sm_80 and sm_90 (format: see kernels/aot.py).
AOT_SPECS = _specs()
