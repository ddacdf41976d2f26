"""Pruner invariants: exact sparsity, masks against a float64 top-|w| oracle, masked weights and
state stay zero, DPF feedback re-activates weights, statistics, finalize, resume bit-identical."""

import collections
import copy

import pytest
import torch
from torch import nn

import dynasparse
from dynasparse import optim, pruning
from dynasparse.nn import SparseConv2d, SparseLinear


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(collections.OrderedDict([
        ("conv1", nn.Conv2d(1, 4, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 6, 3, padding=1)), ("relu2", nn.ReLU()), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(6 * 5 * 5, 23)), ("relu3", nn.ReLU()), ("fc2", nn.Linear(23, 3))]))


def _data(seed=0, n=48):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _train(model, optimizer, pruner, steps, seed=0, start=0, on_step=None):
    x, y = _data(seed)
    for step in range(start, start + steps):
        index = torch.arange(step * 8, step * 8 + 8) % len(y)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
        pruner.step()
        if on_step is not None:
            on_step(step + 1)


def _oracle_global_mask(weights, sparsity):
    """Top-|w| over all layers by a float64 stable sort (random weights have no ties)."""
    flat = torch.cat([w.detach().double().abs().flatten() for w in weights])
    keep = round(flat.numel() * (1 - sparsity))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(flat, descending=True, stable=True)[:keep]] = True
    return list(torch.split(chosen, [w.numel() for w in weights]))


def _active(pruner):
    return sum(int(layer.mask.sum()) for layer in pruner.layers.values())


def _numel(pruner):
    return sum(layer.mask.numel() for layer in pruner.layers.values())


def test_dpf_follows_the_ramp_with_oracle_masks_and_reactivates():
    model = _model()
    steps, target = 48, 0.9
    pruner = pruning.DPF(model, target, steps, ramp_end=0.5, update_every=4, exclude=["conv1", "fc2"])
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(model.conv1, SparseConv2d)
    assert isinstance(model.conv2, SparseConv2d) and isinstance(model.fc1, SparseLinear)
    assert list(pruner.layers) == ["conv2", "fc1"] and _active(pruner) == _numel(pruner)  # ramp starts at 0
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    pruner.attach(optimizer)
    ramp = pruning.Cubic(target, end=24)
    checked = []

    def check(step):
        if step % 4 == 0:
            weights = [layer.weight for layer in pruner.layers.values()]
            assert pruner.target == pytest.approx(ramp(step))
            for layer, expected in zip(pruner.layers.values(), _oracle_global_mask(weights, ramp(step))):
                assert torch.equal(layer.mask.flatten(), expected)
            assert _active(pruner) == round(_numel(pruner) * (1 - ramp(step)))
            checked.append(step)

    _train(model, optimizer, pruner, steps, on_step=check)
    assert checked == list(range(4, steps + 1, 4))
    report = pruner.report()
    assert report.sparsity == pytest.approx(1 - round(_numel(pruner) * 0.1) / _numel(pruner))
    assert report.reactivated_fraction > 0  # feedback: pruned weights came back
    # feedback mode: the dense weights keep values at pruned positions
    assert any(bool((layer.weight[~layer.mask] != 0).any()) for layer in pruner.layers.values())
    assert len(report.flip_rates) == 1 + steps // 4
    pruner.finalize()
    for layer in pruner.layers.values():
        assert bool((layer.weight[~layer.mask] == 0).all()) and layer.grad_mode == "masked"
        assert optimizer.mask(layer.weight)[1] == "masked"
    masks = [layer.mask.clone() for layer in pruner.layers.values()]
    _train(model, optimizer, pruner, 16, start=steps)  # fine-tuning: fixed mask, zeros stay
    for layer, mask in zip(pruner.layers.values(), masks):
        assert torch.equal(layer.mask, mask) and bool((layer.weight[~mask] == 0).all())


def test_gradual_magnitude_masked_monotone_exact():
    model = _model(1)
    steps = 64
    pruner = pruning.GradualMagnitude(model, 0.8, steps, start=0.25, end=0.75, update_every=4,
                                      exclude=["conv1", "fc2"])
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    pruner.attach(optimizer)
    previous = {name: layer.mask.clone() for name, layer in pruner.layers.items()}

    def check(step):
        for name, layer in pruner.layers.items():
            assert not bool((layer.mask & ~previous[name]).any())  # never regrows
            assert bool((layer.weight[~layer.mask] == 0).all())
            buffer = optimizer.state[layer.weight].get("momentum_buffer")
            assert buffer is None or bool((buffer[~layer.mask] == 0).all())
            previous[name] = layer.mask.clone()
        if step <= 16:
            assert _active(pruner) == _numel(pruner)
        expected = pruning.Cubic(0.8, end=48, start=16)(min(step - step % 4, 48))
        assert _active(pruner) == round(_numel(pruner) * (1 - expected))

    _train(model, optimizer, pruner, steps, on_step=check)
    assert pruner.report().reactivated_fraction == 0.0
    assert pruner.history[-1]["step"] == 48  # fixed after the ramp


def test_one_shot_prunes_the_smallest_and_fine_tunes_masked():
    model = _model(2)
    before = [copy.deepcopy(model.conv2.weight.detach()), copy.deepcopy(model.fc1.weight.detach())]
    pruner = pruning.OneShotMagnitude(model, 0.75, exclude=["conv1", "fc2"])
    assert _active(pruner) == _numel(pruner)  # construction changes no mask
    pruner.initialize()
    for layer, expected in zip(pruner.layers.values(), _oracle_global_mask(before, 0.75)):
        assert torch.equal(layer.mask.flatten(), expected)
        assert bool((layer.weight[~layer.mask] == 0).all())
    assert pruner.report().flip_rates == [(0, pytest.approx(1 - _active(pruner) / _numel(pruner)))]
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(optimizer)
    masks = [layer.mask.clone() for layer in pruner.layers.values()]
    _train(model, optimizer, pruner, 20)
    for layer, mask in zip(pruner.layers.values(), masks):
        assert torch.equal(layer.mask, mask) and bool((layer.weight[~mask] == 0).all())
    assert len(pruner.history) == 1


def test_random_pruning_is_exact_seeded_and_masked():
    def masks_for(seed):
        model = _model(3)
        pruner = pruning.RandomPruning(model, pruning.Linear(0.6, end=20), update_every=5, seed=seed,
                                       distribution="uniform")
        optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner.attach(optimizer)
        _train(model, optimizer, pruner, 20)
        for layer in pruner.layers.values():
            assert int(layer.mask.sum()) == round(layer.mask.numel() * 0.4)
            assert bool((layer.weight[~layer.mask] == 0).all())
        assert pruner.report().reactivated_fraction == 0.0
        return [layer.mask.clone() for layer in pruner.layers.values()]

    first, again, other = masks_for(5), masks_for(5), masks_for(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


class _RegrowingPruner(pruning.Pruner):
    """Fresh random scores over all weights in masked mode: weights regrow at every update."""

    def scores(self, name, layer):
        return torch.rand(layer.weight.shape, generator=self.generator)


def test_masked_regrowth_zeroes_weights_and_optimizer_state_and_counts_flips():
    model = _model(4)
    pruner = _RegrowingPruner(model, 0.5, update_every=5, distribution="erk", include=["conv2", "fc1"])
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(optimizer)
    _train(model, optimizer, pruner, 4)
    old = {name: layer.mask.clone() for name, layer in pruner.layers.items()}
    momentum = {name: optimizer.state[layer.weight]["momentum_buffer"].clone() for name, layer in pruner.layers.items()}
    _train(model, optimizer, pruner, 1, start=4)  # step 5: an update
    flips = total = 0
    for name, layer in pruner.layers.items():
        grown = layer.mask & ~old[name]
        assert bool(grown.any())
        assert bool((layer.weight[grown] == 0).all())
        assert bool((optimizer.state[layer.weight]["momentum_buffer"][grown] == 0).all())
        kept = layer.mask & old[name]
        assert bool((optimizer.state[layer.weight]["momentum_buffer"][kept] != momentum[name][kept]).any())
        layer_flips = int((layer.mask != old[name]).sum())
        assert pruner.history[-1]["layers"][name] == pytest.approx(layer_flips / layer.mask.numel())
        flips, total = flips + layer_flips, total + layer.mask.numel()
    assert pruner.history[-1]["flip_rate"] == pytest.approx(flips / total)
    assert pruner.report().reactivated_fraction > 0


def test_row_granularity_prunes_whole_filters():
    model = _model(5)
    pruner = pruning.OneShotMagnitude(model, 0.5, include=["conv2", "fc1"], granularity="row",
                                      distribution="uniform")
    pruner.initialize()
    for layer in pruner.layers.values():
        rows = layer.mask.reshape(layer.mask.shape[0], -1)
        assert bool((rows.all(1) | ~rows.any(1)).all())  # whole rows
        assert int(rows.all(1).sum()) == round(rows.shape[0] * 0.5)
        norms = layer.weight.detach().reshape(rows.shape[0], -1).double().norm(dim=1)
        assert norms[rows.all(1)].min() >= norms[~rows.all(1)].max()


def test_report_table_and_errors():
    model = _model(6)
    pruner = pruning.OneShotMagnitude(model, 0.9, exclude=["conv1", "fc2"])
    pruner.initialize()
    text = str(pruner.report())
    assert "conv2" in text and "fc1" in text and "total (prunable)" in text
    dense = model.conv1.weight.numel() + model.fc2.weight.numel()
    assert pruner.report().dense_weights == dense
    with pytest.raises(TypeError, match="masked mode needs dynasparse.optim"):
        pruner.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    stale = _model(7)
    optimizer = optim.SGD(stale.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="build it after the pruner"):
        pruning.DPF(stale, 0.9, 100, optimizer=optimizer)
    with pytest.raises(ValueError, match="no prunable layer"):
        pruning.DPF(_model(), 0.9, 100, include=["nothing*"])
    with pytest.raises(ValueError, match="unknown distribution"):
        pruning.DPF(_model(), 0.9, 100, distribution="lognormal")


def _resumable(kind):
    model = _model(8)
    if kind == "dpf":
        pruner = pruning.DPF(model, 0.85, 60, ramp_end=0.5, update_every=6, exclude=["conv1"])
        optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        pruner = pruning.RandomPruning(model, pruning.Cubic(0.7, end=40), update_every=6, seed=3)
        optimizer = optim.AdamW(model.parameters(), lr=1e-2)
    pruner.attach(optimizer)
    return model, optimizer, pruner


@pytest.mark.parametrize("kind", ["dpf", "random"])
def test_resume_is_bit_identical(kind, tmp_path):
    model, optimizer, pruner = _resumable(kind)
    _train(model, optimizer, pruner, 60)
    expected = model.state_dict()

    model, optimizer, pruner = _resumable(kind)
    _train(model, optimizer, pruner, 27)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=False)
    model, optimizer, pruner = _resumable(kind)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    pruner.load_state_dict(checkpoint["pruner"])
    _train(model, optimizer, pruner, 33, start=27)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_feedback_runs_with_a_torch_optimizer():
    model = _model(9)
    pruner = pruning.DPF(model, 0.5, 12, update_every=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner.attach(optimizer)  # feedback needs no masking from the optimizer
    _train(model, optimizer, pruner, 12)
    assert pruner.report().sparsity == pytest.approx(1 - round(_numel(pruner) * 0.5) / _numel(pruner))
    assert dynasparse.densify(model) == ["conv1", "conv2", "fc1", "fc2"]


@pytest.mark.parametrize("optimizer_cls", [optim.SGD, optim.AdamW])
def test_sparse_layers_compute_with_the_weights_after_every_step(optimizer_cls):
    """The sparse layers cache packed weights by version counter: the fused optimizer steps
    must move it, or training between mask updates would run on stale weights."""
    model = _model(10)
    pruner = pruning.OneShotMagnitude(model, 0.7)
    optimizer = optimizer_cls(model.parameters(), lr=0.05)
    pruner.attach(optimizer)
    x, y = _data(1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        with torch.no_grad():
            h = torch.relu(nn.functional.conv2d(x, model.conv1.weight * model.conv1.mask, model.conv1.bias, padding=1))
            h = torch.relu(nn.functional.conv2d(h, model.conv2.weight * model.conv2.mask, model.conv2.bias, padding=1))
            h = torch.relu(nn.functional.linear(h.flatten(1), model.fc1.weight * model.fc1.mask, model.fc1.bias))
            expected = nn.functional.linear(h, model.fc2.weight * model.fc2.mask, model.fc2.bias)
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def _layout_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(collections.OrderedDict([
        ("fc1", nn.Linear(96, 64)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(64, 48)), ("relu2", nn.ReLU()),
        ("conv", nn.Conv2d(16, 32, 2)), ("fc3", nn.Linear(48, 32))]))


def _block_rms(weight_2d, block):
    """Root mean square |w| of every block, float64."""
    n, k = weight_2d.shape
    tiles = weight_2d.detach().double().reshape(n // block, block, k // block, block)
    return tiles.square().mean((1, 3)).sqrt()


def _whole_blocks(mask_2d, block):
    n, k = mask_2d.shape
    tiles = mask_2d.reshape(n // block, block, k // block, block)
    kept = tiles.all(3).all(1)
    assert torch.equal(kept, tiles.any(3).any(1)), "a block is partly kept"
    return kept


@pytest.mark.parametrize("distribution", ["uniform", "global", "erk"])
def test_pruners_select_whole_blocks_on_block_layers(distribution):
    model = _layout_model(11)
    dynasparse.sparsify(model, 0.0, layout="block16", exclude=["fc3"])
    pruner = pruning.OneShotMagnitude(model, 0.9, distribution=distribution)
    pruner.initialize()
    blocks = {}
    for name in ("fc1", "fc2", "conv"):
        layer = model.get_submodule(name)
        weight_2d = layer.weight.reshape(layer.weight.shape[0], -1)
        kept = _whole_blocks(layer.mask.reshape(weight_2d.shape), 16)
        rms = _block_rms(weight_2d, 16)
        if kept.any() and (~kept).any():
            assert rms[kept].min() >= rms[~kept].max()  # the largest blocks of the layer
        blocks[name] = (kept, rms)
        if distribution == "uniform":
            assert int(kept.sum()) == round(kept.numel() * 0.1)
    total = sum(layer.mask.numel() for layer in pruner.layers.values())
    active = sum(int(layer.mask.sum()) for layer in pruner.layers.values())
    # whole blocks: each block layer within half a block of its share of the exact count
    assert abs(active - round(total * 0.1)) <= 3 * 16 * 16 / 2
    if distribution == "global":
        # one threshold over the blocks' RMS and the unstructured layer's |w|
        kept_scores = torch.cat([rms[kept] for kept, rms in blocks.values()] +
                                [model.fc3.weight.detach().double().abs()[model.fc3.mask]])
        dropped_scores = torch.cat([rms[~kept] for kept, rms in blocks.values()] +
                                   [model.fc3.weight.detach().double().abs()[~model.fc3.mask]])
        assert kept_scores.min() >= dropped_scores.max() - 1e-6
    if distribution == "uniform":
        fresh = _layout_model(11)
        dynasparse.sparsify(fresh, 0.9, layout="block16", exclude=["fc3"])
        for name in ("fc1", "fc2", "conv"):
            assert torch.equal(model.get_submodule(name).mask, fresh.get_submodule(name).mask)


def _check_2_4(layer, expected_active):
    weight_2d = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
    mask_2d = layer.mask.reshape(weight_2d.shape)
    groups = mask_2d.reshape(mask_2d.shape[0], -1, 4)
    assert int(groups.sum(-1).max()) <= 2
    assert int(mask_2d.sum()) == expected_active
    # oracle: the largest |w| among the 2 largest of each group of 4 (float64 stable sort)
    magnitude = weight_2d.abs().reshape(groups.shape)
    top2 = torch.zeros_like(groups)
    top2.scatter_(-1, torch.argsort(magnitude, dim=-1, descending=True, stable=True)[..., :2], True)
    candidates = magnitude[top2]
    expected = torch.zeros(candidates.numel(), dtype=torch.bool)
    expected[torch.argsort(candidates, descending=True, stable=True)[:expected_active]] = True
    assert torch.equal(groups[top2], expected)


def test_dpf_on_2_4_layers_prunes_within_the_groups_and_reports_the_cap():
    model = _layout_model(12)
    dynasparse.sparsify(model, 0.5, layout="2:4", include=["fc1", "fc2"])
    steps = 40
    pruner = pruning.DPF(model, 0.9, steps, ramp_end=0.5, update_every=4, distribution="uniform",
                         include=["fc1", "fc2"])
    pruner.initialize()
    for layer in pruner.layers.values():  # ramp at 0: the layers stay at their 50%
        _check_2_4(layer, layer.mask.numel() // 2)
    assert "stay at sparsity 0.5 or more where the target is 0.0000" in str(pruner.report())
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(optimizer)
    x = torch.randn(16, 96)

    for step in range(1, steps + 1):
        optimizer.zero_grad()
        model.fc2(model.relu1(model.fc1(x))).square().mean().backward()
        optimizer.step()
        pruner.step()
        if step % 4 == 0:
            for layer in pruner.layers.values():
                _check_2_4(layer, min(round(layer.mask.numel() * (1 - pruner.target)), layer.mask.numel() // 2))
    assert pruner.target == 0.9 and "stay at sparsity" not in str(pruner.report())
    assert "2:4" in str(pruner.report())


def test_global_selection_on_2_4_layers_moves_the_capped_share_elsewhere():
    model = _layout_model(13)
    dynasparse.sparsify(model, 0.5, layout="2:4", include=["fc1"])
    pruner = pruning.OneShotMagnitude(model, 0.3, include=["fc1", "fc2", "fc3"])
    pruner.initialize()
    total = sum(layer.mask.numel() for layer in pruner.layers.values())
    assert sum(int(layer.mask.sum()) for layer in pruner.layers.values()) == round(total * 0.7)
    groups = model.fc1.mask.reshape(model.fc1.mask.shape[0], -1, 4)
    assert int(groups.sum(-1).max()) <= 2


def test_gradual_row_pruning_never_revives_a_row():
    model = _model(14)
    pruner = pruning.GradualMagnitude(model, 0.6, 40, update_every=4, granularity="row", distribution="uniform",
                                      include=["conv2", "fc1"])
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(optimizer)
    previous = {name: layer.mask.clone() for name, layer in pruner.layers.items()}

    def check(step):
        for name, layer in pruner.layers.items():
            assert not bool((layer.mask & ~previous[name]).any()), (name, step)
            previous[name] = layer.mask.clone()

    _train(model, optimizer, pruner, 40, on_step=check)
    assert all(int(layer.mask.reshape(layer.mask.shape[0], -1).all(1).sum()) == round(layer.mask.shape[0] * 0.4)
               for layer in pruner.layers.values())


def test_row_granularity_refuses_structured_layouts():
    model = _layout_model(15)
    dynasparse.sparsify(model, 0.0, layout="block16", include=["fc1"])
    with pytest.raises(ValueError, match=r"granularity='row' needs unstructured layers.*fc1 \(block16\)"):
        pruning.OneShotMagnitude(model, 0.5, granularity="row")


@pytest.mark.parametrize("build,error,message", [
    (lambda m: pruning.DPF(m, 0.9, -5), ValueError, "DPF: total_steps must be >= 1, got -5"),
    (lambda m: pruning.DPF(m, 0.9, 0), ValueError, "total_steps must be >= 1"),
    (lambda m: pruning.DPF(m, 0.9, 10.5), TypeError, "total_steps must be an int"),
    (lambda m: pruning.DPF(m, 0.9, True), TypeError, "total_steps must be an int"),
    (lambda m: pruning.DPF(m, 1.2, 100), ValueError, r"sparsity must be a number in \[0, 1\)"),
    (lambda m: pruning.DPF(m, float("nan"), 100), ValueError, "sparsity must be a number"),
    (lambda m: pruning.DPF(m, "0.9", 100), TypeError, "sparsity must be a number"),
    (lambda m: pruning.DPF(m, 0.9, 100, ramp_end=float("nan")), ValueError, "ramp_end"),
    (lambda m: pruning.DPF(m, 0.9, 100, ramp_end="end"), TypeError, "ramp_end"),
    (lambda m: pruning.DPF(m, 0.9, 100, update_every=0), ValueError, "update_every must be >= 1"),
    (lambda m: pruning.DPF(m, 0.9, 100, update_every=2.0), TypeError, "update_every must be an int"),
    (lambda m: pruning.DPF(m, 0.9, 100, update_until=-1), ValueError, "update_until must be >= 0"),
    (lambda m: pruning.DPF(m, 0.9, 100, seed=-1), ValueError, "seed must be in"),
    (lambda m: pruning.DPF(m, 0.9, 100, seed=2**64), ValueError, "seed must be in"),
    (lambda m: pruning.DPF(m, 0.9, 100, exclude=5), TypeError, "exclude must be"),
    (lambda m: pruning.DPF(m, 0.9, 100, granularity="block"), ValueError, "granularity must be one of"),
    (lambda m: pruning.DPF("model", 0.9, 100), TypeError, "model must be an nn.Module"),
    (lambda m: pruning.GradualMagnitude(m, 0.9, -1), ValueError, "GradualMagnitude: total_steps must be >= 1"),
    (lambda m: pruning.GradualMagnitude(m, 0.9, 100, start=-0.5), ValueError, "start"),
    (lambda m: pruning.GradualMagnitude(m, 0.9, 100, start=0.5, end=0.5), ValueError, "start < end"),
    (lambda m: pruning.GradualMagnitude(m, 0.9, 100, end=float("nan")), ValueError, "end"),
    (lambda m: pruning.GradualMagnitude(m, -0.1, 100), ValueError, "sparsity"),
    (lambda m: pruning.OneShotMagnitude(m, 1.0), ValueError,
     r"OneShotMagnitude: sparsity must be a number in \[0, 1\)"),
    (lambda m: pruning.OneShotMagnitude(m, None), TypeError, "sparsity must be a number"),
    (lambda m: pruning.RandomPruning(m, 1.5), ValueError, r"in \[0, 1\)"),
    (lambda m: pruning.RandomPruning(m, lambda step: 1.5), ValueError, "returned 1.5 at step 0"),
])
def test_pruner_arguments_are_checked_before_the_model_changes(build, error, message):
    model = _model(16)
    with pytest.raises(error, match=message):
        build(model)
    assert not any(isinstance(module, (SparseLinear, SparseConv2d)) for module in model.modules())


@pytest.mark.parametrize("bad", [1.5, float("nan"), -0.25, None, "0.9"])
def test_a_bad_schedule_value_names_the_schedule_and_the_step(bad):
    def schedule(step):
        return 0.5 if step < 8 else bad

    model = _model(17)
    pruner = pruning.RandomPruning(model, schedule, update_every=4)
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    pruner.attach(optimizer)
    masks = [layer.mask.clone() for layer in pruner.layers.values()]
    _train(model, optimizer, pruner, 7)
    with pytest.raises((ValueError, TypeError), match=r"schedule <function .*schedule.* returned .* at step 8"):
        _train(model, optimizer, pruner, 1, start=7)
    for layer, mask in zip(pruner.layers.values(), masks):  # the masks of step 4 stay
        assert int(layer.mask.sum()) == int(mask.sum())


def test_transposed_layers_are_pruned_in_the_layout_of_the_matrix_their_kernels_see():
    """GPT-2's Conv1D stores [in, out]: its 2:4 groups run along `in` (the kernels' K), which is
    the stored weight's first dimension."""
    from dynasparse.nn.modules import SparseTransposedLinear

    torch.manual_seed(18)
    model = nn.Sequential(SparseTransposedLinear(64, 32, layout="2:4"),
                          SparseTransposedLinear(32, 48, layout="block16"))
    pruning.OneShotMagnitude(model, 0.8, distribution="uniform").initialize()
    nm, block = model
    groups = nm.mask.T.reshape(32, -1, 4)
    assert int(groups.sum(-1).max()) <= 2 and int(nm.mask.sum()) == round(nm.mask.numel() * 0.2)
    kept = _whole_blocks(block.mask.T, 16)
    assert int(kept.sum()) == round(kept.numel() * 0.2)
    rms = _block_rms(block.weight.T, 16)
    assert rms[kept].min() >= rms[~kept].max()
    x = torch.randn(3, 64)
    hidden = x.double() @ _masked(nm).double() + nm.bias.double()
    expected = hidden @ _masked(block).double() + block.bias.double()
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def _masked(layer):
    return torch.where(layer.mask, layer.weight, 0)
