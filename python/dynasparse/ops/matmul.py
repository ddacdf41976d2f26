"""Masked matmul ops: kernel plans of a mask, packed weight values, and the three products
a sparse layer needs (forward, input gradient, masked weight gradient).

Layouts (full description in csrc/ops.cpp):
- panel plan (unstructured): per (K-panel, row) runs of 16-bit column offsets; the packed
  values are w's active entries in plan order, refreshed whenever w changes;
- block plan (b x b blocks): per block row, the block columns holding any active element;
  packed values are the blocks of w * m;
- bitmask (Triton): w read in place and masked in registers from pack_mask(m), with a block
  plan of m as the list of tiles to visit.
The input gradient is the forward product over the plan of m.T with w.T's values, so every
product runs the same kernels. `dynasparse.layout.MaskPlan` builds and caches all of this.
conv2d_panels is the forward product of a convolution whose weight [n, C, kh, kw] is planned
as [n, C * kh * kw]: an implicit GEMM over NCHW input, no unfolded copy of it;
conv2d_sddmm_panels is its masked weight gradient, the same way.
"""

from __future__ import annotations


import torch

from .. import checks
from ..reference import matmul as reference
from ._registry import Op, has_triton_kernels


def _nonzeros_unknown_until_run() -> int:
    return torch.library.get_ctx().new_dynamic_size()


def _plan_panels_fake(mask, panel):
    checks.check_plan_panels(mask, panel)
    n, k = mask.shape
    row_ptr = mask.new_empty(checks.panel_count(k, panel) * n + 1, dtype=torch.int64)
    return row_ptr, mask.new_empty(_nonzeros_unknown_until_run(), dtype=torch.int16)


def _plan_blocks_fake(mask, block):
    checks.check_plan_blocks(mask, block)
    row_ptr = mask.new_empty(checks.ceil_div(mask.shape[0], block) + 1, dtype=torch.int64)
    return row_ptr, mask.new_empty(_nonzeros_unknown_until_run(), dtype=torch.int32)


def _pack_panels_fake(weight, row_ptr, cols, panel):
    checks.check_pack_panels(weight, row_ptr, cols, panel)
    return weight.new_empty(cols.shape)


def _pack_blocks_fake(weight, mask, row_ptr, cols, block):
    checks.check_pack_blocks(weight, mask, row_ptr, cols, block)
    return weight.new_empty((cols.shape[0], block, block))


def _unpack_panels_fake(values, row_ptr, cols, panel, n, k):
    checks.check_unpack_panels(values, row_ptr, cols, panel, n, k)
    return values.new_empty((n, k))


def _unpack_blocks_fake(values, row_ptr, cols, n, k):
    checks.check_unpack_blocks(values, row_ptr, cols, n, k)
    return values.new_empty((n, k))


def _spmm_panels_fake(x, values, row_ptr, cols, panel, n, bias=None):
    checks.check_spmm_panels(x, values, row_ptr, cols, panel, n, bias)
    return x.new_empty((*x.shape[:-1], n))


def _spmm_blocks_fake(x, values, row_ptr, cols, n, bias=None):
    checks.check_spmm_blocks(x, values, row_ptr, cols, n, bias)
    return x.new_empty((*x.shape[:-1], n))


def _conv2d_panels_fake(x, values, row_ptr, cols, panel, n, kernel_size, stride, padding, dilation, bias=None):
    checks.check_conv2d_panels(x, values, row_ptr, cols, panel, n, kernel_size, stride, padding, dilation, bias)
    out_h, out_w = (checks.conv_output_size(x.shape[2 + d], kernel_size[d], stride[d], padding[d], dilation[d])
                    for d in range(2))
    return x.new_empty((x.shape[0], n, out_h, out_w))


def _conv2d_sddmm_panels_fake(grad_out, x, row_ptr, cols, panel, kernel_size, stride, padding, dilation):
    checks.check_conv2d_sddmm_panels(grad_out, x, row_ptr, cols, panel, kernel_size, stride, padding, dilation)
    return x.new_empty(cols.shape)


def _sddmm_panels_fake(grad_out, x, row_ptr, cols, panel):
    checks.check_sddmm_panels(grad_out, x, row_ptr, cols, panel)
    return x.new_empty(cols.shape)


def _sddmm_blocks_fake(grad_out, x, mask, row_ptr, cols, block):
    checks.check_sddmm_blocks(grad_out, x, mask, row_ptr, cols, block)
    return x.new_empty((cols.shape[0], block, block))


def _masked_mm_fake(x, weight, mask_words, tile_ptr, tile_cols, tile, bias=None):
    checks.check_masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _masked_sddmm_fake(grad_out, x, mask_words, tile_ptr, tile_cols, tile):
    checks.check_masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile)
    return x.new_empty((grad_out.shape[-1], x.shape[-1]))


_HAS_TRITON_KERNELS = has_triton_kernels("matmul")


# dynasparse.kernels needs triton: imported at the first Triton call, not before.
def _masked_mm_triton(x, weight, mask_words, tile_ptr, tile_cols, tile, bias=None):
    from dynasparse.kernels import matmul as kernels

    return kernels.masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile, bias)


def _masked_sddmm_triton(grad_out, x, mask_words, tile_ptr, tile_cols, tile):
    from dynasparse.kernels import matmul as kernels

    return kernels.masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile)


# The fused bitmask path exists for GPUs; on CPU tensors the plan layouts are the fast path
# and masked_mm runs as its reference (the dense w * m product) without a fallback warning.
_BITMASK_PREFERENCE = {"cpu": ("reference",), "cuda": ("triton", "reference")}

_plan_panels = Op("plan_panels", fake=_plan_panels_fake, reference=reference.plan_panels, triton=None)
_plan_blocks = Op("plan_blocks", fake=_plan_blocks_fake, reference=reference.plan_blocks, triton=None)
_pack_panels = Op("pack_panels", fake=_pack_panels_fake, reference=reference.pack_panels, triton=None)
_pack_blocks = Op("pack_blocks", fake=_pack_blocks_fake, reference=reference.pack_blocks, triton=None)
_unpack_panels = Op("unpack_panels", fake=_unpack_panels_fake, reference=reference.unpack_panels, triton=None)
_unpack_blocks = Op("unpack_blocks", fake=_unpack_blocks_fake, reference=reference.unpack_blocks, triton=None)
_spmm_panels = Op("spmm_panels", fake=_spmm_panels_fake, reference=reference.spmm_panels, triton=None)
_spmm_blocks = Op("spmm_blocks", fake=_spmm_blocks_fake, reference=reference.spmm_blocks, triton=None)
_sddmm_panels = Op("sddmm_panels", fake=_sddmm_panels_fake, reference=reference.sddmm_panels, triton=None)
_sddmm_blocks = Op("sddmm_blocks", fake=_sddmm_blocks_fake, reference=reference.sddmm_blocks, triton=None)
# No CUDA kernel: CUDA devices run the fused bitmask path (unfolded patches), and a panel
# plan on a CUDA tensor gets the reference (unpacked weight + F.conv2d) without a warning.
_conv2d_panels = Op("conv2d_panels", fake=_conv2d_panels_fake, reference=reference.conv2d_panels, triton=None,
                    preference={"cpu": ("cpu", "reference"), "cuda": ("reference",)})
_conv2d_sddmm_panels = Op("conv2d_sddmm_panels", fake=_conv2d_sddmm_panels_fake,
                          reference=reference.conv2d_sddmm_panels, triton=None,
                          preference={"cpu": ("cpu", "reference"), "cuda": ("reference",)})
_masked_mm = Op("masked_mm", fake=_masked_mm_fake, reference=reference.masked_mm,
                triton=_masked_mm_triton if _HAS_TRITON_KERNELS else None, preference=_BITMASK_PREFERENCE)
_masked_sddmm = Op("masked_sddmm", fake=_masked_sddmm_fake, reference=reference.masked_sddmm,
                   triton=_masked_sddmm_triton if _HAS_TRITON_KERNELS else None, preference=_BITMASK_PREFERENCE)


def plan_panels(mask: torch.Tensor, panel: int, *, backend: str | None = None):
    """Panel plan of a bool mask [N, K]: (row_ptr int64 [ceil(K/panel) * N + 1], cols int16 [nnz])."""
    return _plan_panels(mask, panel, backend=backend)


def plan_blocks(mask: torch.Tensor, block: int, *, backend: str | None = None):
    """Block plan of a bool mask [N, K]: (row_ptr int64 [ceil(N/b) + 1], cols int32 [blocks])."""
    return _plan_blocks(mask, block, backend=backend)


def pack_panels(weight, row_ptr, cols, panel: int, *, backend: str | None = None) -> torch.Tensor:
    """w's entries at the plan's nonzeros, in plan order (weight may be any 2-D view, e.g. w.T)."""
    return _pack_panels(weight, row_ptr, cols, panel, backend=backend)


def pack_blocks(weight, mask, row_ptr, cols, block: int, *, backend: str | None = None) -> torch.Tensor:
    """The plan's blocks of w * m as [blocks, b, b], zero past the edges of w."""
    return _pack_blocks(weight, mask, row_ptr, cols, block, backend=backend)


def unpack_panels(values, row_ptr, cols, panel: int, n: int, k: int, *, backend: str | None = None):
    """Dense [n, k] from packed panel values, zero elsewhere."""
    return _unpack_panels(values, row_ptr, cols, panel, n, k, backend=backend)


def unpack_blocks(values, row_ptr, cols, n: int, k: int, *, backend: str | None = None):
    """Dense [n, k] from packed blocks, zero elsewhere."""
    return _unpack_blocks(values, row_ptr, cols, n, k, backend=backend)


def spmm_panels(x, values, row_ptr, cols, panel: int, n: int, bias=None, *, backend: str | None = None):
    """x (..., K) @ W.T (+ bias) -> (..., n), W given by a panel plan and its packed values."""
    return _spmm_panels(x, values, row_ptr, cols, panel, n, bias, backend=backend)


def spmm_blocks(x, values, row_ptr, cols, n: int, bias=None, *, backend: str | None = None):
    """x (..., K) @ W.T (+ bias) -> (..., n), W given by a block plan and its packed blocks."""
    return _spmm_blocks(x, values, row_ptr, cols, n, bias, backend=backend)


def conv2d_panels(x, values, row_ptr, cols, panel: int, n: int, kernel_size, stride, padding, dilation, bias=None,
                  *, backend: str | None = None):
    """conv2d(x [B, C, H, W], W viewed as [n, C, kh, kw], stride, zero padding, dilation) (+ bias)
    -> [B, n, OH, OW], W the [n, C * kh * kw] matrix of a panel plan and its packed values: an
    implicit GEMM building im2col tiles in cache (CPU; on CUDA the reference runs)."""
    return _conv2d_panels(x, values, row_ptr, cols, panel, n, list(kernel_size), list(stride), list(padding),
                          list(dilation), bias, backend=backend)


def conv2d_sddmm_panels(grad_out, x, row_ptr, cols, panel: int, kernel_size, stride, padding, dilation, *,
                        backend: str | None = None):
    """The weight gradient of conv2d_panels at the plan's nonzeros, packed in plan order: for each
    nonzero (n, k) of the [n, C * kh * kw] plan, the sum over images and output pixels of
    grad_out [B, n, OH, OW] times the unfolded x [B, C, H, W] (an implicit GEMM over im2col tiles
    built in cache on CPU; on CUDA the reference runs)."""
    return _conv2d_sddmm_panels(grad_out, x, row_ptr, cols, panel, list(kernel_size), list(stride), list(padding),
                                list(dilation), backend=backend)


def sddmm_panels(grad_out, x, row_ptr, cols, panel: int, *, backend: str | None = None):
    """grad_out.T @ x at the plan's nonzeros, packed in plan order (summed over leading dims)."""
    return _sddmm_panels(grad_out, x, row_ptr, cols, panel, backend=backend)


def sddmm_blocks(grad_out, x, mask, row_ptr, cols, block: int, *, backend: str | None = None):
    """grad_out.T @ x on the plan's blocks, zero where the mask is, as [blocks, b, b]."""
    return _sddmm_blocks(grad_out, x, mask, row_ptr, cols, block, backend=backend)


def masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile: int, bias=None, *, backend: str | None = None):
    """x @ (w * m).T (+ bias), w read in place and masked by its packed bitmask; the block plan
    (tile_ptr, tile_cols) of m with block `tile` lists the tiles worth visiting."""
    return _masked_mm(x, weight, mask_words, tile_ptr, tile_cols, tile, bias, backend=backend)


def masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile: int, *, backend: str | None = None):
    """Dense [N, K] grad_out.T @ x, zero where the mask is; empty tiles are never computed."""
    return _masked_sddmm(grad_out, x, mask_words, tile_ptr, tile_cols, tile, backend=backend)


OPS = (_plan_panels, _plan_blocks, _pack_panels, _pack_blocks, _unpack_panels, _unpack_blocks, _spmm_panels,
       _spmm_blocks, _conv2d_panels, _conv2d_sddmm_panels, _sddmm_panels, _sddmm_blocks, _masked_mm, _masked_sddmm)
