"""Block-plan kernels of the CPU backend (csrc/cpu/matmul_blocks.cpp) against float64 dense torch:
plans and packed blocks exactly as the reference builds them, products within twice torch's own
rounding error, edge blocks, batch tails of the AVX-512 tiles, strided views, every dtype."""

import math

import pytest
import torch

from dynasparse import ops
from dynasparse.ops import matmul as matmul_ops
from dynasparse.reference import matmul as reference
from tests.helpers import poison_allocator, random_block_mask

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BLOCKS = [1, 3, 16, 32, 64]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def block_mask(n, k, block, sparsity, element_level, generator):
    """Whole blocks kept at random, or (element_level) a random 30% of each kept block's elements."""
    return random_block_mask(n, k, block, sparsity, generator, inner_sparsity=0.7 if element_level else 0.0)


def weight_with_pruned_garbage(n, k, mask, dtype, generator):
    """Random weights; pruned positions hold inf / nan / huge values that must contribute nothing."""
    weight = torch.randn(n, k, generator=generator, dtype=torch.float64)
    garbage = torch.tensor([float("inf"), float("nan"), -float("inf"), 1e30], dtype=torch.float64)
    pruned = garbage[torch.randint(0, 4, (n, k), generator=generator)]
    return torch.where(mask, weight, pruned).to(dtype)


def assert_within_torch_error(ours, exact, torch_result, scale, dtype):
    """Our error vs float64 is at most twice torch's own, with an eps * |x| |w| floor (exact zeros)."""
    assert ours.dtype == dtype and ours.shape == exact.shape
    ours = ours.double()
    assert torch.isfinite(ours).all()
    eps = torch.finfo(dtype).eps
    allowed = 2 * torch.maximum((torch_result.double() - exact).abs().max() if exact.numel() else torch.tensor(0.0),
                                eps * scale.max() if scale.numel() else torch.tensor(0.0))
    if dtype == torch.float64:
        allowed = 64 * eps * (scale.max() if scale.numel() else 1.0)
    error = (ours - exact).abs().max() if exact.numel() else torch.tensor(0.0)
    assert error <= allowed, f"error {float(error):.3g} > allowed {float(allowed):.3g}"


# Plans and packing ---------------------------------------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("element_level", [False, True], ids=["block-mask", "element-mask"])
def test_plan_and_pack_match_reference(block, sparsity, element_level, poisoned_empty):
    generator = torch.Generator().manual_seed(hash((block, sparsity, element_level)) % 2**31)
    n, k = 3 * block + 5, 2 * block + 7
    mask = block_mask(n, k, block, sparsity, element_level, generator)
    weight = weight_with_pruned_garbage(n, k, mask, torch.float32, generator)
    # Row-major, the transposed views the input-gradient plan packs from, and a general stride.
    for w, m in [(weight, mask), (weight.T, mask.T), (weight[:, ::2], mask[:, ::2])]:
        row_ptr, cols = ops.plan_blocks(m, block, backend="cpu")
        expected_ptr, expected_cols = reference.plan_blocks(m.contiguous(), block)
        assert row_ptr.dtype == torch.int64 and cols.dtype == torch.int32
        assert torch.equal(row_ptr, expected_ptr) and torch.equal(cols, expected_cols)
        values = ops.pack_blocks(w, m, row_ptr, cols, block, backend="cpu")
        expected = reference.pack_blocks(w.contiguous(), m.contiguous(), row_ptr, cols, block)
        assert values.shape == (cols.numel(), block, block)
        assert torch.equal(values.view(torch.int32), expected.view(torch.int32))  # bit-identical
        dense = ops.unpack_blocks(values, row_ptr, cols, *m.shape, backend="cpu")
        assert torch.equal(dense.view(torch.int32), torch.where(m, w, 0).view(torch.int32))


def test_plan_is_exact_on_a_sparse_element_mask():
    # One element per listed block, in the blocks' far corners: an edge read is not enough.
    mask = torch.zeros(70, 45, dtype=torch.bool)
    mask[31, 63 - 32] = mask[32, 0] = mask[69, 44] = True
    row_ptr, cols = ops.plan_blocks(mask, 32, backend="cpu")
    assert row_ptr.tolist() == [0, 1, 2, 3] and cols.tolist() == [0, 0, 1]
    row_ptr_t, cols_t = ops.plan_blocks(mask.T, 32, backend="cpu")
    assert row_ptr_t.tolist() == [0, 2, 3] and cols_t.tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_every_dtype_bit_identical(dtype):
    generator = torch.Generator().manual_seed(3)
    mask = block_mask(37, 50, 16, 0.5, True, generator)
    weight = weight_with_pruned_garbage(37, 50, mask, dtype, generator)
    weight[mask & (torch.rand(37, 50, generator=generator) < 0.1)] = -0.0  # the sign of a kept zero survives
    row_ptr, cols = ops.plan_blocks(mask, 16, backend="cpu")
    values = ops.pack_blocks(weight.T, mask.T, *ops.plan_blocks(mask.T, 16, backend="cpu"), 16, backend="cpu")
    expected = reference.pack_blocks(weight.T, mask.T, *reference.plan_blocks(mask.T, 16), 16)
    assert values.dtype == dtype and torch.equal(values.view(torch.uint8), expected.view(torch.uint8))
    values = ops.pack_blocks(weight, mask, row_ptr, cols, 16, backend="cpu")
    expected = reference.pack_blocks(weight, mask, row_ptr, cols, 16)
    assert torch.equal(values.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("shape", [(0, 0), (0, 9), (9, 0), (1, 1)])
def test_plan_empty_and_tiny(shape):
    mask = torch.ones(shape, dtype=torch.bool)
    row_ptr, cols = ops.plan_blocks(mask, 4, backend="cpu")
    expected_ptr, expected_cols = reference.plan_blocks(mask, 4)
    assert torch.equal(row_ptr, expected_ptr) and torch.equal(cols, expected_cols)
    weight = torch.randn(shape)
    values = ops.pack_blocks(weight, mask, row_ptr, cols, 4, backend="cpu")
    assert torch.equal(values, reference.pack_blocks(weight, mask, row_ptr, cols, 4))
    assert torch.equal(ops.unpack_blocks(values, row_ptr, cols, *shape, backend="cpu"), weight)


# Products -------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [3, 32])
@pytest.mark.parametrize("n,k", [(9, 0), (0, 9), (33, 40)])
def test_products_with_empty_dimensions(block, n, k):
    mask = torch.ones(n, k, dtype=torch.bool)
    weight = torch.randn(n, k, dtype=torch.float64)
    values, row_ptr, cols = plan_of(weight, mask, block)
    bias = torch.randn(n, dtype=torch.float64)
    for leading in [(0,), (2, 3)]:
        x = torch.randn(*leading, k, dtype=torch.float64)
        y = ops.spmm_blocks(x, values, row_ptr, cols, n, bias, backend="cpu")
        torch.testing.assert_close(y, x @ weight.T + bias)
        grad_out = torch.randn(*leading, n, dtype=torch.float64)
        rows = math.prod(leading)
        expected = reference.pack_blocks(grad_out.reshape(rows, n).T @ x.reshape(rows, k), mask, row_ptr, cols, block)
        torch.testing.assert_close(ops.sddmm_blocks(grad_out, x, mask, row_ptr, cols, block, backend="cpu"), expected)


def plan_of(weight, mask, block):
    row_ptr, cols = ops.plan_blocks(mask, block, backend="cpu")
    return ops.pack_blocks(weight, mask, row_ptr, cols, block, backend="cpu"), row_ptr, cols


def check_spmm(x, weight, mask, block, bias, dtype):
    values, row_ptr, cols = plan_of(weight, mask, block)
    n = weight.shape[0]
    poison_allocator(x[..., :1].numel() * n * x.element_size(), "cpu")
    y = ops.spmm_blocks(x, values, row_ptr, cols, n, bias, backend="cpu")
    masked = torch.where(mask, weight, 0)
    exact = x.double() @ masked.double().T + (0 if bias is None else bias.double())
    torch_result = x @ masked.T + (0 if bias is None else bias)
    scale = x.double().abs() @ masked.double().abs().T + (0 if bias is None else bias.double().abs())
    assert_within_torch_error(y, exact, torch_result, scale, dtype)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("element_level", [False, True], ids=["block-mask", "element-mask"])
def test_spmm_fp32_forward_and_input_gradient(block, sparsity, element_level, poisoned_empty):
    generator = torch.Generator().manual_seed(hash((block, sparsity, element_level, "spmm")) % 2**31)
    n, k = 2 * block + 3, 3 * block + 5  # odd, not multiples of b nor of the vector width
    mask = block_mask(n, k, block, sparsity, element_level, generator)
    weight = weight_with_pruned_garbage(n, k, mask, torch.float32, generator)
    for leading in [(0,), (1,), (5,), (3, 43)]:  # small-batch path, batch tails, 129 rows
        x = torch.randn(*leading, k, generator=generator)
        bias = torch.randn(n, generator=generator) if len(leading) == 2 else None
        check_spmm(x, weight, mask, block, bias, torch.float32)
        # Input gradient: grad_out (..., n) @ (w * m), the same kernel over the plan of m.T.
        grad_out = torch.randn(*leading, n, generator=generator)
        check_spmm(grad_out, weight.T, mask.T, block, None, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [3, 32])
def test_spmm_every_dtype_strided_x(dtype, block, poisoned_empty):
    generator = torch.Generator().manual_seed(hash((dtype, block)) % 2**31)
    n, k = 70, 45
    mask = block_mask(n, k, block, 0.5, True, generator)
    weight = weight_with_pruned_garbage(n, k, mask, dtype, generator)
    bias = torch.randn(n, generator=generator).to(dtype)
    for rows in [1, 7, 8, 50]:
        x = torch.randn(rows, 2 * k, generator=generator).to(dtype)[:, ::2]  # non-contiguous
        check_spmm(x, weight, mask, block, bias, dtype)
        check_spmm(torch.randn(k, rows, generator=generator).to(dtype).T, weight, mask, block, None, dtype)


def test_spmm_is_independent_of_thread_count():
    generator = torch.Generator().manual_seed(5)
    mask = block_mask(300, 260, 32, 0.5, False, generator)
    values, row_ptr, cols = plan_of(torch.randn(300, 260, generator=generator), mask, 32)
    x = torch.randn(77, 260, generator=generator)
    grad_out = torch.randn(77, 300, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in [1, 2]:
            torch.set_num_threads(count)
            results.append((ops.spmm_blocks(x, values, row_ptr, cols, 300, backend="cpu"),
                            ops.sddmm_blocks(grad_out, x, mask, row_ptr, cols, 32, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def check_sddmm(grad_out, x, mask, block, dtype):
    row_ptr, cols = ops.plan_blocks(mask, block, backend="cpu")
    values = ops.sddmm_blocks(grad_out, x, mask, row_ptr, cols, block, backend="cpu")
    rows = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    exact = rows(grad_out).double().T @ rows(x).double()
    torch_result = rows(grad_out).T @ rows(x)
    scale = rows(grad_out).double().abs().T @ rows(x).double().abs()
    pack = lambda dense: reference.pack_blocks(dense, mask, row_ptr, cols, block)  # noqa: E731
    assert_within_torch_error(values, pack(exact), pack(torch_result.double()), pack(scale), dtype)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("element_level", [False, True], ids=["block-mask", "element-mask"])
def test_sddmm_fp32(block, sparsity, element_level, poisoned_empty):
    generator = torch.Generator().manual_seed(hash((block, sparsity, element_level, "sddmm")) % 2**31)
    n, k = 3 * block + 5, 2 * block + 3
    mask = block_mask(n, k, block, sparsity, element_level, generator)
    for leading in [(0,), (1,), (5,), (2, 64)]:
        grad_out = torch.randn(*leading, n, generator=generator)
        x = torch.randn(*leading, k, generator=generator)
        check_sddmm(grad_out, x, mask, block, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_every_dtype_strided_inputs_and_mask(dtype, poisoned_empty):
    generator = torch.Generator().manual_seed(hash(dtype) % 2**31)
    mask = block_mask(50, 70, 16, 0.5, True, generator)
    grad_out = torch.randn(2 * 50, 33, generator=generator).to(dtype).T[:, ::2]
    x = torch.randn(33, 70, generator=generator).to(dtype)
    check_sddmm(grad_out, x, mask, 16, dtype)
    check_sddmm(x, grad_out, mask.T, 16, dtype)  # the transposed mask view


# Errors and custom-op plumbing ----------------------------------------------------------


def test_bad_inputs_raise_the_shared_errors():
    mask = torch.ones(40, 30, dtype=torch.bool)
    weight = torch.randn(40, 30)
    row_ptr, cols = ops.plan_blocks(mask, 16, backend="cpu")
    values = ops.pack_blocks(weight, mask, row_ptr, cols, 16, backend="cpu")
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        ops.plan_blocks(mask.float(), 16, backend="cpu")
    with pytest.raises(ValueError, match="block must be >= 1"):
        ops.plan_blocks(mask, 0, backend="cpu")
    with pytest.raises(ValueError, match="a plan built for another shape or block size"):
        ops.pack_blocks(weight[:20], mask[:20], row_ptr, cols, 16, backend="cpu")
    with pytest.raises(ValueError, match="mask has shape"):
        ops.pack_blocks(weight, mask[:, :20], row_ptr, cols, 16, backend="cpu")
    with pytest.raises(TypeError, match="cols must be Int"):
        ops.spmm_blocks(torch.randn(2, 30), values, row_ptr, cols.long(), 40, backend="cpu")
    with pytest.raises(ValueError, match="values must be"):
        ops.spmm_blocks(torch.randn(2, 30), values[:, :8], row_ptr, cols, 40, backend="cpu")
    with pytest.raises(TypeError, match="one dtype per product"):
        ops.spmm_blocks(torch.randn(2, 30, dtype=torch.float64), values, row_ptr, cols, 40, backend="cpu")
    with pytest.raises(ValueError, match=r"bias must have shape \[40\]"):
        ops.spmm_blocks(torch.randn(2, 30), values, row_ptr, cols, 40, torch.randn(30), backend="cpu")
    with pytest.raises(ValueError, match="must have the same leading dimensions"):
        ops.sddmm_blocks(torch.randn(3, 40), torch.randn(2, 30), mask, row_ptr, cols, 16, backend="cpu")
    with pytest.raises(ValueError, match=r"mask must be \[40, 30\]"):
        ops.sddmm_blocks(torch.randn(2, 40), torch.randn(2, 30), mask.T, row_ptr, cols, 16, backend="cpu")


def opcheck_args():
    generator = torch.Generator().manual_seed(8)
    mask = block_mask(37, 50, 16, 0.5, True, generator)
    weight = torch.randn(37, 50, generator=generator)
    row_ptr, cols = reference.plan_blocks(mask, 16)
    values = reference.pack_blocks(weight, mask, row_ptr, cols, 16)
    x = torch.randn(3, 50, generator=generator)
    return [
        (matmul_ops._pack_blocks, (weight, mask, row_ptr, cols, 16)),
        (matmul_ops._pack_blocks, (weight.T, mask.T, *reference.plan_blocks(mask.T, 16), 16)),
        (matmul_ops._unpack_blocks, (values, row_ptr, cols, 37, 50)),
        (matmul_ops._spmm_blocks, (x, values, row_ptr, cols, 37, torch.randn(37, generator=generator))),
        (matmul_ops._spmm_blocks, (x, values, row_ptr, cols, 37)),
        (matmul_ops._sddmm_blocks, (torch.randn(3, 37, generator=generator), x, mask, row_ptr, cols, 16)),
    ]


@pytest.mark.parametrize("case", range(len(opcheck_args())))
def test_opcheck(case):
    op, args = opcheck_args()[case]
    for overload in op.overloads():
        torch.library.opcheck(overload, args)


# plan_blocks' cols length depends on the mask's data (new_dynamic_size in its fake): fake
# tensors with a ShapeEnv (test_faketensor, test_aot_dispatch_dynamic) handle it, but
# test_aot_dispatch_static traces without one and raises DynamicOutputShapeException.
def test_opcheck_plan_blocks_all_but_static_aot():
    mask = block_mask(37, 50, 16, 0.5, True, torch.Generator().manual_seed(9))
    for overload in matmul_ops._plan_blocks.overloads():
        torch.library.opcheck(overload, (mask, 16), test_utils=(
            "test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
