"""Sparse variational dropout as a pruning algorithm ("vd"): layer installation, the beta ramp,
the regularizer against the KL formula in float64, threshold mask refreshes and the sparsity
trajectory, finalize into plain sparse layers, resume."""

import copy
import math

import pytest
import torch
from torch import nn

from dynasparse import optim, pruning
from dynasparse.nn import SparseConv2d, SparseLinear, sparsify
from dynasparse.nn.variational import VDConv2d, VDLinear
from dynasparse.pruning.variational_dropout import VariationalDropout

from .tiny import batch, tiny_data, tiny_model

K1, K2, K3 = 0.63576, 1.87320, 1.48695


def build(total_steps=40, **options):
    model = tiny_model(0)
    pruner = pruning.create("vd", model, sparsity=0.0, total_steps=total_steps, **options)
    optimizer = optim.AdamW(model.parameters(), lr=0.02)
    pruner.attach(optimizer)
    return model, optimizer, pruner


def train(model, optimizer, pruner, steps, data=None):
    data = tiny_data() if data is None else data
    for step in range(steps):
        x, y = batch(pruner.step_count, data)
        optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + pruner.regularizer()).backward()
        optimizer.step()
        pruner.step()


def reference_kl(layers):
    total = 0.0
    for layer in layers:
        theta, log_sigma2 = layer.weight.detach().double(), layer.log_sigma2.detach().double()
        log_alpha = (log_sigma2 - 2 * torch.log(theta.abs() + 1e-8)).clamp(-10, 10)
        kl = K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * torch.log1p(torch.exp(-log_alpha))
        total += float(kl[layer.mask].sum())  # pruned weights: alpha infinite, KL 0
    return total


def test_create_installs_vd_layers_that_the_optimizer_trains():
    model, optimizer, pruner = build(exclude=["out"])
    assert "vd" in pruning.available()
    assert isinstance(model.conv, VDConv2d) and isinstance(model.fc1, VDLinear) and isinstance(model.fc2, VDLinear)
    assert type(model.out) is nn.Linear
    assert set(pruner.layers) == {"conv", "fc1", "fc2"}
    assert all(pruner.layers[name] is getattr(model, name) for name in pruner.layers)
    assert all(bool((layer.log_sigma2 == -10).all()) for layer in pruner.layers.values())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(layer.log_sigma2) in held for layer in pruner.layers.values())
    # The first mask is the threshold's: log_alpha < 3.
    for layer in pruner.layers.values():
        assert torch.equal(layer.mask, layer.log_alpha() < 3)


def test_beta_ramps_linearly_over_the_run():
    _, _, pruner = build(total_steps=41)
    assert pruner.beta_at(0) == 0.0
    assert pruner.beta_at(20) == pytest.approx(0.005)
    assert pruner.beta_at(40) == pytest.approx(0.01)
    assert pruner.beta_at(100) == pytest.approx(0.01)
    _, _, short = build(total_steps=41, beta=0.1, ramp_steps=11)
    assert short.beta_at(5) == pytest.approx(0.05) and short.beta_at(10) == pytest.approx(0.1)
    assert short.beta_at(30) == pytest.approx(0.1)


def test_regularizer_is_beta_times_the_kl_of_the_layers():
    model, optimizer, pruner = build(total_steps=21)
    assert float(pruner.regularizer().detach()) == 0.0  # beta is 0 at the first step
    train(model, optimizer, pruner, 7)
    value = pruner.regularizer()
    assert value.requires_grad
    expected = 0.01 * 7 / 20 * reference_kl(pruner.layers.values())
    assert math.isclose(float(value.detach()), expected, rel_tol=1e-5)


def test_mask_refresh_by_threshold_and_the_trajectory():
    model, optimizer, pruner = build(total_steps=80, update_every=8, beta=1.0, ramp_steps=2)
    seen = []

    def check(step, masks):
        seen.append(step)
        for name, layer in pruner.layers.items():
            assert torch.equal(masks[name], layer.log_alpha() < 3)
            assert bool((layer.weight[~masks[name]] == 0).all())  # masked: pruned weights zero

    pruner.on_update(check)
    train(model, optimizer, pruner, 24)
    assert seen == [8, 16, 24]
    steps = [step for step, _ in pruner.trajectory]
    assert steps == [0, 8, 16, 24]
    total = sum(layer.mask.numel() for layer in pruner.layers.values())
    kept = sum(int(layer.mask.sum()) for layer in pruner.layers.values())
    assert pruner.trajectory[-1][1] == pytest.approx(1 - kept / total)
    # A heavy KL weight prunes: the sparsity grows, and pruned weights do not return.
    assert pruner.trajectory[-1][1] > pruner.trajectory[0][1]
    assert pruner.report().reactivated_fraction == 0.0
    assert pruner.report_notes()["trajectory"] == pruner.trajectory


def test_finalize_gives_an_ordinary_sparse_model_with_the_eval_forward():
    model, optimizer, pruner = build(total_steps=30, update_every=8, beta=1.0, ramp_steps=2)
    train(model, optimizer, pruner, 12)  # the last update at step 8: the mask is stale by 4 steps
    x, _ = tiny_data(3)
    model.eval()
    with torch.no_grad():
        before = model(x)
    weights = {name: layer.weight for name, layer in pruner.layers.items()}
    report = pruner.finalize()
    assert pruner.trajectory[-1][0] == 12
    assert type(model.conv) is SparseConv2d and type(model.fc1) is SparseLinear and type(model.out) is SparseLinear
    assert all(pruner.layers[name] is getattr(model, name) for name in pruner.layers)
    assert all(pruner.layers[name].weight is weights[name] for name in weights)  # the optimizer's parameters
    assert report.sparsity == pytest.approx(pruner.trajectory[-1][1])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert pruner.regularizer() is None
    state = model.state_dict()
    assert not any(key.endswith("log_sigma2") for key in state)
    # The stored checkpoint loads into the plain architecture, sparsified.
    rebuilt = tiny_model(1)
    sparsify(rebuilt, 0.0, grad_mode="masked")
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), before, rtol=1e-5, atol=1e-6)
    # Fine-tuning after finalize trains the plain layers with the mask fixed.
    masks = {name: layer.mask.clone() for name, layer in pruner.layers.items()}
    model.train()
    for step in range(3):
        inputs, labels = batch(step, tiny_data())
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        pruner.step()
    for name, layer in pruner.layers.items():
        assert torch.equal(layer.mask, masks[name])
        assert bool((layer.weight[~masks[name]] == 0).all())
    assert not torch.equal(model.fc1.weight, rebuilt.fc1.weight)


def test_resume_restores_the_trajectory_and_follows_the_same_path():
    model, optimizer, pruner = build(total_steps=40, update_every=4, beta=0.5)
    train(model, optimizer, pruner, 6)
    # The noise of the training forward is drawn from torch's generator: its state is resumed too.
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "pruner": pruner.state_dict(), "rng": torch.get_rng_state()})
    train(model, optimizer, pruner, 6)

    model2, optimizer2, pruner2 = build(total_steps=40, update_every=4, beta=0.5)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    pruner2.load_state_dict(saved["pruner"])
    assert pruner2.trajectory == pruner.trajectory[:len(pruner2.trajectory)]
    torch.set_rng_state(saved["rng"])
    train(model2, optimizer2, pruner2, 6)
    assert pruner2.trajectory == pruner.trajectory
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_options_raise():
    with pytest.raises(ValueError, match="sparsity must be 0"):
        pruning.create("vd", tiny_model(), sparsity=0.5, total_steps=10)
    with pytest.raises(ValueError, match="total_steps is required"):
        pruning.create("vd", tiny_model(), sparsity=0.0)
    with pytest.raises(ValueError, match="beta"):
        pruning.create("vd", tiny_model(), sparsity=0.0, total_steps=10, beta=-1.0)
    with pytest.raises(ValueError, match="ramp_steps"):
        pruning.create("vd", tiny_model(), sparsity=0.0, total_steps=10, ramp_steps=0)
    with pytest.raises(ValueError, match="threshold"):
        pruning.create("vd", tiny_model(), sparsity=0.0, total_steps=10, threshold=float("inf"))
    with pytest.raises(TypeError, match="distribution"):
        pruning.create("vd", tiny_model(), sparsity=0.0, total_steps=10, distribution="erk")
    block = nn.Sequential(nn.Linear(32, 32))
    sparsify(block, 0.0, layout="block16")
    with pytest.raises(ValueError, match="unstructured"):
        VariationalDropout(block, 10)
