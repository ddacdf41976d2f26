"""The one op surface of dynasparse: every kernel is reached through these functions.

Each takes `backend=None` (choose by device and what is built) or one of
"cpu", "cuda", "triton", "reference"; see `dynasparse.backends()`.
"""

from .bitmask import pack_mask, unpack_mask

__all__ = ["pack_mask", "unpack_mask"]
