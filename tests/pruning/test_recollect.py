"""Pruner.recollect after modules were replaced (a layer narrowed by nn.shrink, a new dense head):
state kept for the layers still there, dropped for the removed ones, fresh for the new ones,
training and resume go on; and RigL's O(changes) installation of drop-and-grow masks equals
the whole-mask one."""

import pytest
import torch
from torch import nn

import dynasparse
from dynasparse import optim, pruning
from dynasparse.nn import SparseLinear
from dynasparse.nn.shrink import shrink
from tests.pruning.tiny import build, checkpoint, tiny_data, tiny_model, train

KEEP = torch.tensor([0, 2, 3, 5, 7, 8, 11, 13, 14, 17, 19, 23])  # 12 of fc1's 24 units


def narrow_fc1(model):
    """fc1 without half its units and fc2 without the matching inputs, put in place."""
    small = shrink(model, {"fc1": KEEP})
    model.fc1, model.fc2 = small.fc1, small.fc2


def optimizer_for(model):
    return optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def rigl(model_seed=0):
    return build("rigl", model_seed, sparsity=0.8, total_steps=80, update_every=4)


def test_recollect_keeps_drops_and_adds_layer_state():
    model, optimizer, pruner = rigl()
    train(model, optimizer, pruner, 13)
    before = {name: (pruner._pruned_seen[name].clone(), pruner._reactivated[name].clone(),
                     pruner.layers[name].mask.clone()) for name in pruner.layers}
    conv, out = pruner.layers["conv"], pruner.layers["out"]
    narrow_fc1(model)
    changes = pruner.recollect()
    assert changes == {"kept": ["conv", "out"], "removed": ["fc1", "fc2"], "added": ["fc1", "fc2"]}
    assert pruner.layers["conv"] is conv and pruner.layers["out"] is out
    assert pruner.layers["fc1"] is model.fc1 and tuple(model.fc1.weight.shape) == (12, 64)
    for name in ("conv", "out"):
        seen, reactivated, mask = before[name]
        assert torch.equal(pruner._pruned_seen[name], seen) and torch.equal(pruner._reactivated[name], reactivated)
        assert torch.equal(pruner.layers[name].mask, mask)
    for name in ("fc1", "fc2"):
        layer = pruner.layers[name]
        # shrink slices the mask with the weight: the new layers bring the old masks' rows / columns.
        assert isinstance(layer, SparseLinear) and layer.grad_mode == "masked"
        assert not pruner._pruned_seen[name].any() and not pruner._reactivated[name].any()
        assert bool((layer.weight[~layer.mask] == 0).all())
    assert torch.equal(model.fc1.mask, before["fc1"][2][KEEP])
    assert torch.equal(model.fc2.mask, before["fc2"][2][:, KEEP])
    assert set(pruner.state_dict()["pruned_seen"]) == {"conv", "fc1", "fc2", "out"}
    assert [layer.name for layer in pruner.report().layers] == ["conv", "fc1", "fc2", "out"]

    # The old optimizer still holds the removed layers' parameters, not the new ones.
    with pytest.raises(RuntimeError, match=r"does not hold the weights of \['fc1', 'fc2'\].*attach\(optimizer\)"):
        pruner.step()
    optimizer = optimizer_for(model)
    pruner.attach(optimizer)
    counts = {name: int(layer.mask.sum()) for name, layer in pruner.layers.items()}
    train(model, optimizer, pruner, 7, start=13)  # updates at steps 16 and 20
    assert pruner.step_count == 20 and len(pruner.history) == 1 + 5
    assert {name: int(layer.mask.sum()) for name, layer in pruner.layers.items()} == counts
    assert pruner.history[-1]["layers"]["fc1"] > 0  # the new layers drop and grow like the others
    for layer in pruner.layers.values():
        assert bool((layer.weight[~layer.mask] == 0).all())


def test_recollect_converts_a_new_dense_layer_and_zeroes_its_pruned_weights_in_masked_mode():
    model, optimizer, pruner = rigl(1)
    train(model, optimizer, pruner, 5)
    head = nn.Linear(16, 3)
    with torch.no_grad():
        head.weight.copy_(torch.arange(48.0).reshape(3, 16))
    model.out = head
    assert pruner.recollect() == {"kept": ["conv", "fc1", "fc2"], "removed": ["out"], "added": ["out"]}
    new = pruner.layers["out"]
    assert isinstance(new, SparseLinear) and model.out is new and bool(new.mask.all())
    assert torch.equal(new.weight.detach(), torch.arange(48.0).reshape(3, 16))
    # A sparse replacement comes with its mask; the masked rule zeroes what it prunes.
    sparse = SparseLinear.from_dense(nn.Linear(16, 3), sparsity=0.5)
    with torch.no_grad():
        sparse.weight.fill_(1.0)
    model.out = sparse
    pruner.recollect(optimizer_for(model))
    assert bool((sparse.weight[~sparse.mask] == 0).all()) and bool((sparse.weight[sparse.mask] == 1).all())
    train(model, pruner.optimizer, pruner, 8, start=5)
    assert int(sparse.mask.sum()) == 24


def test_recollect_with_nothing_replaced_changes_nothing():
    model, optimizer, pruner = rigl(2)
    train(model, optimizer, pruner, 6)
    state = pruner.state_dict()
    assert pruner.recollect() == {"kept": ["conv", "fc1", "fc2", "out"], "removed": [], "added": []}
    assert pruner.optimizer is optimizer
    again = pruner.state_dict()
    for key in ("pruned_seen", "reactivated"):
        assert all(torch.equal(again[key][name], state[key][name]) for name in state[key])
    assert {key: value for key, value in again.items() if key not in ("pruned_seen", "reactivated", "generator")} == {
        key: value for key, value in state.items() if key not in ("pruned_seen", "reactivated", "generator")}
    train(model, optimizer, pruner, 2, start=6)  # still attached: trains and updates at step 8
    assert pruner.step_count == 8 and len(pruner.history) == 3


def test_recollect_refuses_a_stale_optimizer_and_algorithms_whose_state_cannot_follow():
    model, optimizer, pruner = rigl(3)
    train(model, optimizer, pruner, 3)
    narrow_fc1(model)
    with pytest.raises(ValueError, match=r"does not hold fc1.weight; build it after the modules were replaced"):
        pruner.recollect(optimizer)
    # IMP's rewind point holds every parameter of the old layers: it refuses, the pruner unchanged.
    model, optimizer, imp = build("imp", 4, sparsity=0.5, total_steps=40)
    train(model, optimizer, imp, 3)
    layers = dict(imp.layers)
    narrow_fc1(model)
    with pytest.raises(RuntimeError, match=r"IMP: cannot recollect layers .*rewind_point"):
        imp.recollect()
    assert imp.layers == layers


def run_with_a_narrowing(stop, data):
    """RigL for 24 steps with fc1 narrowed after step 10 (new optimizer), stopped after `stop`."""
    model, optimizer, pruner = rigl(5)
    train(model, optimizer, pruner, min(stop, 10), data=data)
    if stop > 10:
        narrow_fc1(model)
        optimizer = optimizer_for(model)
        pruner.recollect(optimizer)
        train(model, optimizer, pruner, stop - 10, start=10, data=data)
    return model, optimizer, pruner


def test_resume_after_recollect_is_bit_identical():
    data = tiny_data(6)
    expected, _, expected_pruner = run_with_a_narrowing(24, data)
    # Stopped at step 17, after the narrowing: the resumed run builds the narrowed architecture.
    model, optimizer, pruner = run_with_a_narrowing(17, data)
    saved = checkpoint(model, optimizer, pruner)
    resumed = tiny_model(5)
    narrow_fc1(resumed)
    resumed_pruner = pruning.create("rigl", resumed, sparsity=0.8, total_steps=80, update_every=4)
    resumed_optimizer = optimizer_for(resumed)
    resumed_pruner.attach(resumed_optimizer)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_pruner.load_state_dict(saved["pruner"])
    train(resumed, resumed_optimizer, resumed_pruner, 7, start=17, data=data)
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected.state_dict()[name]), name
    assert resumed_pruner.report().flip_rates == expected_pruner.report().flip_rates


def test_drop_and_grow_installs_exactly_what_the_whole_mask_installation_does():
    """The O(changes) installation of RigL's masks against apply_masks on copies of the same
    masks (compared as whole masks), from the same state, also when pruned weights were set
    nonzero behind the optimizer's back."""
    data = tiny_data(7)
    runs = []
    for whole_masks in (False, True):
        model, optimizer, pruner = rigl(6)
        if whole_masks:
            original = pruner.drop_and_grow
            pruner.drop_and_grow = lambda *args: original(*args).clone()  # another tensor: compared in full

        def stray(step, model=model, pruner=pruner):
            if step == 8:
                with torch.no_grad():
                    pruner.layers["fc1"].weight.masked_fill_(~pruner.layers["fc1"].mask, 0.5)

        train(model, optimizer, pruner, 20, data=data, before_step=stray)
        runs.append((model, optimizer, pruner))
    (model, optimizer, pruner), (model2, optimizer2, pruner2) = runs
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, model2.state_dict()[name]), name
    for param, param2 in zip(model.parameters(), model2.parameters()):
        for key, value in optimizer.state[param].items():
            assert torch.equal(value, optimizer2.state[param2][key])
    state, state2 = pruner.state_dict(), pruner2.state_dict()
    assert state["history"] == state2["history"]
    for key in ("pruned_seen", "reactivated"):
        assert all(torch.equal(state[key][name], state2[key][name]) for name in state[key])
    assert bool((pruner.layers["fc1"].weight[~pruner.layers["fc1"].mask] == 0).all())
    assert pruner.report().reactivated_fraction > 0  # the statistics were exercised


def test_drop_and_grow_refuses_structured_layers():
    model = tiny_model(8)
    dynasparse.sparsify(model, 0.5, layout="2:4", include=["fc1"])
    pruner = pruning.create("rigl", model, sparsity=0.5, total_steps=10, distribution="uniform")
    with pytest.raises(ValueError, match=r"drop_and_grow: fc1 is selected by 2:4 units"):
        pruner.drop_and_grow("fc1", 1, torch.zeros_like(model.fc1.weight))
