"""Triton fused bitmask matmul (masked_mm, masked_sddmm) against float64 torch on a bool mask.

The oracle never sees the bitmask or the tile plan: x.double() @ where(m, w, 0).double().T.
Tolerance (fp32, fp16, bf16): our largest error against float64 is at most twice torch's own
error in the same dtype (same device), plus one rounding of the largest output (eps * max
|result|), which covers cases where torch happens to be exact. Under TRITON_INTERPRET=1 bf16
operands are upcast to fp32 before tl.dot (the interpreter's bf16 dot returns garbage) and the
fp32 result is rounded by torch (the interpreter truncates); both are exact or GPU-equivalent,
so the same tolerance applies. Interpreted runs are slow: weights stay near 70 x 45.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton fixes interpret mode when a @triton.jit decorator runs, so before the imports below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dynasparse import ops  # noqa: E402
from dynasparse.kernels import matmul as kernels  # noqa: E402
from dynasparse.ops import matmul as matmul_ops  # noqa: E402
from tests.helpers import random_mask  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
N, K = 70, 45  # neither a multiple of a tile nor of 32


def generator(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=generator(seed)).to(device=DEVICE, dtype=dtype)


def bitmask_plan(mask, tile):
    """The kernels' view of a mask: its packed words and its block plan."""
    tile_ptr, tile_cols = ops.plan_blocks(mask, tile, backend="reference")
    return ops.pack_mask(mask), tile_ptr, tile_cols


def masked_linear(x, weight, mask, bias):
    y = x @ torch.where(mask, weight, 0).T
    return y if bias is None else y + bias


def masked_weight_grad(grad_out, x, mask):
    return torch.where(mask, grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1]), 0)


def assert_close_as_torch(ours, oracle_fn, *operands):
    """ours vs oracle_fn in float64, within twice the error of oracle_fn run in ours' dtype
    plus one rounding of the largest output. For float64 operands torch's own error is zero
    by construction, so there the bound is 8 roundings of the largest sum of |products|."""
    exact = oracle_fn(*[None if t is None else t.double() for t in operands])
    torch_own = oracle_fn(*operands)
    assert ours.dtype == torch_own.dtype and ours.shape == exact.shape and ours.device == exact.device
    if ours.numel() == 0:
        return
    eps = torch.finfo(ours.dtype).eps
    our_error = (ours.double() - exact).abs().max().item()
    if ours.dtype == torch.float64:
        magnitude = oracle_fn(*[None if t is None else t.abs() for t in operands]).max().item()
        assert our_error <= 8 * eps * magnitude, (our_error, magnitude)
        return
    torch_error = (torch_own.double() - exact).abs().max().item()
    one_rounding = eps * exact.abs().max().item()
    assert our_error <= 2 * torch_error + one_rounding, (our_error, torch_error, one_rounding)


def run_masked_mm(x, weight, mask, bias=None, tile=kernels.DEFAULT_TILE):
    return kernels.masked_mm(x, weight, *bitmask_plan(mask, tile), tile, bias)


def run_masked_sddmm(grad_out, x, mask, tile=kernels.DEFAULT_TILE):
    return kernels.masked_sddmm(grad_out, x, *bitmask_plan(mask, tile), tile)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_mm_matches_float64(dtype, sparsity, poisoned_empty):
    mask = random_mask((N, K), sparsity, 1, DEVICE)
    weight, x, bias = randn(N, K, dtype=dtype, seed=2), randn(33, K, dtype=dtype, seed=3), randn(N, dtype=dtype, seed=4)
    assert_close_as_torch(run_masked_mm(x, weight, mask, bias), lambda x, w, b: masked_linear(x, w, mask, b),
                          x, weight, bias)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_sddmm_matches_float64(dtype, sparsity, poisoned_empty):
    mask = random_mask((N, K), sparsity, 5, DEVICE)
    grad_out, x = randn(2, 17, N, dtype=dtype, seed=6), randn(2, 17, K, dtype=dtype, seed=7)
    assert_close_as_torch(run_masked_sddmm(grad_out, x, mask), lambda g, x: masked_weight_grad(g, x, mask),
                          grad_out, x)


@pytest.mark.parametrize("tile", kernels.TILES)
@pytest.mark.parametrize("n,k", [(70, 45), (1, 1), (129, 200), (33, 64)], ids=str)
def test_every_tile_and_odd_shapes(n, k, tile, poisoned_empty):
    mask = random_mask((n, k), 0.5, 8, DEVICE)
    weight, x, bias = randn(n, k, dtype=torch.float32, seed=9), randn(9, k, dtype=torch.float32, seed=10), None
    assert_close_as_torch(run_masked_mm(x, weight, mask, bias, tile), lambda x, w: masked_linear(x, w, mask, None),
                          x, weight)
    grad_out = randn(9, n, dtype=torch.float32, seed=11)
    assert_close_as_torch(run_masked_sddmm(grad_out, x, mask, tile), lambda g, x: masked_weight_grad(g, x, mask),
                          grad_out, x)


def test_grids_of_several_program_bands(poisoned_empty):
    """More row blocks (masked_mm) and tile rows (masked_sddmm) than one band of GROUP holds,
    the last band partial: every output tile is still visited exactly once."""
    tile = 32
    rows = kernels.GROUP * kernels.BLOCK_M + 77
    mask = random_mask((N, K), 0.5, 55, DEVICE)
    weight, x = randn(N, K, dtype=torch.float32, seed=56), randn(rows, K, dtype=torch.float32, seed=57)
    assert_close_as_torch(run_masked_mm(x, weight, mask, None, tile), lambda x, w: masked_linear(x, w, mask, None),
                          x, weight)
    n = kernels.GROUP * tile + 45
    mask = random_mask((n, K), 0.5, 58, DEVICE)
    grad_out, x = randn(5, n, dtype=torch.float32, seed=59), randn(5, K, dtype=torch.float32, seed=60)
    assert_close_as_torch(run_masked_sddmm(grad_out, x, mask, tile), lambda g, x: masked_weight_grad(g, x, mask),
                          grad_out, x)


@pytest.mark.parametrize("leading", [(), (0,), (1,), (2, 3), (3, 0, 2)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_masked_mm_leading_dims(leading, with_bias, poisoned_empty):
    mask = random_mask((N, K), 0.5, 12, DEVICE)
    weight, x = randn(N, K, dtype=torch.float32, seed=13), randn(*leading, K, dtype=torch.float32, seed=14)
    bias = randn(N, dtype=torch.float32, seed=15) if with_bias else None
    y = run_masked_mm(x, weight, mask, bias)
    assert y.shape == (*leading, N)
    assert_close_as_torch(y, lambda x, w, b: masked_linear(x, w, mask, b), x, weight, bias)


@pytest.mark.parametrize("leading", [(0,), (1,), (2, 3), (3, 0, 2)], ids=str)
def test_masked_sddmm_leading_dims(leading, poisoned_empty):
    mask = random_mask((N, K), 0.5, 16, DEVICE)
    grad_out, x = randn(*leading, N, dtype=torch.float32, seed=17), randn(*leading, K, dtype=torch.float32, seed=18)
    result = run_masked_sddmm(grad_out, x, mask)
    assert result.shape == (N, K)
    # No batch rows: every element, computed tile or skipped, is an exact zero.
    if grad_out.numel() == 0:
        assert torch.equal(result, torch.zeros(N, K, device=DEVICE))
    assert_close_as_torch(result, lambda g, x: masked_weight_grad(g, x, mask), grad_out, x)


def test_empty_weight_shapes(poisoned_empty):
    for n, k in [(0, 45), (70, 0), (0, 0)]:
        mask = random_mask((n, k), 0.5, 19, DEVICE)
        x, weight = randn(5, k, dtype=torch.float32, seed=20), randn(n, k, dtype=torch.float32, seed=21)
        bias = randn(n, dtype=torch.float32, seed=22)
        # K = 0: an empty sum, so y is the bias exactly.
        assert torch.equal(run_masked_mm(x, weight, mask, bias), masked_linear(x, weight, mask, bias))
        grad_out = randn(5, n, dtype=torch.float32, seed=23)
        assert torch.equal(run_masked_sddmm(grad_out, x, mask), torch.zeros(n, k, device=DEVICE))


def test_non_contiguous_operands(poisoned_empty):
    mask = random_mask((N, K), 0.5, 24, DEVICE)
    weight = randn(N, 2 * K, dtype=torch.float32, seed=25)[:, ::2]  # strided along K
    x = randn(K, 40, dtype=torch.float32, seed=26).T[::3]  # column-major, every third row
    x3d = randn(4, K, 5, dtype=torch.float32, seed=27).transpose(1, 2)  # leading dims that cannot be viewed flat
    assert not weight.is_contiguous() and not x.is_contiguous() and not x3d.is_contiguous()
    bias = randn(2 * N, dtype=torch.float32, seed=28)[::2]
    for operand in (x, x3d):
        assert_close_as_torch(run_masked_mm(operand, weight, mask, bias), lambda x, w, b: masked_linear(x, w, mask, b),
                              operand, weight, bias)
    grad_out = randn(N, 4, 5, dtype=torch.float32, seed=29).permute(1, 2, 0)
    assert_close_as_torch(run_masked_sddmm(grad_out, x3d, mask), lambda g, x: masked_weight_grad(g, x, mask),
                          grad_out, x3d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_input_gradient_through_a_transposed_weight_view(dtype, poisoned_empty):
    """grad_x = grad_out @ where(m, w, 0): masked_mm with w.T and the bitmask and plan of m.T."""
    mask = random_mask((N, K), 0.7, 30, DEVICE)
    weight, grad_out = randn(N, K, dtype=dtype, seed=31), randn(3, 11, N, dtype=dtype, seed=32)
    grad_x = run_masked_mm(grad_out, weight.T, mask.T.contiguous())
    assert grad_x.shape == (3, 11, K)
    assert_close_as_torch(grad_x, lambda g, w: g @ torch.where(mask, w, 0), grad_out, weight)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=str)
def test_pruned_inf_and_nan_contribute_nothing(value, poisoned_empty):
    mask = random_mask((N, K), 0.5, 33, DEVICE)
    weight = randn(N, K, dtype=torch.float16, seed=34)
    weight[~mask] = value
    x = randn(6, K, dtype=torch.float16, seed=35)
    y = run_masked_mm(x, weight, mask)
    assert torch.isfinite(y).all()
    assert_close_as_torch(y, lambda x, w: masked_linear(x, w, mask, None), x, weight)
    grad_x = run_masked_mm(randn(6, N, dtype=torch.float16, seed=36), weight.T, mask.T.contiguous())
    assert torch.isfinite(grad_x).all()


def test_the_plan_decides_which_tiles_are_visited(poisoned_empty):
    """A plan missing some active tiles (one of a sub-mask) leaves those tiles out of both
    products, so the kernels iterate the plan and never scan the whole weight."""
    tile = 32
    mask = random_mask((N, K), 0.0, 37, DEVICE)
    kept_tiles = torch.zeros(N, K, dtype=torch.bool, device=DEVICE)
    kept_tiles[:tile, tile:] = True  # tile (0, 1)
    kept_tiles[2 * tile:, :tile] = True  # tile (2, 0)
    tile_ptr, tile_cols = ops.plan_blocks(kept_tiles, tile, backend="reference")
    words = ops.pack_mask(mask)
    weight, x = randn(N, K, dtype=torch.float64, seed=38), randn(5, K, dtype=torch.float64, seed=39)
    visited = mask & kept_tiles
    y = kernels.masked_mm(x, weight, words, tile_ptr, tile_cols, tile)
    torch.testing.assert_close(y, masked_linear(x, weight, visited, None))
    grad_out = randn(5, N, dtype=torch.float64, seed=40)
    grad_weight = kernels.masked_sddmm(grad_out, x, words, tile_ptr, tile_cols, tile)
    torch.testing.assert_close(grad_weight, masked_weight_grad(grad_out, x, visited))


def test_block_mask_runs_the_same_kernels(poisoned_empty):
    """Whole 64 x 64 blocks kept (90% of them pruned): the mask is constant per tile."""
    tile = 64
    blocks = torch.rand(4, 3, generator=generator(41)) >= 0.9
    blocks[0, 0] = True
    mask = blocks.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:250, :170].to(DEVICE)
    weight, x = randn(250, 170, dtype=torch.bfloat16, seed=42), randn(7, 170, dtype=torch.bfloat16, seed=43)
    assert_close_as_torch(run_masked_mm(x, weight, mask), lambda x, w: masked_linear(x, w, mask, None), x, weight)
    grad_out = randn(7, 250, dtype=torch.bfloat16, seed=44)
    assert_close_as_torch(run_masked_sddmm(grad_out, x, mask), lambda g, x: masked_weight_grad(g, x, mask),
                          grad_out, x)


def _mm_args(dtype=torch.float32, tile=kernels.DEFAULT_TILE, device=DEVICE):
    mask = random_mask((N, K), 0.5, 45, DEVICE).to(device)
    weight, x = randn(N, K, dtype=dtype, seed=46).to(device), randn(3, K, dtype=dtype, seed=47).to(device)
    return (x, weight, *bitmask_plan(mask, tile), tile, randn(N, dtype=dtype, seed=48).to(device))


def _sddmm_args(dtype=torch.float32, tile=kernels.DEFAULT_TILE, device=DEVICE):
    mask = random_mask((N, K), 0.5, 49, DEVICE).to(device)
    grad_out, x = randn(2, 3, N, dtype=dtype, seed=50).to(device), randn(2, 3, K, dtype=dtype, seed=51).to(device)
    return (grad_out, x, *bitmask_plan(mask, tile), tile)


def _replace(args, position, value):
    return (*args[:position], value, *args[position + 1:])


def _full_plan_ptr(tile):
    """tile_ptr of a plan for an unsupported tile, so that only the tile itself is wrong."""
    return ops.plan_blocks(torch.ones(N, K, dtype=torch.bool, device=DEVICE), tile, backend="reference")[0]


def _unsupported_tile(tile):
    return rf"Triton kernels support tile in \(32, 64, 128\) .*got {tile}"


@pytest.mark.parametrize("launcher", ["kernel", "op"])
@pytest.mark.parametrize("bad,error,message", [
    (lambda mm: _replace(mm, 2, mm[2][:, :1].contiguous()), ValueError, r"mask_words must be \[70, 2\]"),
    (lambda mm: _replace(mm, 2, mm[2].to(torch.int64)), TypeError, "mask_words must be torch.int32"),
    (lambda mm: _replace(mm, 0, mm[0].half()), TypeError, "x is Half but weight is Float"),
    (lambda mm: _replace(mm, 6, mm[6].double()), TypeError, "bias is Double but x is Float"),
    (lambda mm: _replace(mm, 3, mm[3][:-1]), ValueError, "row_ptr has 2 entries"),
    (lambda mm: _replace(_replace(mm, 5, 16), 3, _full_plan_ptr(16)), ValueError, _unsupported_tile(16)),
], ids=["words-shape", "words-dtype", "x-dtype", "bias-dtype", "plan-length", "tile"])
def test_masked_mm_rejects_bad_input(launcher, bad, error, message):
    args = bad(_mm_args())
    with pytest.raises(error, match=message):
        if launcher == "kernel":
            kernels.masked_mm(*args)
        else:
            ops.masked_mm(*args, backend="triton")


@pytest.mark.parametrize("launcher", ["kernel", "op"])
@pytest.mark.parametrize("bad,error,message", [
    (lambda s: _replace(s, 2, s[2][:-1].contiguous()), ValueError, r"mask_words must be \[70, 2\]"),
    (lambda s: _replace(s, 0, s[0].bfloat16()), TypeError, "grad_out is BFloat16 but x is Float"),
    (lambda s: _replace(s, 0, s[0][:1]), ValueError, "same leading dimensions"),
    (lambda s: _replace(s, 5, 32), ValueError, "row_ptr has 3 entries"),
    (lambda s: _replace(_replace(s, 5, 256), 3, _full_plan_ptr(256)), ValueError, _unsupported_tile(256)),
], ids=["words-shape", "dtype", "leading-dims", "plan-for-another-tile", "tile"])
def test_masked_sddmm_rejects_bad_input(launcher, bad, error, message):
    args = bad(_sddmm_args())
    with pytest.raises(error, match=message):
        if launcher == "kernel":
            kernels.masked_sddmm(*args)
        else:
            ops.masked_sddmm(*args, backend="triton")


@pytest.mark.parametrize("op,args", [(matmul_ops._masked_mm, _mm_args), (matmul_ops._masked_sddmm, _sddmm_args)])
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skipif(CUDA, reason="interpreted only")),
                                    pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck_triton_overload(op, args, device):
    assert op.triton is not None and op.triton.name() == f"dynasparse::{op.name}_triton"
    torch.library.opcheck(op.triton, args(device=device))


def test_compiles_fullgraph_with_the_triton_backend():
    torch._dynamo.reset()
    x, weight, words, tile_ptr, tile_cols, tile, bias = _mm_args()

    @torch.compile(fullgraph=True, dynamic=False)
    def layer(x, weight, words, tile_ptr, tile_cols, bias):
        return torch.relu(ops.masked_mm(x, weight, words, tile_ptr, tile_cols, tile, bias, backend="triton"))

    expected = torch.relu(kernels.masked_mm(x, weight, words, tile_ptr, tile_cols, tile, bias))
    assert torch.equal(layer(x, weight, words, tile_ptr, tile_cols, bias), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity,block", [(0.9, 64), (0.9, None), (0.5, None)], ids=["block64", "unstr90", "unstr50"])
def test_benchmark_shape_matches_torch(sparsity, block):
    """The GPU target shape (bf16, x 8192 x 4096, w 4096 x 4096), all three products."""
    generator_cuda = torch.Generator(device="cuda").manual_seed(52)
    if block is None:
        mask = torch.rand(4096, 4096, device="cuda", generator=generator_cuda) >= sparsity
    else:
        blocks = torch.rand(4096 // block, 4096 // block, device="cuda", generator=generator_cuda) >= sparsity
        mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=generator_cuda)
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, generator=generator_cuda)
    grad_out = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, generator=generator_cuda)
    assert_close_as_torch(run_masked_mm(x, weight, mask), lambda x, w: masked_linear(x, w, mask, None), x, weight)
    assert_close_as_torch(run_masked_mm(grad_out, weight.T, mask.T.contiguous()),
                          lambda g, w: g @ torch.where(mask, w, 0), grad_out, weight)
    assert_close_as_torch(run_masked_sddmm(grad_out, x, mask), lambda g, x: masked_weight_grad(g, x, mask),
                          grad_out, x)


@pytest.mark.gpu
def test_offsets_past_int32_range():
    """rows * K passes 2**31 elements in x, grad_out and y; the last rows are checked against
    the same rows on their own."""
    k, n = 256, 64
    rows = 2**31 // k + 1000
    generator_cuda = torch.Generator(device="cuda").manual_seed(53)
    mask = torch.rand(n, k, device="cuda", generator=generator_cuda) >= 0.5
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=generator_cuda)
    x = torch.empty(rows, k, device="cuda", dtype=torch.bfloat16).normal_(generator=generator_cuda)
    y = run_masked_mm(x, weight, mask)
    torch.testing.assert_close(y[-300:], run_masked_mm(x[-300:].clone(), weight, mask))
    del y
    grad_out = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
    grad_out[-300:] = torch.randn(300, n, device="cuda", dtype=torch.bfloat16, generator=generator_cuda)
    torch.testing.assert_close(run_masked_sddmm(grad_out, x, mask),
                               run_masked_sddmm(grad_out[-300:].clone(), x[-300:].clone(), mask))


@pytest.mark.gpu
def test_kernels_run_on_the_current_stream():
    """Producer and kernels on a side stream, no sync in between: a kernel on the default
    stream would read x before the producer has finished writing it."""
    side = torch.cuda.Stream()
    generator_cuda = torch.Generator(device="cuda").manual_seed(54)
    mask = torch.rand(1024, 1024, device="cuda", generator=generator_cuda) >= 0.5
    weight = torch.randn(1024, 1024, device="cuda", generator=generator_cuda)
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device="cuda", generator=generator_cuda)
        for _ in range(8):
            big = torch.tanh(big @ big.T / 64)  # bounded, so x stays finite
        x = big[:512, :1024].contiguous()
        y = run_masked_mm(x, weight, mask)
        grad_weight = run_masked_sddmm(y, x, mask)
        expected_y = masked_linear(x, weight, mask, None)
        expected_grad = masked_weight_grad(y, x, mask)
    side.synchronize()
    # Loose: only finished inputs versus unfinished ones (garbage) is at stake here.
    torch.testing.assert_close(y, expected_y, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad_weight, expected_grad, rtol=1e-3, atol=1e-3)
