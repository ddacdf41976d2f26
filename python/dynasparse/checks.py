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


# Top-k family (csrc/topk.h). Checks that need the data (NaN among the candidates, k
# against the number of candidates when a candidates mask is given) run in the backends,
# with the messages built here.
SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_score_dtype(op: str, name: str, scores: torch.Tensor) -> None:
    if scores.dtype not in SCORE_DTYPES:
        raise TypeError(f"dynasparse.{op}: {name} must be float32, float16, bfloat16 or float64, "
                        f"got {_dtype_name(scores.dtype)}")


def nan_message(op: str, name: str, among_candidates: bool) -> str:
    return (f"dynasparse.{op}: {name} contains NaN{' among the candidates' if among_candidates else ''} "
            "(NaN has no rank)")


def check_k_in_range(op: str, k: int, candidates: int) -> None:
    if k < 0:
        raise ValueError(f"dynasparse.{op}: k must be >= 0, got {k}")
    if k > candidates:
        raise ValueError(f"dynasparse.{op}: k ({k}) exceeds the number of candidates ({candidates})")


def check_topk_mask(scores: torch.Tensor, k: int, candidates: torch.Tensor | None) -> None:
    check_score_dtype("topk_mask", "scores", scores)
    if candidates is None:
        check_k_in_range("topk_mask", k, scores.numel())
        return
    if candidates.dtype != torch.bool:
        raise TypeError(f"dynasparse.topk_mask: candidates must be torch.bool, got {_dtype_name(candidates.dtype)}")
    if candidates.shape != scores.shape:
        raise ValueError(f"dynasparse.topk_mask: candidates must have scores' shape {list(scores.shape)}, "
                         f"got {list(candidates.shape)}")
    if candidates.device != scores.device:
        raise ValueError(f"dynasparse.topk_mask: candidates must be on scores' device ({scores.device}), "
                         f"got {candidates.device}")
    if k < 0:
        raise ValueError(f"dynasparse.topk_mask: k must be >= 0, got {k}")


def check_topk_mask_global(scores: list[torch.Tensor], k: int) -> None:
    for i, tensor in enumerate(scores):
        name = f"scores[{i}]"
        check_score_dtype("topk_mask_global", name, tensor)
        if tensor.dtype != scores[0].dtype:
            raise TypeError(f"dynasparse.topk_mask_global: all scores must have one dtype, but scores[0] is "
                            f"{_dtype_name(scores[0].dtype)} and {name} is {_dtype_name(tensor.dtype)}")
        if tensor.device != scores[0].device:
            raise ValueError(f"dynasparse.topk_mask_global: all scores must be on one device, but scores[0] is on "
                             f"{scores[0].device} and {name} on {tensor.device}")
    check_k_in_range("topk_mask_global", k, sum(tensor.numel() for tensor in scores))


def check_nm_mask(scores: torch.Tensor, n: int, m: int) -> None:
    check_score_dtype("nm_mask", "scores", scores)
    if scores.dim() < 1:
        raise ValueError("dynasparse.nm_mask: scores must have at least one dimension "
                         "(groups run along the last one), got a 0-d tensor")
    if m < 1:
        raise ValueError(f"dynasparse.nm_mask: m must be >= 1, got {m}")
    if not 0 <= n <= m:
        raise ValueError(f"dynasparse.nm_mask: n must be in [0, m] = [0, {m}], got {n}")
    if scores.shape[-1] % m != 0:
        raise ValueError(f"dynasparse.nm_mask: the last dimension ({scores.shape[-1]}) must be a multiple of m ({m})")
