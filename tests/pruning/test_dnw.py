"""DNW: the mask is every layer's top-k |w| (float64 reference) at every step, constant sparsity,
feedback updates."""

import pytest
import torch

from tests.pruning.tiny import build, topk_reference, train


def test_dnw_mask_is_the_per_layer_top_k_at_every_step():
    model, optimizer, pruner = build("dnw", 6, sparsity=0.75)
    flips = []

    def check(step):
        for name, layer in pruner.layers.items():
            expected = topk_reference(layer.weight.abs(), round(layer.weight.numel() * 0.25))
            assert torch.equal(layer.mask, expected), (name, step)
            assert layer.grad_mode == "feedback" and optimizer.mask(layer.weight)[1] == "feedback"
        flips.append(pruner.history[-1]["flip_rate"])

    check(0)
    train(model, optimizer, pruner, 20, after_step=check)
    assert len(pruner.history) == 21
    assert any(rate > 0 for rate in flips[1:])  # feedback: pruned weights learn and come back
    assert pruner.report().reactivated_fraction > 0
    assert pruner.report().dense_gradient_steps == 20


def test_dnw_distribution_changes_the_counts_not_the_rule():
    model, optimizer, pruner = build("dnw", 7, sparsity=0.6, distribution="erk")
    train(model, optimizer, pruner, 3)
    for layer in pruner.layers.values():
        assert torch.equal(layer.mask, topk_reference(layer.weight.abs(), int(layer.mask.sum())))


def test_dnw_rejects_an_option_it_does_not_have():
    with pytest.raises(TypeError, match=r"create\('dnw'\): unknown option 'update_every'"):
        build("dnw", update_every=4)
