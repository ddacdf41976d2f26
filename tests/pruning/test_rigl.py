"""RigL: ERK random init, drop-and-grow against a float64 reference of the rule at every update,
grown weights and optimizer state zero, dense gradients only on update steps, layouts."""

import collections
import copy
import math

import pytest
import torch
from torch import nn

import dynasparse
from dynasparse import optim, pruning
from tests.pruning.tiny import build, erk_counts_reference, masks_of, tiny_data, topk_reference, train


def rigl_reference(weight, mask, grad, fraction):
    """Drop the round(fraction * active) smallest |w| among the active weights, grow as many of the
    largest |grad| among the weights inactive before the drop (float64, ties to the lower index)."""
    active = int(mask.sum())
    k = min(round(fraction * active), mask.numel() - active)
    kept = topk_reference(weight.abs(), active - k, mask)
    grown = topk_reference(grad.abs(), k, ~mask)
    return kept | grown, grown


def test_rigl_init_is_erk_random_and_updates_follow_the_rule():
    steps, every = 40, 4
    model, optimizer, pruner = build("rigl", 1, sparsity=0.8, total_steps=steps, update_every=every)
    shapes = [tuple(layer.weight.shape) for layer in pruner.layers.values()]
    assert [int(layer.mask.sum()) for layer in pruner.layers.values()] == erk_counts_reference(shapes, 0.8)
    end = round(0.75 * steps)
    seen, checked = {}, []

    def before(step):
        seen.clear()
        seen.update({name: (layer.mask.clone(), layer.weight.detach().clone(), layer.weight.grad.clone())
                     for name, layer in pruner.layers.items()})

    def after(step):
        due = step % every == 0 and step <= end
        for name, layer in pruner.layers.items():
            old_mask, weight, grad = seen[name]
            if not due:
                assert torch.equal(layer.mask, old_mask)
                assert bool((grad[~old_mask] == 0).all()), "between updates the weight gradient is nonzero-only"
                continue
            if bool((~old_mask).any()):  # ERK keeps small layers dense: those have no pruned position
                assert bool((grad[~old_mask] != 0).any()), "an update step computes the dense gradient"
            fraction = 0.3 / 2 * (1 + math.cos(math.pi * step / end))
            expected, grown = rigl_reference(weight, old_mask, grad, fraction)
            assert torch.equal(layer.mask, expected), (name, step)
            assert int(layer.mask.sum()) == int(old_mask.sum())
            assert int(grown.sum()) == min(round(fraction * int(old_mask.sum())), int((~old_mask).sum()))
            assert bool((layer.weight[grown] == 0).all())
            assert bool((optimizer.state[layer.weight]["momentum_buffer"][grown] == 0).all())
            assert bool((layer.weight[~layer.mask] == 0).all())
        if due:
            checked.append(step)

    train(model, optimizer, pruner, steps, before_step=before, after_step=after)
    assert checked == list(range(every, end + 1, every))
    report = pruner.report()
    assert report.dense_gradient_steps == len(checked)
    assert len(report.flip_rates) == 1 + len(checked)
    assert f"{len(checked)} dense-gradient step(s)" in str(report)


def test_rigl_weight_gradient_is_dense_exactly_on_update_steps():
    """The layer's weight-gradient override: dense on the update step's backward (against the
    float64 dense gradient of the masked product), at the nonzeros otherwise, masked updates."""
    model, optimizer, pruner = build("rigl", 2, total_steps=20, update_every=5)
    layer = pruner.layers["fc1"]
    for step in range(1, 11):
        assert layer.weight_grad == ("dense" if step % 5 == 0 else None)
        assert layer.grad_mode == "masked" and optimizer.mask(layer.weight)[1] == "masked"
        x, y = tiny_data(3)
        optimizer.zero_grad()
        hidden = {}
        handle = layer.register_forward_hook(lambda module, args, out: hidden.update(x=args[0].detach()))
        nn.functional.cross_entropy(model(x), y).backward()
        handle.remove()
        # float64 reference: the gradient of the loss with respect to w~ = m * w, through a double copy.
        w = torch.where(layer.mask, layer.weight.detach(), 0).double().requires_grad_()
        rest = copy.deepcopy(nn.Sequential(*list(model.children())[4:])).double()
        loss = nn.functional.cross_entropy(rest(nn.functional.linear(hidden["x"].double(), w, layer.bias.double())), y)
        dense = torch.autograd.grad(loss, [w])[0]
        expected = dense if step % 5 == 0 else torch.where(layer.mask, dense, 0)
        torch.testing.assert_close(layer.weight.grad.double(), expected, rtol=1e-4, atol=1e-6)
        optimizer.step()
        pruner.step()
    assert pruner.report().dense_gradient_steps == 2


def test_rigl_on_block_and_2_4_layers_keeps_the_layout_and_the_count():
    torch.manual_seed(4)
    model = nn.Sequential(collections.OrderedDict([("a", nn.Linear(32, 32)), ("relu", nn.ReLU()),
                                                   ("b", nn.Linear(32, 16)), ("relu2", nn.ReLU()),
                                                   ("c", nn.Linear(16, 4))]))
    dynasparse.sparsify(model, 0.0, layout="block16", include=["a"])
    dynasparse.sparsify(model, 0.5, layout="2:4", include=["b"])
    pruner = pruning.create("rigl", model, sparsity=0.75, total_steps=20, update_every=2, drop_fraction=0.6,
                            include=["a", "b"], distribution="uniform")
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(optimizer)
    x = torch.randn(16, 32)
    counts = {name: int(layer.mask.sum()) for name, layer in pruner.layers.items()}
    assert counts == {"a": 256, "b": 128}  # a: 1 of 4 blocks; b: 2:4 caps at half
    flips = 0
    for _ in range(14):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        old = masks_of(pruner)
        pruner.step()
        flips += int((old["a"] != pruner.layers["a"].mask).sum())
        tiles = pruner.layers["a"].mask.reshape(2, 16, 2, 16)
        assert torch.equal(tiles.all(3).all(1), tiles.any(3).any(1))  # whole blocks
        assert int(pruner.layers["b"].mask.reshape(16, -1, 4).sum(-1).max()) <= 2
        assert {name: int(layer.mask.sum()) for name, layer in pruner.layers.items()} == counts
        for layer in pruner.layers.values():
            assert bool((layer.weight[~layer.mask] == 0).all())
    assert flips > 0


def test_rigl_needs_the_gradient_of_the_step():
    model, optimizer, pruner = build("rigl", 5, total_steps=8, update_every=2)
    x, y = tiny_data()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    pruner.step()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match=r"conv.weight has no gradient at the update of step 2.*before the next "
                                           r"zero_grad"):
        pruner.step()
