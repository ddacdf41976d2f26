"""Top-k masks on every backend against numpy, an oracle independent of dynasparse.

The oracle ranks by numpy's lexsort on (-score in float64, flat index): the k first are
kept, which is exactly the tie rule (lower flat index first, tensor order first across a
list). Inputs are built to tie heavily (small integers, all equal, zeros mixed with -0.0).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynasparse import ops
from dynasparse.ops import topk as topk_ops
from tests.helpers import backend_device_params, poison_allocator


def backends_of(op):
    return backend_device_params(op) + [pytest.param("reference", "cpu", id="reference")]


TOPK_BACKENDS = backends_of("topk_mask")
GLOBAL_BACKENDS = backends_of("topk_mask_global")
NM_BACKENDS = backends_of("nm_mask")
RIGL_BACKENDS = backends_of("rigl_masks")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
KINDS = ["normal", "small-integers", "all-equal", "signed-zeros", "few-values"]


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def examples(backend, device, many):
    # The Triton interpreter runs a kernel in about a second: fewer examples there.
    return max(5, many // 8) if interpreted(backend, device) else many


def random_scores(shape, dtype, kind, generator):
    if kind == "normal":
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif kind == "small-integers":
        values = torch.randint(-3, 4, shape, generator=generator).to(torch.float64)
    elif kind == "all-equal":
        values = torch.full(shape, 1.5, dtype=torch.float64)
    elif kind == "signed-zeros":
        sign = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
        nonzero = torch.rand(shape, generator=generator, dtype=torch.float64) < 0.2
        values = torch.where(nonzero, torch.rand(shape, generator=generator, dtype=torch.float64), 0.0) * sign
    elif kind == "few-values":
        choices = torch.tensor([-torch.inf, -2.0, 0.5, 7.0, torch.inf], dtype=torch.float64)
        values = choices[torch.randint(0, len(choices), shape, generator=generator)]
    else:
        raise AssertionError(kind)
    return values.to(dtype)


def as_float64_numpy(tensor):
    return tensor.detach().cpu().to(torch.float64).reshape(-1).numpy()


def oracle_order(values):
    """Flat indices from first kept to last: score descending, then index ascending."""
    # -0.0 and 0.0 must tie: numpy's lexsort compares them as equal, as IEEE does.
    return np.lexsort((np.arange(len(values)), -values))


def oracle_topk(scores, k, candidates=None):
    values = as_float64_numpy(scores)
    indices = np.arange(len(values))
    if candidates is not None:
        indices = indices[candidates.cpu().reshape(-1).numpy()]
    order = indices[oracle_order(values[indices])]
    mask = np.zeros(len(values), dtype=bool)
    mask[order[:k]] = True
    threshold = values[order[k - 1]] if k > 0 else np.inf
    return torch.from_numpy(mask).reshape(scores.shape), threshold


def oracle_global(scores_list, k):
    values = np.concatenate([as_float64_numpy(scores) for scores in scores_list] + [np.zeros(0)])
    order = oracle_order(values)
    mask = np.zeros(len(values), dtype=bool)
    mask[order[:k]] = True
    threshold = values[order[k - 1]] if k > 0 else np.inf
    pieces = np.split(mask, np.cumsum([scores.numel() for scores in scores_list])[:-1]) if scores_list else []
    return [torch.from_numpy(piece).reshape(scores.shape) for piece, scores in zip(pieces, scores_list)], threshold


def oracle_nm(scores, n, m):
    values = as_float64_numpy(scores).reshape(-1, m)
    mask = np.zeros(values.shape, dtype=bool)
    for row, group in enumerate(values):
        mask[row, oracle_order(group)[:n]] = True
    return torch.from_numpy(mask).reshape(scores.shape)


def assert_threshold(threshold, expected, scores):
    assert threshold.dim() == 0 and threshold.dtype == scores.dtype and threshold.device == scores.device
    assert threshold.item() == expected  # exact: the threshold is one of the scores


shapes = st.lists(st.integers(0, 13), min_size=0, max_size=3).map(tuple)


@pytest.mark.parametrize("backend,device", TOPK_BACKENDS)
def test_topk_mask_matches_oracle(backend, device):
    @settings(max_examples=examples(backend, device, 120), deadline=None)
    @given(shape=shapes, dtype=st.sampled_from(DTYPES), kind=st.sampled_from(KINDS),
           candidate_density=st.sampled_from([None, 0.0, 0.3, 0.9, 1.0]), seed=st.integers(0, 2**31 - 1),
           data=st.data())
    def check(shape, dtype, kind, candidate_density, seed, data):
        generator = torch.Generator().manual_seed(seed)
        scores = random_scores(shape, dtype, kind, generator).to(device)
        candidates = None
        if candidate_density is not None:
            candidates = (torch.rand(shape, generator=generator) < candidate_density).to(device)
        available = scores.numel() if candidates is None else int(candidates.sum())
        k = data.draw(st.integers(0, available), label="k")
        expected, threshold = oracle_topk(scores, k, candidates)
        poison_allocator(scores.numel(), device)
        mask, got_threshold = ops.topk_mask(scores, k, candidates, backend=backend)
        assert mask.dtype == torch.bool and mask.shape == scores.shape and mask.device == scores.device
        assert int(mask.sum()) == k
        assert torch.equal(mask.cpu(), expected)
        assert_threshold(got_threshold, threshold, scores)

    check()


@pytest.mark.parametrize("backend,device", TOPK_BACKENDS)
@pytest.mark.parametrize("kind", ["small-integers", "all-equal", "normal"])
def test_topk_mask_large_ties_across_chunks(backend, device, kind):
    """Enough elements for the CPU kernel's many chunks: the k-th score's ties straddle
    chunks and the per-chunk prefix of equal scores decides which are kept."""
    n = 20_011 if interpreted(backend, device) else 300_007
    generator = torch.Generator().manual_seed(5)
    scores = random_scores((n,), torch.float32, kind, generator).to(device)
    candidates = (torch.rand(n, generator=generator) < 0.7).to(device)
    for k, cand in ((n // 3, None), (int(candidates.sum()) // 2 + 1, candidates)):
        expected, threshold = oracle_topk(scores, k, cand)
        mask, got_threshold = ops.topk_mask(scores, k, cand, backend=backend)
        assert torch.equal(mask.cpu(), expected)
        assert_threshold(got_threshold, threshold, scores)


@pytest.mark.parametrize("backend,device", TOPK_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_mask_extremes_and_signed_zero(backend, device, dtype):
    info = torch.finfo(dtype)
    values = [0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, torch.inf, -torch.inf, 1.0, -1.0, 0.0, -0.0]
    scores = torch.tensor(values, dtype=dtype, device=device)
    for k in range(len(values) + 1):
        expected, threshold = oracle_topk(scores, k)
        mask, got_threshold = ops.topk_mask(scores, k, backend=backend)
        assert torch.equal(mask.cpu(), expected), k
        assert_threshold(got_threshold, threshold, scores)
    # -0.0 and 0.0 tie, so the lower index wins whichever sign it has.
    mask, _ = ops.topk_mask(torch.tensor([-0.0, 0.0, -1.0], dtype=dtype, device=device), 1, backend=backend)
    assert mask.cpu().tolist() == [True, False, False]


@pytest.mark.parametrize("backend,device", TOPK_BACKENDS)
def test_topk_mask_non_contiguous(backend, device):
    generator = torch.Generator().manual_seed(6)
    base = random_scores((37, 41), torch.float32, "small-integers", generator).to(device)
    base_candidates = (torch.rand(37, 41, generator=generator) < 0.6).to(device)
    views = [(base.t(), base_candidates.t()), (base[::2, 3::3], base_candidates[::2, 2::3]),
             (base[:1].expand(5, 41), base_candidates[:5])]
    for scores, candidates in views:
        assert not scores.is_contiguous()
        for cand in (None, candidates):
            k = (scores.numel() if cand is None else int(cand.sum())) // 2
            expected, threshold = oracle_topk(scores, k, cand)
            mask, got_threshold = ops.topk_mask(scores, k, cand, backend=backend)
            assert torch.equal(mask.cpu(), expected)
            assert_threshold(got_threshold, threshold, scores)


@pytest.mark.parametrize("backend,device", GLOBAL_BACKENDS)
def test_topk_mask_global_matches_oracle(backend, device):
    @settings(max_examples=examples(backend, device, 80), deadline=None)
    @given(shapes_list=st.lists(shapes, min_size=1, max_size=5), dtype=st.sampled_from(DTYPES),
           kind=st.sampled_from(KINDS), transpose=st.booleans(), seed=st.integers(0, 2**31 - 1), data=st.data())
    def check(shapes_list, dtype, kind, transpose, seed, data):
        generator = torch.Generator().manual_seed(seed)
        scores_list = [random_scores(shape, dtype, kind, generator).to(device) for shape in shapes_list]
        if transpose:  # non-contiguous members, in their logical order
            scores_list = [scores.t() if scores.dim() == 2 else scores for scores in scores_list]
        total = sum(scores.numel() for scores in scores_list)
        k = data.draw(st.integers(0, total), label="k")
        expected, threshold = oracle_global(scores_list, k)
        masks, got_threshold = ops.topk_mask_global(scores_list, k, backend=backend)
        assert len(masks) == len(scores_list)
        for mask, scores, want in zip(masks, scores_list, expected):
            assert mask.dtype == torch.bool and mask.shape == scores.shape and mask.device == scores.device
            assert torch.equal(mask.cpu(), want)
        assert sum(int(mask.sum()) for mask in masks) == k
        assert_threshold(got_threshold, threshold, scores_list[0])

    check()


@pytest.mark.parametrize("backend,device", GLOBAL_BACKENDS)
def test_topk_mask_global_tensor_order_breaks_ties(backend, device):
    big = 70_001 if not interpreted(backend, device) else 3_001
    scores_list = [torch.ones(5, device=device), torch.empty(0, 3, device=device),
                   torch.full((big,), 2.0, device=device), torch.ones(3, 4, device=device)]
    for k in (0, 1, big, big + 3, big + 5, big + 6, big + 17):
        expected, threshold = oracle_global(scores_list, k)
        masks, got_threshold = ops.topk_mask_global(scores_list, k, backend=backend)
        for mask, want in zip(masks, expected):
            assert torch.equal(mask.cpu(), want), k
        assert_threshold(got_threshold, threshold, scores_list[0])


@pytest.mark.parametrize("backend,device", GLOBAL_BACKENDS)
def test_topk_mask_global_empty(backend, device):
    masks, threshold = ops.topk_mask_global([], 0, backend=backend)
    assert masks == [] and threshold.item() == float("inf")
    with pytest.raises(ValueError, match=r"k \(1\) exceeds the number of candidates \(0\)"):
        ops.topk_mask_global([], 1, backend=backend)
    empties = [torch.empty(0, device=device), torch.empty(2, 0, device=device, dtype=torch.float32)]
    masks, threshold = ops.topk_mask_global(empties, 0, backend=backend)
    assert [mask.shape for mask in masks] == [(0,), (2, 0)] and threshold.item() == float("inf")


@pytest.mark.parametrize("backend,device", NM_BACKENDS)
def test_nm_mask_matches_oracle(backend, device):
    @settings(max_examples=examples(backend, device, 80), deadline=None)
    @given(leading=st.lists(st.integers(0, 5), max_size=2), groups=st.integers(0, 4),
           m=st.sampled_from([1, 2, 3, 4, 8, 16, 33, 64]), dtype=st.sampled_from(DTYPES),
           kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1), data=st.data())
    def check(leading, groups, m, dtype, kind, seed, data):
        n = data.draw(st.integers(0, m), label="n")
        scores = random_scores((*leading, groups * m), dtype, kind, torch.Generator().manual_seed(seed)).to(device)
        poison_allocator(scores.numel(), device)
        mask = ops.nm_mask(scores, n, m, backend=backend)
        assert mask.dtype == torch.bool and mask.shape == scores.shape and mask.device == scores.device
        assert torch.equal(mask.cpu(), oracle_nm(scores, n, m))

    check()


@pytest.mark.parametrize("backend,device", NM_BACKENDS)
def test_nm_mask_non_contiguous(backend, device):
    base = random_scores((24, 16), torch.float16, "small-integers", torch.Generator().manual_seed(7)).to(device)
    for scores in (base.t(), base[::3, :12]):
        assert not scores.is_contiguous()
        assert torch.equal(ops.nm_mask(scores, 2, 4, backend=backend).cpu(), oracle_nm(scores, 2, 4))


def bad_topk_inputs(device):
    nan = torch.tensor([1.0, float("nan"), 2.0], device=device)
    return [
        (lambda b: ops.topk_mask(torch.arange(4, device=device), 1, backend=b), TypeError,
         "scores must be float32, float16, bfloat16 or float64, got Long"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), -1, backend=b), ValueError, "k must be >= 0, got -1"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), 5, backend=b), ValueError,
         r"k \(5\) exceeds the number of candidates \(4\)"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), 3,
                                 torch.tensor([True, False, True, False], device=device), backend=b),
         ValueError, r"k \(3\) exceeds the number of candidates \(2\)"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), 1, torch.zeros(4, device=device), backend=b), TypeError,
         "candidates must be torch.bool, got Float"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), 1, torch.ones(2, 2, dtype=torch.bool, device=device),
                                 backend=b), ValueError, r"candidates must have scores' shape \[4\], got \[2, 2\]"),
        (lambda b: ops.topk_mask(nan, 1, backend=b), ValueError, "topk_mask: scores contains NaN"),
        (lambda b: ops.topk_mask(nan, 1, torch.tensor([False, True, False], device=device), backend=b), ValueError,
         "scores contains NaN among the candidates"),
        (lambda b: ops.topk_mask(nan, 0, backend=b), ValueError, "scores contains NaN"),
        # Counts beyond int64 do not fit the op schema: a clear error, not the argument parser's.
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), 2**64, backend=b), ValueError,
         r"topk_mask: k must be in \[0, 4\], got 18446744073709551616"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), -2**63 - 1, backend=b), ValueError, "k must be in"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), 2.0, backend=b), TypeError,
         "topk_mask: k must be an int, got float"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), True, backend=b), TypeError,
         "k must be an int, got bool"),
        (lambda b: ops.topk_mask([0.0, 1.0], 1, backend=b), TypeError, "scores must be a torch.Tensor, got list"),
        (lambda b: ops.topk_mask(torch.zeros(4, device=device), 1, [True] * 4, backend=b), TypeError,
         "candidates must be a torch.Tensor"),
    ]


def bad_global_inputs(device):
    ok = torch.zeros(3, device=device)
    return [
        (lambda b: ops.topk_mask_global([ok, torch.zeros(2, device=device, dtype=torch.float16)], 1, backend=b),
         TypeError, r"all scores must have one dtype, but scores\[0\] is Float and scores\[1\] is Half"),
        (lambda b: ops.topk_mask_global([ok, torch.zeros(2, dtype=torch.int32, device=device)], 1, backend=b),
         TypeError, r"scores\[1\] must be float32, float16, bfloat16 or float64, got Int"),
        (lambda b: ops.topk_mask_global([ok, ok], 7, backend=b), ValueError,
         r"k \(7\) exceeds the number of candidates \(6\)"),
        (lambda b: ops.topk_mask_global([ok, ok], -2, backend=b), ValueError, "k must be >= 0"),
        (lambda b: ops.topk_mask_global([ok, ok, torch.tensor([[0.0, float("nan")]], device=device)], 1, backend=b),
         ValueError, r"topk_mask_global: scores\[2\] contains NaN"),
        # A tensor iterates over its rows: it must not pass for a list of tensors.
        (lambda b: ops.topk_mask_global(torch.zeros(3, 4, device=device), 2, backend=b), TypeError,
         "scores must be a list or tuple of tensors, got Tensor"),
        (lambda b: ops.topk_mask_global(iter([ok]), 1, backend=b), TypeError, "must be a list or tuple"),
        (lambda b: ops.topk_mask_global([ok, [0.0]], 1, backend=b), TypeError,
         r"scores\[1\] must be a torch.Tensor, got list"),
        (lambda b: ops.topk_mask_global([ok, ok], 2**64, backend=b), ValueError,
         r"k must be in \[0, 6\], got 18446744073709551616"),
        (lambda b: ops.topk_mask_global([ok], 1.0, backend=b), TypeError, "k must be an int, got float"),
    ]


def bad_nm_inputs(device):
    return [
        (lambda b: ops.nm_mask(torch.zeros(2, 8, dtype=torch.int64, device=device), 2, 4, backend=b), TypeError,
         "got Long"),
        (lambda b: ops.nm_mask(torch.zeros(2, 10, device=device), 2, 4, backend=b), ValueError,
         r"the last dimension \(10\) must be a multiple of m \(4\)"),
        (lambda b: ops.nm_mask(torch.zeros(2, 8, device=device), 5, 4, backend=b), ValueError,
         r"n must be in \[0, m\] = \[0, 4\], got 5"),
        (lambda b: ops.nm_mask(torch.zeros(2, 8, device=device), -1, 4, backend=b), ValueError, "n must be in"),
        (lambda b: ops.nm_mask(torch.zeros(2, 8, device=device), 0, 0, backend=b), ValueError, "m must be >= 1"),
        (lambda b: ops.nm_mask(torch.tensor(1.0, device=device), 1, 1, backend=b), ValueError,
         "at least one dimension"),
        (lambda b: ops.nm_mask(torch.tensor([[1.0, float("nan")]], device=device), 1, 2, backend=b), ValueError,
         "nm_mask: scores contains NaN"),
        (lambda b: ops.nm_mask(torch.zeros(2, 8, device=device), 2**64, 4, backend=b), ValueError,
         r"n must be in \[0, m\] = \[0, 4\], got 18446744073709551616"),
        (lambda b: ops.nm_mask(torch.zeros(2, 0, device=device), 0, 2**64, backend=b), ValueError,
         "m must be a positive divisor of the last dimension, got 18446744073709551616"),
        (lambda b: ops.nm_mask(torch.zeros(2, 8, device=device), 2.0, 4, backend=b), TypeError,
         "n must be an int, got float"),
    ]


@pytest.mark.parametrize("backend,device", TOPK_BACKENDS)
@pytest.mark.parametrize("case", range(len(bad_topk_inputs("cpu"))))
def test_topk_mask_rejects_bad_input_alike_on_every_backend(backend, device, case):
    call, error, message = bad_topk_inputs(device)[case]
    with pytest.raises(error, match=message):
        call(backend)


@pytest.mark.parametrize("backend,device", GLOBAL_BACKENDS)
@pytest.mark.parametrize("case", range(len(bad_global_inputs("cpu"))))
def test_topk_mask_global_rejects_bad_input_alike_on_every_backend(backend, device, case):
    call, error, message = bad_global_inputs(device)[case]
    with pytest.raises(error, match=message):
        call(backend)


@pytest.mark.parametrize("backend,device", NM_BACKENDS)
@pytest.mark.parametrize("case", range(len(bad_nm_inputs("cpu"))))
def test_nm_mask_rejects_bad_input_alike_on_every_backend(backend, device, case):
    call, error, message = bad_nm_inputs(device)[case]
    with pytest.raises(error, match=message):
        call(backend)


@pytest.mark.gpu
def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="all scores must be on one device"):
        ops.topk_mask_global([torch.zeros(3, device="cuda"), torch.zeros(3)], 1)
    with pytest.raises(ValueError, match=r"candidates must be on scores' device \(cuda:0\), got cpu"):
        ops.topk_mask(torch.zeros(3, device="cuda"), 1, torch.ones(3, dtype=torch.bool))


# RigL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", RIGL_BACKENDS)
def test_rigl_update_invariants(backend, device):
    @settings(max_examples=examples(backend, device, 60), deadline=None)
    @given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple),
           density=st.sampled_from([0.1, 0.5, 0.9]), kind=st.sampled_from(["normal", "small-integers", "all-equal"]),
           seed=st.integers(0, 2**31 - 1), data=st.data())
    def check(shape, density, kind, seed, data):
        generator = torch.Generator().manual_seed(seed)
        mask = (torch.rand(shape, generator=generator) < density).to(device)
        weight = (random_scores(shape, torch.float32, kind, generator).to(device) * mask)
        grad = random_scores(shape, torch.float32, kind, generator).to(device)
        state = [torch.rand(shape, generator=generator).to(device) for _ in range(2)]
        active = int(mask.sum())
        k = data.draw(st.integers(0, min(active, mask.numel() - active)), label="k")
        weight_before, state_before = weight.clone(), [s.clone() for s in state]

        new_mask = ops.rigl_update(weight, mask, grad, k, state=state, backend=backend)

        kept, _ = oracle_topk(weight_before.abs(), active - k, mask)
        grown, _ = oracle_topk(grad.abs(), k, ~mask)
        dropped = mask.cpu() & ~kept
        assert new_mask.dtype == torch.bool and int(new_mask.sum()) == active
        assert int(dropped.sum()) == k and int(grown.sum()) == k
        assert not (dropped & grown).any()
        assert torch.equal(new_mask.cpu(), kept | grown)
        grown = grown.to(device)
        assert (weight[grown] == 0).all() and torch.equal(weight[~grown], weight_before[~grown])
        for tensor, before in zip(state, state_before):
            assert (tensor[grown] == 0).all() and torch.equal(tensor[~grown], before[~grown])

    check()


def oracle_rigl(weight, mask, grad, k):
    """RigL's selection by the numpy oracle: the active - k largest |weight| among the active
    stay, the k largest |grad| among the inactive grow; with the dropped and grown flat indices
    and the number of nonzero inactive weights."""
    active = int(mask.sum())
    kept, _ = oracle_topk(weight.abs(), active - k, mask)
    grown, _ = oracle_topk(grad.abs(), k, ~mask)
    flat_mask = mask.cpu().reshape(-1).numpy()
    dropped = np.flatnonzero(flat_mask & ~kept.reshape(-1).numpy())
    pruned_nonzeros = int(np.count_nonzero(as_float64_numpy(weight)[~flat_mask]))
    return kept | grown, dropped, np.flatnonzero(grown.reshape(-1).numpy()), pruned_nonzeros


def check_rigl_masks(weight, mask, grad, k, backend):
    new_mask, dropped, grown, pruned_nonzeros = topk_ops.rigl_masks(weight, mask, grad, k, backend=backend)
    expected_mask, expected_dropped, expected_grown, expected_nonzeros = oracle_rigl(weight, mask, grad, k)
    assert new_mask.dtype == torch.bool and new_mask.shape == mask.shape and new_mask.device == mask.device
    assert dropped.dtype == grown.dtype == torch.int64 and dropped.shape == grown.shape == (k,)
    assert pruned_nonzeros.dtype == torch.int64 and pruned_nonzeros.dim() == 0
    assert torch.equal(new_mask.cpu(), expected_mask)
    assert np.array_equal(dropped.cpu().numpy(), expected_dropped)
    assert np.array_equal(grown.cpu().numpy(), expected_grown)
    assert int(pruned_nonzeros) == expected_nonzeros


@pytest.mark.parametrize("backend,device", RIGL_BACKENDS)
def test_rigl_masks_matches_oracle(backend, device):
    @settings(max_examples=examples(backend, device, 100), deadline=None)
    @given(shape=shapes, dtype=st.sampled_from(DTYPES), kind=st.sampled_from(KINDS),
           density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), masked_weights=st.booleans(),
           seed=st.integers(0, 2**31 - 1), data=st.data())
    def check(shape, dtype, kind, density, masked_weights, seed, data):
        generator = torch.Generator().manual_seed(seed)
        mask = (torch.rand(shape, generator=generator) < density).to(device)
        weight = random_scores(shape, dtype, kind, generator).to(device)
        if masked_weights:  # as masked training keeps them; else pruned_nonzeros counts them
            weight = torch.where(mask, weight, 0)
        grad = random_scores(shape, dtype, kind, generator).to(device)
        active = int(mask.sum())
        k = data.draw(st.integers(0, min(active, mask.numel() - active)), label="k")
        poison_allocator(mask.numel(), device)
        check_rigl_masks(weight, mask, grad, k, backend)

    check()


def structured_scores(shape, generator):
    """Magnitudes that vary by row and by column over orders of magnitude, as a dense weight
    gradient (outer products of output and input gradients) does."""
    rows = torch.exp(3 * torch.randn(shape[0], 1, generator=generator))
    columns = torch.exp(3 * torch.randn(1, shape[1], generator=generator))
    return rows * columns * torch.randn(shape, generator=generator)


def sample_defeating_scores(shape, generator):
    """Small values exactly where the CPU kernel samples (runs of 32 at the start of every 1056
    elements), large ones elsewhere: every bracket the sample places misses, so both selections
    are made again by the radix select (the result must not change)."""
    flat = torch.rand(shape, generator=generator).reshape(-1) + 10
    sampled = torch.arange(flat.numel()) % 1056 < 32
    flat[sampled] -= 10
    return flat.reshape(shape)


# The compiled backends: the reference sorts (the small oracle test covers it).
@pytest.mark.parametrize("backend,device", backend_device_params("rigl_masks"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["normal", "structured", "zero-weights", "small-integers", "all-equal",
                                  "defeats-the-sample"])
def test_rigl_masks_large_layers(backend, device, dtype, kind):
    """Layers large enough for the CPU kernel's sampled brackets, with distributions that keep
    them narrow (normal, row and column scales, a third of the active weights grown at zero) and
    ones that force the radix select (ties filling a bracket, a misleading sample). float32 runs
    the vectorized pass of the CPU (AVX-512 where there is one), the others its portable loop."""
    if interpreted(backend, device) and dtype != torch.float32:
        pytest.skip("the interpreted Triton kernels are slow: float32 only")
    shape = (97, 131) if interpreted(backend, device) else (613, 347)
    generator = torch.Generator().manual_seed(11)
    mask = torch.rand(shape, generator=generator) < 0.1
    if kind in ("normal", "zero-weights"):
        weight, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    elif kind == "structured":
        weight, grad = structured_scores(shape, generator), structured_scores(shape, generator)
    elif kind == "defeats-the-sample":
        weight, grad = sample_defeating_scores(shape, generator), sample_defeating_scores(shape, generator)
    else:
        weight, grad = (random_scores(shape, torch.float32, kind, generator) for _ in range(2))
    weight = torch.where(mask, weight, 0)
    if kind == "zero-weights":
        weight[mask & (torch.rand(shape, generator=generator) < 0.3)] = 0
    weight, grad = weight.to(dtype), grad.to(dtype)
    active = int(mask.sum())
    for k in (0, 1, round(0.3 * active), active):
        check_rigl_masks(weight.to(device), mask.to(device), grad.to(device), k, backend)


def test_rigl_masks_same_result_at_every_thread_count():
    generator = torch.Generator().manual_seed(12)
    shape = (1024, 999)
    mask = torch.rand(shape, generator=generator) < 0.2
    weight = torch.where(mask, structured_scores(shape, generator), 0)
    grad = random_scores(shape, torch.float32, "small-integers", generator)
    k = round(0.3 * int(mask.sum()))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(topk_ops.rigl_masks(weight, mask, grad, k))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("backend,device", RIGL_BACKENDS)
def test_rigl_masks_non_contiguous(backend, device):
    generator = torch.Generator().manual_seed(13)
    base_mask = torch.rand(37, 41, generator=generator) < 0.4
    base_weight = random_scores((37, 41), torch.float32, "small-integers", generator)
    base_grad = random_scores((37, 41), torch.float32, "normal", generator)
    for view in (lambda t: t.t(), lambda t: t[::2, 3::3]):
        mask, weight, grad = view(base_mask).to(device), view(base_weight).to(device), view(base_grad).to(device)
        assert not mask.is_contiguous()
        check_rigl_masks(weight, mask, grad, min(int(mask.sum()), int((~mask).sum())) // 2, backend)


def bad_rigl_inputs(device):
    weight, grad = torch.randn(4, 4, device=device), torch.randn(4, 4, device=device)
    mask = torch.zeros(4, 4, dtype=torch.bool, device=device)
    mask[0] = True
    nan_weight = weight.clone()
    nan_weight[0, 1] = torch.nan
    nan_grad = grad.clone()
    nan_grad[2, 3] = torch.nan
    rigl = topk_ops.rigl_masks
    return [
        (lambda b: rigl(weight.long(), mask, grad.long(), 1, backend=b), TypeError,
         "weight must be float32, float16, bfloat16 or float64, got Long"),
        (lambda b: rigl(weight, mask.float(), grad, 1, backend=b), TypeError, "mask must be torch.bool, got Float"),
        (lambda b: rigl(weight, mask, grad.double(), 1, backend=b), TypeError,
         r"grad must have weight's dtype \(Float\), got Double"),
        (lambda b: rigl(weight, mask[:2], grad, 1, backend=b), ValueError,
         r"mask must have weight's shape \[4, 4\], got \[2, 4\]"),
        (lambda b: rigl(weight, mask, grad.t()[:3], 1, backend=b), ValueError, "grad must have weight's shape"),
        (lambda b: rigl(weight, mask, grad, -1, backend=b), ValueError, "k must be >= 0, got -1"),
        (lambda b: rigl(weight, mask, grad, 5, backend=b), ValueError,
         r"k \(5\) exceeds the number of active \(4\) or inactive \(12\) weights"),
        (lambda b: rigl(weight, ~mask, grad, 5, backend=b), ValueError,
         r"k \(5\) exceeds the number of active \(12\) or inactive \(4\) weights"),
        (lambda b: rigl(nan_weight, mask, grad, 1, backend=b), ValueError,
         "weight contains NaN among the active weights"),
        (lambda b: rigl(weight, mask, nan_grad, 1, backend=b), ValueError,
         "grad contains NaN among the inactive weights"),
        (lambda b: rigl(weight, mask, grad, 2**64, backend=b), ValueError, "k must be in"),
        (lambda b: rigl(weight, mask, grad, 1.0, backend=b), TypeError, "rigl_masks: k must be an int, got float"),
        (lambda b: rigl(weight, [True] * 16, grad, 1, backend=b), TypeError, "mask must be a torch.Tensor, got list"),
    ]


@pytest.mark.parametrize("backend,device", RIGL_BACKENDS)
@pytest.mark.parametrize("case", range(len(bad_rigl_inputs("cpu"))))
def test_rigl_masks_rejects_bad_input_alike_on_every_backend(backend, device, case):
    call, error, message = bad_rigl_inputs(device)[case]
    with pytest.raises(error, match=message):
        call(backend)


def test_rigl_masks_nan_outside_its_candidates_is_fine():
    """NaN ranks nowhere, so only NaN where it would be ranked is an error: a NaN weight that
    is pruned counts as a nonzero pruned weight, a NaN gradient of an active weight is unused."""
    weight, grad = torch.randn(4, 4), torch.randn(4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0] = True
    weight[2, 2], grad[0, 0] = torch.nan, torch.nan
    for backend in ("cpu", "reference"):
        check_rigl_masks(weight, mask, grad, 2, backend)


def test_rigl_update_rejects_bad_input():
    weight, grad = torch.randn(4, 4), torch.randn(4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0] = True
    with pytest.raises(ValueError, match=r"k \(5\) exceeds the number of active \(4\)"):
        ops.rigl_update(weight, mask, grad, 5)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ops.rigl_update(weight, mask, grad, -1)
    with pytest.raises(TypeError, match="mask must be torch.bool"):
        ops.rigl_update(weight, mask.float(), grad, 1)
    with pytest.raises(ValueError, match=r"state\[0\] must have weight's shape"):
        ops.rigl_update(weight, mask, grad, 1, state=[torch.zeros(3)])
    with pytest.raises(ValueError, match="grad must have weight's shape"):
        ops.rigl_update(weight, mask, grad[:2], 1)
    before = weight.clone()
    with pytest.raises(TypeError, match="rigl_update: k must be an int, got float"):
        ops.rigl_update(weight, mask, grad, 1.5)
    assert torch.equal(weight, before)  # refused before it zeroes grown weights


# Structured scores ---------------------------------------------------------------------


def test_block_scores_and_expand():
    weight = torch.randn(6, 8, dtype=torch.float64)
    scores = ops.block_scores(weight, (3, 2))
    expected = torch.tensor([[float(np.linalg.norm(weight[3 * i:3 * i + 3, 2 * j:2 * j + 2].numpy()))
                              for j in range(4)] for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(ops.block_scores(weight[:4], 2),
                               weight[:4].reshape(2, 2, 4, 2).pow(2).sum((1, 3)).sqrt())
    assert ops.block_scores(weight.half(), 2).dtype == torch.float32
    block_mask, _ = ops.topk_mask(scores, 3)
    element_mask = ops.expand_block_mask(block_mask, (3, 2))
    assert element_mask.shape == weight.shape and int(element_mask.sum()) == 3 * 6
    for i in range(2):
        for j in range(4):
            assert (element_mask[3 * i:3 * i + 3, 2 * j:2 * j + 2] == block_mask[i, j]).all()
    with pytest.raises(ValueError, match=r"blocks of 4 x 4 do not tile a weight of shape \[6, 8\]"):
        ops.block_scores(weight, 4)
    with pytest.raises(ValueError, match="must be 2-d"):
        ops.block_scores(torch.zeros(2, 2, 2), 1)


def test_row_scores_and_expand():
    weight = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    scores = ops.row_scores(weight)
    torch.testing.assert_close(scores, torch.tensor([float(np.linalg.norm(w.numpy())) for w in weight],
                                                    dtype=torch.float64))
    row_mask, _ = ops.topk_mask(scores, 2)
    element_mask = ops.expand_row_mask(row_mask, weight.shape)
    assert element_mask.shape == weight.shape
    assert torch.equal(element_mask.reshape(5, -1).all(1), row_mask)
    assert torch.equal(element_mask.reshape(5, -1).any(1), row_mask)


# Custom-op plumbing --------------------------------------------------------------------


def opcheck_args(device):
    generator = torch.Generator().manual_seed(8)
    scores = random_scores((7, 9), torch.float32, "small-integers", generator).to(device)
    candidates = (torch.rand(7, 9, generator=generator) < 0.5).to(device)
    return [
        (topk_ops._topk, (scores, 20)),
        (topk_ops._topk, (scores, 10, candidates)),
        (topk_ops._topk, (scores.half(), 0)),
        (topk_ops._global, ([scores, scores[:2].t().contiguous(), scores[:0]], 33)),
        (topk_ops._nm, (scores[:, :8], 2, 4)),
        (topk_ops._rigl, (torch.where(candidates, scores, 0), candidates, scores.t().contiguous().reshape(7, 9), 9)),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", range(len(opcheck_args("cpu"))))
def test_opcheck_every_overload(device, case):
    op, args = opcheck_args(device)[case]
    overloads = op.overloads()
    assert overloads[0].name() == f"dynasparse::{op.name}"
    for overload in overloads:
        torch.library.opcheck(overload, args)


# The reference checks NaN and k against the data with Python control flow: it traces in
# eager only, so compile runs the kernel backends.
@pytest.mark.parametrize("backend,device", backend_device_params("topk_mask"))
def test_compiles_fullgraph(backend, device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=False)
    def prune(weights, scores):
        masks, threshold = ops.topk_mask_global(scores, 40, backend=backend)
        local, local_threshold = ops.topk_mask(scores[0], 10, masks[0], backend=backend)
        return [w * m for w, m in zip(weights, masks)], threshold, local, local_threshold

    generator = torch.Generator().manual_seed(9)
    weights = [torch.randn(8, 9, generator=generator).to(device), torch.randn(5, 3, generator=generator).to(device)]
    scores = [w.abs() for w in weights]
    pruned, threshold, local, local_threshold = prune(weights, scores)
    expected_masks, expected_threshold = oracle_global(scores, 40)
    for w, p, m in zip(weights, pruned, expected_masks):
        assert torch.equal(p.cpu(), (w.cpu() * m))
    assert threshold.item() == expected_threshold
    expected_local, expected_local_threshold = oracle_topk(scores[0], 10, expected_masks[0].to(device))
    assert torch.equal(local.cpu(), expected_local) and local_threshold.item() == expected_local_threshold


@pytest.mark.parametrize("backend,device", backend_device_params("rigl_masks"))
def test_rigl_masks_compiles_fullgraph(backend, device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=False)
    def drop_and_grow(weight, mask, grad):
        new_mask, dropped, grown, _ = ops.rigl_masks(weight, mask, grad, 5, backend=backend)
        return weight * new_mask, dropped, grown

    generator = torch.Generator().manual_seed(10)
    mask = torch.rand(9, 11, generator=generator) < 0.4
    weight = torch.where(mask, torch.randn(9, 11, generator=generator), 0).to(device)
    grad, mask = torch.randn(9, 11, generator=generator).to(device), mask.to(device)
    pruned, dropped, grown = drop_and_grow(weight, mask, grad)
    expected_mask, expected_dropped, expected_grown, _ = oracle_rigl(weight.cpu(), mask.cpu(), grad.cpu(), 5)
    assert torch.equal(pruned.cpu(), weight.cpu() * expected_mask)
    assert np.array_equal(dropped.cpu().numpy(), expected_dropped)
    assert np.array_equal(grown.cpu().numpy(), expected_grown)
