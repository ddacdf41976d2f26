"""Saliency estimators against independent float64 references: the exact Hessian diagonal
against a closed form and against double backward, the empirical Fisher against one backward
per example, the model-label Fisher against the Gauss-Newton diagonal (and the Hessian where
the model is linear in its parameters), Hutchinson against the exact diagonal within its own
standard error (checked against the exact probe variance); per-batch samples, chunking, sparse
layers, and the refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynasparse
from dynasparse.pruning import saliency


def _mlp(seed: int, sizes=(5, 7, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).double()


def _batches(seed: int, sizes, features=5, classes=3):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=generator, dtype=torch.float64),
             torch.randint(0, classes, (n,), generator=generator)) for n in sizes]


def _flat_params(model, names):
    return torch.cat([dict(model.named_parameters())[name].detach().reshape(-1) for name in names])


def _loss_of_flat(model, names, inputs, targets, loss=F.cross_entropy):
    """The mean loss as a function of the flattened chosen parameters (plain autograd)."""
    shapes = [dict(model.named_parameters())[name].shape for name in names]
    sizes = [s.numel() for s in shapes]

    def function(vector):
        parts = {name: part.reshape(shape) for name, part, shape in zip(names, vector.split(sizes), shapes)}
        return loss(torch.func.functional_call(model, parts, (inputs,)), targets)

    return function


def _full_hessian(model, names, inputs, targets, loss=F.cross_entropy):
    """The full Hessian by double backward, one row per parameter (independent of torch.func)."""
    vector = _flat_params(model, names).clone().requires_grad_(True)
    value = _loss_of_flat(model, names, inputs, targets, loss)(vector)
    (gradient,) = torch.autograd.grad(value, vector, create_graph=True)
    rows = [torch.autograd.grad(gradient[k], vector, retain_graph=True)[0] for k in range(len(vector))]
    return torch.stack(rows)


def _split(model, names, flat):
    out, start = {}, 0
    for name in names:
        shape = dict(model.named_parameters())[name].shape
        out[name] = flat[start:start + shape.numel()].reshape(shape)
        start += shape.numel()
    return out


NAMES = ["0.weight", "2.weight"]


def test_exact_diagonal_matches_the_closed_form_of_least_squares():
    # L = mean over N examples and O outputs of (W x + b - y)**2: d2L / dW_ok**2 = 2 mean_n x_nk**2 / O.
    torch.manual_seed(3)
    model = nn.Linear(6, 4).double()
    inputs, targets = torch.randn(13, 6, dtype=torch.float64), torch.randn(13, 4, dtype=torch.float64)
    estimate = saliency.exact_diagonal(model, [(inputs, targets)], loss=F.mse_loss)
    expected = (2 * inputs.square().mean(0) / 4).expand(4, 6)
    torch.testing.assert_close(estimate.mean["weight"], expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(estimate.stderr["weight"], torch.zeros(4, 6, dtype=torch.float64))


def test_exact_diagonal_matches_double_backward_and_keeps_the_batch_samples():
    model = _mlp(0)
    batches = _batches(1, [9, 4, 11])
    estimate = saliency.exact_diagonal(model, batches)
    assert list(estimate.mean) == NAMES and estimate.counts == (9, 4, 11) and estimate.method == "exact"
    per_batch = [_split(model, NAMES, _full_hessian(model, NAMES, x, y).diagonal()) for x, y in batches]
    for name in NAMES:
        assert estimate.samples[name].shape == (3, *dict(model.named_parameters())[name].shape)
        for b in range(3):
            torch.testing.assert_close(estimate.samples[name][b], per_batch[b][name], rtol=1e-10, atol=1e-13)
        weighted = sum(n * per_batch[b][name] for b, n in enumerate(estimate.counts)) / 24
        torch.testing.assert_close(estimate.mean[name], weighted, rtol=1e-10, atol=1e-13)


def _per_example_squares(model, names, inputs, targets):
    """Squared gradients of each example's loss, one backward per example (the reference)."""
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    rows = []
    for x, y in zip(inputs, targets):
        reference.zero_grad()
        F.cross_entropy(reference(x[None]), y[None]).backward()
        rows.append({name: params[name].grad.detach().square() for name in names})
    return {name: torch.stack([row[name] for row in rows]) for name in names}


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_empirical_fisher_is_the_mean_of_per_example_squared_gradients(chunk_size):
    model = _mlp(4, (5, 6, 4, 3))
    names = ["0.weight", "2.weight", "2.bias", "4.weight"]
    batches = _batches(5, [7, 10])
    estimate = saliency.fisher_diagonal(model, batches, params=names, chunk_size=chunk_size)
    squares = [_per_example_squares(model, names, x, y) for x, y in batches]
    for name in names:
        for b in range(2):
            torch.testing.assert_close(estimate.samples[name][b], squares[b][name].mean(0), rtol=1e-10, atol=1e-15)
        every = torch.cat([squares[0][name], squares[1][name]])
        torch.testing.assert_close(estimate.mean[name], every.mean(0), rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(estimate.stderr[name], every.std(0) / every.shape[0] ** 0.5, rtol=1e-7,
                                   atol=1e-15)


def test_fisher_chunking_and_batches_give_the_same_estimate():
    model = _mlp(6)
    (inputs, targets), = _batches(7, [23])
    whole = saliency.fisher_diagonal(model, [(inputs, targets)], chunk_size=23)
    chunked = saliency.fisher_diagonal(model, [(inputs, targets)], chunk_size=5)
    split = saliency.fisher_diagonal(model, [(inputs[:8], targets[:8]), (inputs[8:], targets[8:])], chunk_size=4)
    for name in NAMES:
        torch.testing.assert_close(chunked.mean[name], whole.mean[name], rtol=1e-12, atol=1e-16)
        torch.testing.assert_close(split.mean[name], whole.mean[name], rtol=1e-12, atol=1e-16)
        torch.testing.assert_close(split.stderr[name], whole.stderr[name], rtol=1e-9, atol=1e-16)
        assert split.samples[name].shape[0] == 2 and whole.samples[name].shape[0] == 1


def _gauss_newton_diagonal(model, names, inputs):
    """diag(J^T (diag(p) - p p^T) J), averaged over examples: J the Jacobian of the logits."""
    total = 0
    for x in inputs:
        function = _loss_of_flat(model, names, x[None], None, loss=lambda outputs, _: outputs[0])
        jacobian = torch.autograd.functional.jacobian(function, _flat_params(model, names))  # [C, P]
        p = torch.softmax(function(_flat_params(model, names)), 0)
        curvature = torch.diag(p) - torch.outer(p, p)
        total = total + torch.einsum("ik,ij,jk->k", jacobian, curvature, jacobian)
    return total / len(inputs)


def test_model_label_fisher_is_the_gauss_newton_diagonal():
    model = _mlp(8)
    batches = _batches(9, [6, 5])
    estimate = saliency.fisher_diagonal(model, batches, labels="model", chunk_size=4)
    assert estimate.method == "fisher-model"
    expected = _split(model, NAMES, _gauss_newton_diagonal(model, NAMES, torch.cat([x for x, _ in batches])))
    for name in NAMES:
        torch.testing.assert_close(estimate.mean[name], expected[name], rtol=1e-10, atol=1e-14)


def test_model_label_fisher_equals_the_hessian_of_softmax_regression():
    # A model linear in its parameters: Gauss-Newton = Hessian, so the Fisher is exact there.
    torch.manual_seed(10)
    model = nn.Linear(5, 4).double()
    batches = _batches(11, [8, 13], classes=4)
    fisher = saliency.fisher_diagonal(model, batches, labels="model", params=["weight", "bias"])
    exact = saliency.exact_diagonal(model, batches, params=["weight", "bias"])
    for name in ("weight", "bias"):
        torch.testing.assert_close(fisher.mean[name], exact.mean[name], rtol=1e-10, atol=1e-14)
    # The empirical Fisher, at the observed labels, is not the Hessian.
    empirical = saliency.fisher_diagonal(model, batches, params=["weight"])
    assert not torch.allclose(empirical.mean["weight"], exact.mean["weight"], rtol=0.05)


def test_hutchinson_is_within_its_standard_error_of_the_exact_diagonal():
    model = _mlp(12)
    batches = _batches(13, [10, 6])
    probes = 800
    estimate = saliency.hutchinson_diagonal(model, batches, probes=probes, probe_chunk=200,
                                            generator=torch.Generator().manual_seed(14))
    assert estimate.method == "hutchinson" and estimate.counts == (10, 6)
    weights = [10 / 16, 6 / 16]
    hessians = [_full_hessian(model, NAMES, x, y) for x, y in batches]
    exact = _split(model, NAMES, sum(w * h.diagonal() for w, h in zip(weights, hessians)))
    # A Rademacher probe's error at k is sum_{j != k} z_k z_j H_kj: variance sum_{j != k} H_kj**2.
    variance = sum(w * w * (h.square().sum(1) - h.diagonal().square()) for w, h in zip(weights, hessians)) / probes
    expected_stderr = _split(model, NAMES, variance.sqrt())
    for name in NAMES:
        error = (estimate.mean[name] - exact[name]).abs()
        assert bool((error <= 5 * estimate.stderr[name] + 1e-12).all()), name
        # the stated standard error is the true one (its own estimate is good to a few % at 800 probes)
        torch.testing.assert_close(estimate.stderr[name], expected_stderr[name], rtol=0.25, atol=1e-9)
        assert estimate.samples[name].shape[0] == 2
        torch.testing.assert_close(estimate.mean[name], weights[0] * estimate.samples[name][0]
                                   + weights[1] * estimate.samples[name][1], rtol=1e-12, atol=1e-15)
    again = saliency.hutchinson_diagonal(model, batches, probes=probes, probe_chunk=200,
                                         generator=torch.Generator().manual_seed(14))
    for name in NAMES:
        assert torch.equal(again.mean[name], estimate.mean[name])  # the generator decides the probes


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # L = (1/3) sum_k w_k**2: a diagonal Hessian 2/3 I, so every probe is exact and the stderr 0.
    model = nn.Linear(3, 1, bias=False).double()
    inputs = torch.eye(3, dtype=torch.float64)
    targets = torch.zeros(3, 1, dtype=torch.float64)
    estimate = saliency.hutchinson_diagonal(model, [(inputs, targets)], probes=3, loss=F.mse_loss,
                                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimate.mean["weight"], torch.full((1, 3), 2 / 3, dtype=torch.float64))
    assert torch.equal(estimate.stderr["weight"], torch.zeros(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_sparse_layers_are_differentiated_at_their_effective_weight(grad_mode):
    model = _mlp(15, (5, 8, 3))
    dense = copy.deepcopy(model)
    dynasparse.nn.sparsify(model, 0.6, include=["0"], grad_mode=grad_mode)
    layer = model[0]
    with torch.no_grad():
        dense[0].weight.copy_(layer.masked_weight())
    layer.weight_grad = "nonzeros"
    model.train()
    batches = _batches(16, [9, 7])
    for estimator in (saliency.exact_diagonal, saliency.fisher_diagonal):
        ours, reference = estimator(model, batches), estimator(dense, batches)
        for name in NAMES:
            torch.testing.assert_close(ours.mean[name], reference.mean[name], rtol=1e-10, atol=1e-14)
        assert layer.weight_grad == "nonzeros" and model.training  # restored
    assert bool((ours.mean["0.weight"][~layer.mask] != 0).any())  # the curvature of re-growing
    scores = saliency.obd_saliency(model, ours)
    assert bool((scores["0.weight"][~layer.mask] == 0).all())
    expected = ours.mean["0.weight"] * layer.masked_weight().detach().square() / 2
    torch.testing.assert_close(scores["0.weight"], expected, rtol=0, atol=0)
    per_batch = saliency.obd_saliency(model, ours, per_batch=True)
    torch.testing.assert_close(per_batch["2.weight"], ours.samples["2.weight"] * model[2].weight.detach().square() / 2)


def test_sparse_convolution_fisher_matches_its_dense_copy():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    dense = copy.deepcopy(model)
    dynasparse.nn.sparsify(model, 0.5, include=["0", "3"])
    with torch.no_grad():
        dense[0].weight.copy_(model[0].masked_weight())
        dense[3].weight.copy_(model[3].masked_weight())
    inputs, targets = torch.randn(12, 2, 5, 5), torch.randint(0, 3, (12,))
    ours = saliency.fisher_diagonal(model, [(inputs, targets)], chunk_size=5)
    reference = saliency.fisher_diagonal(dense, [(inputs, targets)], chunk_size=12)
    for name in ("0.weight", "3.weight"):
        torch.testing.assert_close(ours.mean[name], reference.mean[name], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("estimator", ["exact", "hutchinson", "fisher"])
def test_a_subset_of_parameters_among_other_sparse_layers(estimator):
    # Sparse layers before and after the chosen one: they see transformed inputs, not weights.
    torch.manual_seed(22)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 3, padding=1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 5 * 5, 3)).double()
    dense = copy.deepcopy(model)
    dynasparse.nn.sparsify(model, 0.5, include=["0", "2", "5"])
    with torch.no_grad():
        for i in (0, 2, 5):
            dense[i].weight.copy_(model[i].masked_weight())
    model[5].backend = "sparse"
    default = model[0].backend
    inputs, targets = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    options = {"probes": 4} if estimator == "hutchinson" else {}
    results = []
    for network in (model, dense):
        if estimator == "hutchinson":
            options["generator"] = torch.Generator().manual_seed(23)
        results.append(saliency.hessian_diagonal(network, [(inputs, targets)], estimator, params=["2.weight"],
                                                 **options))
    torch.testing.assert_close(results[0].mean["2.weight"], results[1].mean["2.weight"], rtol=1e-10, atol=1e-14)
    assert model[5].backend == "sparse" and model[0].backend == default  # restored


def test_gradients_are_left_alone_and_the_hessian_dispatcher():
    model = _mlp(18)
    for param in model.parameters():
        param.grad = torch.full_like(param, 3.0)
    batches = _batches(19, [5])
    by_name = saliency.hessian_diagonal(model, batches, "exact")
    direct = saliency.exact_diagonal(model, batches)
    assert all(torch.equal(by_name.mean[n], direct.mean[n]) for n in NAMES)
    assert all(bool((param.grad == 3.0).all()) for param in model.parameters())


def test_refusals_name_the_argument():
    model = _mlp(20)
    batches = _batches(21, [4])
    with pytest.raises(ValueError, match="not parameters of the model"):
        saliency.fisher_diagonal(model, batches, params=["nope.weight"])
    with pytest.raises(ValueError, match="batches is empty"):
        saliency.fisher_diagonal(model, [])
    with pytest.raises(TypeError, match="wrap a single batch"):
        saliency.fisher_diagonal(model, batches[0])
    with pytest.raises(ValueError, match="holds no examples"):
        saliency.fisher_diagonal(model, [(torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long))])
    with pytest.raises(ValueError, match="same leading"):
        saliency.fisher_diagonal(model, [(torch.zeros(3, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        saliency.fisher_diagonal(model, batches, chunk_size=0)
    with pytest.raises(ValueError, match="labels must be one of"):
        saliency.fisher_diagonal(model, batches, labels="true")
    with pytest.raises(ValueError, match="custom loss"):
        saliency.fisher_diagonal(model, batches, labels="model", loss=F.mse_loss)
    with pytest.raises(ValueError, match="probes must be >= 2"):
        saliency.hutchinson_diagonal(model, batches, probes=1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        saliency.hutchinson_diagonal(model, batches, generator=3)
    with pytest.raises(ValueError, match="more than limit=10"):
        saliency.exact_diagonal(model, batches, limit=10)
    with pytest.raises(ValueError, match="estimator must be one of"):
        saliency.hessian_diagonal(model, batches, "newton")
    with pytest.raises(TypeError, match="scalar tensor"):
        saliency.exact_diagonal(model, batches, loss=lambda outputs, targets: outputs)
    with pytest.raises(ValueError, match="no linear or convolutional layer"):
        saliency.fisher_diagonal(nn.Sequential(nn.Tanh()), batches)
