"""The CPU kernels of the panel plan (csrc/cpu/matmul_panels.cpp) at their own edges: panel
boundaries, empty rows and segments, SIMD and batch-slice tails, strided inputs, thread splits.
Plans and packed values must equal the reference exactly; products are held to float64 torch
with at most twice torch's own error in the same dtype."""

import pytest
import torch

from dynasparse import ops
from dynasparse.ops import matmul as matmul_ops
from dynasparse.reference import matmul as reference
from tests.helpers import assert_close_to_float64, poison_allocator, random_mask

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# 1 and 7: many tiny panels; 128 and the default 256: several 64-column mask words per panel.
PANELS = [1, 7, 128, 256]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def generator_for(*key):
    return torch.Generator().manual_seed(hash(key) % 2**31)


def masked(weight, mask):
    return torch.where(mask, weight, 0)


def plan(mask, panel):
    return ops.plan_panels(mask, panel, backend="cpu")


@pytest.mark.parametrize("panel", PANELS + [300, 65536])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", [(37, 301), (1, 1), (5, 64), (3, 129), (0, 7), (7, 0)], ids=str)
def test_plan_equals_reference(shape, sparsity, panel):
    mask = random_mask(shape, sparsity, generator_for(shape, sparsity, panel))
    row_ptr, cols = plan(mask, panel)
    expected_ptr, expected_cols = reference.plan_panels(mask, panel)
    assert row_ptr.dtype == torch.int64 and cols.dtype == torch.int16
    assert torch.equal(row_ptr, expected_ptr) and torch.equal(cols, expected_cols)


@pytest.mark.parametrize("panel", [7, 128, 65536])
def test_plan_of_strided_masks(panel):
    generator = generator_for("strided", panel)
    mask = random_mask((41, 70000), 0.9, generator) if panel == 65536 else random_mask((301, 37), 0.5, generator)
    for view in (mask.T, mask[::2, 1::3]):
        row_ptr, cols = plan(view, panel)
        expected_ptr, expected_cols = reference.plan_panels(view.contiguous(), panel)
        assert torch.equal(row_ptr, expected_ptr) and torch.equal(cols, expected_cols)


def test_offsets_above_32767_keep_their_bit_pattern():
    mask = torch.zeros(2, 70000, dtype=torch.bool)
    mask[0, [0, 32767, 32768, 65535, 65536, 69999]] = True
    row_ptr, cols = plan(mask, 65536)
    assert row_ptr.tolist() == [0, 4, 4, 6, 6]
    assert (cols.to(torch.int64) & 0xFFFF).tolist() == [0, 32767, 32768, 65535, 0, 4463]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("panel", PANELS)
@pytest.mark.parametrize("transposed", [False, True], ids=["w", "w.T"])
def test_pack_and_unpack_are_exact(dtype, panel, transposed):
    generator = generator_for("pack", dtype, panel, transposed)
    mask = random_mask((37, 301), 0.5, generator)
    weight = torch.randn(37, 301, generator=generator).to(dtype)
    if transposed:  # the input gradient's plan: m.T, values from the w.T view
        mask, weight = mask.T, weight.T
    row_ptr, cols = plan(mask, panel)
    poison_allocator(cols.numel() * weight.element_size(), "cpu")
    values = ops.pack_panels(weight, row_ptr, cols, panel, backend="cpu")
    assert values.dtype == dtype
    assert torch.equal(values, reference.pack_panels(weight.contiguous(), row_ptr, cols, panel))
    if panel >= weight.shape[1]:  # one panel: plan order is the mask's row-major order
        assert torch.equal(values, weight[mask])
    dense = ops.unpack_panels(values, row_ptr, cols, panel, *weight.shape, backend="cpu")
    assert torch.equal(dense, masked(weight, mask))


def product_case(n, k, sparsity, panel, dtype, key):
    generator = generator_for(n, k, sparsity, panel, dtype, key)
    mask = random_mask((n, k), sparsity, generator)
    weight = torch.randn(n, k, generator=generator)
    row_ptr, cols = plan(mask, panel)
    values = ops.pack_panels(weight.to(dtype), row_ptr, cols, panel, backend="cpu")
    return generator, mask, weight, row_ptr, cols, values


def strided_input(leading, k, generator, dtype, contiguous):
    x = torch.randn(*leading, k if contiguous else 2 * k + 1, generator=generator)
    return (x if contiguous else x[..., 1::2]).to(dtype)


# Batch sizes: empty, the batch-1 gather path, tails of the slices (AVX-512: 16/32/64 rows,
# AVX2: 8/16/32), several slices.
LEADING = [(0,), (1,), (5,), (12,), (2, 3), (20,), (33,), (130,), (2, 0, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("panel", PANELS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_spmm_matches_float64(cpu_isa, dtype, panel, sparsity):
    n, k = 37, 301
    generator, mask, weight, row_ptr, cols, values = product_case(n, k, sparsity, panel, dtype, "spmm")
    exact_weight = masked(weight.to(dtype), mask).double()
    for leading in LEADING:
        for contiguous in (True, False):
            x = strided_input(leading, k, generator, dtype, contiguous)
            bias = torch.randn(n, generator=generator).to(dtype) if contiguous else None
            poison_allocator(x[..., :1].numel() * n * x.element_size(), "cpu")
            y = ops.spmm_panels(x, values, row_ptr, cols, panel, n, bias, backend="cpu")
            assert y.shape == (*leading, n) and y.dtype == dtype
            exact = x.double() @ exact_weight.T + (0 if bias is None else bias.double())
            torch_own = x @ masked(weight.to(dtype), mask).T + (0 if bias is None else bias)
            assert_close_to_float64(y, torch_own, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("panel", [7, 128])
def test_input_gradient_over_the_transposed_plan(cpu_isa, dtype, panel):
    n, k = 45, 260
    generator = generator_for("grad_input", dtype, panel)
    mask = random_mask((n, k), 0.9, generator)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    row_ptr, cols = plan(mask.T, panel)
    values = ops.pack_panels(weight.T, row_ptr, cols, panel, backend="cpu")
    for batch in (1, 17, 70):
        grad_out = torch.randn(batch, n, generator=generator).to(dtype)
        grad_input = ops.spmm_panels(grad_out, values, row_ptr, cols, panel, k, backend="cpu")
        exact = grad_out.double() @ masked(weight, mask).double()
        assert_close_to_float64(grad_input, grad_out @ masked(weight, mask), exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("panel", PANELS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_sddmm_matches_float64(cpu_isa, dtype, panel, sparsity):
    n, k = 37, 301
    generator, mask, _, row_ptr, cols, _ = product_case(n, k, sparsity, panel, dtype, "sddmm")
    for leading in LEADING:
        for contiguous in (True, False):
            grad_out = strided_input(leading, n, generator, dtype, contiguous)
            x = strided_input(leading, k, generator, dtype, not contiguous)
            poison_allocator(cols.numel() * x.element_size(), "cpu")
            values = ops.sddmm_panels(grad_out, x, row_ptr, cols, panel, backend="cpu")
            assert values.shape == cols.shape and values.dtype == dtype
            exact = (grad_out.double().reshape(-1, n).T @ x.double().reshape(-1, k))[mask]
            torch_own = (grad_out.reshape(-1, n).T @ x.reshape(-1, k))[mask]
            # Plan order is panel-major; compare in the mask's row-major order.
            dense = ops.unpack_panels(values, row_ptr, cols, panel, n, k, backend="cpu")
            assert_close_to_float64(dense[mask], torch_own, exact)


def test_rows_without_nonzeros_and_wide_rows_across_threads(cpu_isa):
    """Empty rows between full ones, rows longer than a slice of work, under 1 and 2 threads:
    bitwise the same (the summation order does not depend on the split)."""
    n, k, panel = 1100, 700, 128
    generator = generator_for("threads")
    mask = random_mask((n, k), 0.7, generator)
    mask[::3] = False
    mask[1::7] = True
    weight = torch.randn(n, k, generator=generator)
    row_ptr, cols = plan(mask, panel)
    values = ops.pack_panels(weight, row_ptr, cols, panel, backend="cpu")
    x = torch.randn(70, k, generator=generator)
    grad_out = torch.randn(70, n, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append((ops.spmm_panels(x, values, row_ptr, cols, panel, n, backend="cpu"),
                             ops.spmm_panels(x[:1], values, row_ptr, cols, panel, n, backend="cpu"),
                             ops.sddmm_panels(grad_out, x, row_ptr, cols, panel, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    exact = x.double() @ masked(weight, mask).double().T
    assert_close_to_float64(results[0][0], x @ masked(weight, mask).T, exact)
    assert (results[0][0][:, ~mask.any(1)] == 0).all()


def test_sddmm_of_an_empty_batch_is_zero():
    mask = torch.ones(3, 5, dtype=torch.bool)
    row_ptr, cols = plan(mask, 2)
    values = ops.sddmm_panels(torch.empty(0, 3), torch.empty(0, 5), row_ptr, cols, 2, backend="cpu")
    assert torch.equal(values, torch.zeros(15))


# Where in a long segment a bad offset sits: the vectorized checks read 16 or 32 offsets at a
# time (first vector, a later one, the partial last one); the plan's last entry has no vector
# past it.
@pytest.mark.parametrize("where", ["second", "seventeenth", "last_of_segment", "last_of_plan"])
@pytest.mark.parametrize("edit", ["repeat_previous", "past_width"])
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_a_bad_offset_anywhere_in_a_long_segment_raises(cpu_isa, where, edit, batch):
    n, k, panel = 4, 300, 256
    generator = generator_for("long segments", where, edit)
    mask = random_mask((n, k), 0.05, generator)
    row_ptr, cols = plan(mask, panel)
    values = torch.randn(cols.numel(), generator=generator)
    begin, end = int(row_ptr[2]), int(row_ptr[3])  # row 2 of panel 0: about 240 offsets
    position = {"second": begin + 1, "seventeenth": begin + 16, "last_of_segment": end - 1,
                "last_of_plan": cols.numel() - 1}[where]
    bad = cols.clone()
    if edit == "repeat_previous":
        bad[position] = bad[position - 1]
        error, match = ValueError, "must ascend"
    else:
        width = panel if position < int(row_ptr[n]) else k - panel
        bad[position] = width
        error, match = IndexError, "is outside panel"
    x = torch.randn(batch, k, generator=generator)
    with pytest.raises(error, match=match):
        ops.spmm_panels(x, values, row_ptr, bad, panel, n, backend="cpu")
    with pytest.raises(error, match=match):
        ops.sddmm_panels(torch.randn(batch, n, generator=generator), x, row_ptr, bad, panel, backend="cpu")


def small_plan(panel=4):
    mask = random_mask((6, 10), 0.5, generator_for("small"))
    row_ptr, cols = plan(mask, panel)
    return mask, row_ptr, cols


def test_bad_inputs_raise_the_shared_errors():
    mask, row_ptr, cols = small_plan()
    weight = torch.randn(6, 10)
    values = ops.pack_panels(weight, row_ptr, cols, 4, backend="cpu")
    x = torch.randn(3, 10)
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        ops.plan_panels(mask.float(), 4, backend="cpu")
    with pytest.raises(ValueError, match="panel must be in"):
        ops.plan_panels(mask, 65537, backend="cpu")
    with pytest.raises(ValueError, match="row_ptr has"):
        ops.pack_panels(weight, row_ptr[:-1], cols, 4, backend="cpu")
    with pytest.raises(ValueError, match="row_ptr has"):
        ops.spmm_panels(x, values, row_ptr, cols, 5, 6, backend="cpu")
    with pytest.raises(TypeError, match="cols must be"):
        ops.spmm_panels(x, values, row_ptr, cols.int(), 4, 6, backend="cpu")
    with pytest.raises(TypeError, match="values is"):
        ops.spmm_panels(x, values.double(), row_ptr, cols, 4, 6, backend="cpu")
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.spmm_panels(x, values, row_ptr, cols, 4, 6, torch.zeros(5), backend="cpu")
    with pytest.raises(TypeError, match="grad_out is"):
        ops.sddmm_panels(torch.randn(3, 6).double(), x, row_ptr, cols, 4, backend="cpu")
    with pytest.raises(ValueError, match="same leading dimensions"):
        ops.sddmm_panels(torch.randn(2, 6), x, row_ptr, cols, 4, backend="cpu")
    with pytest.raises(ValueError, match="values must be 1-D"):
        ops.unpack_panels(values[:-1], row_ptr, cols, 4, 6, 10, backend="cpu")


def opcheck_cases():
    mask, row_ptr, cols = small_plan()
    values = ops.pack_panels(torch.randn(6, 10), row_ptr, cols, 4, backend="cpu")
    x = torch.randn(2, 3, 10)
    return [
        (matmul_ops._plan_panels, (mask, 4)),
        (matmul_ops._pack_panels, (torch.randn(10, 6).T, row_ptr, cols, 4)),
        (matmul_ops._unpack_panels, (values, row_ptr, cols, 4, 6, 10)),
        (matmul_ops._spmm_panels, (x, values, row_ptr, cols, 4, 6, torch.randn(6))),
        (matmul_ops._spmm_panels, (x[0, :1], values, row_ptr, cols, 4, 6)),
        (matmul_ops._sddmm_panels, (torch.randn(2, 3, 6), x, row_ptr, cols, 4)),
    ]


# plan_panels' cols has a data-dependent length (an unbacked symbol in its fake): static AOT
# dispatch traces without a ShapeEnv and raises DynamicOutputShapeException, as for
# torch.nonzero; the dynamic variant (with a ShapeEnv) passes.
DATA_DEPENDENT = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    for overload in op.overloads():
        utils = DATA_DEPENDENT if op is matmul_ops._plan_panels else None
        if utils is None:
            torch.library.opcheck(overload, args)
        else:
            torch.library.opcheck(overload, args, test_utils=utils)


def test_products_compile_fullgraph():
    torch._dynamo.reset()
    mask, row_ptr, cols = small_plan()
    weight = torch.randn(6, 10)
    values = ops.pack_panels(weight, row_ptr, cols, 4, backend="cpu")

    @torch.compile(fullgraph=True, dynamic=False)
    def layer(x, grad_out):
        y = ops.spmm_panels(x, values, row_ptr, cols, 4, 6, backend="cpu")
        return y, ops.sddmm_panels(grad_out, x, row_ptr, cols, 4, backend="cpu")

    x, grad_out = torch.randn(5, 10), torch.randn(5, 6)
    y, grad_values = layer(x, grad_out)
    assert torch.equal(y, ops.spmm_panels(x, values, row_ptr, cols, 4, 6, backend="cpu"))
    assert torch.equal(grad_values, ops.sddmm_panels(grad_out, x, row_ptr, cols, 4, backend="cpu"))
