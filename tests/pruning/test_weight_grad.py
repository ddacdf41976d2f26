"""A sparse layer's weight-gradient override, apart from its grad mode: dense, at the nonzeros, or
none, on every product path (panel kernels, 1x1 and k x k convolutions, grouped, double backward),
against float64 torch."""

import pytest
import torch

from dynasparse.nn import SparseConv2d, SparseLinear


def _layers():
    torch.manual_seed(0)
    return [SparseLinear(12, 7, sparsity=0.6), SparseConv2d(3, 5, 3, padding=1, sparsity=0.6),
            SparseConv2d(4, 6, 1, sparsity=0.5), SparseConv2d(4, 4, 3, groups=2, sparsity=0.5)]


def _input(layer):
    return torch.randn(5, 12) if isinstance(layer, SparseLinear) else torch.randn(2, layer.in_channels, 5, 6)


@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
@pytest.mark.parametrize("weight_grad", [None, "dense", "nonzeros", "none"])
@pytest.mark.parametrize("create_graph", [False, True])
def test_weight_grad_override_against_float64(grad_mode, weight_grad, create_graph):
    for layer in _layers():
        layer.grad_mode, layer.weight_grad = grad_mode, weight_grad
        x = _input(layer).requires_grad_()
        out = layer(x)
        grad_out = torch.randn_like(out)
        weight_grads = torch.autograd.grad(out, [x, layer.weight], grad_out, create_graph=create_graph,
                                           allow_unused=True)
        w = torch.where(layer.mask, layer.weight.detach(), 0).double().requires_grad_()
        x64 = x.detach().double().requires_grad_()
        if isinstance(layer, SparseLinear):
            ref = torch.nn.functional.linear(x64, w, layer.bias.double())
        else:
            ref = torch.nn.functional.conv2d(x64, w, layer.bias.double(), layer.stride, layer.padding, layer.dilation,
                                             layer.groups)
        grad_x, dense = torch.autograd.grad(ref, [x64, w], grad_out.double())
        torch.testing.assert_close(weight_grads[0].double(), grad_x, rtol=1e-4, atol=1e-5)
        kind = weight_grad or ("dense" if grad_mode == "feedback" else "nonzeros")
        if kind == "none":
            assert weight_grads[1] is None, type(layer).__name__
        else:
            expected = dense if kind == "dense" else torch.where(layer.mask, dense, 0)
            torch.testing.assert_close(weight_grads[1].double(), expected, rtol=1e-4, atol=1e-5)


def test_a_bad_weight_grad_is_refused_at_once():
    layer = SparseLinear(4, 4)
    with pytest.raises(ValueError, match="unknown weight_grad 'sparse'"):
        layer.weight_grad = "sparse"
    assert layer.weight_grad is None
    layer.weight_grad = "dense"
    assert "weight_grad=dense" in repr(layer)
