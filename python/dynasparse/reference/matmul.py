"""Pure-PyTorch masked matmul: plans, packed values and products (the layouts are described
in csrc/ops.cpp). The oracle for every backend and the fallback on any device: whole-tensor
torch ops, no Python loops over rows or nonzeros. Every op that reads through a plan checks
its values first (dynasparse.checks), as the kernels do.
"""

import math

import torch

from .. import checks
from .bitmask import unpack_mask


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as a 2-D [rows, K] matrix (also when K or the leading dims are 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _to_int16(offsets: torch.Tensor) -> torch.Tensor:
    # Offsets are unsigned 16-bit; int16 stores their bit pattern.
    return torch.where(offsets >= 2**15, offsets - 2**16, offsets).to(torch.int16)


def _panel_coordinates(row_ptr: torch.Tensor, cols: torch.Tensor, panel: int, n: int):
    """Row and absolute column of every plan nonzero, in plan order."""
    segments = torch.arange(row_ptr.numel() - 1, device=cols.device)
    segment = torch.repeat_interleave(segments, torch.diff(row_ptr))
    column = (segment // max(n, 1)) * panel + (cols.to(torch.int64) & 0xFFFF)
    return segment % max(n, 1), column


def block_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=row_ptr.device), torch.diff(row_ptr))


def _tiled(dense: torch.Tensor, block: int) -> torch.Tensor:
    """[n, k] zero-padded to whole blocks, viewed as [n_blocks, b, k_blocks, b]."""
    n, k = dense.shape
    padded = torch.nn.functional.pad(dense, (0, checks.ceil_div(k, block) * block - k,
                                             0, checks.ceil_div(n, block) * block - n))
    return padded.reshape(checks.ceil_div(n, block), block, checks.ceil_div(k, block), block)


def plan_panels(mask: torch.Tensor, panel: int):
    checks.check_plan_panels(mask, panel)
    n, k = mask.shape
    rows, columns = mask.nonzero(as_tuple=True)
    segment = (columns // panel) * n + rows
    # nonzero() is row-major, so a stable sort by segment keeps columns ascending inside one.
    segment, order = torch.sort(segment, stable=True)
    counts = torch.bincount(segment, minlength=checks.panel_count(k, panel) * n)
    return _offsets(counts), _to_int16(columns[order] % panel)


def plan_blocks(mask: torch.Tensor, block: int):
    checks.check_plan_blocks(mask, block)
    occupied = _tiled(mask, block).any(dim=3).any(dim=1)
    occupied_rows, occupied_cols = occupied.nonzero(as_tuple=True)
    counts = torch.bincount(occupied_rows, minlength=occupied.shape[0])
    return _offsets(counts), occupied_cols.to(torch.int32)


# The unchecked bodies (_pack_panels, ...) serve the ops below that have checked the plan.

def _pack_panels(weight, row_ptr, cols, panel: int):
    rows, columns = _panel_coordinates(row_ptr, cols, panel, weight.shape[0])
    return weight[rows, columns]


def pack_panels(weight, row_ptr, cols, panel: int):
    checks.check_pack_panels(weight, row_ptr, cols, panel)
    checks.check_panel_plan_values("pack_panels", row_ptr, cols, panel, *weight.shape)
    return _pack_panels(weight, row_ptr, cols, panel)


def _pack_blocks(weight, mask, row_ptr, cols, block: int):
    # where, not weight * mask: a pruned inf or nan must contribute nothing.
    tiles = _tiled(torch.where(mask, weight, 0), block)
    # Indices split by a slice: the indexed dimension comes first, giving [blocks, b, b].
    return tiles[block_rows(row_ptr), :, cols.to(torch.int64), :]


def pack_blocks(weight, mask, row_ptr, cols, block: int):
    checks.check_pack_blocks(weight, mask, row_ptr, cols, block)
    checks.check_block_plan_values("pack_blocks", row_ptr, cols, block, *weight.shape)
    return _pack_blocks(weight, mask, row_ptr, cols, block)


def _unpack_panels(values, row_ptr, cols, panel: int, n: int, k: int):
    dense = values.new_zeros(n, k)
    rows, columns = _panel_coordinates(row_ptr, cols, panel, n)
    dense[rows, columns] = values
    return dense


def unpack_panels(values, row_ptr, cols, panel: int, n: int, k: int):
    checks.check_unpack_panels(values, row_ptr, cols, panel, n, k)
    checks.check_panel_plan_values("unpack_panels", row_ptr, cols, panel, n, k)
    return _unpack_panels(values, row_ptr, cols, panel, n, k)


def _unpack_blocks(values, row_ptr, cols, n: int, k: int):
    block = values.shape[1]
    tiles = _tiled(values.new_zeros(n, k), block)
    tiles[block_rows(row_ptr), :, cols.to(torch.int64), :] = values
    return tiles.reshape(tiles.shape[0] * block, tiles.shape[2] * block)[:n, :k]


def unpack_blocks(values, row_ptr, cols, n: int, k: int):
    block = checks.check_unpack_blocks(values, row_ptr, cols, n, k)
    checks.check_block_plan_values("unpack_blocks", row_ptr, cols, block, n, k)
    return _unpack_blocks(values, row_ptr, cols, n, k)


def _linear(x, weight, bias):
    y = as_rows(x) @ weight.T
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def spmm_panels(x, values, row_ptr, cols, panel: int, n: int, bias=None):
    checks.check_spmm_panels(x, values, row_ptr, cols, panel, n, bias)
    checks.check_panel_plan_values("spmm_panels", row_ptr, cols, panel, n, x.shape[-1])
    return _linear(x, _unpack_panels(values, row_ptr, cols, panel, n, x.shape[-1]), bias)


def spmm_blocks(x, values, row_ptr, cols, n: int, bias=None):
    block = checks.check_spmm_blocks(x, values, row_ptr, cols, n, bias)
    checks.check_block_plan_values("spmm_blocks", row_ptr, cols, block, n, x.shape[-1])
    return _linear(x, _unpack_blocks(values, row_ptr, cols, n, x.shape[-1]), bias)


def conv2d_panels(x, values, row_ptr, cols, panel: int, n: int, kernel_size, stride, padding, dilation, bias=None):
    checks.check_conv2d_panels(x, values, row_ptr, cols, panel, n, kernel_size, stride, padding, dilation, bias)
    k = x.shape[1] * kernel_size[0] * kernel_size[1]
    checks.check_panel_plan_values("conv2d_panels", row_ptr, cols, panel, n, k)
    weight = _unpack_panels(values, row_ptr, cols, panel, n, k)
    weight = weight.reshape(n, x.shape[1], *kernel_size)
    return torch.nn.functional.conv2d(x, weight, bias, stride=stride, padding=padding, dilation=dilation)


def _weight_grad(grad_out, x):
    return as_rows(grad_out).T @ as_rows(x)


def conv2d_sddmm_panels(grad_out, x, row_ptr, cols, panel: int, kernel_size, stride, padding, dilation):
    checks.check_conv2d_sddmm_panels(grad_out, x, row_ptr, cols, panel, kernel_size, stride, padding, dilation)
    n, k = grad_out.shape[1], x.shape[1] * kernel_size[0] * kernel_size[1]
    checks.check_panel_plan_values("conv2d_sddmm_panels", row_ptr, cols, panel, n, k)
    # im2col rows (one per image and output pixel) against grad_out's: the dense [n, k] weight
    # gradient, then its entries at the plan's nonzeros.
    patches = torch.nn.functional.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    weight_grad = _weight_grad(grad_out.flatten(2).transpose(1, 2), patches.transpose(1, 2))
    return _pack_panels(weight_grad, row_ptr, cols, panel)


def sddmm_panels(grad_out, x, row_ptr, cols, panel: int):
    checks.check_sddmm_panels(grad_out, x, row_ptr, cols, panel)
    checks.check_panel_plan_values("sddmm_panels", row_ptr, cols, panel, grad_out.shape[-1], x.shape[-1])
    return _pack_panels(_weight_grad(grad_out, x), row_ptr, cols, panel)


def sddmm_blocks(grad_out, x, mask, row_ptr, cols, block: int):
    checks.check_sddmm_blocks(grad_out, x, mask, row_ptr, cols, block)
    checks.check_block_plan_values("sddmm_blocks", row_ptr, cols, block, grad_out.shape[-1], x.shape[-1])
    return _pack_blocks(_weight_grad(grad_out, x), mask, row_ptr, cols, block)


def _bitmask_mask(mask_words, tile_ptr, tile_cols, tile: int, n: int, k: int) -> torch.Tensor:
    """The mask the fused kernels apply: m where the tile plan lists a tile. They never visit
    the tiles it leaves out, so those count as empty whatever m holds there."""
    listed = torch.zeros(checks.ceil_div(n, tile), checks.ceil_div(k, tile), dtype=torch.bool,
                         device=tile_cols.device)
    listed[block_rows(tile_ptr), tile_cols.to(torch.int64)] = True
    listed = listed.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:n, :k]
    return unpack_mask(mask_words, k) & listed


def masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile: int, bias=None):
    checks.check_masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile, bias)
    checks.check_block_plan_values("masked_mm", tile_ptr, tile_cols, tile, *weight.shape)
    mask = _bitmask_mask(mask_words, tile_ptr, tile_cols, tile, *weight.shape)
    return _linear(x, torch.where(mask, weight, 0), bias)


def masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile: int):
    checks.check_masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile)
    checks.check_block_plan_values("masked_sddmm", tile_ptr, tile_cols, tile, grad_out.shape[-1], x.shape[-1])
    mask = _bitmask_mask(mask_words, tile_ptr, tile_cols, tile, grad_out.shape[-1], x.shape[-1])
    return torch.where(mask, _weight_grad(grad_out, x), 0)
