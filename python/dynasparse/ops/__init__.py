"""The one op surface of dynasparse: every kernel is reached through these functions.

Each takes `backend=None` (choose by device and what is built) or one of
"cpu", "cuda", "triton", "reference"; see `dynasparse.backends()`.
"""

from .bitmask import pack_mask, unpack_mask
from .optim import adamw_step, sgd_step
from .topk import (block_scores, expand_block_mask, expand_row_mask, nm_mask, rigl_update, row_scores, topk_mask,
                   topk_mask_global)

__all__ = ["adamw_step", "block_scores", "expand_block_mask", "expand_row_mask", "nm_mask", "pack_mask",
           "rigl_update", "row_scores", "sgd_step", "topk_mask", "topk_mask_global", "unpack_mask"]
