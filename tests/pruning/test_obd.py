"""OBD and OBD-SD: the kept weights against float64 references of their saliencies (a hand-built
Hessian, and per-example gradients one backward at a time), the aggregators, masks at the
target sparsity including 0 and near 1, rounds of prune -> retrain, the registry, resume and
the refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynasparse import optim, pruning
from dynasparse.pruning import obd, saliency
from tests.pruning.tiny import batch, checkpoint, global_topk_reference, masks_of, tiny_data, tiny_model, train

PRUNED = ["conv", "fc1", "fc2", "out"]


def _hand_built():
    # One weight per feature, example n = s_n e_n with target w_n s_n - 1/sqrt(2): the mean
    # squared error is L = (1/3) sum_k (w_k s_k - t_k)**2, so h_kk = 2 s_k**2 / 3, and with
    # every residual +-1/sqrt(2) the empirical Fisher (1/3) (2 r_k s_k)**2 is the same. The
    # saliency s_k**2 w_k**2 / 3: feature 0 has the largest weight but the least saliency.
    model = nn.Sequential(nn.Linear(3, 1, bias=False))
    weight = torch.tensor([2.0, 0.5, 1.0])
    with torch.no_grad():
        model[0].weight.copy_(weight[None])
    scales = torch.tensor([0.1, 3.0, 1.0])
    targets = (weight * scales - 0.5 ** 0.5)[:, None]
    return model, [(torch.diag(scales), targets)], (scales * weight).square() / 3


@pytest.mark.parametrize("estimator", ["exact", "hutchinson", "fisher"])
def test_obd_prunes_the_least_salient_weight_of_a_hand_built_hessian(estimator):
    model, batches, expected = _hand_built()
    estimate = saliency.hessian_diagonal(model, batches, estimator, loss=F.mse_loss)
    torch.testing.assert_close(saliency.obd_saliency(model, estimate)["0.weight"][0], expected, rtol=1e-5, atol=0)
    magnitude = pruning.create("oneshot", copy.deepcopy(model), sparsity=1 / 3)
    magnitude.initialize()
    assert magnitude.layers["0"].mask.tolist() == [[True, False, True]]  # magnitude prunes the 0.5
    pruner = pruning.create("obd", model, sparsity=1 / 3, estimator=estimator, loss=F.mse_loss)
    pruner.calibrate(batches)
    assert pruner.layers["0"].mask.tolist() == [[False, True, True]]
    assert model[0].weight.tolist() == [[0.0, 0.5, 1.0]]


def _fisher_saliency_per_batch(model, batches):
    """OBD saliencies of the PRUNED layers per batch, float64, one backward per example."""
    reference = copy.deepcopy(model).double()
    per_batch = []
    for inputs, targets in batches:
        squares = {name: 0 for name in PRUNED}
        for x, y in zip(inputs, targets):
            reference.zero_grad()
            F.cross_entropy(reference(x[None].double()), y[None]).backward()
            for name in PRUNED:
                squares[name] = squares[name] + reference.get_submodule(name).weight.grad.square()
        per_batch.append([squares[name] / len(inputs) * reference.get_submodule(name).weight.detach().square() / 2
                          for name in PRUNED])
    return per_batch


def _assert_top_k(pruner, scores, keep):
    ours = torch.cat([pruner.layers[name].mask.flatten() for name in PRUNED])
    assert int(ours.sum()) == keep
    flat = torch.cat([s.flatten() for s in scores])
    expected = torch.cat([m.flatten() for m in global_topk_reference(scores, keep)])
    disagree = ours != expected
    threshold = torch.sort(flat, descending=True).values[keep - 1] if keep else 0.0
    # float32 and float64 saliencies may order differently only at the threshold
    assert bool(((flat[disagree] - threshold).abs() <= 1e-4 * abs(float(threshold)) + 1e-12).all())


@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.95, 0.999])
def test_obd_keeps_the_global_top_k_of_the_fisher_saliency(sparsity):
    model = tiny_model(1)
    batches = [batch(0, tiny_data(2), 16), batch(1, tiny_data(2), 16), batch(2, tiny_data(2), 5)]
    per_batch = _fisher_saliency_per_batch(model, batches)
    pruner = pruning.create("obd", model, sparsity=sparsity)
    pruner.calibrate(batches)
    total = sum(pruner.layers[name].mask.numel() for name in PRUNED)
    keep = round(total * (1 - sparsity))
    # OBD: the saliency of the mean loss, i.e. batches weighted by their examples
    mean = [sum(len(b[1]) * s[i] for b, s in zip(batches, per_batch)) / 37 for i in range(len(PRUNED))]
    _assert_top_k(pruner, mean, keep)
    for layer in pruner.layers.values():
        assert layer.grad_mode == "masked" and bool((layer.weight[~layer.mask] == 0).all())
    assert pruner.calibration is None  # one-shot: the batches are not kept


def test_obd_sd_ranks_by_mean_minus_std_over_batches():
    model = tiny_model(3)
    batches = [batch(i, tiny_data(4), 12) for i in range(4)]
    per_batch = _fisher_saliency_per_batch(model, batches)
    pruner = pruning.create("obd_sd", model, sparsity=0.8)
    pruner.calibrate(batches)
    scores = []
    for i in range(len(PRUNED)):
        stacked = torch.stack([s[i] for s in per_batch])
        scores.append(stacked.mean(0) - stacked.std(0))
    total = sum(pruner.layers[name].mask.numel() for name in PRUNED)
    _assert_top_k(pruner, scores, round(total * 0.2))
    assert pruner.report().notes["aggregator"] == "mean-std"


def test_obd_sd_takes_a_callable_aggregator_and_kappa():
    model = tiny_model(5)
    batches = [batch(i, tiny_data(6), 10) for i in range(3)]
    per_batch = _fisher_saliency_per_batch(model, batches)

    def largest(samples):
        return samples.max(0).values

    pruner = pruning.create("obd_sd", copy.deepcopy(model), sparsity=0.7, aggregator=largest)
    pruner.calibrate(batches)
    total = sum(pruner.layers[name].mask.numel() for name in PRUNED)
    _assert_top_k(pruner, [torch.stack([s[i] for s in per_batch]).max(0).values for i in range(len(PRUNED))],
                  round(total * 0.3))
    assert pruner.report().notes["aggregator"] == "largest"
    heavy = pruning.create("obd_sd", copy.deepcopy(model), sparsity=0.7, kappa=2.5)
    heavy.calibrate(batches)
    scores = []
    for i in range(len(PRUNED)):
        stacked = torch.stack([s[i] for s in per_batch])
        scores.append(stacked.mean(0) - 2.5 * stacked.std(0))
    _assert_top_k(heavy, scores, round(total * 0.3))


def test_aggregate_by_name_and_its_refusals():
    samples = torch.tensor([[1.0, 2.0, 0.0], [3.0, 6.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64)
    std = torch.tensor([1.0, (((2 - 3) ** 2 + (6 - 3) ** 2 + (1 - 3) ** 2) / 2) ** 0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(obd.aggregate(samples, "mean-std"), torch.tensor([2.0, 3.0, 0.0]).double() - std)
    torch.testing.assert_close(obd.aggregate(samples, "mean-std", kappa=0.5),
                               torch.tensor([2.0, 3.0, 0.0]).double() - 0.5 * std)
    torch.testing.assert_close(obd.aggregate(samples, "mean"), torch.tensor([2.0, 3.0, 0.0]).double())
    torch.testing.assert_close(obd.aggregate(samples, "median"), torch.tensor([2.0, 2.0, 0.0]).double())
    torch.testing.assert_close(obd.aggregate(samples, "min"), torch.tensor([1.0, 1.0, 0.0]).double())
    with pytest.raises(ValueError, match="needs at least 2 batches"):
        obd.aggregate(samples[:1], "mean-std")
    with pytest.raises(ValueError, match="aggregator must be a callable or one of"):
        obd.aggregate(samples, "max")
    with pytest.raises(ValueError, match="shaped like one batch"):
        obd.aggregate(samples, lambda s: s.sum())
    torch.testing.assert_close(obd.aggregate(samples, kappa=-1.0), torch.tensor([2.0, 3.0, 0.0]).double() + std)
    with pytest.raises(ValueError, match="kappa must be a number in"):
        obd.aggregate(samples, kappa=float("nan"))
    with pytest.raises(ValueError, match="B >= 1"):
        obd.aggregate(torch.zeros(0, 3))


def test_rounds_prune_to_the_schedule_and_never_revive():
    model = tiny_model(7)
    pruner = pruning.create("obd", model, sparsity=0.875, total_steps=30, rounds=3)  # round_steps 10
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(optimizer)
    assert not pruner.initialized
    pruner.calibrate([batch(0, tiny_data(8), 16), batch(1, tiny_data(8), 16)])
    total = sum(layer.mask.numel() for layer in pruner.layers.values())

    def kept():
        return sum(int(layer.mask.sum()) for layer in pruner.layers.values())

    assert kept() == round(total * 0.5)  # (1 - 0.875) ** (1 / 3) = 0.5 kept
    before = masks_of(pruner)
    train(model, optimizer, pruner, 10)
    assert kept() == round(total * 0.25) and pruner.calibration is not None
    assert all(bool((~before[n] & pruner.layers[n].mask).sum() == 0) for n in before)
    before = masks_of(pruner)
    train(model, optimizer, pruner, 10, start=10)
    assert kept() == round(total * 0.125) and pruner.calibration is None
    assert all(bool((~before[n] & pruner.layers[n].mask).sum() == 0) for n in before)
    final = masks_of(pruner)
    train(model, optimizer, pruner, 10, start=20)
    assert all(torch.equal(final[n], pruner.layers[n].mask) for n in final)
    assert pruner.report().notes == {"estimator": "fisher", "round": 3, "rounds": 3}


def test_rounds_resume_on_the_same_trajectory():
    def start():
        model = tiny_model(9)
        pruner = pruning.create("obd", model, sparsity=0.9, total_steps=24, rounds=2, estimator="hutchinson",
                                probes=4, seed=3)
        optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner.attach(optimizer)
        return model, optimizer, pruner

    model, optimizer, pruner = start()
    pruner.calibrate([batch(0, tiny_data(10), 8), batch(1, tiny_data(10), 8)])
    train(model, optimizer, pruner, 6)
    saved = checkpoint(model, optimizer, pruner)
    train(model, optimizer, pruner, 18, start=6)
    model2, optimizer2, pruner2 = start()
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    pruner2.load_state_dict(saved["pruner"])
    train(model2, optimizer2, pruner2, 18, start=6)
    for name in pruner.layers:
        assert torch.equal(pruner.layers[name].mask, pruner2.layers[name].mask)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_registry_and_the_refusals():
    assert "obd" in pruning.available() and "obd_sd" in pruning.available()
    assert pruning.describe("obd_sd")["kappa"][0] == 1.0
    assert pruning.describe("obd")["estimator"][0] == "fisher"
    with pytest.raises(TypeError, match="unknown option 'kappa'"):
        pruning.create("obd", tiny_model(), sparsity=0.5, kappa=1.0)
    with pytest.raises(ValueError, match="sparsity must be a number in"):
        pruning.create("obd", tiny_model(), sparsity=1.0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        pruning.create("obd", tiny_model(), sparsity=0.5, estimator="newton")
    with pytest.raises(ValueError, match="needs total_steps"):
        pruning.create("obd", tiny_model(), sparsity=0.5, rounds=2)
    with pytest.raises(ValueError, match="never be reached"):
        pruning.create("obd", tiny_model(), sparsity=0.5, total_steps=10, rounds=3, round_steps=5)
    with pytest.raises(ValueError, match="aggregator must be a callable or one of"):
        pruning.create("obd_sd", tiny_model(), sparsity=0.5, aggregator="max")
    pruner = pruning.create("obd_sd", tiny_model(), sparsity=0.5)
    with pytest.raises(ValueError, match="needs at least 2 calibration batches"):
        pruner.calibrate([batch(0, tiny_data(), 8)])
    with pytest.raises(TypeError, match="give the loss to the constructor"):
        pruner.calibrate([batch(0, tiny_data(), 8)] * 2, loss=F.cross_entropy)
    with pytest.raises(ValueError, match="batches is empty"):
        pruner.calibrate([])
    with pytest.raises(RuntimeError, match=r"call calibrate\(batches\)"):
        pruner.initialize()
    pruner.calibrate([batch(0, tiny_data(), 8), batch(1, tiny_data(), 8)])
    with pytest.raises(RuntimeError, match="already initialized"):
        pruner.calibrate([batch(0, tiny_data(), 8)] * 2)
