"""Structured DPF: whole rows (filters / output neurons) kept by the L2 norm of the dense weights
under one global threshold (float64 reference) at every update, feedback, cubic ramp."""

import pytest
import torch

from dynasparse import pruning
from tests.pruning.tiny import build, global_topk_reference, tiny_model, train


def test_structured_dpf_keeps_whole_rows_by_their_l2_norm():
    steps, every = 32, 4
    model, optimizer, pruner = build("dpf_structured", 13, sparsity=0.6, total_steps=steps, update_every=every,
                                     exclude=["out"])
    ramp = pruning.Cubic(0.6, end=round(0.75 * steps))
    checked = []

    def after(step):
        if step % every:
            return
        names = list(pruner.layers)
        norms = [pruner.layers[name].weight.detach().double().reshape(pruner.layers[name].weight.shape[0], -1)
                 .norm(dim=1) for name in names]
        rows = sum(norm.numel() for norm in norms)
        expected = global_topk_reference(norms, round(rows * (1 - ramp(step))))
        kept = pruner.kept_rows()
        for name, rows_kept in zip(names, expected):
            mask = pruner.layers[name].mask.reshape(rows_kept.numel(), -1)
            assert bool((mask.all(1) | ~mask.any(1)).all()), "whole rows"
            assert torch.equal(kept[name], rows_kept), (name, step)
        checked.append(step)

    train(model, optimizer, pruner, steps, after_step=after)
    assert checked == list(range(every, steps + 1, every))
    assert pruner.report().reactivated_fraction > 0  # feedback: pruned rows come back
    pruner.finalize()
    for layer in pruner.layers.values():
        assert bool((layer.weight[~layer.mask] == 0).all())


def test_structured_dpf_has_no_granularity_option():
    with pytest.raises(TypeError, match=r"unknown option 'granularity'"):
        pruning.create("dpf_structured", tiny_model(), sparsity=0.5, total_steps=10, granularity="weight")
