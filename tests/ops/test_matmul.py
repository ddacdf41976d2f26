"""Masked matmul ops on every backend against oracles independent of dynasparse: plans
against a row-by-row construction from the definition, products against float64 torch on
the dense w * m. Kernel-specific edge cases live beside each backend's own test file."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynasparse import dispatch, ops
from dynasparse.layout import MaskPlan
from dynasparse.ops import matmul as matmul_ops
from tests.helpers import (assert_close_to_float64, backend_device_params, poison_allocator, random_block_mask,
                           random_mask)


def backends(op: str):
    return backend_device_params(op) + [pytest.param("reference", "cpu", id="reference")]


SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# (N, K): odd sizes, not multiples of panels, blocks or vector widths; empty ones.
SHAPES = [(37, 301), (1, 5), (64, 64), (70, 129), (0, 9), (6, 0)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        device=device, dtype=dtype)


# --- oracles, written from the definitions in csrc/ops.cpp ---

def panel_order(mask, panel):
    """Row pointers and the (row, column) of every nonzero, panel by panel, row by row."""
    dense = mask.cpu().numpy()
    n, k = dense.shape
    row_ptr, positions = [0], []
    for p in range(-(-k // panel)):
        for row in range(n):
            offsets = np.nonzero(dense[row, p * panel:(p + 1) * panel])[0]
            positions.extend((row, p * panel + offset) for offset in offsets.tolist())
            row_ptr.append(len(positions))
    return row_ptr, positions


def panel_plan_oracle(mask, panel):
    row_ptr, positions = panel_order(mask, panel)
    offsets = np.array([column % panel for _, column in positions], dtype=np.int64)
    as_int16 = offsets.astype(np.uint16).view(np.int16)
    return torch.tensor(row_ptr, dtype=torch.int64), torch.from_numpy(as_int16.copy())


def panel_values_oracle(weight, mask, panel):
    _, positions = panel_order(mask, panel)
    dense = weight.cpu()
    return torch.stack([dense[row, column] for row, column in positions]) if positions else dense.new_zeros(0)


def block_plan_oracle(mask, block):
    dense = mask.cpu().numpy()
    n, k = dense.shape
    row_ptr, cols = [0], []
    for r in range(-(-n // block)):
        for c in range(-(-k // block)):
            if dense[r * block:(r + 1) * block, c * block:(c + 1) * block].any():
                cols.append(c)
        row_ptr.append(len(cols))
    return torch.tensor(row_ptr, dtype=torch.int64), torch.tensor(cols, dtype=torch.int32)


def masked_dense(weight, mask):
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


# --- plans ---

@pytest.mark.parametrize("backend,device", backends("plan_panels"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("panel", [1, 7, 256, 65536])
def test_plan_panels_matches_definition(backend, device, shape, sparsity, panel):
    mask = random_mask(shape, sparsity, hash((shape, sparsity, panel)) % 2**31, device=device)
    row_ptr, cols = ops.plan_panels(mask, panel, backend=backend)
    expected_ptr, expected_cols = panel_plan_oracle(mask, panel)
    assert torch.equal(row_ptr.cpu(), expected_ptr)
    assert torch.equal(cols.cpu(), expected_cols)


@pytest.mark.parametrize("backend,device", backends("plan_blocks"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("block", [1, 3, 16, 32, 64])
def test_plan_blocks_matches_definition(backend, device, shape, sparsity, block):
    mask = random_block_mask(*shape, block, sparsity, hash((shape, sparsity, block)) % 2**31, inner_sparsity=0.1,
                             device=device)
    row_ptr, cols = ops.plan_blocks(mask, block, backend=backend)
    expected_ptr, expected_cols = block_plan_oracle(mask, block)
    assert torch.equal(row_ptr.cpu(), expected_ptr)
    assert torch.equal(cols.cpu(), expected_cols)


@pytest.mark.parametrize("backend,device", backends("plan_panels"))
def test_plans_of_transposed_views(backend, device):
    mask = random_mask((45, 70), 0.8, 3, device=device)
    for view in (mask.T, mask[::2, 1::3]):
        assert torch.equal(ops.plan_panels(view, 16, backend=backend)[1].cpu(), panel_plan_oracle(view, 16)[1])
        assert torch.equal(ops.plan_blocks(view, 16, backend=backend)[1].cpu(), block_plan_oracle(view, 16)[1])


# --- packing ---

@pytest.mark.parametrize("backend,device", backends("pack_panels"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
@pytest.mark.parametrize("transposed", [False, True])
def test_pack_and_unpack_panels(backend, device, shape, sparsity, transposed):
    n, k = shape
    mask = random_mask((n, k), sparsity, 11, device=device)
    weight = randn(n, k, seed=12, device=device)
    if transposed:  # the input gradient packs from w.T views
        mask, weight = mask.T, weight.T
    row_ptr, cols = panel_plan_oracle(mask, 7)
    row_ptr, cols = row_ptr.to(device), cols.to(device)
    poison_allocator(cols.numel() * 4, device)
    values = ops.pack_panels(weight, row_ptr, cols, 7, backend=backend)
    assert torch.equal(values.cpu(), panel_values_oracle(weight, mask, 7))
    dense = ops.unpack_panels(values, row_ptr, cols, 7, *mask.shape, backend=backend)
    assert torch.equal(dense.cpu(), masked_dense(weight, mask).cpu())


@pytest.mark.parametrize("backend,device", backends("pack_blocks"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("block", [1, 16, 32])
@pytest.mark.parametrize("transposed", [False, True])
def test_pack_and_unpack_blocks(backend, device, shape, block, transposed):
    n, k = shape
    mask = random_block_mask(n, k, block, 0.6, 13, inner_sparsity=0.1).to(device)
    weight = randn(n, k, seed=14, device=device)
    weight[~mask] = float("inf")  # pruned entries must contribute nothing, not inf * 0
    if transposed:
        mask, weight = mask.T, weight.T
    row_ptr, cols = (t.to(device) for t in block_plan_oracle(mask, block))
    values = ops.pack_blocks(weight, mask, row_ptr, cols, block, backend=backend)
    dense = masked_dense(weight, mask).cpu()
    rows, columns = mask.shape
    padded = torch.zeros(-(-rows // block) * block, -(-columns // block) * block, dtype=dense.dtype)
    padded[:rows, :columns] = dense
    block_rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1), torch.diff(row_ptr.cpu()))
    expected = torch.stack([padded[r * block:(r + 1) * block, c * block:(c + 1) * block]
                            for r, c in zip(block_rows.tolist(), cols.cpu().tolist())]) if cols.numel() else \
        torch.zeros(0, block, block, dtype=dense.dtype)
    assert torch.equal(values.cpu(), expected)
    assert torch.equal(ops.unpack_blocks(values, row_ptr, cols, rows, columns, backend=backend).cpu(), dense)


# --- products ---

def dense_products(x, weight, mask, grad_out, bias):
    """float64 oracle and torch's own result in the inputs' precision."""
    def run(dtype):
        wm = masked_dense(weight.cpu().to(dtype), mask.cpu())
        rows = math.prod(x.shape[:-1])
        x_rows = x.cpu().to(dtype).reshape(rows, x.shape[-1])
        g_rows = grad_out.cpu().to(dtype).reshape(rows, grad_out.shape[-1])
        y = x_rows @ wm.T + (bias.cpu().to(dtype) if bias is not None else 0)
        return (y.reshape(*x.shape[:-1], weight.shape[0]), (g_rows @ wm).reshape(*x.shape),
                masked_dense(g_rows.T @ x_rows, mask.cpu()))
    return run(torch.float64), run(x.dtype)


PRODUCT_CASES = [  # (N, K, leading dims of x)
    (37, 301, (5,)), (70, 129, (2, 3)), (64, 64, (1,)), (33, 17, (0,)), (5, 0, (3,)), (0, 7, (2,))]


def product_inputs(n, k, lead, dtype, sparsity, device, seed, block=None):
    mask = (random_block_mask(n, k, block, sparsity, seed, inner_sparsity=0.1) if block
            else random_mask((n, k), sparsity, seed)).to(device)
    weight = randn(n, k, dtype=dtype, seed=seed + 1, device=device)
    x_wide = randn(*lead, 2 * k, dtype=dtype, seed=seed + 2, device=device)
    x = x_wide[..., ::2]  # non-contiguous
    grad_out = randn(*lead, n, dtype=dtype, seed=seed + 3, device=device)
    bias = randn(n, dtype=dtype, seed=seed + 4, device=device)
    return mask, weight, x, grad_out, bias


@pytest.mark.parametrize("backend,device", backends("spmm_panels"))
@pytest.mark.parametrize("case", PRODUCT_CASES, ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_panel_products(backend, device, case, sparsity, dtype):
    n, k, lead = case
    mask, weight, x, grad_out, bias = product_inputs(n, k, lead, dtype, sparsity, device, seed=21)
    (y64, gx64, gw64), (y, gx, gw) = dense_products(x, weight, mask, grad_out, bias)
    row_ptr, cols = (t.to(device) for t in panel_plan_oracle(mask, 64))
    row_ptr_t, cols_t = (t.to(device) for t in panel_plan_oracle(mask.T, 64))
    values = ops.pack_panels(weight, row_ptr, cols, 64, backend="reference")
    values_t = ops.pack_panels(weight.T, row_ptr_t, cols_t, 64, backend="reference")
    poison_allocator(y64.numel() * dtype.itemsize, device)
    assert_close_to_float64(ops.spmm_panels(x, values, row_ptr, cols, 64, n, bias, backend=backend), y, y64)
    assert_close_to_float64(ops.spmm_panels(grad_out, values_t, row_ptr_t, cols_t, 64, k, backend=backend), gx, gx64)
    packed_grad = ops.sddmm_panels(grad_out, x, row_ptr, cols, 64, backend=backend)
    unpacked = ops.unpack_panels(packed_grad.cpu(), row_ptr.cpu(), cols.cpu(), 64, n, k, backend="reference")
    assert_close_to_float64(unpacked, gw, gw64)


@pytest.mark.parametrize("backend,device", backends("spmm_blocks"))
@pytest.mark.parametrize("case", PRODUCT_CASES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [16, 32])
def test_block_products(backend, device, case, sparsity, dtype, block):
    n, k, lead = case
    mask, weight, x, grad_out, bias = product_inputs(n, k, lead, dtype, sparsity, device, seed=31, block=block)
    (y64, gx64, gw64), (y, gx, gw) = dense_products(x, weight, mask, grad_out, bias)
    row_ptr, cols = (t.to(device) for t in block_plan_oracle(mask, block))
    row_ptr_t, cols_t = (t.to(device) for t in block_plan_oracle(mask.T, block))
    values = ops.pack_blocks(weight, mask, row_ptr, cols, block, backend="reference")
    values_t = ops.pack_blocks(weight.T, mask.T, row_ptr_t, cols_t, block, backend="reference")
    poison_allocator(y64.numel() * dtype.itemsize, device)
    assert_close_to_float64(ops.spmm_blocks(x, values, row_ptr, cols, n, bias, backend=backend), y, y64)
    assert_close_to_float64(ops.spmm_blocks(grad_out, values_t, row_ptr_t, cols_t, k, backend=backend), gx, gx64)
    packed_grad = ops.sddmm_blocks(grad_out, x, mask, row_ptr, cols, block, backend=backend)
    unpacked = ops.unpack_blocks(packed_grad.cpu(), row_ptr.cpu(), cols.cpu(), n, k, backend="reference")
    assert_close_to_float64(unpacked, gw, gw64)


@pytest.mark.parametrize("backend,device", backends("masked_mm"))
@pytest.mark.parametrize("case", PRODUCT_CASES[:4], ids=str)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_bitmask_products(backend, device, case, sparsity, dtype):
    n, k, lead = case
    mask, weight, x, grad_out, bias = product_inputs(n, k, lead, dtype, sparsity, device, seed=41)
    weight[~mask] = float("nan")  # never read as a value: masked in registers
    (y64, gx64, gw64), (y, gx, gw) = dense_products(x, torch.where(mask, weight, 0), mask, grad_out, bias)
    words, words_t = ops.pack_mask(mask), ops.pack_mask(mask.T)
    tiles = [t.to(device) for t in block_plan_oracle(mask, 64)]
    tiles_t = [t.to(device) for t in block_plan_oracle(mask.T, 64)]
    assert_close_to_float64(ops.masked_mm(x, weight, words, *tiles, 64, bias, backend=backend), y, y64)
    assert_close_to_float64(ops.masked_mm(grad_out, weight.T, words_t, *tiles_t, 64, backend=backend), gx, gx64)
    assert_close_to_float64(ops.masked_sddmm(grad_out, x, words, *tiles, 64, backend=backend), gw, gw64)


# --- the differentiable layer product ---

PLAN_KINDS = [("unstructured", None, "panels"), ("2:4", None, "panels"), ("block", 16, "blocks"),
              ("block", 32, "blocks"), ("unstructured", None, "bitmask")]


def plan_mask(layout, block, n, k, sparsity, seed):
    if layout == "block":
        return random_block_mask(n, k, block, sparsity, seed, inner_sparsity=0.1)
    if layout == "2:4":
        return ops.nm_mask(randn(n, k, seed=seed), 2, 4, backend="reference")
    return random_mask((n, k), sparsity, seed)


@pytest.mark.parametrize("layout,block,kernel", PLAN_KINDS, ids=str)
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
def test_plan_linear_forward_and_backward(layout, block, kernel, grad_mode, sparsity):
    n, k = 45, 132
    mask = plan_mask(layout, block, n, k, sparsity, seed=51)
    weight = randn(n, k, seed=52).requires_grad_()
    bias = randn(n, seed=53).requires_grad_()
    x = randn(3, 4, k, seed=54).requires_grad_()
    plan = MaskPlan(mask, layout, block=block, kernel=kernel)
    assert plan.kernel == kernel
    y = plan.linear(x, weight, bias, grad_mode)
    grad_out = randn(*y.shape, seed=55)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_out)

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y64 = x64 @ masked_dense(w64, mask).T + b64
    gx64, gw64, gb64 = torch.autograd.grad(y64, (x64, w64, b64), grad_out.double())
    if grad_mode == "feedback":  # DPF: the gradient taken at w * m reaches every weight
        gw64 = grad_out.double().reshape(12, n).T @ x64.detach().reshape(12, k)
    else:
        assert (grads[1][~mask] == 0).all()
    for ours, exact in zip((y, *grads), (y64, gx64, gw64, gb64)):
        torch.testing.assert_close(ours.double(), exact.detach(), rtol=1e-4, atol=1e-4)


def test_plan_repacks_only_when_the_weight_changes():
    mask = random_mask((20, 40), 0.5, 61)
    weight = randn(20, 40, seed=62)
    plan = MaskPlan(mask, kernel="panels")
    first = plan.pack(weight)
    assert plan.pack(weight) is first
    with torch.no_grad():
        weight.mul_(2)  # an optimizer step bumps the version counter
    second = plan.pack(weight)
    assert second is not first
    torch.testing.assert_close(second, 2 * first)


@pytest.mark.parametrize("layout,block", [("unstructured", None), ("block", 16), ("block", 32)])
def test_transposed_values_reordered_from_the_forward_ones_equal_a_fresh_pack(layout, block):
    n, k = 70, 45
    mask = random_block_mask(n, k, block, 0.5, 68, inner_sparsity=0.1) if block else random_mask((n, k), 0.7, 68)
    weight = randn(n, k, seed=69)
    plan = MaskPlan(mask, layout, block=block)
    plan.pack(weight)  # the forward's values are current: the reordering path
    reordered = plan.pack_transposed(weight)
    fresh = MaskPlan(mask, layout, block=block).pack_transposed(weight)  # no forward values: a strided pack
    assert torch.equal(reordered, fresh)
    with torch.no_grad():
        weight.add_(1)  # stale forward values must not be reordered
    assert torch.equal(plan.pack_transposed(weight), MaskPlan(mask, layout, block=block).pack_transposed(weight))


def test_stale_plan_is_detected():
    mask = random_mask((20, 40), 0.5, 63)
    plan = MaskPlan(mask, kernel="panels")
    weight, x = randn(20, 40, seed=64), randn(3, 40, seed=65)
    plan.linear(x, weight)
    mask[0, 0] = not mask[0, 0]
    with pytest.raises(ValueError, match="modified in place"):
        plan.linear(x, weight)
    with pytest.raises(ValueError, match="another mask"):
        MaskPlan(random_mask((20, 40), 0.5, 66), kernel="panels").check(mask)
    with pytest.raises(ValueError, match="shape"):
        MaskPlan(mask, kernel="panels").linear(x, randn(21, 40))


@pytest.mark.parametrize("arguments,match", [
    (dict(layout="diagonal"), "unknown layout"),
    (dict(layout="block", block=24), "block in"),
    (dict(layout="unstructured", block=16), "only applies"),
    (dict(layout="unstructured", kernel="blocks"), "needs layout 'block'"),
    (dict(layout="unstructured", kernel="cusparse"), "unknown kernel"),
])
def test_plan_rejects_bad_layouts(arguments, match):
    with pytest.raises(ValueError, match=match):
        MaskPlan(random_mask((8, 16), 0.5, 67), **arguments)


def test_two_four_layout_checks_the_pattern():
    with pytest.raises(ValueError, match="at most 2 active"):
        MaskPlan(torch.ones(4, 8, dtype=torch.bool), "2:4")
    with pytest.raises(ValueError, match="divisible by 4"):
        MaskPlan(torch.zeros(4, 6, dtype=torch.bool), "2:4")


# --- bad input, alike on every backend ---

def _panel_args(device):
    mask = random_mask((6, 10), 0.5, 71, device=device)
    row_ptr, cols = (t.to(device) for t in panel_plan_oracle(mask, 4))
    weight = randn(6, 10, device=device)
    values = weight[mask]
    return mask, row_ptr, cols, weight, values


@pytest.mark.parametrize("backend,device", backends("spmm_panels"))
def test_bad_panel_inputs(backend, device):
    mask, row_ptr, cols, weight, values = _panel_args(device)
    x = randn(3, 10, device=device)
    with pytest.raises(ValueError, match="row_ptr has"):
        ops.spmm_panels(x, values, row_ptr[:-1].contiguous(), cols, 4, 6, backend=backend)
    with pytest.raises(TypeError, match="cols must be"):
        ops.spmm_panels(x, values, row_ptr, cols.int(), 4, 6, backend=backend)
    with pytest.raises(TypeError, match="one dtype per product"):
        ops.spmm_panels(x.double(), values, row_ptr, cols, 4, 6, backend=backend)
    with pytest.raises(ValueError, match="row_ptr has"):  # a plan of another panel width
        ops.spmm_panels(x, values, row_ptr, cols, 8, 6, backend=backend)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.spmm_panels(x, values, row_ptr, cols, 4, 6, randn(7, device=device), backend=backend)
    with pytest.raises(ValueError, match="one entry per plan nonzero"):
        ops.spmm_panels(x, values[1:], row_ptr, cols, 4, 6, backend=backend)
    with pytest.raises(ValueError, match="panel must be in"):
        ops.spmm_panels(x, values, row_ptr, cols, 0, 6, backend=backend)
    with pytest.raises(ValueError, match="same leading dimensions"):
        ops.sddmm_panels(randn(2, 6, device=device), x, row_ptr, cols, 4, backend=backend)
    with pytest.raises(TypeError, match="must be float32"):
        ops.pack_panels(weight.int(), row_ptr, cols, 4, backend=backend)


@pytest.mark.parametrize("backend,device", backends("plan_panels"))
def test_bad_plan_inputs(backend, device):
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        ops.plan_panels(torch.ones(3, 4, device=device), 4, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        ops.plan_panels(torch.ones(3, 4, 5, dtype=torch.bool, device=device), 4, backend=backend)
    with pytest.raises(ValueError, match="panel must be in"):
        ops.plan_panels(torch.ones(3, 4, dtype=torch.bool, device=device), 65537, backend=backend)
    with pytest.raises(ValueError, match="block must be >= 1"):
        ops.plan_blocks(torch.ones(3, 4, dtype=torch.bool, device=device), 0, backend=backend)


@pytest.mark.parametrize("backend,device", backends("spmm_blocks"))
def test_bad_block_inputs(backend, device):
    mask = random_block_mask(10, 12, 4, 0.5, 72, inner_sparsity=0.1).to(device)
    row_ptr, cols = (t.to(device) for t in block_plan_oracle(mask, 4))
    weight = randn(10, 12, device=device)
    values = ops.pack_blocks(weight, mask, row_ptr, cols, 4, backend="reference")
    x = randn(2, 12, device=device)
    with pytest.raises(ValueError, match=r"values must be \["):
        ops.spmm_blocks(x, values[:, :3], row_ptr, cols, 10, backend=backend)
    with pytest.raises(ValueError, match="row_ptr has"):  # a plan for another row count
        ops.spmm_blocks(x, values, row_ptr, cols, 17, backend=backend)
    with pytest.raises(ValueError, match="mask has shape"):
        ops.pack_blocks(weight, mask[:, :11], row_ptr, cols, 4, backend=backend)


@pytest.mark.gpu
def test_conv2d_panels_on_cuda_runs_the_reference():
    mask = random_mask((6, 27), 0.5, 91)
    weight, x, bias = randn(6, 27, seed=92), randn(2, 3, 7, 9, seed=93), randn(6, seed=94)
    row_ptr, cols = ops.plan_panels(mask.cuda(), 8)
    values = ops.pack_panels(weight.cuda(), row_ptr, cols, 8)
    y = ops.conv2d_panels(x.cuda(), values, row_ptr, cols, 8, 6, (3, 3), (1, 2), (1, 1), (1, 1), bias.cuda())
    expected = F.conv2d(x.double(), torch.where(mask, weight, 0).double().reshape(6, 3, 3, 3), bias.double(),
                        stride=(1, 2), padding=1)
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-4, atol=1e-4)


# --- op contracts ---

def _opcheck_samples():
    mask = random_mask((9, 20), 0.6, 81)
    weight, x, grad_out = randn(9, 20, seed=82), randn(3, 20, seed=83), randn(3, 9, seed=84)
    bias = randn(9, seed=85)
    row_ptr, cols = panel_plan_oracle(mask, 8)
    values = ops.pack_panels(weight, row_ptr, cols, 8, backend="reference")
    block_ptr, block_cols = block_plan_oracle(mask, 4)
    blocks = ops.pack_blocks(weight, mask, block_ptr, block_cols, 4, backend="reference")
    words = ops.pack_mask(mask, backend="reference")
    tile_ptr, tile_cols = block_plan_oracle(mask, 32)  # the Triton kernels' smallest tile
    return {
        "pack_panels": (weight, row_ptr, cols, 8),
        "pack_blocks": (weight, mask, block_ptr, block_cols, 4),
        "unpack_panels": (values, row_ptr, cols, 8, 9, 20),
        "unpack_blocks": (blocks, block_ptr, block_cols, 9, 20),
        "spmm_panels": (x, values, row_ptr, cols, 8, 9, bias),
        "spmm_blocks": (x, blocks, block_ptr, block_cols, 9, bias),
        # K = 20 = 5 channels x a 2 x 2 kernel.
        "conv2d_panels": (randn(2, 5, 4, 6, seed=86), values, row_ptr, cols, 8, 9, [2, 2], [2, 1], [1, 0], [1, 2],
                          bias),
        # Its weight gradient: grad_out [2, 9, 3, 4] is that convolution's output.
        "conv2d_sddmm_panels": (randn(2, 9, 3, 4, seed=87), randn(2, 5, 4, 6, seed=86), row_ptr, cols, 8, [2, 2],
                                [2, 1], [1, 0], [1, 2]),
        "sddmm_panels": (grad_out, x, row_ptr, cols, 8),
        "sddmm_blocks": (grad_out, x, mask, block_ptr, block_cols, 4),
        "masked_mm": (x, weight, words, tile_ptr, tile_cols, 32, bias),
        "masked_sddmm": (grad_out, x, words, tile_ptr, tile_cols, 32),
        "plan_panels": (mask, 8),
        "plan_blocks": (mask, 4),
    }


OPCHECK_SAMPLES = _opcheck_samples()


@pytest.mark.parametrize("op", matmul_ops.OPS, ids=lambda op: op.name)
def test_opcheck(op):
    args = OPCHECK_SAMPLES[op.name]
    # Plan sizes depend on the mask's contents (unbacked sizes): the dynamic-shape AOT
    # check cannot trace a function whose output size only the data decides.
    utils = (("test_schema", "test_autograd_registration", "test_faketensor") if op.name.startswith("plan_")
             else ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    for overload in op.overloads():
        if overload is op.native and "CPU" not in dispatch._NATIVE_KERNELS.get(op.name, ()):
            continue  # the bitmask ops have no CPU kernel; their Triton overloads are checked
        torch.library.opcheck(overload, args, test_utils=utils)


def test_linear_compiles_fullgraph():
    mask = random_mask((24, 40), 0.7, 91)
    weight = randn(24, 40, seed=92).requires_grad_()
    bias = randn(24, seed=93).requires_grad_()
    x = randn(5, 40, seed=94).requires_grad_()
    for kernel, layout, block in (("panels", "unstructured", None), ("blocks", "block", 16)):
        kernel_mask = mask if kernel == "panels" else random_block_mask(24, 40, 16, 0.5, 95, inner_sparsity=0.1)
        plan = MaskPlan(kernel_mask, layout, block=block, kernel=kernel)
        for grad_mode in ("feedback", "masked"):
            def loss(x, weight, bias):
                return plan.linear(x, weight, bias, grad_mode).square().sum()

            torch._dynamo.reset()
            compiled = torch.compile(loss, fullgraph=True)
            eager_grads = torch.autograd.grad(loss(x, weight, bias), (x, weight, bias))
            compiled_grads = torch.autograd.grad(compiled(x, weight, bias), (x, weight, bias))
            for a, b in zip(compiled_grads, eager_grads):
                torch.testing.assert_close(a, b)
