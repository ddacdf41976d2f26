"""Each analysis function against values computed by hand."""

import math

import pytest
import torch
from torch import nn

import dynasparse
from dynasparse.experiments import analysis

T, F = True, False


def test_accuracy_and_agreement():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # predicts 0, 1, 0
    assert analysis.accuracy(logits, torch.tensor([0, 1, 1])) == 2 / 3
    assert analysis.accuracy(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1])) == 2 / 3
    assert analysis.agreement(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 2, 2, 1])) == 0.5
    assert analysis.agreement(logits, torch.tensor([0, 1, 1])) == 2 / 3
    with pytest.raises(ValueError, match="outputs_a has 3 examples, outputs_b 2"):
        analysis.agreement(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="hold no examples"):
        analysis.accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="logits \\[N, C\\] or integer labels \\[N\\]"):
        analysis.accuracy(torch.tensor([0.5, 1.0]), torch.tensor([0, 1]))


def test_correlations():
    # x = 1..4, y = 1, 3, 2, 4: sum dx dy = 4, sum dx^2 = sum dy^2 = 5, so r = 0.8 (the ranks
    # are the values: Spearman 0.8 too); t = 0.8 sqrt(2) / 0.6 and with 2 degrees of freedom
    # P(|T| > t) = 1 - t / sqrt(2 + t^2) = 0.2.
    found = analysis.correlations([1, 2, 3, 4], [1, 3, 2, 4])
    assert found["n"] == 4
    for key, value in (("pearson", 0.8), ("spearman", 0.8), ("pearson_p", 0.2), ("spearman_p", 0.2)):
        assert found[key] == pytest.approx(value, rel=1e-12), key
    flipped = analysis.correlations([1, 2, 3, 4], [4, 2, 3, 1])
    assert flipped["pearson"] == pytest.approx(-0.8) and flipped["spearman"] == pytest.approx(-0.8)
    # Monotone but not linear: Spearman 1, Pearson below.
    curved = analysis.correlations([1, 2, 3, 4], [1, 4, 9, 100])
    assert curved["spearman"] == pytest.approx(1.0) and curved["pearson"] < 0.9
    assert all(math.isnan(v) for k, v in analysis.correlations([1, 2, 3], [5, 5, 5]).items() if k != "n")
    with pytest.raises(ValueError, match="at least 3 pairs"):
        analysis.correlations([1, 2], [1, 2])
    with pytest.raises(ValueError, match="x has 3 values, y 2"):
        analysis.correlations([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        analysis.correlations([1, 2, float("nan")], [1, 2, 3])


def test_mask_iou_and_flip_rates():
    a, b = torch.tensor([T, T, F, F]), torch.tensor([T, F, T, F])
    assert analysis.mask_iou(a, b) == 1 / 3 and analysis.flip_rate(a, b) == 0.5
    assert analysis.mask_iou(a, a) == 1.0 and analysis.flip_rate(a, a) == 0.0
    first = {"x": torch.tensor([T, F]), "y": torch.tensor([[T], [T]])}
    second = {"x": torch.tensor([T, T]), "y": torch.tensor([[F], [T]])}
    assert analysis.mask_iou(first, second) == 2 / 4 and analysis.flip_rate(first, second) == 2 / 4
    assert analysis.mask_iou(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
    assert analysis.flip_rate(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)) == 0.0
    assert analysis.flip_rates([a, b, b, a]) == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="different layers"):
        analysis.mask_iou(first, {"x": first["x"]})
    with pytest.raises(ValueError, match="shapes \\[4\\] and \\[2\\]"):
        analysis.mask_iou(a, a[:2])
    with pytest.raises(TypeError, match="must be bool"):
        analysis.flip_rate(a.float(), b.float())


def test_layer_sparsity_and_its_distribution():
    masks = {"x": torch.tensor([T, F, F, F]), "y": torch.ones(2, 3, dtype=torch.bool), "z": torch.zeros(0).bool()}
    assert analysis.layer_sparsity(masks) == {"x": 0.75, "y": 0.0, "z": 0.0}
    found = analysis.sparsity_distribution([{"a": 0.5, "b": 0.1}, {"a": 0.7, "b": 0.1}, {"a": 0.9, "b": 0.1}])
    assert found["a"]["mean"] == pytest.approx(0.7) and found["a"]["std"] == pytest.approx(0.2)
    assert (found["a"]["min"], found["a"]["max"], found["a"]["n"]) == (0.5, 0.9, 3)
    assert found["b"]["std"] == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="different layers"):
        analysis.sparsity_distribution([{"a": 0.5}, {"b": 0.5}])


def _tiny_model():
    """One sparse linear layer 4 -> 2 with W = [[4, -1, .25, 2], [0, 3, .5, 1.5]], b = [.01, 0]."""
    layer = dynasparse.SparseLinear(4, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, -1.0, 0.25, 2.0], [0.0, 3.0, 0.5, 1.5]]))
        layer.bias.copy_(torch.tensor([0.01, 0.0]))
    return nn.Sequential(layer)


def test_masks_from_a_model_a_checkpoint_and_a_state_dict(tmp_path):
    model = _tiny_model()
    model[0].set_mask(torch.tensor([[T, F, T, T], [F, T, T, T]]))
    dynasparse.save(model, tmp_path / "m.dsp.safetensors")
    for source in (model, tmp_path / "m.dsp.safetensors", str(tmp_path / "m.dsp.safetensors"), model.state_dict()):
        found = analysis.masks(source)
        assert list(found) == ["0"] and torch.equal(found["0"], model[0].mask)
    assert analysis.masks(nn.Linear(2, 2)) == {}


def test_further_pruning_curve():
    # Inputs e0..e3 read off W's columns. Pruning q of the 8 weights removes the smallest |w|:
    # 0 and .25 (q = .25), then .5 and 1 (q = .5), then 1.5 and 2 (q = .75), then all.
    # Labels 0, 1, 1, 0: e2 = [.25 + .01, .5] is right until .5 goes ([.01, 0] -> class 0);
    # e3 = [2.01, 1.5] stays right; with every weight pruned all predict class 0.
    model = _tiny_model()
    split = (torch.eye(4), torch.tensor([0, 1, 1, 0]))
    curve = analysis.further_pruning_curve(model, split, [0.0, 0.25, 0.5, 0.75, 1.0])
    assert [point["accuracy"] for point in curve] == [1.0, 1.0, 0.75, 0.75, 0.5]
    assert [point["sparsity"] for point in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bool(model[0].mask.all())  # the model itself is left as it was
    model[0].set_mask(torch.tensor([[T, T, T, T], [F, T, T, T]]))  # 7 active: q = .5 prunes round(3.5) = 4
    assert analysis.further_pruning_curve(model, split, [0.5])[0]["sparsity"] == 5 / 8
    with pytest.raises(ValueError, match="no sparse layers"):
        analysis.further_pruning_curve(nn.Sequential(nn.Linear(4, 2)), split, [0.5])
    with pytest.raises(ValueError, match="fractions must be numbers in \\[0, 1\\]"):
        analysis.further_pruning_curve(model, split, [1.5])


def test_size_in_bits():
    model = nn.Sequential(dynasparse.SparseLinear(4, 2), nn.Linear(2, 3))
    model[0].set_mask(torch.tensor([[T, F, F, T], [F, F, T, F]]))
    # Sparse weight: 3 kept of 8, each 32 value bits + ceil(log2 8) = 3 index bits = 105;
    # its bias 2 x 32; the dense layer (6 + 3) x 32.
    assert analysis.size_in_bits(model) == 105 + 64 + 288
    assert analysis.size_in_bits(model, index="bitmask") == (8 + 3 * 32) + 64 + 288
    assert analysis.size_in_bits(model, value_bits=8) == 3 * (8 + 3) + 2 * 8 + 9 * 8
    with pytest.raises(ValueError, match="index must be one of position, bitmask"):
        analysis.size_in_bits(model, index="csr")
    with pytest.raises(ValueError, match="value_bits must be an int >= 1"):
        analysis.size_in_bits(model, value_bits=0)
