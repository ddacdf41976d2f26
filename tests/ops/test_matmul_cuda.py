"""The CUDA C++ panel-plan kernels (csrc/cuda/matmul.cu) against the pure-torch reference.

Plans, packing and unpacking must match the reference bit for bit (they only move data). The
products are compared with the reference evaluated in float64 on the CPU, within a bound that
scales with |x| @ |W|.T (the size of the terms summed), so a wrong term, a skipped nonzero or
an unwritten output fails while fp32 accumulation and the final rounding pass. Every test but
the registration check needs a GPU (marked `gpu`; they skip on CPU-only machines).
"""

import math
import zlib

import pytest
import torch

import dynasparse
from dynasparse import ops
from dynasparse.ops import matmul as matmul_ops
from dynasparse.reference import matmul as reference
from tests.helpers import poison_allocator

CUDA_OPS = ["plan_panels", "plan_blocks", "pack_panels", "unpack_panels", "spmm_panels", "sddmm_panels"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# Unit roundoff of the output dtype and of its accumulator (fp32 for fp32/fp16/bf16).
OUTPUT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ACCUMULATOR_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24,
                        torch.bfloat16: 2.0**-24}


def tolerance(dtype, terms):
    """Allowed error relative to the sum of |terms|: one rounding of the output plus a sum of
    `terms` rounded products (8 sqrt(terms) unit roundoffs: the statistical bound, far below the
    worst case terms * u). In float64 that is ~1e-13, so a missing or extra term always fails
    there; the narrower dtypes check the conversions."""
    return OUTPUT_ROUNDOFF[dtype] + 8 * ACCUMULATOR_ROUNDOFF[dtype] * math.sqrt(terms + 1)

gpu = pytest.mark.gpu


def _cuda_built() -> bool:
    return dynasparse.dispatch.status("cuda").built


def test_cuda_kernels_are_registered():
    """Runs without a GPU: the library was built with the CUDA kernels of this family."""
    if not _cuda_built():
        pytest.skip(f"dynasparse was built without CUDA kernels ({dynasparse._C.cuda_build})")
    for op in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynasparse::{op}", "CUDA"), op


# Inputs --------------------------------------------------------------------------------


def seed_of(*parts):
    """A seed that names the case and is the same in every process (str hashes are salted)."""
    return zlib.crc32(repr(parts).encode())


def exact_count_mask(n, k, sparsity, generator, device="cuda"):
    """Exactly round(sparsity * n * k) zeros at random positions (0 and 1 give full/empty)."""
    active = n * k - round(sparsity * n * k)
    mask = torch.zeros(n * k, dtype=torch.bool)
    mask[torch.randperm(n * k, generator=generator)[:active]] = True
    return mask.reshape(n, k).to(device)


def random_values(shape, dtype, generator, device="cuda"):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(device)


def cpu_plan(mask, panel):
    return reference.plan_panels(mask.cpu(), panel)


def assert_plans_equal(got, expected, what):
    for name, g, e in zip(("row_ptr", "cols"), got, expected):
        assert g.device.type == "cuda", f"{what}: {name} on {g.device}"
        assert g.dtype == e.dtype, f"{what}: {name} dtype {g.dtype}, expected {e.dtype}"
        assert g.shape == e.shape, f"{what}: {name} shape {tuple(g.shape)}, expected {tuple(e.shape)}"
        g = g.cpu()
        if not torch.equal(g, e):
            wrong = (g != e).nonzero().flatten()
            first = int(wrong[0])
            raise AssertionError(f"{what}: {name} differs at {wrong.numel()} of {e.numel()} entries; first at "
                                 f"{first}: got {int(g[first])}, expected {int(e[first])}")


def assert_close_to(got, expected64, bound, dtype, terms, what):
    """|got - expected| <= tolerance(dtype, terms) * bound elementwise (+ a hair for exact zeros)."""
    assert got.device.type == "cuda", f"{what}: result on {got.device}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == expected64.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected64.shape)}"
    got64 = got.cpu().double()
    error = (got64 - expected64).abs()
    allowed = tolerance(dtype, terms) * bound + 1e-30
    bad = ~(error <= allowed)  # NaN in got counts as bad
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what} [{dtype}]: {int(bad.sum())} of {got.numel()} elements off; first at {index}: "
                             f"got {float(got64[index])}, expected {float(expected64[index])}, allowed error "
                             f"{float(allowed[index])}; max error {float(error.nan_to_num(float('inf')).max())}")


def rows_of(x):
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# Plans ---------------------------------------------------------------------------------

PLAN_SHAPES = [(1, 1), (3, 5), (37, 100), (300, 129), (5, 1000), (2, 70000)]
PANELS = [1, 7, 32, 100, 373, 65536]


@gpu
@pytest.mark.parametrize("shape", PLAN_SHAPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_plan_panels_matches_the_reference(shape, sparsity):
    generator = torch.Generator().manual_seed(seed_of(shape, sparsity))
    mask = exact_count_mask(*shape, sparsity, generator)
    for panel in PANELS + [min(shape[1], 65536)]:
        if panel == 1 and shape[0] * shape[1] > 20000:
            continue  # a segment per element: covered by the smaller shapes
        assert_plans_equal(ops.plan_panels(mask, panel, backend="cuda"), cpu_plan(mask, panel),
                           f"plan_panels({shape}, sparsity {sparsity}, panel {panel})")


@gpu
def test_plan_panels_of_strided_and_empty_masks():
    generator = torch.Generator().manual_seed(1)
    base = exact_count_mask(90, 150, 0.7, generator)
    views = {"transposed": base.T, "sliced": base[3::2, 1::3], "expanded": base[:1].expand(40, 150),
             "empty rows": base[:0], "empty columns": base[:, :0], "empty": base[:0, :0]}
    for name, mask in views.items():
        for panel in (1, 13, 65536):
            assert_plans_equal(ops.plan_panels(mask, panel, backend="cuda"), cpu_plan(mask, panel),
                               f"plan_panels({name} {tuple(mask.shape)}, panel {panel})")


@gpu
def test_plan_panels_column_offsets_use_all_16_bits():
    """A panel of 65536 columns stores offsets >= 32768 as negative int16."""
    mask = torch.zeros(3, 65536 + 40, dtype=torch.bool, device="cuda")
    mask[0, [0, 32767, 32768, 65535, 65536, 65575]] = True
    mask[2, 40000] = True
    row_ptr, cols = ops.plan_panels(mask, 65536, backend="cuda")
    assert_plans_equal((row_ptr, cols), cpu_plan(mask, 65536), "plan_panels(high offsets)")
    assert (cols.cpu().to(torch.int64) & 0xFFFF).tolist() == [0, 32767, 32768, 65535, 40000, 0, 39]


@gpu
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 100), (300, 129), (129, 1000), (4, 70000)], ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_plan_blocks_matches_the_reference(shape, sparsity):
    generator = torch.Generator().manual_seed(seed_of(shape, sparsity, "blocks"))
    mask = exact_count_mask(*shape, sparsity, generator)
    for block in (1, 2, 3, 16, 64, 1000, 2**40):
        expected = reference.plan_blocks(mask.cpu(), block) if block < 2**40 else reference.plan_blocks(
            mask.cpu(), max(shape))  # one block either way; the reference would pad to 2**40
        assert_plans_equal(ops.plan_blocks(mask, block, backend="cuda"), expected,
                           f"plan_blocks({shape}, sparsity {sparsity}, block {block})")


@gpu
def test_plan_blocks_of_strided_and_empty_masks():
    generator = torch.Generator().manual_seed(2)
    base = exact_count_mask(90, 150, 0.97, generator)
    views = {"transposed": base.T, "sliced": base[3::2, 1::3], "expanded": base[:1].expand(40, 150),
             "empty rows": base[:0], "empty columns": base[:, :0], "empty": base[:0, :0]}
    for name, mask in views.items():
        for block in (1, 4, 16):
            assert_plans_equal(ops.plan_blocks(mask, block, backend="cuda"), reference.plan_blocks(mask.cpu(), block),
                               f"plan_blocks({name} {tuple(mask.shape)}, block {block})")


@gpu
def test_plans_overwrite_poisoned_memory():
    generator = torch.Generator().manual_seed(3)
    mask = exact_count_mask(70, 333, 0.8, generator)
    for _ in range(2):
        poison_allocator(1 << 20, "cuda")
        assert_plans_equal(ops.plan_panels(mask, 64, backend="cuda"), cpu_plan(mask, 64), "poisoned plan_panels")
        poison_allocator(1 << 20, "cuda")
        assert_plans_equal(ops.plan_blocks(mask, 8, backend="cuda"), reference.plan_blocks(mask.cpu(), 8),
                           "poisoned plan_blocks")


# Packing -------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("panel", [1, 9, 65536])
def test_pack_and_unpack_move_values_exactly(dtype, panel):
    generator = torch.Generator().manual_seed(4)
    for n, k, sparsity in [(1, 1, 0.0), (37, 100, 0.9), (300, 129, 0.5), (20, 500, 1.0), (0, 5, 0.5), (5, 0, 0.5)]:
        mask = exact_count_mask(n, k, sparsity, generator)
        weight = random_values((n, k), dtype, generator)
        weight_t = random_values((k, n), dtype, generator).T  # the strided view packed for w.T
        row_ptr, cols = ops.plan_panels(mask, panel, backend="cuda")
        cpu_row_ptr, cpu_cols = cpu_plan(mask, panel)
        for name, w in (("contiguous", weight), ("transposed view", weight_t)):
            what = f"pack_panels({name} [{n}, {k}], panel {panel})"
            poison_allocator(cols.numel() * w.element_size(), "cuda")
            values = ops.pack_panels(w, row_ptr, cols, panel, backend="cuda")
            expected = reference.pack_panels(w.cpu(), cpu_row_ptr, cpu_cols, panel)
            assert values.dtype == dtype and values.device.type == "cuda", what
            assert torch.equal(values.cpu(), expected), what
            poison_allocator(n * k * w.element_size(), "cuda")
            dense = ops.unpack_panels(values, row_ptr, cols, panel, n, k, backend="cuda")
            assert dense.dtype == dtype and dense.shape == (n, k), what
            assert torch.equal(dense.cpu(), torch.where(mask, w, 0).cpu()), f"unpack of {what}"


@gpu
def test_unpack_reads_non_contiguous_values():
    generator = torch.Generator().manual_seed(5)
    mask = exact_count_mask(30, 40, 0.5, generator)
    row_ptr, cols = ops.plan_panels(mask, 16, backend="cuda")
    values = random_values((cols.numel(), 2), torch.float32, generator)[:, 1]
    dense = ops.unpack_panels(values, row_ptr, cols, 16, 30, 40, backend="cuda")
    expected = reference.unpack_panels(values.cpu(), *cpu_plan(mask, 16), 16, 30, 40)
    assert torch.equal(dense.cpu(), expected)


# Products ------------------------------------------------------------------------------

# (leading dims of x, N, K): batch 0 and 1, leading dims, several batch tiles and row groups,
# K past one shared-memory chunk (372 / 186 columns) and past one 65536-wide panel.
PRODUCT_SHAPES = [((1,), 1, 1), ((0,), 7, 9), ((1,), 37, 100), ((2, 3), 300, 129), ((65,), 257, 1000),
                  ((130,), 5, 383), ((3, 0, 2), 4, 6), ((70,), 9, 70000), ((5,), 0, 10), ((5,), 10, 0)]


def product_panels(k):
    return sorted({1, 5, 186, 373, 65536, max(k, 1)}) if k <= 1000 else [373, 65536]


def spmm_expected(x, weight_dense, bias):
    """float64 reference on the CPU and the error scale |x| @ |W|.T + |bias|."""
    x64, w64 = rows_of(x.cpu().double()), weight_dense.cpu().double()
    b64 = None if bias is None else bias.cpu().double()
    expected = reference._linear(x.cpu().double(), w64, b64)
    bound = rows_of(x64).abs() @ w64.abs().T
    if b64 is not None:
        bound = bound + b64.abs()
    return expected, bound.reshape(expected.shape)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", PRODUCT_SHAPES, ids=str)
def test_spmm_panels_matches_float64_reference(dtype, sparsity, shape):
    lead, n, k = shape
    generator = torch.Generator().manual_seed(seed_of(shape, sparsity, str(dtype)))
    mask = exact_count_mask(n, k, sparsity, generator)
    weight = random_values((n, k), dtype, generator)
    x = random_values((*lead, k), dtype, generator)
    bias = random_values((n,), dtype, generator)
    dense = torch.where(mask, weight, 0)
    for panel in product_panels(k):
        if panel == 1 and n * k > 20000:
            continue
        row_ptr, cols = ops.plan_panels(mask, panel, backend="cuda")
        values = ops.pack_panels(weight, row_ptr, cols, panel, backend="cuda")
        for with_bias in (False, True):
            b = bias if with_bias else None
            expected, bound = spmm_expected(x, dense, b)
            poison_allocator(expected.numel() * x.element_size(), "cuda")
            got = ops.spmm_panels(x, values, row_ptr, cols, panel, n, b, backend="cuda")
            assert_close_to(got, expected, bound, dtype, k + 1,
                            f"spmm_panels(x {tuple(x.shape)}, W [{n}, {k}], sparsity {sparsity}, panel {panel}, "
                            f"bias {with_bias})")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_spmm_panels_reads_non_contiguous_operands(dtype):
    generator = torch.Generator().manual_seed(6)
    n, k = 70, 450
    mask = exact_count_mask(n, k, 0.9, generator)
    weight = random_values((n, k), dtype, generator)
    row_ptr, cols = ops.plan_panels(mask, 200, backend="cuda")
    values = ops.pack_panels(weight, row_ptr, cols, 200, backend="cuda")
    x = random_values((k, 3, 33), dtype, generator).permute(2, 1, 0)  # (33, 3, k), last dim strided
    bias = random_values((n, 2), dtype, generator)[:, 0]
    values_strided = torch.stack([values, values]).T[:, 1]
    got = ops.spmm_panels(x, values_strided, row_ptr, cols, 200, n, bias, backend="cuda")
    expected, bound = spmm_expected(x, torch.where(mask, weight, 0), bias)
    assert_close_to(got, expected, bound, dtype, k + 1, "spmm_panels(non-contiguous x, values, bias)")


@gpu
def test_spmm_panels_skips_pruned_non_finite_weights_and_propagates_active_ones():
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]], device="cuda")
    weight = torch.tensor([[1.0, float("nan"), 2.0], [float("inf"), 1.0, 1.0], [0.0, float("inf"), 0.0]],
                          device="cuda")
    row_ptr, cols = ops.plan_panels(mask, 2, backend="cuda")
    values = ops.pack_panels(weight, row_ptr, cols, 2, backend="cuda")
    x = torch.tensor([[1.0, 5.0, 3.0]], device="cuda")
    got = ops.spmm_panels(x, values, row_ptr, cols, 2, 3, backend="cuda").cpu()
    assert got[0, 0] == 7.0 and got[0, 1] == 0.0 and got[0, 2] == float("inf"), got


def sddmm_expected(grad_out, x, mask):
    """float64 reference at the mask's nonzeros in plan order (panel-independent values via a
    dense [N, K]) and the error scale |grad_out|.T @ |x| there."""
    g64, x64 = rows_of(grad_out.cpu().double()), rows_of(x.cpu().double())
    return reference._weight_grad(g64, x64), g64.abs().T @ x64.abs()


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", PRODUCT_SHAPES, ids=str)
def test_sddmm_panels_matches_float64_reference(dtype, sparsity, shape):
    lead, n, k = shape
    generator = torch.Generator().manual_seed(seed_of(shape, sparsity, str(dtype), "sddmm"))
    mask = exact_count_mask(n, k, sparsity, generator)
    grad_out = random_values((*lead, n), dtype, generator)
    x = random_values((*lead, k), dtype, generator)
    dense_expected, dense_bound = sddmm_expected(grad_out, x, mask)
    for panel in product_panels(k):
        if panel == 1 and n * k > 20000:
            continue
        row_ptr, cols = ops.plan_panels(mask, panel, backend="cuda")
        cpu_row_ptr, cpu_cols = cpu_plan(mask, panel)
        expected = reference.pack_panels(dense_expected, cpu_row_ptr, cpu_cols, panel)
        bound = reference.pack_panels(dense_bound, cpu_row_ptr, cpu_cols, panel)
        poison_allocator(cols.numel() * 4, "cuda")
        got = ops.sddmm_panels(grad_out, x, row_ptr, cols, panel, backend="cuda")
        assert_close_to(got, expected, bound, dtype, math.prod(lead),
                        f"sddmm_panels(grad_out {tuple(grad_out.shape)}, x {tuple(x.shape)}, sparsity {sparsity}, "
                        f"panel {panel})")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_panels_reads_non_contiguous_operands_and_long_batches(dtype):
    generator = torch.Generator().manual_seed(7)
    n, k = 300, 500
    mask = exact_count_mask(n, k, 0.95, generator)
    grad_out = random_values((n, 1000), dtype, generator).T  # (1000, n) column-major
    x = random_values((2, 1000, k), dtype, generator)[1]
    row_ptr, cols = ops.plan_panels(mask, k, backend="cuda")
    cpu_row_ptr, cpu_cols = cpu_plan(mask, k)
    dense_expected, dense_bound = sddmm_expected(grad_out, x, mask)
    got = ops.sddmm_panels(grad_out, x, row_ptr, cols, k, backend="cuda")
    assert_close_to(got, reference.pack_panels(dense_expected, cpu_row_ptr, cpu_cols, k),
                    reference.pack_panels(dense_bound, cpu_row_ptr, cpu_cols, k), dtype, 1000,
                    "sddmm_panels(non-contiguous grad_out and x, batch 1000)")


@gpu
def test_products_are_deterministic():
    generator = torch.Generator().manual_seed(8)
    mask = exact_count_mask(300, 900, 0.9, generator)
    weight = random_values((300, 900), torch.float32, generator)
    x = random_values((500, 900), torch.float32, generator)
    grad_out = random_values((500, 300), torch.float32, generator)
    plan = ops.plan_panels(mask, 65536, backend="cuda")
    values = ops.pack_panels(weight, *plan, 65536, backend="cuda")
    first = (ops.spmm_panels(x, values, *plan, 65536, 300, backend="cuda"),
             ops.sddmm_panels(grad_out, x, *plan, 65536, backend="cuda"))
    for _ in range(3):
        assert torch.equal(ops.spmm_panels(x, values, *plan, 65536, 300, backend="cuda"), first[0])
        assert torch.equal(ops.sddmm_panels(grad_out, x, *plan, 65536, backend="cuda"), first[1])


@gpu
def test_input_gradient_runs_on_the_plan_of_the_transposed_mask():
    """grad_input = grad_out @ (w * m): the forward kernel over plan(m.T) with values packed from w.T."""
    generator = torch.Generator().manual_seed(9)
    n, k = 130, 410
    mask = exact_count_mask(n, k, 0.9, generator)
    weight = random_values((n, k), torch.float32, generator)
    grad_out = random_values((4, 6, n), torch.float32, generator)
    plan_t = ops.plan_panels(mask.T, 65536, backend="cuda")
    values_t = ops.pack_panels(weight.T, *plan_t, 65536, backend="cuda")
    got = ops.spmm_panels(grad_out, values_t, *plan_t, 65536, k, backend="cuda")
    expected, bound = spmm_expected(grad_out, torch.where(mask, weight, 0).T, None)
    assert_close_to(got, expected, bound, torch.float32, n, "grad_input via plan of m.T")


# Past 2**31 elements -------------------------------------------------------------------


def _free_gpu_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@gpu
def test_past_2_to_the_31_elements():
    """fp16 weight and mask of 50000 x 50000 (2.5e9 elements) and x of 44000 x 50000: every
    flat index past 2**31 must be computed in 64 bits. Checks rows at the far end."""
    if _free_gpu_bytes() < 40 * 2**30:
        pytest.skip("needs about 40 GiB of free GPU memory")
    n = k = 50000
    batch = 44000
    device = "cuda"
    generator = torch.Generator(device=device).manual_seed(10)
    # Built in row blocks so no 10 GB fp32 temporary is needed.
    mask = torch.empty(n, k, dtype=torch.bool, device=device)
    for start in range(0, n, 5000):
        mask[start:start + 5000] = torch.rand(5000, k, generator=generator, device=device) < 0.01
    mask[-1, -1] = True
    plan = ops.plan_panels(mask, 65536, backend="cuda")
    blocks = ops.plan_blocks(mask, 64, backend="cuda")
    # The reference plans slices of 64 * 79 rows (whole block rows), each well under 2**31
    # elements; one panel spans all columns, so the slices' plans concatenate.
    for start in range(0, n, 64 * 79):
        stop = min(n, start + 64 * 79)
        row_ptr, cols = reference.plan_panels(mask[start:stop], 65536)
        assert torch.equal(plan[0][start:stop + 1], row_ptr + plan[0][start]), f"row_ptr of rows {start}:{stop}"
        assert torch.equal(plan[1][plan[0][start]:plan[0][stop]], cols), f"cols of rows {start}:{stop}"
        row_ptr, cols = reference.plan_blocks(mask[start:stop], 64)
        first, last = start // 64, math.ceil(stop / 64)
        assert torch.equal(blocks[0][first:last + 1], row_ptr + blocks[0][first]), f"block rows {first}:{last}"
        assert torch.equal(blocks[1][blocks[0][first]:blocks[0][last]], cols), f"block cols of {first}:{last}"
    assert plan[0][-1] == plan[1].numel() and blocks[0][-1] == blocks[1].numel()
    del blocks

    weight = torch.empty(n, k, dtype=torch.float16, device=device)
    for start in range(0, n, 5000):
        weight[start:start + 5000] = torch.randn(5000, k, generator=generator, device=device)
    values = ops.pack_panels(weight, *plan, 65536, backend="cuda")
    tail_rows = torch.arange(n - 300, n, device=device)  # rows whose flat offsets are past 2**31
    rows, columns = reference._panel_coordinates(*plan, 65536, n)
    assert torch.equal(values, weight[rows, columns])
    del rows, columns

    x = torch.empty(batch, k, dtype=torch.float16, device=device)
    for start in range(0, batch, 4000):
        x[start:start + 4000] = torch.randn(4000, k, generator=generator, device=device)
    out = ops.spmm_panels(x, values, *plan, 65536, n, backend="cuda")
    tail_batch = torch.arange(batch - 200, batch, device=device)
    w_tail = torch.where(mask[tail_rows], weight[tail_rows], 0).double()
    expected = x[tail_batch].double() @ w_tail.T
    bound = x[tail_batch].double().abs() @ w_tail.abs().T
    assert_close_to(out[tail_batch][:, tail_rows], expected.cpu(), bound.cpu(), torch.float16, k,
                    "spmm_panels past 2**31 (tail of out)")
    del out, w_tail

    dense = ops.unpack_panels(values, *plan, 65536, n, k, backend="cuda")
    assert torch.equal(dense[tail_rows], torch.where(mask[tail_rows], weight[tail_rows], 0))
    del dense, weight

    grad_out = torch.empty(batch, n, dtype=torch.float16, device=device)
    for start in range(0, batch, 4000):
        grad_out[start:start + 4000] = torch.randn(4000, n, generator=generator, device=device)
    got = ops.sddmm_panels(grad_out, x, *plan, 65536, backend="cuda")
    # The last 2000 nonzeros: rows near n, columns anywhere.
    last = torch.arange(values.numel() - 2000, values.numel(), device=device)
    rows, columns = reference._panel_coordinates(*plan, 65536, n)
    g = grad_out[:, rows[last]].double()
    xs = x[:, columns[last]].double()
    assert_close_to(got[last], (g * xs).sum(0).cpu(), (g.abs() * xs.abs()).sum(0).cpu(), torch.float16, batch,
                    "sddmm_panels past 2**31 (last nonzeros)")


# Bad input, streams, custom-op plumbing ------------------------------------------------


def bad_inputs():
    """(description, call(backend, device)) pairs; each must raise alike on cuda and reference."""
    def plan(device):
        mask = torch.ones(4, 6, dtype=torch.bool, device=device)
        return ops.plan_panels(mask, 4, backend="reference")

    def x_values(device, dtype=torch.float32):
        row_ptr, cols = plan(device)
        return (torch.ones(3, 6, dtype=dtype, device=device), torch.ones(cols.numel(), dtype=dtype, device=device),
                row_ptr, cols)

    return [
        ("plan of a float mask", lambda b, d: ops.plan_panels(torch.ones(3, 3, device=d), 2, backend=b)),
        ("plan of a 3-D mask", lambda b, d: ops.plan_panels(torch.ones(2, 3, 3, dtype=torch.bool, device=d), 2,
                                                            backend=b)),
        ("panel 0", lambda b, d: ops.plan_panels(torch.ones(3, 3, dtype=torch.bool, device=d), 0, backend=b)),
        ("panel 65537", lambda b, d: ops.plan_panels(torch.ones(3, 3, dtype=torch.bool, device=d), 65537,
                                                     backend=b)),
        ("block 0", lambda b, d: ops.plan_blocks(torch.ones(3, 3, dtype=torch.bool, device=d), 0, backend=b)),
        ("pack with a plan of another panel", lambda b, d: ops.pack_panels(torch.ones(4, 6, device=d), *plan(d), 2,
                                                                          backend=b)),
        ("pack an int weight", lambda b, d: ops.pack_panels(torch.ones(4, 6, dtype=torch.int32, device=d),
                                                            *plan(d), 4, backend=b)),
        ("pack with int32 row_ptr", lambda b, d: ops.pack_panels(torch.ones(4, 6, device=d), plan(d)[0].int(),
                                                                 plan(d)[1], 4, backend=b)),
        ("unpack with too few values", lambda b, d: ops.unpack_panels(torch.ones(3, device=d), *plan(d), 4, 4, 6,
                                                                       backend=b)),
        ("unpack to n = -1", lambda b, d: ops.unpack_panels(torch.ones(24, device=d), *plan(d), 4, -1, 6,
                                                             backend=b)),
        ("spmm with mixed dtypes", lambda b, d: ops.spmm_panels(
            x_values(d)[0].double(), *x_values(d)[1:], 4, 4, backend=b)),
        ("spmm with a K of more panels", lambda b, d: ops.spmm_panels(
            torch.ones(3, 9, device=d), *x_values(d)[1:], 4, 4, backend=b)),
        ("spmm with a bad bias", lambda b, d: ops.spmm_panels(*x_values(d), 4, 4, torch.ones(5, device=d),
                                                              backend=b)),
        ("spmm of a 0-d x", lambda b, d: ops.spmm_panels(torch.tensor(1.0, device=d), *x_values(d)[1:], 4, 4,
                                                         backend=b)),
        ("sddmm with other leading dims", lambda b, d: ops.sddmm_panels(
            torch.ones(2, 4, device=d), torch.ones(3, 6, device=d), *plan(d), 4, backend=b)),
        ("sddmm of int operands", lambda b, d: ops.sddmm_panels(
            torch.ones(3, 4, dtype=torch.int64, device=d), torch.ones(3, 6, dtype=torch.int64, device=d), *plan(d),
            4, backend=b)),
    ]


def _raised(call, backend, device):
    try:
        call(backend, device)
    except Exception as error:  # noqa: BLE001 (the test compares whatever is raised)
        return type(error), str(error)
    return None, "nothing raised"


@gpu
@pytest.mark.parametrize("case", range(len(bad_inputs())), ids=[name for name, _ in bad_inputs()])
def test_bad_input_raises_like_the_reference(case):
    name, call = bad_inputs()[case]
    expected_type, expected_message = _raised(call, "reference", "cuda")
    assert expected_type in (TypeError, ValueError), f"{name}: the reference raised {expected_type}"
    got_type, got_message = _raised(call, "cuda", "cuda")
    assert (got_type, got_message.split("\n")[0]) == (expected_type, expected_message.split("\n")[0]), name


@gpu
def test_mixed_devices_are_rejected():
    mask = torch.ones(4, 6, dtype=torch.bool, device="cuda")
    row_ptr, cols = ops.plan_panels(mask, 4, backend="cuda")
    with pytest.raises(ValueError, match="is on"):
        ops.spmm_panels(torch.ones(3, 6, device="cuda"), torch.ones(24), row_ptr, cols, 4, 4, backend="cuda")
    with pytest.raises(ValueError, match="is on"):
        ops.pack_panels(torch.ones(4, 6, device="cuda"), row_ptr.cpu(), cols, 4, backend="cuda")
    with pytest.raises(ValueError, match="is on"):
        ops.sddmm_panels(torch.ones(3, 4, device="cuda"), torch.ones(3, 6), row_ptr, cols, 4, backend="cuda")


@gpu
def test_cuda_kernels_run_on_the_current_stream():
    """Producers and kernels on a side stream, no sync in between: a kernel on the default
    stream would read its inputs before the producers finished writing them."""
    side = torch.cuda.Stream()
    generator = torch.Generator(device="cuda").manual_seed(11)
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device="cuda", generator=generator)
        for _ in range(8):
            big = torch.tanh(big @ big.T / 64)  # slow to produce, bounded values
        mask = big[:500, :700] > 0.5
        weight = big[1000:1500, :700].clone()
        x = big[2000:2300, :700] * 1.0
        grad_out = big[3000:3300, :500] * 1.0
        row_ptr, cols = ops.plan_panels(mask, 300, backend="cuda")
        block_plan = ops.plan_blocks(mask, 16, backend="cuda")
        values = ops.pack_panels(weight, row_ptr, cols, 300, backend="cuda")
        dense = ops.unpack_panels(values * 1.0, row_ptr, cols, 300, 500, 700, backend="cuda")
        out = ops.spmm_panels(x, values, row_ptr, cols, 300, 500, backend="cuda")
        grad = ops.sddmm_panels(grad_out, x, row_ptr, cols, 300, backend="cuda")
    side.synchronize()
    mask_cpu = mask.cpu()
    assert_plans_equal((row_ptr, cols), cpu_plan(mask_cpu, 300), "plan_panels on a side stream")
    assert_plans_equal(block_plan, reference.plan_blocks(mask_cpu, 16), "plan_blocks on a side stream")
    assert torch.equal(dense.cpu(), torch.where(mask, weight, 0).cpu())
    expected, bound = spmm_expected(x, dense, None)
    assert_close_to(out, expected, bound, torch.float32, 700, "spmm_panels on a side stream")
    dense_expected, dense_bound = sddmm_expected(grad_out, x, mask)
    cpu_row_ptr, cpu_cols = cpu_plan(mask_cpu, 300)
    assert_close_to(grad, reference.pack_panels(dense_expected, cpu_row_ptr, cpu_cols, 300),
                    reference.pack_panels(dense_bound, cpu_row_ptr, cpu_cols, 300), torch.float32, 300,
                    "sddmm_panels on a side stream")


def opcheck_args():
    generator = torch.Generator().manual_seed(12)
    mask = exact_count_mask(9, 13, 0.6, generator)
    row_ptr, cols = ops.plan_panels(mask, 5, backend="cuda")
    weight = random_values((9, 13), torch.float32, generator)
    values = ops.pack_panels(weight, row_ptr, cols, 5, backend="cuda")
    x = random_values((2, 3, 13), torch.float32, generator)
    grad_out = random_values((2, 3, 9), torch.float32, generator)
    bias = random_values((9,), torch.float32, generator)
    return [
        (matmul_ops._plan_panels, (mask, 5)),
        (matmul_ops._plan_panels, (mask.T, 65536)),
        (matmul_ops._plan_blocks, (mask, 4)),
        (matmul_ops._plan_blocks, (mask[:, :0], 4)),
        (matmul_ops._pack_panels, (weight, row_ptr, cols, 5)),
        (matmul_ops._unpack_panels, (values, row_ptr, cols, 5, 9, 13)),
        (matmul_ops._spmm_panels, (x, values, row_ptr, cols, 5, 9)),
        (matmul_ops._spmm_panels, (x.half(), values.half(), row_ptr, cols, 5, 9, bias.half())),
        (matmul_ops._sddmm_panels, (grad_out, x, row_ptr, cols, 5)),
        (matmul_ops._sddmm_panels, (grad_out.bfloat16(), x.bfloat16(), row_ptr, cols, 5)),
    ]


@gpu
@pytest.mark.parametrize("case", range(10))
def test_opcheck_every_overload(case):
    op, args = opcheck_args()[case]
    overloads = op.overloads()
    assert overloads[0].name() == f"dynasparse::{op.name}"
    for overload in overloads:
        torch.library.opcheck(overload, args)


@gpu
def test_compiles_fullgraph():
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(13)
    mask = exact_count_mask(40, 70, 0.8, generator)
    weight = random_values((40, 70), torch.float32, generator)
    x = random_values((5, 70), torch.float32, generator)
    row_ptr, cols = ops.plan_panels(mask, 65536, backend="cuda")

    @torch.compile(fullgraph=True, dynamic=False)
    def step(x, weight, grad_out):
        values = ops.pack_panels(weight, row_ptr, cols, 65536, backend="cuda")
        y = ops.spmm_panels(x, values, row_ptr, cols, 65536, 40, backend="cuda")
        return y, ops.sddmm_panels(grad_out, x, row_ptr, cols, 65536, backend="cuda")

    grad_out = random_values((5, 40), torch.float32, generator)
    y, grad = step(x, weight, grad_out)
    values = ops.pack_panels(weight, row_ptr, cols, 65536, backend="cuda")
    assert torch.equal(y, ops.spmm_panels(x, values, row_ptr, cols, 65536, 40, backend="cuda"))
    assert torch.equal(grad, ops.sddmm_panels(grad_out, x, row_ptr, cols, 65536, backend="cuda"))
