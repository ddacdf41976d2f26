"""Pure-PyTorch bitmask layout: the oracle for every backend and the fallback on any device.

bool (..., K) <-> int32 (..., ceil(K / 32)); bit j of word w in a row is element 32 * w + j.
"""

import torch

from ..checks import BITS_PER_WORD, check_pack_mask, check_unpack_mask, words_per_row


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    check_pack_mask(mask)
    k = mask.shape[-1]
    words = words_per_row(k)
    padded = torch.nn.functional.pad(mask.to(torch.int64), (0, words * BITS_PER_WORD - k))
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=mask.device) << torch.arange(
        BITS_PER_WORD, device=mask.device)
    unsigned = (padded.reshape(*mask.shape[:-1], words, BITS_PER_WORD) * weights).sum(-1)
    # Words are unsigned 32-bit patterns; int32 holds them with bit 31 as the sign bit.
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def unpack_mask(packed: torch.Tensor, k: int) -> torch.Tensor:
    check_unpack_mask(packed, k)
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int64, device=packed.device)
    bits = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * BITS_PER_WORD)[..., :k].to(torch.bool)
