"""Plan index values and operand widths on every masked-matmul op and backend (issue 11,
items 1 and 2). A plan the plan ops could not have built, or an operand narrower than the
plan, must give a clear ValueError / IndexError naming the argument, with the same message
on every backend, never a crash or a read or write out of range; a plan that still describes
a valid plan computes that plan's product.

(a) one regression case per kind of bad value, per op, on every backend; (b) random
corruptions of plan tensors and (c) random operand widths, each op family in a subprocess
(a crash fails the test instead of killing the suite), against oracles written here from the
layouts' definition in csrc/ops.cpp: which plans are valid, and what a valid one computes,
in float64. The oracles never call dynasparse.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynasparse import dispatch, ops

ROOT = Path(__file__).resolve().parents[2]
PANEL_OPS = ("pack_panels", "unpack_panels", "spmm_panels", "sddmm_panels", "conv2d_panels")
BLOCK_OPS = ("pack_blocks", "unpack_blocks", "spmm_blocks", "sddmm_blocks")
BITMASK_OPS = ("masked_mm", "masked_sddmm")
FAMILIES = {"panels": PANEL_OPS, "blocks": BLOCK_OPS, "bitmask": BITMASK_OPS}
PLAN_ERRORS = (ValueError, IndexError)


def backends(op: str, device: str = "cpu") -> list[str]:
    return dispatch.usable_backends(device, op)


# --- oracles from the definitions ------------------------------------------------------------

def panel_entries(row_ptr, cols, panel, n, k):
    """(row, column) of each entry of a panel plan of an [n, k] matrix, None if it is not one:
    row_ptr from 0 to nnz over ceil(k / panel) * n segments, each holding ascending unsigned
    16-bit offsets below its panel's width."""
    row_ptr, offsets = row_ptr.tolist(), [c & 0xFFFF for c in cols.tolist()]
    segments = -(-k // panel) * n
    if len(row_ptr) != segments + 1 or row_ptr[0] != 0 or row_ptr[-1] != len(offsets):
        return None
    entries = []
    for s in range(segments):
        if row_ptr[s] > row_ptr[s + 1]:
            return None
        p, row = divmod(s, n)
        run = offsets[row_ptr[s]:row_ptr[s + 1]]
        if any(o >= min(panel, k - p * panel) for o in run) or any(a >= b for a, b in zip(run, run[1:])):
            return None
        entries.extend((row, p * panel + o) for o in run)
    return entries


def block_entries(row_ptr, cols, block, n, k):
    """(block row, block column) of each entry of a block plan of an [n, k] matrix, or None."""
    row_ptr, cols = row_ptr.tolist(), cols.tolist()
    block_rows, block_cols = -(-n // block), -(-k // block)
    if len(row_ptr) != block_rows + 1 or row_ptr[0] != 0 or row_ptr[-1] != len(cols):
        return None
    entries = []
    for r in range(block_rows):
        if row_ptr[r] > row_ptr[r + 1]:
            return None
        run = cols[row_ptr[r]:row_ptr[r + 1]]
        if any(not 0 <= c < block_cols for c in run) or any(a >= b for a, b in zip(run, run[1:])):
            return None
        entries.extend((r, c) for c in run)
    return entries


def dense_from_panels(entries, values, n, k):
    dense = torch.zeros(n, k, dtype=torch.float64)
    if entries:
        rows, columns = torch.tensor(entries).T
        dense[rows, columns] = values.double()
    return dense


def padded(dense, block):
    n, k = dense.shape
    return F.pad(dense, (0, -(-k // block) * block - k, 0, -(-n // block) * block - n))


def dense_from_blocks(entries, values, block, n, k):
    dense = padded(torch.zeros(n, k, dtype=torch.float64), block)
    for (r, c), tile in zip(entries, values.double()):
        dense[r * block:(r + 1) * block, c * block:(c + 1) * block] = tile
    return dense[:n, :k]


def blocks_of(dense, entries, block):
    tiles = padded(dense, block)
    return torch.stack([tiles[r * block:(r + 1) * block, c * block:(c + 1) * block] for r, c in entries]) \
        if entries else dense.new_zeros(0, block, block)


def listed_tiles(entries, tile, n, k):
    listed = torch.zeros(-(-n // tile) * tile, -(-k // tile) * tile, dtype=torch.bool)
    for r, c in entries:
        listed[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = True
    return listed[:n, :k]


def unpack_bits(words, k):
    bits = (words.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :k].bool()


# --- cases: a valid plan, its operands, the call, and the oracle -----------------------------

class Case:
    """One op call. `plan` holds row_ptr and cols (the tensors corruptions replace), `args`
    the rest; expected() reads the plan as it now is, returning None when it is invalid and
    else (float64 result, error bound, exact) -- exact for the gathers and scatters."""

    def __init__(self, op, plan, args, expected):
        self.op, self.plan, self.args, self._expected = op, dict(plan), dict(args), expected

    def call(self, backend, device="cpu"):
        moved = {name: t.to(device) if isinstance(t, torch.Tensor) else t
                 for name, t in {**self.plan, **self.args}.items()}
        return CALLS[self.op](moved, backend)

    def expected(self):
        return self._expected(self.plan, self.args)


def _float(rng):
    return torch.float64 if rng.random() < 0.3 else torch.float32


def _randn(rng, *shape, dtype):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def _mask(rng, n, k):
    mask = torch.from_numpy(rng.random((n, k)) < rng.choice([0.0, 0.05, 0.3, 0.7, 1.0]))
    mask[rng.integers(n), k - 1] = True  # an operand narrower than the plan is then caught
    return mask


def _batch(rng):
    # Batch 1 (the spmv kernel), slices of 16, 32 and 64 rows, two slices, none.
    return int(rng.choice([1, 5, 20, 40, 70, 0], p=[0.2, 0.2, 0.2, 0.15, 0.15, 0.1]))


def _bound(a_abs, b_abs, terms, dtype):
    """Error bound of a float product summed over `terms` terms: terms * eps * sum |a b|."""
    return max(terms, 1) * torch.finfo(dtype).eps * (a_abs @ b_abs) + 1e-300


def panel_case(op, rng):
    if op == "conv2d_panels":
        channels, n = int(rng.integers(1, 7)), int(rng.integers(1, 9))
        kernel = [int(rng.integers(1, 4)), int(rng.integers(1, 4))]
        k = channels * kernel[0] * kernel[1]
    else:
        n, k = int(rng.integers(1, 41)), int(rng.integers(1, 601))
    panel = int(rng.choice([7, 64, 256, 65536]))
    mask = _mask(rng, n, k)
    row_ptr, cols = ops.plan_panels(mask, panel, backend="cpu")
    dtype = _float(rng)
    plan = {"row_ptr": row_ptr, "cols": cols}
    if op == "pack_panels":
        args = {"weight": _randn(rng, n, k, dtype=dtype), "panel": panel}

        def expected(plan, args):
            w = args["weight"]
            entries = panel_entries(plan["row_ptr"], plan["cols"], panel, *w.shape)
            if entries is None:
                return None
            rows, columns = torch.tensor(entries, dtype=torch.int64).reshape(-1, 2).T
            return w[rows, columns].double(), None, True
    elif op == "unpack_panels":
        args = {"values": _randn(rng, cols.numel(), dtype=dtype), "panel": panel, "n": n, "k": k}

        def expected(plan, args):
            entries = panel_entries(plan["row_ptr"], plan["cols"], panel, args["n"], args["k"])
            if entries is None or args["values"].numel() != len(entries):
                return None
            return dense_from_panels(entries, args["values"], args["n"], args["k"]), None, True
    elif op == "spmm_panels":
        x = _randn(rng, _batch(rng), k, dtype=dtype)
        args = {"x": x, "values": _randn(rng, cols.numel(), dtype=dtype), "panel": panel, "n": n,
                "bias": _randn(rng, n, dtype=dtype) if rng.random() < 0.5 else None}

        def expected(plan, args):
            x, n = args["x"], args["n"]
            entries = panel_entries(plan["row_ptr"], plan["cols"], panel, n, x.shape[-1])
            if entries is None or args["values"].numel() != len(entries):
                return None
            w = dense_from_panels(entries, args["values"], n, x.shape[-1])
            y = x.double() @ w.T
            bound = _bound(x.double().abs(), w.abs().T, x.shape[-1] + 1, x.dtype)
            if args["bias"] is not None:
                y = y + args["bias"].double()
                bound = bound + torch.finfo(x.dtype).eps * y.abs()
            return y, bound, False
    elif op == "sddmm_panels":
        batch = _batch(rng)
        args = {"grad_out": _randn(rng, batch, n, dtype=dtype), "x": _randn(rng, batch, k, dtype=dtype),
                "panel": panel}

        def expected(plan, args):
            g, x = args["grad_out"].double(), args["x"].double()
            entries = panel_entries(plan["row_ptr"], plan["cols"], panel, g.shape[-1], x.shape[-1])
            if entries is None:
                return None
            rows, columns = torch.tensor(entries, dtype=torch.int64).reshape(-1, 2).T
            bound = _bound(g.abs().T, x.abs(), g.shape[0], args["x"].dtype)
            return (g.T @ x)[rows, columns], bound[rows, columns], False
    else:  # conv2d_panels
        x = _randn(rng, _batch(rng) % 4, channels, int(rng.integers(3, 9)), int(rng.integers(3, 9)), dtype=dtype)
        conv = {"kernel_size": kernel, "stride": [int(rng.integers(1, 3)), 1], "padding": [1, int(rng.integers(0, 2))],
                "dilation": [1, 1]}
        args = {"x": x, "values": _randn(rng, cols.numel(), dtype=dtype), "panel": panel, "n": n, **conv,
                "bias": _randn(rng, n, dtype=dtype) if rng.random() < 0.5 else None}

        def expected(plan, args):
            x, n, kernel = args["x"], args["n"], args["kernel_size"]
            k = x.shape[1] * kernel[0] * kernel[1]
            entries = panel_entries(plan["row_ptr"], plan["cols"], panel, n, k)
            if entries is None or args["values"].numel() != len(entries):
                return None
            w = dense_from_panels(entries, args["values"], n, k).reshape(n, x.shape[1], *kernel)
            params = {name: args[name] for name in ("stride", "padding", "dilation")}
            bias = None if args["bias"] is None else args["bias"].double()
            y = F.conv2d(x.double(), w, bias, **params)
            bound = (k + 1) * torch.finfo(x.dtype).eps * (F.conv2d(x.double().abs(), w.abs(), **params) + (
                0 if bias is None else bias.abs()[:, None, None])) + 1e-300
            return y, bound, False
    return Case(op, plan, args, expected)


def block_case(op, rng):
    n, k = int(rng.integers(1, 80)), int(rng.integers(1, 140))
    # The Triton tiles are 32, 64 or 128; the CPU kernels have fast paths for 16, 32 and 64.
    block = 32 if op in BITMASK_OPS else int(rng.choice([8, 16, 32, 64]))
    tiles = torch.from_numpy(rng.random((-(-n // block), -(-k // block))) < rng.choice([0.0, 0.2, 0.6, 1.0]))
    mask = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    mask &= torch.from_numpy(rng.random((n, k)) < 0.7)
    mask[int(rng.integers(n)), k - 1] = True  # a block in the last block column
    row_ptr, cols = ops.plan_blocks(mask, block, backend="cpu")
    dtype = _float(rng)
    plan = {"row_ptr": row_ptr, "cols": cols}
    w = _randn(rng, n, k, dtype=dtype)
    if op == "pack_blocks":
        args = {"weight": w, "mask": mask, "block": block}

        def expected(plan, args):
            entries = block_entries(plan["row_ptr"], plan["cols"], block, *args["weight"].shape)
            if entries is None:
                return None
            return blocks_of(torch.where(args["mask"], args["weight"].double(), 0), entries, block), None, True
    elif op == "unpack_blocks":
        args = {"values": _randn(rng, cols.numel(), block, block, dtype=dtype), "n": n, "k": k}

        def expected(plan, args):
            values = args["values"]
            entries = block_entries(plan["row_ptr"], plan["cols"], values.shape[1], args["n"], args["k"])
            if entries is None or values.shape[0] != len(entries):
                return None
            return dense_from_blocks(entries, values, values.shape[1], args["n"], args["k"]), None, True
    elif op in ("spmm_blocks", "masked_mm"):
        x = _randn(rng, _batch(rng), k, dtype=dtype)
        bias = _randn(rng, n, dtype=dtype) if rng.random() < 0.5 else None
        if op == "spmm_blocks":
            args = {"x": x, "values": _randn(rng, cols.numel(), block, block, dtype=dtype), "n": n, "bias": bias}
        else:
            args = {"x": x, "weight": w, "mask_words": ops.pack_mask(mask), "tile": block, "bias": bias}

        def expected(plan, args):
            x = args["x"]
            if op == "spmm_blocks":
                values, rows = args["values"], args["n"]
                entries = block_entries(plan["row_ptr"], plan["cols"], values.shape[1], rows, x.shape[-1])
                if entries is None or values.shape[0] != len(entries):
                    return None
                dense = dense_from_blocks(entries, values, values.shape[1], rows, x.shape[-1])
            else:
                weight = args["weight"]
                entries = block_entries(plan["row_ptr"], plan["cols"], block, *weight.shape)
                if entries is None:
                    return None
                keep = unpack_bits(args["mask_words"], weight.shape[1]) & listed_tiles(entries, block, *weight.shape)
                dense = torch.where(keep, weight.double(), 0)
            y = x.double() @ dense.T
            bound = _bound(x.double().abs(), dense.abs().T, x.shape[-1] + 1, x.dtype)
            if args["bias"] is not None:
                y = y + args["bias"].double()
                bound = bound + torch.finfo(x.dtype).eps * y.abs()
            return y, bound, False
    else:  # sddmm_blocks, masked_sddmm
        batch = _batch(rng)
        args = {"grad_out": _randn(rng, batch, n, dtype=dtype), "x": _randn(rng, batch, k, dtype=dtype)}
        args.update({"mask": mask, "block": block} if op == "sddmm_blocks"
                    else {"mask_words": ops.pack_mask(mask), "tile": block})

        def expected(plan, args):
            g, x = args["grad_out"].double(), args["x"].double()
            shape = (g.shape[-1], x.shape[-1])
            entries = block_entries(plan["row_ptr"], plan["cols"], block, *shape)
            if entries is None:
                return None
            full = g.T @ x
            bound = _bound(g.abs().T, x.abs(), g.shape[0], args["x"].dtype)
            if op == "sddmm_blocks":
                keep = args["mask"]
                return blocks_of(torch.where(keep, full, 0), entries, block), blocks_of(bound, entries, block), False
            keep = unpack_bits(args["mask_words"], shape[1]) & listed_tiles(entries, block, *shape)
            return torch.where(keep, full, 0), bound, False
    return Case(op, plan, args, expected)


def make_case(op, rng):
    """A random valid case of `op`; its plan has an entry in the matrix's last column."""
    return (panel_case if op in PANEL_OPS else block_case)(op, rng)


CALLS = {
    "pack_panels": lambda a, b: ops.pack_panels(a["weight"], a["row_ptr"], a["cols"], a["panel"], backend=b),
    "unpack_panels": lambda a, b: ops.unpack_panels(a["values"], a["row_ptr"], a["cols"], a["panel"], a["n"], a["k"],
                                                    backend=b),
    "spmm_panels": lambda a, b: ops.spmm_panels(a["x"], a["values"], a["row_ptr"], a["cols"], a["panel"], a["n"],
                                                a["bias"], backend=b),
    "sddmm_panels": lambda a, b: ops.sddmm_panels(a["grad_out"], a["x"], a["row_ptr"], a["cols"], a["panel"],
                                                  backend=b),
    "conv2d_panels": lambda a, b: ops.conv2d_panels(a["x"], a["values"], a["row_ptr"], a["cols"], a["panel"], a["n"],
                                                    a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                                    a["bias"], backend=b),
    "pack_blocks": lambda a, b: ops.pack_blocks(a["weight"], a["mask"], a["row_ptr"], a["cols"], a["block"],
                                                backend=b),
    "unpack_blocks": lambda a, b: ops.unpack_blocks(a["values"], a["row_ptr"], a["cols"], a["n"], a["k"], backend=b),
    "spmm_blocks": lambda a, b: ops.spmm_blocks(a["x"], a["values"], a["row_ptr"], a["cols"], a["n"], a["bias"],
                                                backend=b),
    "sddmm_blocks": lambda a, b: ops.sddmm_blocks(a["grad_out"], a["x"], a["mask"], a["row_ptr"], a["cols"],
                                                  a["block"], backend=b),
    "masked_mm": lambda a, b: ops.masked_mm(a["x"], a["weight"], a["mask_words"], a["row_ptr"], a["cols"], a["tile"],
                                            a["bias"], backend=b),
    "masked_sddmm": lambda a, b: ops.masked_sddmm(a["grad_out"], a["x"], a["mask_words"], a["row_ptr"], a["cols"],
                                                  a["tile"], backend=b),
}


def outcomes(case, device="cpu"):
    """{backend: result tensor or (exception type name, message)} over every backend that can
    run the op on `device`; only plan errors (ValueError, IndexError) are caught."""
    results = {}
    for backend in backends(case.op, device):
        try:
            results[backend] = case.call(backend, device).cpu()
        except PLAN_ERRORS as error:
            results[backend] = (type(error).__name__, str(error))
    return results


def assert_outcomes(case, results, what):
    """Every backend raised the same plan error (and the plan is invalid), or every backend
    returned the product of the plan as it is (and it is valid)."""
    expected = case.expected()
    for backend, result in results.items():
        where = f"{case.op} on {backend}, {what}"
        if expected is None:
            assert isinstance(result, tuple), f"{where}: an invalid plan gave an output"
            assert result[1].startswith(f"dynasparse.{case.op}: "), f"{where}: {result}"
            continue
        assert not isinstance(result, tuple), f"{where}: a valid plan was rejected: {result}"
        exact, bound, equal = expected
        assert result.shape == exact.shape, (where, result.shape, exact.shape)
        if equal:
            assert torch.equal(result.double(), exact), where
        else:
            error = (result.double() - exact).abs()
            assert bool((error <= bound).all()), f"{where}: error {error.max().item()} over its bound"
    errors = {backend: result for backend, result in results.items() if isinstance(result, tuple)}
    assert len(set(errors.values())) <= 1, f"{case.op}, {what}: backends disagree: {errors}"


# --- (a) regression cases --------------------------------------------------------------------

ALL_OPS = PANEL_OPS + BLOCK_OPS + BITMASK_OPS
# The regression plans: [6, 300] over panels of 256 (the last one 44 wide; the convolution's
# [6, 4 * 3 * 3] is one panel), [100, 70] over blocks (tiles) of 32 (block columns 0, 1, 2).
PANEL, BLOCK = 256, 32


def regression_k(op):
    return 36 if op == "conv2d_panels" else 300 if op in PANEL_OPS else 70


def _regression_case(op):
    """A valid case with a nonzero in the plan's last column and a segment (block row)
    holding several entries."""
    generator = torch.Generator().manual_seed(11)
    k = regression_k(op)
    n = 6 if op in PANEL_OPS else 100
    mask = torch.rand(n, k, generator=generator) < 0.3
    mask[1, k - 1] = True  # an operand narrower than the plan is caught
    if op in PANEL_OPS:
        mask[2, :3] = True  # a segment of several entries, to disorder
        row_ptr, cols = ops.plan_panels(mask, PANEL, backend="cpu")
    else:
        mask[0, [0, 40, 69]] = True  # a block row of three blocks
        row_ptr, cols = ops.plan_blocks(mask, BLOCK, backend="cpu")

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    values = randn(cols.numel()) if op in PANEL_OPS else randn(cols.numel(), BLOCK, BLOCK)
    args = {
        "pack_panels": lambda: {"weight": randn(n, k), "panel": PANEL},
        "unpack_panels": lambda: {"values": values, "panel": PANEL, "n": n, "k": k},
        "spmm_panels": lambda: {"x": randn(3, k), "values": values, "panel": PANEL, "n": n, "bias": None},
        "sddmm_panels": lambda: {"grad_out": randn(3, n), "x": randn(3, k), "panel": PANEL},
        "conv2d_panels": lambda: {"x": randn(2, 4, 6, 6), "values": values, "panel": PANEL, "n": n,
                                  "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
                                  "bias": None},
        "pack_blocks": lambda: {"weight": randn(n, k), "mask": mask, "block": BLOCK},
        "unpack_blocks": lambda: {"values": values, "n": n, "k": k},
        "spmm_blocks": lambda: {"x": randn(3, k), "values": values, "n": n, "bias": None},
        "sddmm_blocks": lambda: {"grad_out": randn(3, n), "x": randn(3, k), "mask": mask, "block": BLOCK},
        "masked_mm": lambda: {"x": randn(3, k), "weight": randn(n, k), "mask_words": ops.pack_mask(mask),
                              "tile": BLOCK, "bias": None},
        "masked_sddmm": lambda: {"grad_out": randn(3, n), "x": randn(3, k), "mask_words": ops.pack_mask(mask),
                                 "tile": BLOCK},
    }[op]()
    return {"row_ptr": row_ptr, "cols": cols}, args


def _narrowed(op, args, k):
    """The operands cut to k columns (to k / 9 input channels for the 3 x 3 convolution)."""
    args = dict(args)
    if op == "conv2d_panels":
        args["x"] = args["x"][:, :k // 9]
    if "k" in args:
        args["k"] = k
    for name in ("x", "weight", "mask"):
        if name in args and op != "conv2d_panels":
            args[name] = args[name][..., :k]
    if "mask_words" in args:
        args["mask_words"] = ops.pack_mask(unpack_bits(args["mask_words"], regression_k(op))[:, :k])
    return args


def _check_raises(op, plan, args, error, match):
    """Every backend raises `error` with one message, matching `match`."""
    results = outcomes(Case(op, plan, args, expected=None))
    assert results, f"no backend runs {op} here"
    for backend, result in results.items():
        assert isinstance(result, tuple), f"{op} on {backend} gave an output"
        assert result[0] == error.__name__, (backend, result)
        assert result[1].startswith(f"dynasparse.{op}: ") and re.search(match, result[1]), (backend, result)
    assert len(set(results.values())) == 1, f"backends disagree: {results}"


def _edited(plan, name, index, value):
    tensor = plan[name].clone()
    tensor[index] = value
    return {**plan, name: tensor}


ROW_PTR_CASES = {
    # name: (index of row_ptr, its new value given (row_ptr, nnz), message)
    "start_not_0": (0, lambda r, nnz: 1, r"row_ptr\[0\] must be 0, got 1 \(row_ptr and cols as built"),
    "end_short": (-1, lambda r, nnz: nnz - 1, r"row_ptr\[\d+\] must be cols.numel\(\) = \d+, got \d+"),
    "end_long": (-1, lambda r, nnz: nnz + 1, r"row_ptr\[\d+\] must be cols.numel\(\) = \d+, got \d+"),
    "decreasing": (2, lambda r, nnz: r[3] + 1, r"row_ptr must not decrease, but row_ptr\[2\] = \d+ > row_ptr\[3\]"),
    "negative": (2, lambda r, nnz: -1, r"row_ptr must not decrease, but row_ptr\[1\] = \d+ > row_ptr\[2\] = -1"),
    "past_the_end": (2, lambda r, nnz: nnz + 1000, r"but row_ptr\[2\] = \d+ > row_ptr\[3\]"),
    "huge": (1, lambda r, nnz: 2**62, r"but row_ptr\[1\] = 4611686018427387904 > row_ptr\[2\]"),
}


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("name", sorted(ROW_PTR_CASES))
def test_bad_row_ptr_is_a_value_error(op, name):
    plan, args = _regression_case(op)
    index, value, match = ROW_PTR_CASES[name]
    new = value(plan["row_ptr"].tolist(), plan["cols"].numel())
    _check_raises(op, _edited(plan, "row_ptr", index, new), args, ValueError, match)


@pytest.mark.parametrize("op", PANEL_OPS)
@pytest.mark.parametrize("value", [30000, -1, "width"])
def test_panel_offset_outside_its_panel_is_an_index_error(op, value):
    """Entry 0 lies in panel 0 (row_ptr[0] = 0); -1 is the unsigned offset 65535."""
    plan, args = _regression_case(op)
    width = min(PANEL, regression_k(op))
    value = width if value == "width" else value
    _check_raises(op, _edited(plan, "cols", 0, value), args, IndexError,
                  rf"cols\[0\] = {value & 0xFFFF} is outside panel 0 of row \d+, whose column offsets are in "
                  rf"\[0, {width}\) \(a panel plan of an \[6, {regression_k(op)}\] matrix with panel 256\)")


@pytest.mark.parametrize("op", PANEL_OPS)
def test_panel_offset_past_k_in_the_last_panel_is_an_index_error(op):
    plan, args = _regression_case(op)
    k = regression_k(op)
    last_panel = (k - 1) // PANEL
    width = k - last_panel * PANEL
    i = int(((plan["cols"].to(torch.int64) & 0xFFFF) == width - 1).nonzero()[-1, 0])  # at column k - 1
    _check_raises(op, _edited(plan, "cols", i, width), args, IndexError,
                  rf"cols\[{i}\] = {width} is outside panel {last_panel} of row \d+, whose column offsets are in "
                  rf"\[0, {width}\)")


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("edit", ["swap", "duplicate"])
def test_entries_out_of_order_are_a_value_error(op, edit):
    plan, args = _regression_case(op)
    row_ptr, cols = plan["row_ptr"], plan["cols"]
    i = int(row_ptr[:-1][(row_ptr.diff() >= 2).nonzero()[0, 0]])  # the first of a segment's two entries
    first, second = cols[i].item(), cols[i + 1].item()
    plan = _edited(_edited(plan, "cols", i, second), "cols", i + 1, first) if edit == "swap" \
        else _edited(plan, "cols", i + 1, first)
    order = "column offsets must ascend inside a \\(panel, row\\) segment" if op in PANEL_OPS \
        else "block columns must ascend inside a block row"
    _check_raises(op, plan, args, ValueError, rf"cols\[{i + 1}\] = \d+ follows cols\[{i}\] = \d+ in .*: {order}")


@pytest.mark.parametrize("op", BLOCK_OPS + BITMASK_OPS)
@pytest.mark.parametrize("value", [3, -1, 2**31 - 1])
def test_block_column_out_of_range_is_an_index_error(op, value):
    plan, args = _regression_case(op)
    _check_raises(op, _edited(plan, "cols", 0, value), args, IndexError,
                  rf"cols\[0\] = {value} is outside block row 0, whose block columns are in \[0, 3\) "
                  rf"\(a block plan of an \[100, 70\] matrix with block 32\)")


@pytest.mark.parametrize("op", ALL_OPS)
def test_operand_narrower_than_the_plan_is_an_index_error(op):
    """The issue's x of width 7 against a plan of K = 8: operands (x, weight, unpack's k,
    channels) narrower than the plan, which has a nonzero in its last column. Panel plans
    lose that column (300 -> 299; the convolution 4 -> 3 channels, 36 -> 27 columns), block
    plans the last block column (70 -> 64)."""
    plan, args = _regression_case(op)
    k = {"conv2d_panels": 27}.get(op, 299 if op in PANEL_OPS else 64)
    if op in PANEL_OPS:
        width = k - (k - 1) // PANEL * PANEL
        match = rf"is outside panel {(k - 1) // PANEL} of row \d+, whose column offsets are in \[0, {width}\)"
    else:
        match = r"is outside block row 0, whose block columns are in \[0, 2\)"
    _check_raises(op, plan, _narrowed(op, args, k), IndexError, match)


@pytest.mark.parametrize("op", ALL_OPS)
def test_plans_the_plan_ops_build_compute_their_product(op):
    for seed in range(3):
        case = make_case(op, np.random.default_rng(seed))
        results = outcomes(case)
        assert results and not any(isinstance(result, tuple) for result in results.values()), results
        assert_outcomes(case, results, "as built")


def test_sddmm_checks_grad_out_against_x_and_its_width_against_the_plan():
    """grad_out's width is N (the old check compared it with itself): what can be checked is
    its dtype and rank against x, and N against the plan."""
    plan, args = _regression_case("sddmm_panels")
    row_ptr, cols, x = plan["row_ptr"], plan["cols"], args["x"]
    for backend in backends("sddmm_panels"):
        with pytest.raises(TypeError, match="grad_out is Double but x is Float"):
            ops.sddmm_panels(args["grad_out"].double(), x, row_ptr, cols, PANEL, backend=backend)
        with pytest.raises(ValueError, match="grad_out must have at least one dimension"):
            ops.sddmm_panels(torch.tensor(1.0), x, row_ptr, cols, PANEL, backend=backend)
        with pytest.raises(ValueError, match=r"row_ptr has 13 entries, but a panel plan of an \[7, 300\]"):
            ops.sddmm_panels(torch.randn(3, 7), x, row_ptr, cols, PANEL, backend=backend)


# --- (b), (c): random corruptions and widths, in subprocesses -------------------------------

def _corrupt(rng, case):
    """One random edit of the plan's tensors (and of the values, when their count follows
    cols); returns its description."""
    row_ptr, cols = case.plan["row_ptr"].clone(), case.plan["cols"].clone()
    nnz, info = cols.numel(), torch.iinfo(cols.dtype)
    kind = rng.choice(["row_ptr_value", "row_ptr_step", "row_ptr_swap", "row_ptr_length", "cols_value",
                       "cols_step", "cols_swap", "cols_length", "cols_extreme", "none"])
    if kind == "row_ptr_value" and row_ptr.numel():
        i = int(rng.integers(row_ptr.numel()))
        row_ptr[i] = int(rng.choice([int(rng.integers(-3, nnz + 4)), -1, nnz + 1, 2**40, -2**62, 2**63 - 1]))
    elif kind == "row_ptr_step" and row_ptr.numel():
        i = int(rng.integers(row_ptr.numel()))
        row_ptr[i] += int(rng.choice([-1, 1]))
    elif kind == "row_ptr_swap" and row_ptr.numel() > 1:
        i, j = rng.integers(row_ptr.numel(), size=2)
        row_ptr[i], row_ptr[j] = case.plan["row_ptr"][j].item(), case.plan["row_ptr"][i].item()
    elif kind == "row_ptr_length":
        row_ptr = row_ptr[:-int(rng.integers(1, 3))] if rng.random() < 0.6 else torch.cat([row_ptr, row_ptr[-1:]])
    elif kind in ("cols_value", "cols_step", "cols_extreme", "cols_swap") and nnz:
        i = int(rng.integers(nnz))
        if kind == "cols_value":
            bound = 300 if cols.dtype == torch.int16 else 8
            cols[i] = int(rng.integers(-bound, bound))
        elif kind == "cols_step":
            cols[i] += int(rng.choice([-1, 1]))
        elif kind == "cols_extreme":
            cols[i] = int(rng.choice([info.min, info.max, -1, 30000 if cols.dtype == torch.int16 else 2**20]))
        else:
            j = min(nnz - 1, i + 1) if rng.random() < 0.7 else int(rng.integers(nnz))
            cols[i], cols[j] = case.plan["cols"][j].item(), case.plan["cols"][i].item()
    elif kind == "cols_length":
        count = int(rng.integers(1, 3))
        cols = cols[:max(nnz - count, 0)] if rng.random() < 0.6 else torch.cat([cols, cols[-1:] + 1 if nnz else
                                                                                 cols.new_zeros(count)])
        if "values" in case.args and rng.random() < 0.8:  # values follow cols, or not
            values = case.args["values"]
            extra = values.new_zeros(max(cols.numel() - values.shape[0], 0), *values.shape[1:])
            case.args["values"] = torch.cat([values, extra])[:cols.numel()]
    case.plan.update(row_ptr=row_ptr.contiguous(), cols=cols.contiguous())
    return str(kind)


def _rewidth(rng, case):
    """A random operand width other than the plan's: returns (description, narrower). A
    narrower operand drops the plan's last column (its panel plans) or last block column
    (block plans), where every case has a nonzero, so it must be an error."""
    args, op = case.args, case.op
    blocky = op in BLOCK_OPS + BITMASK_OPS
    if op == "conv2d_panels":
        channels = args["x"].shape[1]
        new = int(rng.choice([c for c in range(0, 9) if c != channels]))
        args["x"] = torch.from_numpy(rng.standard_normal((args["x"].shape[0], new, *args["x"].shape[2:]))).to(
            args["x"].dtype)
        return f"channels {channels} -> {new}", new < channels
    k = next(t.shape[-1] for name, t in args.items() if name in ("x", "weight") and isinstance(t, torch.Tensor)) \
        if "k" not in args else args["k"]
    if blocky:
        block = args["block"] if "block" in args else args["tile"] if "tile" in args else args["values"].shape[1]
        limit = (-(-k // block) - 1) * block  # the widest width without the last block column
    else:
        limit = k - 1
    new = int(rng.integers(0, limit + 1)) if rng.random() < 0.6 else int(rng.integers(k + 1, 2 * k + 300))
    if "k" in args:
        args["k"] = new
    for name in ("x", "weight", "mask"):
        if name in args:
            tensor = args[name]
            fresh = torch.from_numpy(rng.random((*tensor.shape[:-1], new)) < 0.5) if tensor.dtype == torch.bool \
                else torch.from_numpy(rng.standard_normal((*tensor.shape[:-1], new))).to(tensor.dtype)
            args[name] = fresh
    if "mask_words" in args:
        args["mask_words"] = ops.pack_mask(torch.from_numpy(rng.random((args["mask_words"].shape[0], new)) < 0.5))
    if op == "sddmm_panels" and rng.random() < 0.3:  # grad_out's width is the plan's row count
        args["grad_out"] = _randn(rng, args["grad_out"].shape[0], int(rng.integers(0, 50)), dtype=args["x"].dtype)
        return f"k {k} -> {new}, grad_out width {args['grad_out'].shape[1]}", False
    return f"k {k} -> {new}", new <= limit


def worker(family: str, mode: str, seed: int, count: int, device: str) -> None:
    """Runs `count` random cases per op of the family; prints one line before each call, so
    that a crash names the case it died in."""
    checked = {"raised": 0, "computed": 0}
    for op in FAMILIES[family]:
        per_op = count if op not in BITMASK_OPS or "triton" not in backends(op, device) else max(count // 4, 5)
        for i in range(per_op):
            rng = np.random.default_rng([seed, i, ALL_OPS.index(op)])
            case = make_case(op, rng)
            if mode == "corrupt":
                what = " + ".join(_corrupt(rng, case) for _ in range(int(rng.integers(1, 3))))
                narrower = False
            else:
                what, narrower = _rewidth(rng, case)
            print(f"{op} case {i}: {what}", flush=True)
            results = outcomes(case, device)
            assert_outcomes(case, results, what)
            if narrower:
                assert all(isinstance(r, tuple) for r in results.values()), f"{op}, {what}: narrower gave an output"
            checked["raised" if any(isinstance(r, tuple) for r in results.values()) else "computed"] += 1
    print(json.dumps(checked), flush=True)


def _run_worker(family, mode, count, device):
    seed = int.from_bytes(os.urandom(4), "little")
    call = f"worker({family!r}, {mode!r}, {seed}, {count}, {device!r})"
    command = [sys.executable, "-c", f"from tests.ops.test_plan_validation import worker; {call}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
    assert done.returncode == 0, f"{call} exited with {done.returncode} (negative: killed by that signal):\n{tail}"
    checked = json.loads(done.stdout.splitlines()[-1])
    # Both outcomes occur: edits that leave a valid plan, and edits that break it.
    assert checked["raised"] > 0 and checked["computed"] > 0, (call, checked)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_plan_corruptions_raise_or_compute_that_plan(family, device):
    _run_worker(family, "corrupt", 50, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_operand_widths_raise_or_compute_that_plan(family, device):
    _run_worker(family, "widths", 25, device)


# --- the optimizer steps' packing plans --------------------------------------------------------

STEP_OPS = ("sgd_step", "adamw_step")


def _step(op, param, mask, plan, backend, generator):
    values, row_ptr, cols = plan
    grad, packed = torch.randn(param.shape, generator=generator), {0: (values, row_ptr, cols, PANEL)}
    if op == "sgd_step":
        return ops.sgd_step([param], [grad], [torch.zeros_like(param)], masks=[mask], lr=0.1, momentum=0.9,
                            first_step=True, packed=packed, backend=backend)
    return ops.adamw_step([param], [grad], [torch.zeros_like(param)], [torch.zeros_like(param)], masks=[mask],
                          lr=0.1, step=1, packed=packed, backend=backend)


@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("edit", ["row_ptr_past_the_end", "row_ptr_negative", "col_outside_panel", "col_negative"])
def test_step_packing_plan_values_are_checked_before_any_write(op, edit):
    """A packing plan the plan ops could not have built fails the step with the matmul ops'
    message on every backend, and leaves the param as it was (no half-done step)."""
    generator = torch.Generator().manual_seed(5)
    n, k = 6, 300
    mask = torch.rand(n, k, generator=generator) < 0.3
    row_ptr, cols = ops.plan_panels(mask, PANEL, backend="cpu")
    row_ptr, cols = row_ptr.clone(), cols.clone()
    if edit == "row_ptr_past_the_end":
        row_ptr[2] = cols.numel() + 1000
    elif edit == "row_ptr_negative":
        row_ptr[2] = -1
    elif edit == "col_outside_panel":
        cols[0] = 30000
    else:
        cols[0] = -1
    messages = {}
    for backend in backends(op):
        param = torch.randn(n, k, generator=generator)
        before = param.clone()
        values = torch.zeros(cols.numel())
        with pytest.raises(PLAN_ERRORS) as raised:
            _step(op, param, mask, (values, row_ptr, cols), backend, generator)
        assert torch.equal(param, before), f"{op} on {backend} wrote the param before failing"
        messages[backend] = str(raised.value)
    assert all(message.startswith(f"dynasparse.{op}: ") for message in messages.values()), messages
    assert len(set(messages.values())) == 1, f"backends disagree: {messages}"


@pytest.mark.parametrize("op", STEP_OPS)
def test_step_packs_the_updated_values_through_a_valid_plan(op):
    generator = torch.Generator().manual_seed(6)
    n, k = 5, 520
    mask = torch.rand(n, k, generator=generator) < 0.2
    row_ptr, cols = ops.plan_panels(mask, PANEL, backend="cpu")
    entries = panel_entries(row_ptr, cols, PANEL, n, k)
    for backend in backends(op):
        param = torch.randn(n, k, generator=generator)
        values = torch.full((cols.numel(),), float("nan"))
        _step(op, param, mask, (values, row_ptr, cols), backend, generator)
        expected = torch.tensor([float(param[r, c]) for r, c in entries])
        assert torch.equal(values, expected), backend
