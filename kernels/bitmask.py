"""Triton kernels for the bitmask layout: bool mask (..., K) <-> int32 words (..., ceil(K / 32)).

Bit j of word w in a row is element 32 * w + j of that row (bit 31 is the int32 sign bit);
tail bits past K are zero. The launchers run the same argument checks as every other
backend (dynasparse.checks), so a bad input never reaches a kernel as an out-of-bounds access.

Both kernels walk the flattened output/input words: one program handles BLOCK_WORDS words,
i.e. a [BLOCK_WORDS, 32] tile of mask bytes. Flattening rows and words onto grid axis 0
avoids the 65535-program limit of axes 1 and 2, so any row count and any K fit one launch.
"""

import torch
import triton
import triton.language as tl

from dynasparse.checks import check_pack_mask, check_unpack_mask, words_per_row

# One config per kernel: mask packing runs once per mask change, so tuning buys little.
# A [64, 32] tile is 2048 bytes of mask, 16 per thread with 4 warps.
BLOCK_WORDS = 64
NUM_WARPS = 4


@triton.jit
def _word_tile(k, total_words, BLOCK_WORDS: tl.constexpr):
    """This program's words, the flat offsets of their [BLOCK_WORDS, 32] mask elements, and
    which of those exist."""
    # Offsets in int64 whatever width the sizes came in: rows * K passes 2**31 on big masks.
    k64 = k.to(tl.int64)
    words_per_row = (k64 + 31) // 32
    word = tl.program_id(0).to(tl.int64) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    row = word // words_per_row
    col = ((word - row * words_per_row) * 32)[:, None] + tl.arange(0, 32)[None, :]
    in_bounds = (word[:, None] < total_words) & (col < k64)
    return word, row[:, None] * k64 + col, in_bounds


# Sizes are not specialized on their value (== 1, multiples of 16), so the variants compiled at
# run time differ from AOT_SPECS only in pointer-alignment hints and in the integer width Triton
# picks from a size's value (i32 below 2**31, i64 above); AOT_SPECS lists both widths.
@triton.jit(do_not_specialize=["k", "total_words"])
def _pack_mask_kernel(mask_ptr, packed_ptr, k, total_words, BLOCK_WORDS: tl.constexpr):
    word, element, in_bounds = _word_tile(k, total_words, BLOCK_WORDS)
    # Bool tensors arrive as uint8 views: Triton has no bool pointer loads worth trusting.
    byte = tl.load(mask_ptr + element, mask=in_bounds, other=0)
    # Distinct bits, so the sum is their OR and stays below 2**32 in uint32.
    bits = (byte != 0).to(tl.uint32) << tl.arange(0, 32)[None, :].to(tl.uint32)
    packed = tl.sum(bits, axis=1)
    tl.store(packed_ptr + word, packed.to(tl.int32, bitcast=True), mask=word < total_words)


@triton.jit(do_not_specialize=["k", "total_words"])
def _unpack_mask_kernel(packed_ptr, mask_ptr, k, total_words, BLOCK_WORDS: tl.constexpr):
    word, element, in_bounds = _word_tile(k, total_words, BLOCK_WORDS)
    packed = tl.load(packed_ptr + word, mask=word < total_words, other=0)
    # The arithmetic shift copies the sign bit downwards; the & 1 keeps only bit j.
    byte = (packed[:, None] >> tl.arange(0, 32)[None, :]) & 1
    tl.store(mask_ptr + element, byte.to(tl.uint8), mask=in_bounds)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask (..., K) into a new int32 tensor (..., ceil(K / 32))."""
    check_pack_mask(mask)
    mask = mask.contiguous()
    k = mask.shape[-1]
    packed = torch.empty((*mask.shape[:-1], words_per_row(k)), dtype=torch.int32, device=mask.device)
    total_words = packed.numel()
    if total_words:
        grid = (triton.cdiv(total_words, BLOCK_WORDS),)
        _pack_mask_kernel[grid](mask.view(torch.uint8), packed, k, total_words,
                                BLOCK_WORDS=BLOCK_WORDS, num_warps=NUM_WARPS)
    return packed


def unpack_mask(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of `pack_mask`: int32 (..., ceil(k / 32)) to a new bool (..., k)."""
    check_unpack_mask(packed, k)
    packed = packed.contiguous()
    mask = torch.empty((*packed.shape[:-1], k), dtype=torch.bool, device=packed.device)
    total_words = packed.numel()
    if total_words:
        grid = (triton.cdiv(total_words, BLOCK_WORDS),)
        _unpack_mask_kernel[grid](packed, mask.view(torch.uint8), k, total_words,
                                  BLOCK_WORDS=BLOCK_WORDS, num_warps=NUM_WARPS)
    return mask


def _specs(kernel, pointer_types: dict[str, str]) -> list[dict]:
    # Mixed widths (k in i32, total_words in i64) compile to the same code after the casts at
    # the top of each kernel, so the two uniform widths cover every launch.
    return [
        {
            "kernel": kernel,
            "signature": {**pointer_types, "k": int_type, "total_words": int_type},
            "constexprs": {"BLOCK_WORDS": BLOCK_WORDS},
            "options": {"num_warps": NUM_WARPS},
        }
        for int_type in ("i32", "i64")
    ]


# Every kernel of this module with every config it is launched with; dynasparse.kernels.aot
# compiles each for sm_80 and sm_90. Format: {"kernel": the @triton.jit object, "signature":
# {runtime arg: Triton type}, "constexprs": {constexpr arg: value}, "options": compile options}.
AOT_SPECS = [
    *_specs(_pack_mask_kernel, {"mask_ptr": "*u8", "packed_ptr": "*i32"}),
    *_specs(_unpack_mask_kernel, {"packed_ptr": "*i32", "mask_ptr": "*u8"}),
]
