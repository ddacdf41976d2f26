"""Triton kernels for top-k masks: exact, deterministic top-k by radix select, and N:M masks.

Scores are read as their bit patterns (int64, int32 or int16) and mapped to order-preserving
uint64 keys in [0, 2**bits): -0.0 is folded onto +0.0, the sign bit is flipped for positives and
the magnitude bits for negatives. NaN is counted, never ranked.

Top-k runs one histogram pass per 8-bit digit of the key (8 for float64, 4 for float32, 2 for
the 16-bit formats). Each pass counts, over the candidate keys whose higher digits equal the prefix chosen
so far, how many fall on each digit; torch ops on that 256-entry histogram then pick the digit
holding the k-th key, all on the device (`_select_digit`). After the last digit the prefix is
the k-th key itself. The mask pass keeps key > kth and, of the keys == kth, only the first
(k - count greater) in flat order (tensor order first across a list): a counting kernel writes
the equal keys per program, torch.cumsum turns them into each program's start, and the writing
kernel ranks its own equal keys with tl.cumsum. So ties break the same way on every run.

Work is O(n) per pass with O(256 + n / BLOCK) extra memory, never a sort or a copy of the
scores. A list of tensors is one launch per tensor per pass over shared histograms. The host
waits on the device once per call, after the first pass, to raise NaN and k above the number
of candidates as errors.

The launchers run the argument checks of every backend first, so bad input never reaches a kernel.
"""

import torch
import triton
import triton.language as tl

from dynasparse.checks import check_k_in_range, check_nm_mask, check_topk_mask, check_topk_mask_global, nan_message

RADIX_BITS = 8
RADIX_BINS = 1 << RADIX_BITS
# tl.histogram has no mask argument before Triton 3.7: keys outside the prefix go to bin
# RADIX_BINS, in a histogram twice as wide (bin counts must be powers of two).
_HISTOGRAM_BINS = 2 * RADIX_BINS
# One config for every kernel: 4096 scores per program keeps the per-program histogram flushes
# and per-program tie counts small next to the data (1 in 4096), and 8 warps give 16 scores a thread.
BLOCK = 4096
NUM_WARPS = 8

# Per score dtype: the integer dtype its bits are read as, key width, and the bits of +inf
# (a magnitude above them is NaN).
_FORMATS = {
    torch.float64: (torch.int64, 64, 0x7FF0000000000000),
    torch.float32: (torch.int32, 32, 0x7F800000),
    torch.float16: (torch.int16, 16, 0x7C00),
    torch.bfloat16: (torch.int16, 16, 0x7F80),
}


@triton.jit
def _order_keys(bits, KEY_BITS: tl.constexpr):
    """uint64 keys in [0, 2**KEY_BITS) ordered like the scores whose bits these are."""
    # Widening sign-extends, so negative scores are negative integers at every width.
    signed = bits.to(tl.int64)
    magnitude_bits = (1 << (KEY_BITS - 1)) - 1
    signed = tl.where(signed == -magnitude_bits - 1, 0, signed)  # -0.0 ties with +0.0
    # Ordered as signed integers; adding 2**(KEY_BITS - 1) modulo 2**64 makes them unsigned.
    ordered = tl.where(signed >= 0, signed, signed ^ magnitude_bits)
    return ordered.to(tl.uint64, bitcast=True) + (1 << (KEY_BITS - 1))


@triton.jit
def _is_nan(bits, inf_bits, KEY_BITS: tl.constexpr):
    return (bits.to(tl.int64) & ((1 << (KEY_BITS - 1)) - 1)) > inf_bits


@triton.jit
def _load_keys(bits_ptr, candidates_ptr, numel, KEY_BITS: tl.constexpr, HAS_CANDIDATES: tl.constexpr,
               BLOCK: tl.constexpr):
    """This program's offsets, score bits, their keys, and which scores are candidates."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    bits = tl.load(bits_ptr + offsets, mask=in_bounds, other=0)
    candidate = in_bounds
    if HAS_CANDIDATES:
        candidate = candidate & (tl.load(candidates_ptr + offsets, mask=in_bounds, other=0) != 0)
    return offsets, bits, _order_keys(bits, KEY_BITS), candidate


# Sizes are not specialized on their value, so the run-time variants differ from AOT_SPECS only
# in pointer-alignment hints and in the width Triton picks for numel (i32 below 2**31, i64
# above); AOT_SPECS lists both widths.
@triton.jit(do_not_specialize=["numel", "shift", "inf_bits"])
def _histogram_kernel(bits_ptr, candidates_ptr, state_ptr, histogram_ptr, nan_count_ptr, numel, shift, inf_bits,
                      KEY_BITS: tl.constexpr, HAS_CANDIDATES: tl.constexpr, BLOCK: tl.constexpr):
    _, bits, keys, candidate = _load_keys(bits_ptr, candidates_ptr, numel, KEY_BITS, HAS_CANDIDATES, BLOCK)
    nan = candidate & _is_nan(bits, inf_bits, KEY_BITS)
    candidate = candidate & ~nan
    prefix = tl.load(state_ptr).to(tl.uint64, bitcast=True)
    # Two shifts: one by shift + 8 would reach 64 on float64's first pass, which is undefined.
    matches = candidate & (((keys >> shift) >> 8) == ((prefix >> shift) >> 8))
    digits = tl.where(matches, (keys >> shift) & 255, 256).to(tl.int32)
    counts = tl.histogram(digits, 512)
    bins = tl.arange(0, 512)
    tl.atomic_add(histogram_ptr + bins, counts.to(tl.int64), mask=(bins < 256) & (counts > 0))
    nan_count = tl.sum(nan.to(tl.int64), axis=0)
    if nan_count > 0:
        tl.atomic_add(nan_count_ptr, nan_count)


@triton.jit(do_not_specialize=["numel"])
def _count_equal_kernel(bits_ptr, candidates_ptr, state_ptr, tile_counts_ptr, numel,
                        KEY_BITS: tl.constexpr, HAS_CANDIDATES: tl.constexpr, BLOCK: tl.constexpr):
    _, _, keys, candidate = _load_keys(bits_ptr, candidates_ptr, numel, KEY_BITS, HAS_CANDIDATES, BLOCK)
    equal = candidate & (keys == tl.load(state_ptr).to(tl.uint64, bitcast=True))
    tl.store(tile_counts_ptr + tl.program_id(0), tl.sum(equal.to(tl.int64), axis=0))


@triton.jit(do_not_specialize=["numel"])
def _write_mask_kernel(bits_ptr, candidates_ptr, state_ptr, tile_starts_ptr, mask_ptr, numel,
                       KEY_BITS: tl.constexpr, HAS_CANDIDATES: tl.constexpr, BLOCK: tl.constexpr):
    offsets, _, keys, candidate = _load_keys(bits_ptr, candidates_ptr, numel, KEY_BITS, HAS_CANDIDATES, BLOCK)
    kth = tl.load(state_ptr).to(tl.uint64, bitcast=True)
    ties_to_keep = tl.load(state_ptr + 1)
    equal = candidate & (keys == kth)
    equal_count = equal.to(tl.int64)
    # Equal keys before each one in flat order: those of earlier programs plus this program's.
    rank = tl.load(tile_starts_ptr + tl.program_id(0)) + tl.cumsum(equal_count, axis=0) - equal_count
    keep = (candidate & (keys > kth)) | (equal & (rank < ties_to_keep))
    tl.store(mask_ptr + offsets, keep.to(tl.uint8), mask=offsets < numel)


@triton.jit(do_not_specialize=["numel", "n", "m", "inf_bits"])
def _nm_mask_kernel(bits_ptr, mask_ptr, nan_count_ptr, numel, n, m, inf_bits,
                    KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offsets < numel
    bits = tl.load(bits_ptr + offsets, mask=in_bounds, other=0)
    keys = _order_keys(bits, KEY_BITS)
    position = offsets % m
    group_start = offsets - position
    # The rank of each score in its group: larger scores, and equal ones at lower positions.
    # O(m) per score, for the small m of N:M sparsity; the group's scores come from cache.
    # A while loop, not range(m): Triton 3.6's interpreter cannot take a run-time bound in range().
    rank = tl.zeros([BLOCK], dtype=tl.int64)
    other = 0
    while other < m:
        other_keys = _order_keys(tl.load(bits_ptr + group_start + other, mask=in_bounds, other=0), KEY_BITS)
        rank += ((other_keys > keys) | ((other_keys == keys) & (other < position))).to(tl.int64)
        other += 1
    tl.store(mask_ptr + offsets, (rank < n).to(tl.uint8), mask=in_bounds)
    nan_count = tl.sum((in_bounds & _is_nan(bits, inf_bits, KEY_BITS)).to(tl.int64), axis=0)
    if nan_count > 0:
        tl.atomic_add(nan_count_ptr, nan_count)


def _programs(numel: int) -> int:
    return triton.cdiv(numel, BLOCK)


def _select_digit(histogram: torch.Tensor, state: torch.Tensor, shift: int) -> None:
    """Narrow state = [prefix, remaining] to the digit at `shift` holding the remaining-th largest
    matching key, with torch ops on the device (no host synchronization). The prefix is a uint64
    key kept in int64: float64's top digit wraps it negative, as its bits require."""
    at_or_above = histogram.flip(0).cumsum(0).flip(0)
    above = at_or_above - histogram
    remaining = state[1]
    # Exactly one digit has fewer than `remaining` keys above it and at least `remaining` at or above.
    chosen = ((above < remaining) & (remaining <= at_or_above)).to(torch.int64)
    digit = (chosen * torch.arange(RADIX_BINS, device=histogram.device)).sum()
    state.copy_(torch.stack([state[0] + (digit << shift), remaining - (chosen * above).sum()]))


def _decode_threshold(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The score (0-d, `dtype`) whose order key is `key` (0-d int64): _order_keys inverted."""
    bits_dtype, key_bits, _ = _FORMATS[dtype]
    magnitude_bits = (1 << (key_bits - 1)) - 1
    # Undo the unsigned offset; for 64-bit keys that is flipping the (int64) sign bit.
    ordered = key ^ torch.iinfo(torch.int64).min if key_bits == 64 else key - (magnitude_bits + 1)
    signed = torch.where(ordered >= 0, ordered, ordered ^ magnitude_bits)
    return signed.to(bits_dtype).view(dtype)


def _select(scores: list[torch.Tensor], candidates: list[torch.Tensor | None], k: int, op: str,
            names: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Shared path of both top-k launchers: `scores` contiguous, one dtype and device."""
    dtype, device = scores[0].dtype, scores[0].device
    bits_dtype, key_bits, inf_bits = _FORMATS[dtype]
    masks = [torch.empty(tensor.shape, dtype=torch.bool, device=device) for tensor in scores]
    total = sum(tensor.numel() for tensor in scores)
    infinite = torch.full((), float("inf"), dtype=dtype, device=device)
    if total == 0:
        check_k_in_range(op, k, 0)  # only fails with candidates, whose count the checks could not know
        return masks, infinite
    bits = [tensor.view(bits_dtype) for tensor in scores]
    candidate_bytes = [None if mask is None else mask.view(torch.uint8) for mask in candidates]
    passes = key_bits // RADIX_BITS
    histograms = torch.zeros(passes, RADIX_BINS, dtype=torch.int64, device=device)
    nan_counts = torch.zeros(len(scores), dtype=torch.int64, device=device)
    state = torch.tensor([0, k], dtype=torch.int64, device=device)

    def launch(kernel, i, *args):
        # Without candidates the scores' bits stand in for the unused pointer: HAS_CANDIDATES=False
        # compiles its loads away.
        has_candidates = candidate_bytes[i] is not None
        kernel[(_programs(bits[i].numel()),)](
            bits[i], candidate_bytes[i] if has_candidates else bits[i], state, *args,
            KEY_BITS=key_bits, HAS_CANDIDATES=has_candidates, BLOCK=BLOCK, num_warps=NUM_WARPS)

    nonempty = [i for i in range(len(scores)) if scores[i].numel()]
    for pass_index in range(passes):
        shift = key_bits - RADIX_BITS * (pass_index + 1)
        for i in nonempty:
            launch(_histogram_kernel, i, histograms[pass_index], nan_counts[i:i + 1], bits[i].numel(), shift, inf_bits)
        if pass_index == 0:
            # The one host synchronization: NaN and too large a k are errors the caller must see.
            first = torch.cat([nan_counts, histograms[0].sum().reshape(1)]).tolist()
            for name, nan_count in zip(names, first[:-1]):
                if nan_count:
                    raise ValueError(nan_message(op, name, candidates[0] is not None))
            check_k_in_range(op, k, first[-1])
            if k == 0:
                for mask in masks:
                    mask.zero_()
                return masks, infinite
        _select_digit(histograms[pass_index], state, shift)

    programs = [_programs(tensor.numel()) for tensor in bits]
    starts = [sum(programs[:i]) for i in range(len(programs))]
    tile_counts = torch.empty(sum(programs), dtype=torch.int64, device=device)
    for i in nonempty:
        launch(_count_equal_kernel, i, tile_counts[starts[i]:starts[i] + programs[i]], bits[i].numel())
    tile_starts = tile_counts.cumsum(0) - tile_counts
    for i in nonempty:
        launch(_write_mask_kernel, i, tile_starts[starts[i]:starts[i] + programs[i]], masks[i].view(torch.uint8),
               bits[i].numel())
    return masks, _decode_threshold(state[0], dtype)


def topk_mask(scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask of the k largest scores (among `candidates` when given) and the smallest kept
    score as a 0-d tensor (+inf when k == 0). Ties keep the lower flat index."""
    check_topk_mask(scores, k, candidates)
    masks, threshold = _select([scores.contiguous()], [None if candidates is None else candidates.contiguous()],
                               k, "topk_mask", ["scores"])
    return masks[0], threshold


def topk_mask_global(scores: list[torch.Tensor], k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The k largest scores over the whole list, without concatenating it: one mask per tensor and
    the smallest kept score. Ties keep the earlier tensor, then the lower flat index."""
    check_topk_mask_global(scores, k)
    if not scores:  # the checks left k == 0; no tensor names a dtype or device
        return [], torch.full((), float("inf"))
    return _select([tensor.contiguous() for tensor in scores], [None] * len(scores), k, "topk_mask_global",
                   [f"scores[{i}]" for i in range(len(scores))])


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the n largest of every m consecutive scores along the last dimension
    (ties: lower index)."""
    check_nm_mask(scores, n, m)
    scores = scores.contiguous()
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    if scores.numel() == 0:
        return mask
    bits_dtype, key_bits, inf_bits = _FORMATS[scores.dtype]
    nan_count = torch.zeros(1, dtype=torch.int64, device=scores.device)
    _nm_mask_kernel[(_programs(scores.numel()),)](
        scores.view(bits_dtype), mask.view(torch.uint8), nan_count, scores.numel(), n, m, inf_bits,
        KEY_BITS=key_bits, BLOCK=BLOCK, num_warps=NUM_WARPS)
    if nan_count.item():
        raise ValueError(nan_message("nm_mask", "scores", False))
    return mask


def _specs() -> list[dict]:
    # Pointers per key width: scores' bits (int64, int32 or int16), candidate bytes (a uint8 view,
    # or the scores' bits again when there are none), int64 state/counts, uint8 mask.
    specs = []
    # +inf's bits need 64 bits for float64 only, so inf_bits is i64 there and i32 elsewhere.
    for key_bits, bits_type, inf_type in ((64, "*i64", "i64"), (32, "*i32", "i32"), (16, "*i16", "i32")):
        for int_type in ("i32", "i64"):
            for has_candidates in (False, True):
                common = {"bits_ptr": bits_type, "candidates_ptr": "*u8" if has_candidates else bits_type,
                          "state_ptr": "*i64"}
                constexprs = {"KEY_BITS": key_bits, "HAS_CANDIDATES": has_candidates, "BLOCK": BLOCK}
                options = {"num_warps": NUM_WARPS}
                specs += [
                    {"kernel": _histogram_kernel, "constexprs": constexprs, "options": options,
                     "signature": {**common, "histogram_ptr": "*i64", "nan_count_ptr": "*i64", "numel": int_type,
                                   "shift": "i32", "inf_bits": inf_type}},
                    {"kernel": _count_equal_kernel, "constexprs": constexprs, "options": options,
                     "signature": {**common, "tile_counts_ptr": "*i64", "numel": int_type}},
                    {"kernel": _write_mask_kernel, "constexprs": constexprs, "options": options,
                     "signature": {**common, "tile_starts_ptr": "*i64", "mask_ptr": "*u8", "numel": int_type}},
                ]
            specs.append({"kernel": _nm_mask_kernel, "constexprs": {"KEY_BITS": key_bits, "BLOCK": BLOCK},
                          "options": {"num_warps": NUM_WARPS},
                          "signature": {"bits_ptr": bits_type, "mask_ptr": "*u8", "nan_count_ptr": "*i64",
                                        "numel": int_type, "n": "i32", "m": "i32", "inf_bits": inf_type}})
    return specs


# Every kernel of this module with every config it is launched with; dynasparse.kernels.aot
# compiles each for sm_80 and sm_90 (format: see kernels/bitmask.py).
AOT_SPECS = _specs()
