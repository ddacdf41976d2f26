"""Early-frozen RigL and DNW: mask updates until freeze_after only, then the mask is fixed, the
training masked and nonzero-only, and the report counts the dense-gradient steps saved."""

import pytest
import torch

from tests.pruning.tiny import build, masks_of, topk_reference, train


def test_frozen_rigl_updates_until_the_freeze_then_trains_sparse_only():
    steps, every, freeze = 40, 3, 12
    model, optimizer, pruner = build("rigl_frozen", 11, total_steps=steps, update_every=every, freeze_after=freeze)
    updates, frozen = [], {}

    def after(step):
        if pruner.history[-1]["step"] == step:
            updates.append(step)
        if step == freeze:
            frozen.update(masks_of(pruner))
        for name, layer in pruner.layers.items():
            if step >= freeze:
                assert torch.equal(layer.mask, frozen[name])
                assert layer.weight_grad is None and layer.grad_mode == "masked"
                assert bool((layer.weight[~layer.mask] == 0).all())
                # the freeze step itself was an update step, with its dense gradient
                assert step == freeze or bool((layer.weight.grad[~layer.mask] == 0).all())

    train(model, optimizer, pruner, steps, after_step=after)
    # the last period ends at the freeze, where the cosine drop fraction is 0: no flip there
    assert updates == [3, 6, 9, 12] and pruner.history[-1]["flip_rate"] == 0
    report = pruner.report()
    assert report.dense_gradient_steps == 4
    # unfrozen RigL (end 0.75 * 40 = 30) would have updated at 15, 18, ..., 30
    assert report.notes == {"frozen": True, "dense_gradient_steps_saved": 6}
    assert "dense_gradient_steps_saved: 6" in str(report)


def test_frozen_rigl_needs_an_update_before_the_freeze():
    with pytest.raises(ValueError, match=r"update_every \(100\) > freeze_after \(20\)"):
        build("rigl_frozen", total_steps=200, freeze_after=20)
    with pytest.raises(TypeError, match="freeze_after must be an int"):
        build("rigl_frozen", total_steps=200, freeze_after=None)


def test_frozen_dnw_is_dnw_until_the_freeze_then_masked():
    freeze = 6
    model, optimizer, pruner = build("dnw_frozen", 12, sparsity=0.7, freeze_after=freeze)
    frozen = {}

    def after(step):
        if step <= freeze:
            for layer in pruner.layers.values():
                assert torch.equal(layer.mask, topk_reference(layer.weight.abs(), round(layer.weight.numel() * 0.3)))
        if step == freeze:
            frozen.update(masks_of(pruner))
        if step >= freeze:
            for name, layer in pruner.layers.items():
                assert torch.equal(layer.mask, frozen[name]) and layer.grad_mode == "masked"
                assert optimizer.mask(layer.weight)[1] == "masked"
                assert bool((layer.weight[~layer.mask] == 0).all())
                assert bool((optimizer.state[layer.weight]["momentum_buffer"][~layer.mask] == 0).all())

    train(model, optimizer, pruner, 16, after_step=after)
    report = pruner.report()
    assert report.dense_gradient_steps == freeze
    assert report.notes == {"frozen": True, "dense_gradient_steps_saved": 16 - freeze}


def test_frozen_dnw_refuses_a_torch_optimizer_up_front():
    from dynasparse import pruning
    from tests.pruning.tiny import tiny_model

    model = tiny_model()
    pruner = pruning.create("dnw_frozen", model, sparsity=0.5, freeze_after=3)
    with pytest.raises(TypeError, match="masked mode needs dynasparse.optim"):
        pruner.attach(torch.optim.SGD(model.parameters(), lr=0.1))
