"""Top-k mask updates: exact-k selection masks, N:M masks, structured scores and RigL.

The selection ops (`topk_mask`, `topk_mask_global`, `nm_mask`) return bool masks with
exactly k kept, deterministic on every backend: among equal scores the lower flat index
(row-major over the logical shape) is kept, tensor order first across a list; -0.0 equals
0.0; NaN among the candidates is a ValueError. Their threshold is the smallest kept score
(+inf when k == 0), a 0-d tensor of the scores' dtype.

The structured helpers (`block_scores`, `row_scores`, `expand_block_mask`,
`expand_row_mask`) are plain PyTorch reductions and expansions: block or row masks are the
selection ops run on the reduced scores. `rigl_masks` is RigL's drop-and-grow selection of
one layer in one pass (CPU kernel; Triton and the reference compose it from `topk_mask`),
`rigl_update` the step built on it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .. import checks
from ..reference import topk as reference
from ._registry import Op, has_triton_kernels


def _topk_mask_fake(scores, k, candidates=None):
    checks.check_topk_mask(scores, k, candidates)
    return scores.new_empty(scores.shape, dtype=torch.bool), scores.new_empty(())


def _topk_mask_global_fake(scores, k):
    checks.check_topk_mask_global(scores, k)
    # The public function answers an empty list itself: there is no tensor to dispatch on.
    return [tensor.new_empty(tensor.shape, dtype=torch.bool) for tensor in scores], scores[0].new_empty(())


def _nm_mask_fake(scores, n, m):
    checks.check_nm_mask(scores, n, m)
    return scores.new_empty(scores.shape, dtype=torch.bool)


def _rigl_masks_fake(weight, mask, grad, k):
    checks.check_rigl_masks(weight, mask, grad, k)
    indices = weight.new_empty((k,), dtype=torch.int64)
    return (weight.new_empty(weight.shape, dtype=torch.bool), indices, indices.new_empty((k,)),
            weight.new_empty((), dtype=torch.int64))


_HAS_TRITON_KERNELS = has_triton_kernels("topk")


def _topk_mask_triton(scores, k, candidates=None):
    from dynasparse.kernels import topk as kernels

    return kernels.topk_mask(scores, k, candidates)


def _topk_mask_global_triton(scores, k):
    from dynasparse.kernels import topk as kernels

    return kernels.topk_mask_global(scores, k)


def _nm_mask_triton(scores, n, m):
    from dynasparse.kernels import topk as kernels

    return kernels.nm_mask(scores, n, m)


def _rigl_masks_triton(weight, mask, grad, k):
    from dynasparse.kernels import topk as kernels

    return reference.drop_and_grow(weight, mask, grad, k, kernels.topk_mask)


# The ops' schemas carry counts as int64: a larger Python int would fail in the argument
# parser with "Expected int, found int".
_INT64_MAX = 2**63 - 1


def _count(op: str, name: str, value, valid: str) -> int:
    """`value` as an int, or a clear error naming the argument (`valid`: what it must be)."""
    if isinstance(value, bool):
        raise TypeError(f"dynasparse.{op}: {name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"dynasparse.{op}: {name} must be an int, got {type(value).__name__}") from None
    if abs(value) > _INT64_MAX:
        raise ValueError(f"dynasparse.{op}: {name} must be {valid}, got {value}")
    return value


def _tensor(op: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"dynasparse.{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


_topk = Op("topk_mask", fake=_topk_mask_fake, reference=reference.topk_mask,
           triton=_topk_mask_triton if _HAS_TRITON_KERNELS else None)
_global = Op("topk_mask_global", fake=_topk_mask_global_fake, reference=reference.topk_mask_global,
             triton=_topk_mask_global_triton if _HAS_TRITON_KERNELS else None)
_nm = Op("nm_mask", fake=_nm_mask_fake, reference=reference.nm_mask,
         triton=_nm_mask_triton if _HAS_TRITON_KERNELS else None)
# The C++ kernel is CPU-only: CUDA tensors take the Triton composition (no fallback warning).
_rigl = Op("rigl_masks", fake=_rigl_masks_fake, reference=reference.rigl_masks,
           triton=_rigl_masks_triton if _HAS_TRITON_KERNELS else None,
           preference={"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")})


def topk_mask(scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None, *,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest `scores` (among `candidates`, a bool mask of the same shape, if given).

    Returns `(mask, threshold)`: a bool mask of scores' shape with exactly k True, and the
    smallest kept score as a 0-d tensor of scores' dtype (+inf when k == 0). Ties keep the
    lower flat index. k must be in [0, number of candidates].
    """
    _tensor("topk_mask", "scores", scores)
    if candidates is not None:
        _tensor("topk_mask", "candidates", candidates)
    return _topk(scores, _count("topk_mask", "k", k, f"in [0, {scores.numel()}]"), candidates, backend=backend)


def topk_mask_global(scores: Sequence[torch.Tensor], k: int, *,
                     backend: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The k largest scores over a whole list of tensors (any shapes, one dtype and device),
    without concatenating them: one threshold for all, as for global magnitude pruning.

    Returns `(masks, threshold)`, one bool mask per tensor. Ties keep the earlier tensor,
    then the lower flat index. An empty list needs no kernel: it gives `([], +inf)` (a
    float32 on the CPU) for k == 0 on any backend.
    """
    # A tensor is a sequence too: iterating one would take its rows for the tensors.
    if not isinstance(scores, (list, tuple)):
        raise TypeError(f"dynasparse.topk_mask_global: scores must be a list or tuple of tensors, got "
                        f"{type(scores).__name__} (for one tensor use topk_mask)")
    for i, tensor in enumerate(scores):
        _tensor("topk_mask_global", f"scores[{i}]", tensor)
    scores = list(scores)
    k = _count("topk_mask_global", "k", k, f"in [0, {sum(tensor.numel() for tensor in scores)}]")
    if not scores:
        return reference.topk_mask_global(scores, k)
    return _global(scores, k, backend=backend)


def nm_mask(scores: torch.Tensor, n: int, m: int, *, backend: str | None = None) -> torch.Tensor:
    """N:M mask: the n largest of every group of m consecutive elements along the last
    dimension (a multiple of m), ties to the lower index."""
    _tensor("nm_mask", "scores", scores)
    m = _count("nm_mask", "m", m, "a positive divisor of the last dimension")
    return _nm(scores, _count("nm_mask", "n", n, f"in [0, m] = [0, {m}]"), m, backend=backend)


def _pair(block: int | Sequence[int]) -> tuple[int, int]:
    rows, cols = (block, block) if isinstance(block, int) else tuple(block)
    if rows < 1 or cols < 1:
        raise ValueError(f"dynasparse.block_scores: block sizes must be >= 1, got {block}")
    return rows, cols


def block_scores(weight: torch.Tensor, block: int | Sequence[int]) -> torch.Tensor:
    """L2 norm of every `block` x `block` tile (or `(rows, cols)` tile) of a 2-d weight, a
    (R / rows, C / cols) tensor (float32 for half-precision weights). Plain PyTorch; select
    tiles with `topk_mask` on these scores and expand with `expand_block_mask`."""
    rows, cols = _pair(block)
    if weight.dim() != 2:
        raise ValueError(f"dynasparse.block_scores: weight must be 2-d, got shape {list(weight.shape)}")
    if weight.shape[0] % rows or weight.shape[1] % cols:
        raise ValueError(f"dynasparse.block_scores: blocks of {rows} x {cols} do not tile a weight of shape "
                         f"{list(weight.shape)}")
    tiles = weight.reshape(weight.shape[0] // rows, rows, weight.shape[1] // cols, cols)
    return torch.linalg.vector_norm(tiles.to(torch.promote_types(weight.dtype, torch.float32)), dim=(1, 3))


def expand_block_mask(block_mask: torch.Tensor, block: int | Sequence[int]) -> torch.Tensor:
    """A per-tile bool mask (R / rows, C / cols) -> the element mask (R, C)."""
    rows, cols = _pair(block)
    return block_mask.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)


def row_scores(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of every output row (Linear) or filter (Conv): a 1-d tensor of weight.shape[0]
    (float32 for half-precision weights). Plain PyTorch; expand with `expand_row_mask`."""
    if weight.dim() < 1:
        raise ValueError("dynasparse.row_scores: weight must have at least one dimension")
    rows = weight.reshape(weight.shape[0], -1)
    return torch.linalg.vector_norm(rows.to(torch.promote_types(weight.dtype, torch.float32)), dim=1)


def expand_row_mask(row_mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A per-row bool mask (shape[0],) -> the element mask of `shape` (a view, not a copy)."""
    return row_mask.reshape(-1, *([1] * (len(shape) - 1))).expand(*shape)


def rigl_masks(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, k: int, *,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RigL's drop and grow of one layer: among the active weights (`mask`, bool) the
    `active - k` of largest |weight| stay, among the inactive ones the k of largest |grad|
    grow (both ties to the lower flat index, as `topk_mask`), so no weight is dropped and
    grown at once. `grad` has weight's dtype; k is in [0, min(active, inactive)]; NaN in weight
    among the active or in grad among the inactive is a ValueError.

    Returns `(new_mask, dropped, grown, pruned_nonzeros)`: the new mask (as many active), the
    flat indices of the dropped and of the grown weights (int64, k each, ascending), and how
    many inactive weights are nonzero (0-d int64; masked training keeps them at 0, so a caller
    that zeroes only what changed can tell when that is not enough). The CPU kernel reads the
    layer once, after a sample of 1/33 of it; nothing is modified.
    """
    for name, value in (("weight", weight), ("mask", mask), ("grad", grad)):
        _tensor("rigl_masks", name, value)
    k = _count("rigl_masks", "k", k, "in [0, min(active, inactive weights)]")
    return _rigl(weight, mask, grad, k, backend=backend)


@torch.no_grad()
def rigl_update(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, k: int, *,
                state: Sequence[torch.Tensor] = (), backend: str | None = None) -> torch.Tensor:
    """One RigL drop-and-grow step on one tensor; returns the new mask (as many active).

    Drops the k active weights of smallest |weight| and grows the k weights inactive before
    the drop with the largest |grad| (`rigl_masks`, ties to the lower flat index), so no
    weight is both dropped and grown. Grown weights and every tensor in `state` (optimizer
    state shaped like the weight) are zeroed in place at the grown positions.
    """
    checks.check_rigl_update(weight, mask, grad, state)
    k = _count("rigl_update", "k", k, "in [0, min(active, inactive weights)]")
    new_mask, _, grown, _ = rigl_masks(weight, mask, grad, k, backend=backend)
    if grown.numel():
        positions = torch.unravel_index(grown, weight.shape)
        for tensor in (weight, *state):
            tensor.index_put_(positions, tensor.new_zeros(()))
    return new_mask
