"""Distributions: exact kept counts, one threshold for Global, ERK against a bisection oracle."""

import math

import pytest
import torch

from dynasparse.pruning import ERK, Global, Uniform

SHAPES = [torch.Size([7, 3, 3, 3]), torch.Size([33, 17]), torch.Size([5, 40]), torch.Size([64, 7, 1, 1]), torch.Size([3, 2])]


def _scores(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator) for shape in SHAPES]


@pytest.mark.parametrize("sparsity", [0.0, 0.37, 0.9, 0.98, 0.9999])
def test_global_exact_count_and_single_threshold(sparsity):
    scores = _scores(1)
    masks = Global().select(scores, SHAPES, sparsity)
    total = sum(s.numel() for s in scores)
    assert sum(int(m.sum()) for m in masks) == round(total * (1 - sparsity))
    kept = torch.cat([s[m] for s, m in zip(scores, masks)]).double()
    dropped = torch.cat([s[~m] for s, m in zip(scores, masks)]).double()
    if kept.numel() and dropped.numel():
        assert kept.min() >= dropped.max()


def test_global_ties_keep_the_earlier_layer():
    scores = [torch.zeros(3, 4), torch.zeros(5)]
    masks = Global().select(scores, [s.shape for s in scores], 0.5)  # keep round(17 * 0.5) = 8
    assert masks[0].sum() == 8 and masks[1].sum() == 0


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_uniform_exact_per_layer(sparsity):
    scores = _scores(2)
    for score, mask in zip(scores, Uniform().select(scores, SHAPES, sparsity)):
        assert int(mask.sum()) == round(score.numel() * (1 - sparsity))
        if 0 < mask.sum() < mask.numel():
            assert score[mask].min() >= score[~mask].max()


def _erk_oracle(shapes, sparsity):
    """Continuous ERK densities by bisection on the scale: sum(min(1, scale * raw) * n) = kept."""
    sizes = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / math.prod(shape) for shape in shapes]
    kept = round(sum(sizes) * (1 - sparsity))
    low, high = 0.0, 1e9
    for _ in range(300):
        middle = (low + high) / 2
        if sum(min(1.0, middle * r) * n for r, n in zip(raw, sizes)) < kept:
            low = middle
        else:
            high = middle
    return [min(1.0, high * r) for r in raw], kept


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.98])
def test_erk_matches_bisection_oracle(sparsity):
    scores = _scores(3)
    masks = ERK().select(scores, SHAPES, sparsity)
    densities, kept = _erk_oracle(SHAPES, sparsity)
    assert sum(int(m.sum()) for m in masks) == kept
    for mask, density in zip(masks, densities):
        assert abs(int(mask.sum()) - density * mask.numel()) <= 1.0 + 1e-6
    if sparsity == 0.5:
        assert any(d == 1.0 for d in densities)  # the 3x2 layer is capped dense at 50%
        for mask, density in zip(masks, densities):
            if density == 1.0:
                assert bool(mask.all())


def test_erk_keeps_the_best_scores_per_layer():
    scores = _scores(4)
    for score, mask in zip(scores, ERK().select(scores, SHAPES, 0.9)):
        if 0 < mask.sum() < mask.numel():
            assert score[mask].min() >= score[~mask].max()
