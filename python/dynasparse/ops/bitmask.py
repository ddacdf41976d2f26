"""Bitmask layout ops: bool mask (..., K) <-> packed int32 words (..., ceil(K / 32)).

Bit j of word w in a row is element 32 * w + j of that row; tail bits are zero. Kernels
read masks in this form (1 bit per weight instead of 8).
"""

import torch

from .. import checks
from ..reference import bitmask as reference
from ._registry import Op


def _pack_mask_fake(mask):
    checks.check_pack_mask(mask)
    return mask.new_empty((*mask.shape[:-1], checks.words_per_row(mask.shape[-1])), dtype=torch.int32)


def _unpack_mask_fake(packed, k):
    checks.check_unpack_mask(packed, k)
    return packed.new_empty((*packed.shape[:-1], k), dtype=torch.bool)


# dynasparse.kernels needs triton: imported at the first Triton call, not before.
def _pack_mask_triton(mask):
    from dynasparse.kernels import bitmask as kernels

    return kernels.pack_mask(mask)


def _unpack_mask_triton(packed, k):
    from dynasparse.kernels import bitmask as kernels

    return kernels.unpack_mask(packed, k)


_pack = Op("pack_mask", fake=_pack_mask_fake, reference=reference.pack_mask, triton=_pack_mask_triton)
_unpack = Op("unpack_mask", fake=_unpack_mask_fake, reference=reference.unpack_mask, triton=_unpack_mask_triton)


def pack_mask(mask: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Pack a bool mask along its last dimension into int32 words (32 elements a word)."""
    return _pack(mask, backend=backend)


def unpack_mask(packed: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of `pack_mask`: `k` is the length of the original last dimension."""
    return _unpack(packed, k, backend=backend)
