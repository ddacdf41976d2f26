"""sparsify / densify: every matching weight matrix is converted (and then computes what the dense
layer computes with w * m, against float64) or reported with the reason; a second call re-prunes;
arguments that cannot work are errors."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynasparse
from dynasparse.nn import SparseConv2d, SparseLinear
from dynasparse.nn.modules import SparseTransposedLinear


def _masked_weight(module):
    return torch.where(module.mask, module.weight, 0)


def _conv_configs():
    """Every Conv2d geometry sparsify may meet, with a few odd ones: even kernels with 'same'."""
    kernels = [1, 2, 3, (2, 3), (4, 1)]
    paddings = [0, 1, "valid", "same", (1, 2)]
    dilations = [1, 2]
    return list(itertools.product(kernels, paddings, dilations))


def test_sparsify_converts_exactly_the_convolutions_that_compute():
    """A converted layer must compute; one the sparse layer cannot compute is reported, never
    converted into a layer whose every forward raises (even kernel with padding='same')."""
    configs = _conv_configs()
    model = nn.Sequential(*[nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation)
                            for kernel, padding, dilation in configs])
    torch.manual_seed(0)
    dense = copy.deepcopy(model)
    report = dynasparse.sparsify(model, 0.5)
    assert sorted(report.converted + list(report.skipped), key=int) == [str(i) for i in range(len(configs))]
    x = torch.randn(2, 3, 9, 10)
    for name in report.converted:
        layer, original = model.get_submodule(name), dense.get_submodule(name)
        assert isinstance(layer, SparseConv2d)
        expected = F.conv2d(x.double(), _masked_weight(layer).double(), original.bias.double(), original.stride,
                            original.padding, original.dilation)
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    for name, reason in report.skipped.items():
        assert type(model.get_submodule(name)) is nn.Conv2d
        assert "same" in reason
    even_same = {str(i) for i, (kernel, padding, dilation) in enumerate(configs)
                 if padding == "same" and any(dilation * (k - 1) % 2 for k in (kernel if isinstance(kernel, tuple)
                                                                                else (kernel, kernel)))}
    assert set(report.skipped) == even_same and even_same
    with pytest.raises(ValueError, match="could not convert"):
        dynasparse.sparsify(nn.Sequential(nn.Conv2d(3, 4, 2, padding="same")), 0.5, strict=True)


@pytest.mark.parametrize("rnn_class", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_weights_are_reported_and_strict_fails(rnn_class):
    torch.manual_seed(1)
    model = nn.Sequential()
    model.add_module("rnn", rnn_class(6, 8, num_layers=2, bidirectional=True))
    model.add_module("head", nn.Linear(16, 3))
    report = dynasparse.sparsify(model, 0.5)
    assert report.converted == ["head"]
    reason = report.skipped["rnn"]
    matrices = [name for name, param in model.rnn.named_parameters() if param.dim() >= 2]
    assert len(matrices) == 8
    for name in matrices:
        assert name in reason
    assert rnn_class.__name__ in reason
    with pytest.raises(ValueError, match="could not convert every matching layer"):
        dynasparse.sparsify(model, 0.5, strict=True)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.after = nn.Linear(8, 8)

    def forward(self, x):
        return self.after(self.attention(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("training", [True, False])  # eval takes MHA's fast path
def test_multihead_attention_projections_are_reported_and_still_compute(training):
    torch.manual_seed(2)
    model = _Attention().train(training)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        before = model(x)
        reference = copy.deepcopy(model)
    report = dynasparse.sparsify(model, 0.75)
    assert report.converted == ["after"]
    assert "in_proj_weight" in report.skipped["attention"]
    # out_proj is an nn.Linear subclass, but MHA multiplies by its weight directly, so a
    # sparse layer there would compute nothing: it stays dense and says why.
    assert "out_proj.weight" in report.skipped["attention.out_proj"]
    assert type(model.attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        hidden = reference.attention(x, x, x, need_weights=False)[0]
        expected = F.linear(hidden.double(), _masked_weight(model.after).double(), model.after.bias.double())
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model(x), before)  # the Linear after it was pruned


class _WithBareParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 4))
        self.scale = nn.Parameter(torch.ones(4))  # 1-D: not a weight matrix
        self.block = nn.Module()
        self.block.kernel = nn.Parameter(torch.randn(4, 4, 3))
        self.block.fc = nn.Linear(4, 4)


def test_bare_parameter_matrices_are_reported_wherever_they_live():
    model = _WithBareParameters()
    report = dynasparse.sparsify(model, 0.5)
    assert report.converted == ["block.fc"]
    assert set(report.skipped) == {"table", "block"}
    assert "model itself" in report.skipped["table"]
    assert "kernel" in report.skipped["block"]
    untouched = _WithBareParameters()
    with pytest.raises(ValueError, match="could not convert every matching layer \\(the model is unchanged\\)"):
        dynasparse.sparsify(untouched, 0.5, strict=True)
    assert type(untouched.block.fc) is nn.Linear
    # Excluded parameters are not reported: what is asked for is.
    assert dynasparse.sparsify(_WithBareParameters(), 0.5, include=["block.fc"]).skipped == {}


def test_2_4_takes_its_own_sparsity_only():
    model = nn.Sequential(nn.Linear(16, 8))
    for sparsity in (0.9, 0.0, 0.75):
        with pytest.raises(ValueError, match=f"sparsity={sparsity}"):
            dynasparse.sparsify(model, sparsity, layout="2:4")
    assert type(model[0]) is nn.Linear  # refused before any change
    report = dynasparse.sparsify(model, 0.5, layout="2:4")
    assert report.converted == ["0"] and model[0].sparsity == 0.5


@pytest.mark.parametrize("layout,first,second", [("unstructured", 0.9, 0.6), ("unstructured", 0.5, 0.95),
                                                 ("block16", 0.75, 0.25)])
def test_sparsify_again_reprunes_in_place_as_one_call_would(layout, first, second):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv2d(64, 32, 1), nn.Flatten())
    fresh = copy.deepcopy(model)
    dynasparse.sparsify(model, first, layout=layout, grad_mode="masked")
    layers = [model[0], model[2]]
    masks = [layer.mask for layer in layers]
    report = dynasparse.sparsify(model, second, layout=layout, grad_mode="masked")
    assert report.converted == [] and report.repruned == ["0", "2"] and report.skipped == {}
    assert "re-pruned 2" in str(report)
    dynasparse.sparsify(fresh, second, layout=layout, grad_mode="masked")
    for layer, mask, once in zip(layers, masks, [fresh[0], fresh[2]]):
        assert layer.mask is mask  # optimizers holding the buffer see the new mask
        assert torch.equal(layer.mask, once.mask)
        assert layer.sparsity == pytest.approx(once.sparsity) and abs(layer.sparsity - second) < 0.05
    x = torch.randn(4, 64)
    expected = F.linear(x.double(), _masked_weight(model[0]).double(), model[0].bias.double())
    torch.testing.assert_close(model[0](x).double(), expected, rtol=1e-5, atol=1e-5)


def test_sparsify_again_with_another_layout_or_grad_mode_reports_it():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    dynasparse.sparsify(model, 0.5, grad_mode="masked")
    masks = [model[0].mask.clone(), model[1].mask.clone()]
    for kwargs in ({"layout": "block16", "grad_mode": "masked"}, {"grad_mode": "feedback"}):
        report = dynasparse.sparsify(model, 0.9, **kwargs)
        assert report.repruned == [] and set(report.skipped) == {"0", "1"}
        assert "already sparse" in report.skipped["0"] and "densify" in report.skipped["0"]
        with pytest.raises(ValueError, match="could not convert"):
            dynasparse.sparsify(model, 0.9, strict=True, **kwargs)
    assert torch.equal(model[0].mask, masks[0]) and torch.equal(model[1].mask, masks[1])
    # strict fails before re-pruning anything
    model.add_module("2", nn.Conv3d(2, 2, 1))  # not a layer sparsify converts
    with pytest.raises(ValueError, match="Conv3d"):
        dynasparse.sparsify(model, 0.9, grad_mode="masked", strict=True)
    assert torch.equal(model[0].mask, masks[0]) and torch.equal(model[1].mask, masks[1])


def test_a_bare_layer_is_an_error_for_sparsify_and_densify():
    torch.manual_seed(4)
    for layer in (SparseLinear(8, 4, sparsity=0.5), SparseConv2d(2, 3, 3, sparsity=0.5),
                  SparseTransposedLinear(8, 4, sparsity=0.5)):
        with pytest.raises(ValueError, match="densify cannot replace"):
            dynasparse.densify(layer)
        with pytest.raises(ValueError, match="the model is itself a sparse layer"):
            dynasparse.sparsify(layer, 0.5)
    dense = SparseLinear(8, 4, sparsity=0.5).to_dense()  # the advice the error gives
    assert type(dense) is nn.Linear
    with pytest.raises(ValueError, match="the layer itself"):
        dynasparse.sparsify(nn.Conv2d(2, 2, 1))


def test_bad_arguments_are_clear_errors():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="exclude must be"):
        dynasparse.sparsify(model, 0.5, exclude=(name for name in ["0"]))
    with pytest.raises(TypeError, match="include must be"):
        dynasparse.sparsify(model, 0.5, include=3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dynasparse.sparsify({"0": model}, 0.5)
    assert type(model[0]) is nn.Linear
