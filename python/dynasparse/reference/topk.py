"""Pure-PyTorch top-k masks: the oracle for every backend and the fallback on any device.

Sort-based (a stable descending sort keeps the lower flat index first among equal scores),
so O(n log n) and a full copy of the scores: correct and simple, not fast. Semantics as in
csrc/ops.cpp: exactly k kept among the candidates, ties to the lower flat index (tensor
order first across a list), -0.0 equal to 0.0, NaN among the candidates an error, and the
threshold the smallest kept score (+inf when k == 0).
"""

from __future__ import annotations

import torch

from ..checks import (check_k_in_range, check_nm_mask, check_rigl_masks, check_topk_mask, check_topk_mask_global,
                      nan_message)


def _check_no_nan(op: str, name: str, scores: torch.Tensor, candidates: torch.Tensor | None) -> None:
    nan = torch.isnan(scores) if candidates is None else torch.isnan(scores) & candidates
    if bool(nan.any()):
        raise ValueError(nan_message(op, name, candidates is not None))


def _select(flat: torch.Tensor, k: int, candidates: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and threshold of the k largest of a 1-d tensor (among `candidates`)."""
    # + 0.0 turns -0.0 into 0.0; float64 holds every supported dtype exactly.
    values = flat.to(torch.float64) + 0.0
    if candidates is not None:
        values = torch.where(candidates, values, -torch.inf)
    order = torch.sort(values, descending=True, stable=True).indices
    if candidates is not None:
        # Non-candidates after every candidate, even a -inf one; stable keeps the rest in place.
        order = order[torch.sort((~candidates[order]).to(torch.uint8), stable=True).indices]
    kept = order[:k]
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[kept] = True
    threshold = flat[kept].min() + 0.0 if k > 0 else torch.tensor(torch.inf, dtype=flat.dtype, device=flat.device)
    return mask, threshold.to(flat.dtype)


def topk_mask(scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None):
    check_topk_mask(scores, k, candidates)
    _check_no_nan("topk_mask", "scores", scores, candidates)
    flat_candidates = None if candidates is None else candidates.reshape(-1)
    if flat_candidates is not None:
        check_k_in_range("topk_mask", k, int(flat_candidates.sum()))
    mask, threshold = _select(scores.reshape(-1), k, flat_candidates)
    return mask.reshape(scores.shape), threshold


def topk_mask_global(scores: list[torch.Tensor], k: int):
    check_topk_mask_global(scores, k)
    if not scores:
        return [], torch.tensor(torch.inf)
    for i, tensor in enumerate(scores):
        _check_no_nan("topk_mask_global", f"scores[{i}]", tensor, None)
    mask, threshold = _select(torch.cat([tensor.reshape(-1) for tensor in scores]), k, None)
    pieces = mask.split([tensor.numel() for tensor in scores])
    return [piece.reshape(tensor.shape) for piece, tensor in zip(pieces, scores)], threshold


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    check_nm_mask(scores, n, m)
    _check_no_nan("nm_mask", "scores", scores, None)
    groups = (scores.to(torch.float64) + 0.0).reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, order[:, :n], True)
    return mask.reshape(scores.shape)


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, k: int, topk):
    """rigl_masks composed from a top-k op, `topk(scores, k, candidates) -> (mask, threshold)`:
    this module's `topk_mask` for the reference, the Triton kernels' for the Triton backend."""
    check_rigl_masks(weight, mask, grad, k)
    if bool((torch.isnan(weight) & mask).any()):
        raise ValueError("dynasparse.rigl_masks: weight contains NaN among the active weights (NaN has no rank)")
    if bool((torch.isnan(grad) & ~mask).any()):
        raise ValueError("dynasparse.rigl_masks: grad contains NaN among the inactive weights (NaN has no rank)")
    active = int(mask.sum())
    if k > active or k > mask.numel() - active:
        raise ValueError(f"dynasparse.rigl_masks: k ({k}) exceeds the number of active ({active}) or inactive "
                         f"({mask.numel() - active}) weights")
    kept, _ = topk(weight.abs(), active - k, mask)
    grown, _ = topk(grad.abs(), k, ~mask)
    return (kept | grown, torch.nonzero((mask & ~kept).reshape(-1)).reshape(-1),
            torch.nonzero(grown.reshape(-1)).reshape(-1), torch.count_nonzero(weight[~mask]))


def rigl_masks(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, k: int):
    return drop_and_grow(weight, mask, grad, k, topk_mask)
