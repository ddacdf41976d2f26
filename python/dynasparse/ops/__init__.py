"""The one op surface of dynasparse: every kernel is reached through these functions.

Each takes `backend=None` (choose by device and what is built) or one of
"cpu", "cuda", "triton", "reference"; see `dynasparse.backends()`.
"""

from .bitmask import pack_mask, unpack_mask
from .matmul import (conv2d_panels, conv2d_sddmm_panels, masked_mm, masked_sddmm, pack_blocks, pack_panels,
                     plan_blocks, plan_panels, sddmm_blocks, sddmm_panels, spmm_blocks, spmm_panels, unpack_blocks,
                     unpack_panels)
from .optim import adamw_step, sgd_step
from .topk import (block_scores, expand_block_mask, expand_row_mask, nm_mask, rigl_masks, rigl_update, row_scores,
                   topk_mask, topk_mask_global)

__all__ = ["adamw_step", "block_scores", "conv2d_panels", "conv2d_sddmm_panels", "expand_block_mask",
           "expand_row_mask", "masked_mm", "masked_sddmm", "nm_mask",
           "pack_blocks", "pack_mask", "pack_panels", "plan_blocks", "plan_panels", "rigl_masks", "rigl_update", "row_scores",
           "sddmm_blocks", "sddmm_panels", "sgd_step", "spmm_blocks", "spmm_panels", "topk_mask", "topk_mask_global",
           "unpack_blocks", "unpack_mask", "unpack_panels"]
