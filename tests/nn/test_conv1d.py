"""SparseConv1d against nn.Conv1d computing with w * m in float64: geometry, padding modes,
grouped fallback, unbatched input, both grad modes, conversion, state_dict, compile."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynasparse
from dynasparse.nn import SparseConv1d


@pytest.mark.parametrize("config", [
    dict(kernel_size=5, padding=2), dict(kernel_size=1), dict(kernel_size=1, stride=3),
    dict(kernel_size=3, stride=2, padding=1, dilation=2), dict(kernel_size=3, padding="same"),
    dict(kernel_size=4, padding="valid"), dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="circular"), dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=3, padding=1, groups=6, bias=False),
], ids=str)
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
@pytest.mark.parametrize("layout", ["unstructured", "2:4"])
def test_sparse_conv1d_matches_dense_float64(config, grad_mode, layout):
    if layout == "2:4" and config.get("groups", 1) != 1:
        pytest.skip("2:4 is refused for grouped convolutions (tested below)")
    torch.manual_seed(4)
    sparsity = 0.5 if layout == "2:4" else 0.7
    in_channels = 6 if layout == "unstructured" else 8  # 2:4 groups K = in_channels * kernel_size by 4
    layer = SparseConv1d(in_channels, 12, sparsity=sparsity, layout=layout, grad_mode=grad_mode,
                         **config).double()
    dense = nn.Conv1d(in_channels, 12, **config).double()
    x = torch.randn(3, in_channels, 29, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    params = (x, layer.weight) + ((layer.bias,) if layer.bias is not None else ())
    grads = torch.autograd.grad(y, params, grad_out)
    w = layer.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = dense._conv_forward(x_ref, torch.where(layer.mask, w, 0), layer.bias)
    gx_ref, gw_masked = torch.autograd.grad(y_ref, (x_ref, w), grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grads[0], gx_ref)
    if grad_mode == "masked":
        torch.testing.assert_close(grads[1], gw_masked)
        assert (grads[1][~layer.mask] == 0).all()
    else:  # the dense conv's weight gradient at w * m, pruned weights included
        w_dense = torch.where(layer.mask, w, 0).detach().requires_grad_()
        (gw_dense,) = torch.autograd.grad(dense._conv_forward(x.detach(), w_dense, layer.bias), (w_dense,), grad_out)
        torch.testing.assert_close(grads[1], gw_dense)
    if layer.bias is not None:
        torch.testing.assert_close(grads[2], grad_out.sum((0, 2)))


def test_unbatched_input_and_shape_errors():
    torch.manual_seed(5)
    layer = SparseConv1d(3, 4, 3, padding=1, padding_mode="replicate", sparsity=0.5)
    x = torch.randn(3, 10)
    expected = F.conv1d(F.pad(x, (1, 1), mode="replicate"), layer.weight * layer.mask, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="2-D \\(unbatched\\) or 3-D input, got 4-D"):
        layer(torch.randn(2, 3, 4, 10))
    with pytest.raises(RuntimeError, match="to have 3 channels \\(in_channels\\), got 2"):
        layer(torch.randn(5, 2, 10))
    with pytest.raises(ValueError, match="not supported for grouped convolutions"):
        SparseConv1d(4, 4, 3, groups=2, layout="2:4", sparsity=0.5)
    with pytest.raises(ValueError, match="even effective kernel"):
        SparseConv1d(4, 4, 4, padding="same")
    with pytest.raises(TypeError, match="module must be an nn.Conv1d"):
        SparseConv1d.from_dense(nn.Conv2d(2, 2, 1))


def test_state_dict_round_trip_sparsify_and_densify():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 14, 3))
    x = torch.randn(2, 4, 16)
    report = dynasparse.sparsify(model, 0.6, backend="sparse")
    assert isinstance(model[0], SparseConv1d) and isinstance(model[2], SparseConv1d) and not report.skipped
    assert abs(model[0].sparsity - 0.6) < 0.02
    dense_copy = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3), nn.Flatten(),
                               nn.Linear(8 * 14, 3))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("mask")}
    dense_copy.load_state_dict(state)  # the sparse state_dict has nn.Conv1d's keys and shapes
    out = model(x)
    dynasparse.densify(model)
    assert type(model[0]) is nn.Conv1d
    torch.testing.assert_close(model(x), out)
    layer = SparseConv1d.from_dense(nn.Conv1d(3, 5, 3), sparsity=0.4)
    assert type(layer.to_dense()) is nn.Conv1d and "backend=" in repr(layer)


def test_compiled_conv1d_matches_eager():
    torch.manual_seed(7)
    layer = SparseConv1d(6, 8, 3, padding=1, sparsity=0.8)
    x = torch.randn(2, 6, 40)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
