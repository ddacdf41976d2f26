"""Top-k and N:M mask kernels against an independent oracle: numpy lexsort on (-score, index) in float64.

Runs the Triton launchers (interpreted on CPU tensors here, compiled on a GPU machine) and, on a
GPU machine, the CUDA C++ kernels through torch.ops.dynasparse. Sizes cross the Triton program
size (4096) and the CUDA tile (4096) so that ties straddle programs.
"""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

if not torch.cuda.is_available():
    # Triton fixes interpret mode when a @triton.jit decorator runs, so before the import below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dynasparse.kernels import topk  # noqa: E402

from tests.helpers import poison_allocator  # noqa: E402

CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


class TritonLaunchers:
    device = "cuda" if CUDA else "cpu"
    topk_mask = staticmethod(topk.topk_mask)
    topk_mask_global = staticmethod(topk.topk_mask_global)
    nm_mask = staticmethod(topk.nm_mask)


class CudaOps:
    device = "cuda"

    @staticmethod
    def topk_mask(scores, k, candidates=None):
        poison_allocator(scores.numel(), "cuda")
        return torch.ops.dynasparse.topk_mask(scores, k, candidates)

    @staticmethod
    def topk_mask_global(scores, k):
        return torch.ops.dynasparse.topk_mask_global(scores, k)

    @staticmethod
    def nm_mask(scores, n, m):
        poison_allocator(scores.numel(), "cuda")
        return torch.ops.dynasparse.nm_mask(scores, n, m)


@pytest.fixture(params=[pytest.param(TritonLaunchers, id="triton"),
                        pytest.param(CudaOps, id="cuda", marks=pytest.mark.gpu)])
def impl(request):
    return request.param



def oracle_topk(scores: list[torch.Tensor], k: int, candidates: list[torch.Tensor] | None = None):
    """Masks and threshold by sorting (-score, global flat index) in float64."""
    values = np.concatenate([s.detach().cpu().double().numpy().ravel() for s in scores]) if scores else np.zeros(0)
    if candidates is None:
        allowed = np.ones(values.shape, dtype=bool)
    else:
        allowed = np.concatenate([c.cpu().numpy().ravel() for c in candidates])
    index = np.flatnonzero(allowed)
    kept = index[np.lexsort((index, -values[index]))][:k]
    flat = np.zeros(values.shape, dtype=bool)
    flat[kept] = True
    threshold = values[kept].min() if k else float("inf")
    masks, start = [], 0
    for s in scores:
        masks.append(torch.from_numpy(flat[start:start + s.numel()].copy()).reshape(s.shape))
        start += s.numel()
    return masks, threshold


def oracle_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = scores.detach().cpu().double().numpy().reshape(-1, m)
    mask = np.zeros(groups.shape, dtype=bool)
    position = np.arange(m)
    for row, group in enumerate(groups):
        mask[row, np.lexsort((position, -group))[:n]] = True
    return torch.from_numpy(mask).reshape(scores.shape)


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    # Byte for byte: a poison byte may read as True in bool comparisons.
    return mask.detach().cpu().contiguous().view(torch.uint8)


def assert_topk(result, scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None):
    mask, threshold = result
    expected_masks, expected_threshold = oracle_topk([scores], k, None if candidates is None else [candidates])
    assert mask.dtype == torch.bool and mask.shape == scores.shape and mask.device == scores.device
    assert torch.equal(as_bytes(mask), as_bytes(expected_masks[0]))
    assert threshold.shape == () and threshold.dtype == scores.dtype and threshold.device == scores.device
    assert threshold.item() == expected_threshold


def random_scores(shape, dtype, device, seed, kind="normal"):
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        scores = torch.randn(shape, generator=generator)
    elif kind == "integers":  # heavy ties
        scores = torch.randint(-3, 4, shape, generator=generator).float()
    elif kind == "equal":
        scores = torch.full(shape, 1.5)
    else:  # "zeros": +0.0 and -0.0, which must tie, with a few other values
        scores = torch.where(torch.rand(shape, generator=generator) < 0.5, 0.0, -0.0)
        scores = torch.where(torch.rand(shape, generator=generator) < 0.1, torch.randn(shape, generator=generator),
                             scores)
    return scores.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (4097,), (2, 3, 701)], ids=str)
def test_topk_mask_random(impl, shape, dtype, poisoned_empty):
    scores = random_scores(shape, dtype, impl.device, seed=sum(shape))
    n = scores.numel()
    for k in sorted({0, 1, n // 3, n - 1, n}):
        assert_topk(impl.topk_mask(scores, k), scores, k)


@pytest.mark.parametrize("kind", ["integers", "equal", "zeros"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_mask_ties_straddle_programs(impl, kind, dtype, poisoned_empty):
    # 9000 scores span three 4096-wide programs/tiles, so the kept share of a tie is split across them.
    scores = random_scores((9000,), dtype, impl.device, seed=1, kind=kind)
    for k in (1, 2500, 4096, 4097, 8999):
        assert_topk(impl.topk_mask(scores, k), scores, k)


def test_topk_mask_keeps_lower_index_and_folds_negative_zero(impl):
    scores = torch.tensor([1.0, -0.0, 2.0, 0.0, 1.0, -0.0, -1.0], device=impl.device)
    mask, threshold = impl.topk_mask(scores, 4)
    assert mask.cpu().tolist() == [True, True, True, False, True, False, False]
    assert threshold.item() == 0.0


def test_topk_mask_extremes(impl):
    for dtype in DTYPES:
        info = torch.finfo(dtype)
        scores = torch.tensor([float("-inf"), info.max, float("inf"), -info.max, info.tiny, -info.tiny, 0.0,
                               -info.tiny * info.eps, info.tiny * info.eps], dtype=dtype, device=impl.device)
        for k in range(scores.numel() + 1):
            assert_topk(impl.topk_mask(scores, k), scores, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_mask_candidates(impl, dtype, poisoned_empty):
    scores = random_scores((5000,), dtype, impl.device, seed=2, kind="integers")
    generator = torch.Generator().manual_seed(3)
    candidates = (torch.rand(scores.shape, generator=generator) < 0.3).to(impl.device)
    # NaN outside the candidates is never looked at.
    scores = scores.masked_fill(~candidates & (torch.arange(5000, device=impl.device) % 7 == 0), float("nan"))
    count = int(candidates.sum())
    for k in (0, 1, count // 2, count):
        assert_topk(impl.topk_mask(scores, k, candidates), scores, k, candidates)


def test_topk_mask_no_candidates(impl):
    scores = torch.randn(10, device=impl.device)
    candidates = torch.zeros(10, dtype=torch.bool, device=impl.device)
    assert_topk(impl.topk_mask(scores, 0, candidates), scores, 0, candidates)
    with pytest.raises(ValueError, match=r"k \(1\) exceeds the number of candidates \(0\)"):
        impl.topk_mask(scores, 1, candidates)


def test_topk_mask_empty_and_zero_dim(impl):
    empty = torch.empty(0, 3, device=impl.device)
    assert_topk(impl.topk_mask(empty, 0), empty, 0)
    no_candidates = torch.empty(0, 3, dtype=torch.bool, device=impl.device)
    assert_topk(impl.topk_mask(empty, 0, no_candidates), empty, 0, no_candidates)
    with pytest.raises(ValueError, match=r"k \(1\) exceeds the number of candidates \(0\)"):
        impl.topk_mask(empty, 1, no_candidates)
    scalar = torch.tensor(2.5, device=impl.device)
    assert_topk(impl.topk_mask(scalar, 1), scalar, 1)
    assert_topk(impl.topk_mask(scalar, 0), scalar, 0)


def test_topk_mask_non_contiguous(impl):
    scores = random_scores((40, 30), torch.float32, impl.device, seed=4, kind="integers").t()
    assert not scores.is_contiguous()
    # Ties break by the logical row-major index of the transposed view.
    assert_topk(impl.topk_mask(scores, 500), scores, 500)


@settings(max_examples=15, deadline=None)
@given(values=st.lists(st.sampled_from([-2.0, -0.0, 0.0, 0.5, 3.0, float("inf"), float("-inf")]), max_size=60),
       k_fraction=st.floats(0, 1))
def test_topk_mask_property_heavy_ties(values, k_fraction):
    scores = torch.tensor(values, dtype=torch.float32, device=TritonLaunchers.device)
    k = round(k_fraction * len(values))
    assert_topk(topk.topk_mask(scores, k), scores, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_mask_global(impl, dtype, poisoned_empty):
    shapes = [(0,), (3, 700), (1,), (0, 4), (4100,), (5,)]
    scores = [random_scores(shape, dtype, impl.device, seed=i, kind="integers") for i, shape in enumerate(shapes)]
    total = sum(s.numel() for s in scores)
    for k in (0, 1, 2000, total - 1, total):
        masks, threshold = impl.topk_mask_global(scores, k)
        expected_masks, expected_threshold = oracle_topk(scores, k)
        assert len(masks) == len(scores)
        for mask, expected, s in zip(masks, expected_masks, scores):
            assert mask.shape == s.shape and mask.device == s.device
            assert torch.equal(as_bytes(mask), as_bytes(expected))
        assert threshold.shape == () and threshold.dtype == dtype and threshold.item() == expected_threshold


def test_topk_mask_global_ties_go_to_the_earlier_tensor(impl):
    scores = [torch.zeros(3, device=impl.device), torch.full((2,), -0.0, device=impl.device),
              torch.zeros(4, device=impl.device)]
    masks, threshold = impl.topk_mask_global(scores, 4)
    assert [m.cpu().tolist() for m in masks] == [[True] * 3, [True, False], [False] * 4]
    assert threshold.item() == 0.0


def test_topk_mask_global_empty_list():
    masks, threshold = topk.topk_mask_global([], 0)
    assert masks == [] and threshold.item() == float("inf")
    with pytest.raises(ValueError, match=r"k \(1\) exceeds the number of candidates \(0\)"):
        topk.topk_mask_global([], 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, n, m", [
    ((3, 8), 2, 4), ((3, 8), 1, 4), ((3, 8), 0, 4), ((3, 8), 4, 4), ((2, 10), 3, 5), ((16,), 1, 1),
    ((2, 3, 16), 5, 16), ((0, 8), 2, 4), ((1100, 4), 2, 4),
], ids=str)
def test_nm_mask(impl, shape, n, m, dtype, poisoned_empty):
    for kind in ("normal", "integers", "zeros"):
        scores = random_scores(shape, dtype, impl.device, seed=n + m, kind=kind)
        mask = impl.nm_mask(scores, n, m)
        assert mask.dtype == torch.bool and mask.shape == scores.shape and mask.device == scores.device
        assert torch.equal(as_bytes(mask), as_bytes(oracle_nm(scores, n, m)))


def test_nm_mask_non_contiguous(impl):
    scores = random_scores((8, 6), torch.float32, impl.device, seed=5, kind="integers").t()
    assert torch.equal(as_bytes(impl.nm_mask(scores, 2, 4)), as_bytes(oracle_nm(scores, 2, 4)))


def test_nan_raises(impl):
    scores = torch.randn(6000, device=impl.device)
    scores[4500] = float("nan")
    with pytest.raises(ValueError, match=r"dynasparse.topk_mask: scores contains NaN \(NaN has no rank\)"):
        impl.topk_mask(scores, 3)
    with pytest.raises(ValueError, match=r"dynasparse.topk_mask: scores contains NaN among the candidates"):
        impl.topk_mask(scores, 3, scores.isnan())
    with pytest.raises(ValueError, match=r"dynasparse.topk_mask: scores contains NaN"):
        impl.topk_mask(scores, 0)
    clean = torch.randn(5, device=impl.device)
    with pytest.raises(ValueError, match=r"dynasparse.topk_mask_global: scores\[3\] contains NaN"):
        impl.topk_mask_global([clean, clean, torch.empty(0, device=impl.device), scores[:5000], clean], 2)
    with pytest.raises(ValueError, match=r"dynasparse.nm_mask: scores contains NaN"):
        impl.nm_mask(scores.bfloat16().reshape(-1, 4), 2, 4)


@pytest.mark.parametrize("k", [-1, 11])
def test_bad_k_raises(impl, k):
    scores = torch.randn(10, device=impl.device)
    with pytest.raises(ValueError, match=r"dynasparse.topk_mask: k"):
        impl.topk_mask(scores, k)
    with pytest.raises(ValueError, match=r"dynasparse.topk_mask_global: k"):
        impl.topk_mask_global([scores[:4], scores[4:]], k)


def test_bad_arguments_raise(impl):
    device = impl.device
    scores = torch.randn(4, 8, device=device)
    with pytest.raises(TypeError, match="scores must be float32, float16, bfloat16 or float64, got Int"):
        impl.topk_mask(scores.int(), 1)
    with pytest.raises(TypeError, match="candidates must be torch.bool, got Float"):
        impl.topk_mask(scores, 1, scores)
    with pytest.raises(ValueError, match=r"candidates must have scores' shape \[4, 8\], got \[8, 4\]"):
        impl.topk_mask(scores, 1, torch.ones(8, 4, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match=r"all scores must have one dtype, but scores\[0\] is Float and scores\[1\] is Half"):
        impl.topk_mask_global([scores, scores.half()], 1)
    with pytest.raises(TypeError, match=r"scores\[1\] must be float32, float16, bfloat16 or float64, got Int"):
        impl.topk_mask_global([scores, scores.int()], 1)
    with pytest.raises(ValueError, match=r"the last dimension \(8\) must be a multiple of m \(3\)"):
        impl.nm_mask(scores, 1, 3)
    with pytest.raises(ValueError, match="m must be >= 1, got 0"):
        impl.nm_mask(scores, 0, 0)
    with pytest.raises(ValueError, match=r"n must be in \[0, m\] = \[0, 4\], got 5"):
        impl.nm_mask(scores, 5, 4)
    with pytest.raises(ValueError, match="at least one dimension"):
        impl.nm_mask(scores[0, 0], 1, 1)


@pytest.mark.gpu
def test_topk_mask_large_on_gpu(impl):
    # Several radix passes over many tiles, a tie straddling the k-th position.
    scores = torch.randint(-1000, 1000, (3_000_001,), device="cuda").float() / 8
    for k in (1, 1_234_567, 3_000_001):
        assert_topk(impl.topk_mask(scores, k), scores, k)


@pytest.mark.gpu
def test_topk_mask_global_many_tensors_on_gpu(impl):
    # More tensors than one CUDA launch carries (64), so the tie order crosses launch batches.
    scores = [torch.randint(0, 3, (i * 37 % 500,), device="cuda").half() for i in range(150)]
    total = sum(s.numel() for s in scores)
    for k in (1, total // 2, total):
        masks, threshold = impl.topk_mask_global(scores, k)
        expected_masks, expected_threshold = oracle_topk(scores, k)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(masks, expected_masks))
        assert threshold.item() == expected_threshold
