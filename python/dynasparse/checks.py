"""Argument checks shared by the Python-side backends (fake, Triton, reference).

The C++ backends run the same checks in csrc/<family>.h with the same messages and
exception types, so a bad input fails alike whichever backend a call lands on. Plain
raises rather than torch._check: dynamo traces them without graph breaks.
"""

import torch

BITS_PER_WORD = 32


def words_per_row(k: int) -> int:
    return (k + BITS_PER_WORD - 1) // BITS_PER_WORD


def _dtype_name(dtype: torch.dtype) -> str:
    # The C++ checks print c10's names (Float, Int); match them.
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int32: "Int", torch.int64: "Long", torch.int16: "Short", torch.int8: "Char",
            torch.uint8: "Byte", torch.bool: "Bool"}.get(dtype, str(dtype))


def check_pack_mask(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"dynasparse.pack_mask: mask must be torch.bool, got {_dtype_name(mask.dtype)} "
                        "(masks are explicit bool tensors; never derive one from weight == 0)")
    if mask.dim() < 1:
        raise ValueError("dynasparse.pack_mask: mask must have at least one dimension "
                         "(packing runs along the last one), got a 0-d tensor")


def check_unpack_mask(packed: torch.Tensor, k: int) -> None:
    if packed.dtype != torch.int32:
        raise TypeError("dynasparse.unpack_mask: packed must be torch.int32 (as returned by pack_mask), "
                        f"got {_dtype_name(packed.dtype)}")
    if packed.dim() < 1:
        raise ValueError("dynasparse.unpack_mask: packed must have at least one dimension")
    if k < 0:
        raise ValueError(f"dynasparse.unpack_mask: k must be >= 0, got {k}")
    if packed.shape[-1] != words_per_row(k):
        raise ValueError(f"dynasparse.unpack_mask: a row of {k} mask elements packs into {words_per_row(k)} "
                         f"int32 words, but packed has {packed.shape[-1]} in its last dimension")
