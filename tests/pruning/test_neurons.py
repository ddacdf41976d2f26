"""Neuron scores, selection and merging: each against its definition computed independently
(float64 autograd of an explicitly gated network, brute-force merge costs), on networks built
so that the answer is known (one neuron that matters, two identical neurons)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynasparse
from dynasparse.experiments import models
from dynasparse.nn.shrink import NotShrinkable, shrink
from dynasparse.pruning import neurons


def _batches(shape, classes, sizes, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=generator, dtype=dtype),
             torch.randint(0, classes, (size,), generator=generator)) for size in sizes]


def _one_neuron_matters():
    """fc1's unit 5 alone reaches the classifier, and it decides the class: removing it costs
    log 2 - (the trained loss); every other unit has no outgoing weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    direction = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)
    with torch.no_grad():
        model[0].weight[5] = direction
        model[0].bias[5] = 0.0
        model[2].weight.zero_()
        model[2].weight[:, 5] = torch.tensor([3.0, -3.0])
        model[2].bias.copy_(torch.tensor([-1.0, 1.0]))
    generator = torch.Generator().manual_seed(1)
    batches = []
    for size in (40, 24):
        x = torch.randn(size, 4, generator=generator, dtype=torch.float64)
        batches.append((x, (x @ direction <= 0.5).long()))
    return model, batches


def test_damage_finds_the_one_neuron_that_matters_with_its_exact_damage():
    model, batches = _one_neuron_matters()
    damage = neurons.score(model, "0", "damage", batches=batches, generator=torch.Generator().manual_seed(2), K=48,
                           p=0.5)
    assert damage.shape == (8,)
    assert int(damage.argmax()) == 5
    # Unit 5 decides the loss alone: removed, the loss is that of the classifier's bias alone.
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        kept = F.cross_entropy(model(x), y)
        removed = F.cross_entropy(model[2].bias.expand(len(x), 2), y)
    torch.testing.assert_close(damage[5], removed - kept, rtol=1e-10, atol=1e-12)
    assert damage[5] > 0.1
    again = neurons.score(model, "0", "damage", batches=batches, generator=torch.Generator().manual_seed(2), K=48)
    assert torch.equal(damage, again)


def test_damage_needs_every_unit_removed_and_kept_in_some_pass():
    model, batches = _one_neuron_matters()
    with pytest.raises(ValueError, match="raise K"):
        neurons.score(model, "0", "damage", batches=batches, generator=torch.Generator().manual_seed(0), K=2, p=0.05)
    with pytest.raises(ValueError, match="p must be"):
        neurons.score(model, "0", "damage", batches=batches, p=1.0)


def _gated_reference(model, batches):
    """L(g) of the tanh MLP with a gate on fc2's input (fc1's units), written out by hand."""
    def loss(g):
        total = sum(len(x) for x, _ in batches)
        value = 0
        for x, y in batches:
            h = torch.tanh(F.linear(x.flatten(1), model.fc1.weight, model.fc1.bias)) * g
            h = torch.tanh(F.linear(h, model.fc2.weight, model.fc2.bias))
            value = value + F.cross_entropy(F.linear(h, model.classifier.weight, model.classifier.bias), y) * len(x)
        return value / total
    return loss


def test_obd_is_the_taylor_estimate_of_removing_the_gate():
    torch.manual_seed(3)
    model = models.build("mlp", input_shape=[6], classes=3, hidden=[7, 5], activation="tanh").double()
    batches = _batches([6], 3, [9, 14], 4, torch.float64)
    loss = _gated_reference(model, batches)
    g = torch.ones(7, dtype=torch.float64)
    gradient = torch.autograd.functional.jacobian(loss, g)
    curvature = torch.autograd.functional.hessian(loss, g).diagonal()
    expected = -gradient + curvature / 2
    ours = neurons.score(model, "fc1", "obd", batches=batches, hessian="exact")
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    fisher = neurons.score(model, "fc1", "obd", batches=batches)  # the default: empirical Fisher
    assert fisher.shape == (7,) and torch.isfinite(fisher).all()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert torch.equal(fisher, neurons.score(model, "fc1", "obd", batches=batches))


def test_the_gate_removes_what_shrink_removes_also_before_a_batchnorm():
    """Gate 0 must be the shrunk network (not the layer's output zeroed, which a BatchNorm
    would turn into its shift)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4, 3))
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(5, 2, 4, 4)
    keep = torch.tensor([0, 2, 5])
    work, gate = neurons._gated_copy(model, "0", x)
    with torch.no_grad():
        gate.zero_()
        gate[keep] = 1
        torch.testing.assert_close(work(x), shrink(model, {"0": keep}, example_input=x)(x), rtol=1e-5, atol=1e-6)


def test_l2_and_random_scores():
    torch.manual_seed(6)
    model = models.build("cnn1d", input_shape=[2, 11], classes=3, channels=[5, 4], kernels=[3, 3], strides=[1, 2])
    l2 = neurons.score(model, "conv2", "l2")
    weight, bias = model.conv2.weight.detach().double(), model.conv2.bias.detach().double()
    expected = torch.tensor([math.sqrt(weight[j].square().sum() + bias[j] ** 2) for j in range(4)]).to(l2.dtype)
    torch.testing.assert_close(l2, expected)
    first = neurons.score(model, "conv1", "random", generator=torch.Generator().manual_seed(7))
    second = neurons.score(model, "conv1", "random", generator=torch.Generator().manual_seed(7))
    other = neurons.score(model, "conv1", "random", generator=torch.Generator().manual_seed(8))
    assert first.shape == (5,) and torch.equal(first, second) and not torch.equal(first, other)


def test_l2_of_a_sparse_layer_uses_its_effective_weights():
    torch.manual_seed(9)
    model = models.build("mlp", input_shape=[6], classes=2, hidden=[5])
    dynasparse.sparsify(model, 0.5, exclude="classifier")
    weight = torch.where(model.fc1.mask, model.fc1.weight, 0)
    expected = (weight.square().sum(1) + model.fc1.bias.square()).sqrt()
    torch.testing.assert_close(neurons.score(model, "fc1", "l2"), expected.detach())


def test_select_counts_defaults_and_ties():
    torch.manual_seed(10)
    model = models.build("mlp", input_shape=[6], classes=3, hidden=[16, 5])
    kept = neurons.select(model, 0.5, "l2")
    assert list(kept) == ["fc1", "fc2"]  # not the classifier
    assert [len(kept["fc1"]), len(kept["fc2"])] == [8, 3]  # round(2.5) = 2 removed
    assert torch.equal(kept["fc1"], torch.sort(kept["fc1"]).values)
    scores = neurons.score(model, "fc1", "l2")
    assert scores[kept["fc1"]].min() >= scores[_complement(16, kept["fc1"])].max()
    assert {name: len(v) for name, v in neurons.select(model, {"fc2": 0.2}, "random").items()} == {"fc2": 4}
    assert torch.equal(neurons.select(model, 0.0, "l2", layers=["fc1"])["fc1"], torch.arange(16))
    assert len(neurons.select(model, 0.99, "l2", layers=["fc2"])["fc2"]) == 1  # a layer keeps one unit
    with torch.no_grad():
        model.fc2.weight[1] = model.fc2.weight[3]
        model.fc2.bias[1] = model.fc2.bias[3]
        model.fc2.weight[[0, 2, 4]] *= 10
        model.fc2.bias[[0, 2, 4]] *= 10
    # Units 1 and 3 tie for the last place kept: the lower index stays.
    assert neurons.select(model, 0.2, "l2", layers=["fc2"])["fc2"].tolist() == [0, 1, 2, 4]


def _complement(count, keep):
    mask = torch.ones(count, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def test_select_default_layers_of_cnn_and_resnet():
    cnn = models.build("cnn1d", input_shape=[1, 20], classes=3, channels=[4, 6, 8])
    batches = _batches([1, 20], 3, [4], 11)
    kept = neurons.select(cnn, 0.25, "obd", batches=batches)
    assert {name: len(v) for name, v in kept.items()} == {"conv1": 3, "conv2": 4, "conv3": 6}
    small = shrink(cnn, kept, example_input=batches[0][0])
    assert small(batches[0][0]).shape == (4, 3)
    resnet = models.build("resnet", input_shape=[3, 8, 8], classes=3, depth=8, width=4)
    assert neurons.prunable_layers(resnet) == ["stage1.0.conv1", "stage2.0.conv1", "stage3.0.conv1"]
    with pytest.raises(ValueError, match="example_input"):
        neurons.select(cnn, 0.5, "l2")


@pytest.mark.parametrize("call,error,message", [
    (lambda m, b: neurons.score(m, "nope", "l2"), ValueError, "does not have"),
    (lambda m, b: neurons.score(m, "act1", "l2"), ValueError, "a ReLU"),
    (lambda m, b: neurons.score(m, "fc1", "magnitude"), ValueError, "unknown method"),
    (lambda m, b: neurons.score(m, "fc1", "obd"), ValueError, "needs data"),
    (lambda m, b: neurons.score(m, "fc1", "damage"), ValueError, "needs data"),
    (lambda m, b: neurons.score(m, "fc1", "l2", K=3), TypeError, "no option"),
    (lambda m, b: neurons.score(m, "fc1", "obd", batches=b, hessian="diag"), ValueError, "hessian must be"),
    (lambda m, b: neurons.score(m, "fc1", "random", generator=0), TypeError, "generator"),
    (lambda m, b: neurons.score(m, "fc1", "obd", batches=b[0]), TypeError, "wrap a single batch"),
    (lambda m, b: neurons.select(m, 1.0, "l2"), ValueError, r"\[0, 1\)"),
    (lambda m, b: neurons.select(m, -0.1, "l2"), ValueError, r"\[0, 1\)"),
    (lambda m, b: neurons.select(m, "0.5", "l2"), TypeError, "fraction"),
    (lambda m, b: neurons.select(m, {"fc1": 0.5}, "l2", layers=["fc2"]), ValueError, "keys must be the layers"),
    (lambda m, b: neurons.select(m, 0.5, "l2", layers="fc1"), TypeError, "list of layer names"),
    (lambda m, b: neurons.select(m, 0.5, "l2", layers=["fc9"]), ValueError, "does not have"),
    (lambda m, b: neurons.select(m, 0.5, "damage"), ValueError, "needs data"),
    (lambda m, b: neurons.merge(m, 1.5), ValueError, r"\[0, 1\)"),
    (lambda m, b: neurons.merge(m, 0.5, layers=["classifier"]), NotShrinkable, "model's output"),
])
def test_bad_arguments_raise(call, error, message):
    model = models.build("mlp", input_shape=[4], classes=2, hidden=[6, 5])
    with pytest.raises(error, match=message):
        call(model, _batches([4], 2, [3], 12))


def test_merging_two_identical_neurons_keeps_the_output():
    torch.manual_seed(13)
    model = models.build("mlp", input_shape=[5], classes=3, hidden=[9, 4]).double()
    with torch.no_grad():
        model.fc1.weight[6] = model.fc1.weight[2]
        model.fc1.bias[6] = model.fc1.bias[2]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    merged = neurons.merge(model, 1 / 9, layers=["fc1"])
    assert merged.fc1.out_features == 8 and merged.fc2.in_features == 8
    x = torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)
    assert torch.equal(merged.fc1.weight, model.fc1.weight[[0, 1, 2, 3, 4, 5, 7, 8]])
    torch.testing.assert_close(merged.fc2.weight[:, 2], model.fc2.weight[:, 2] + model.fc2.weight[:, 6])
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_merging_identical_filters_through_a_flatten_keeps_the_output():
    torch.manual_seed(14)
    model = models.build("cnn1d", input_shape=[1, 12], classes=3, channels=[4, 5], kernels=[3, 3],
                         strides=[1, 2]).double()
    with torch.no_grad():
        model.conv2.weight[4] = model.conv2.weight[1]
        model.conv2.bias[4] = model.conv2.bias[1]
    x = torch.randn(3, 1, 12, dtype=torch.float64)
    merged = neurons.merge(model, 0.2, layers=["conv2"], example_input=x)
    assert merged.conv2.out_channels == 4 and merged.fc.in_features == 4 * 6
    torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)


def test_merge_takes_the_cheapest_pair_by_its_definition():
    torch.manual_seed(15)
    model = models.build("mlp", input_shape=[3], classes=2, hidden=[6, 4]).double()
    theta = torch.cat([model.fc1.weight, model.fc1.bias[:, None]], 1).detach()
    outgoing = model.fc2.weight.detach()
    costs = {(i, j): outgoing[:, j].square().mean() * (theta[i] - theta[j]).square().sum()
             for i in range(6) for j in range(6) if i != j}
    first = min(costs, key=costs.get)
    merged = neurons.merge(model, 1 / 6, layers=["fc1"])
    target, source = first
    survivors = [unit for unit in range(6) if unit != source]
    assert torch.equal(merged.fc1.weight, model.fc1.weight[survivors])
    torch.testing.assert_close(merged.fc2.weight[:, survivors.index(target)], outgoing[:, target] + outgoing[:, source])
    # Two merges: the second uses the merged unit's new outgoing weights.
    outgoing2 = outgoing.clone()
    outgoing2[:, target] += outgoing2[:, source]
    costs2 = {(i, j): outgoing2[:, j].square().mean() * (theta[i] - theta[j]).square().sum()
              for i in survivors for j in survivors if i != j}
    second = min(costs2, key=costs2.get)
    twice = neurons.merge(model, 2 / 6, layers=["fc1"])
    assert torch.equal(twice.fc1.weight, model.fc1.weight[[u for u in survivors if u != second[1]]])


def test_merge_refuses_batchnorm_and_sparse_consumers():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(NotShrinkable, match="BatchNorm|per-channel"):
        neurons.merge(model, 0.5, layers=["0"], example_input=torch.randn(3, 4))
    sparse = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    dynasparse.sparsify(sparse, 0.5)
    with pytest.raises(NotShrinkable, match="sparse consumer"):
        neurons.merge(sparse, 0.5, layers=["0"])
