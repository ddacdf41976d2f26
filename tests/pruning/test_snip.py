"""SNIP: the kept weights are the global top-k of |g * w| (float64 reference on a dense copy),
calibration leaves the gradients as they were, the mask stays fixed in masked training."""

import copy

import pytest
import torch
from torch import nn

from dynasparse import optim, pruning
from tests.pruning.tiny import batch, tiny_data, tiny_model, train

PRUNED = ["conv", "fc1", "fc2", "out"]


def _saliency_reference(dense, batches):
    """|mean over batches of dL/dw * w| in float64 on a dense copy of the model."""
    reference = copy.deepcopy(dense).double()
    grads = {name: 0 for name in PRUNED}
    for x, y in batches:
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x.double()), y).backward()
        for name in PRUNED:
            grads[name] = grads[name] + reference.get_submodule(name).weight.grad
    return [(grads[name] / len(batches) * reference.get_submodule(name).weight.detach()).abs() for name in PRUNED]


@pytest.mark.parametrize("sparsity", [0.0, 0.85])
def test_snip_keeps_the_global_top_k_of_the_saliency(sparsity):
    model = tiny_model(8)
    dense = copy.deepcopy(model)
    batches = [batch(0, tiny_data(1), 16), batch(1, tiny_data(1), 16)]
    pruner = pruning.create("snip", model, sparsity=sparsity)
    assert all(bool(layer.mask.all()) for layer in pruner.layers.values())  # construction changes no mask
    sentinel = {name: torch.full_like(param, 7.0) for name, param in model.named_parameters()}
    for name, param in model.named_parameters():
        param.grad = sentinel[name].clone()
    pruner.calibrate(batches)
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, sentinel[name]), name
    saliency = _saliency_reference(dense, batches)
    flat = torch.cat([s.flatten() for s in saliency])
    keep = round(flat.numel() * (1 - sparsity))
    assert sum(int(layer.mask.sum()) for layer in pruner.layers.values()) == keep
    ours = torch.cat([pruner.layers[name].mask.flatten() for name in PRUNED])
    threshold = torch.sort(flat, descending=True).values[keep - 1]
    disagree = ours != (flat >= threshold)
    # float32 and float64 saliencies may order differently only at the threshold
    assert bool(((flat[disagree] - threshold).abs() <= 1e-5 * threshold).all())
    for layer in pruner.layers.values():
        assert bool((layer.weight[~layer.mask] == 0).all()) and layer.grad_mode == "masked"


def test_snip_lifecycle_and_masked_training():
    model = tiny_model(9)
    pruner = pruning.create("snip", model, sparsity=0.7, include=["fc1", "fc2"])
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(optimizer)  # needs data: attach does not initialize
    assert not pruner.initialized
    with pytest.raises(RuntimeError, match=r"SNIP: call calibrate\(batches\) before step\(\)"):
        pruner.step()
    with pytest.raises(RuntimeError, match=r"needs data for its first masks: call calibrate"):
        pruner.initialize()
    with pytest.raises(ValueError, match="batches is empty"):
        pruner.calibrate([])
    with pytest.raises(TypeError, match=r"a batch is \(inputs, targets\)"):
        pruner.calibrate([torch.randn(4, 2, 4, 4)])
    x, y = batch(0, tiny_data(2), 16)
    pruner.calibrate([(x, y)], loss=lambda net, b: nn.functional.cross_entropy(net(b[0]), b[1]))
    with pytest.raises(RuntimeError, match="already initialized"):
        pruner.calibrate([(x, y)])
    masks = {name: layer.mask.clone() for name, layer in pruner.layers.items()}
    train(model, optimizer, pruner, 10)
    for name, layer in pruner.layers.items():
        assert torch.equal(layer.mask, masks[name]) and bool((layer.weight[~layer.mask] == 0).all())
    assert pruner.report().dense_gradient_steps == 0
