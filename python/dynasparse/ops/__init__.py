"""The one op surface of dynasparse: every kernel is reached through these functions.

Each takes `backend=None` (choose by device and what is built) or one of
"cpu", "cuda", "triton", "reference"; see `dynasparse.backends()`.
"""

from .bitmask import pack_mask, unpack_mask
from .optim import adamw_step, sgd_step

__all__ = ["adamw_step", "pack_mask", "sgd_step", "unpack_mask"]
