"""SparseLinear, SparseConv2d, sparsify/densify and compressed checkpoints, against the dense
torch modules computing with w * m in float64."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynasparse
import dynasparse.optim
from dynasparse.nn import SparseConv2d, SparseLinear, sparse_masks
from dynasparse.nn.modules import SparseTransposedLinear

from tests.helpers import assert_close_to_float64


def seeded(seed):
    torch.manual_seed(seed)


def masked_weight(module):
    return torch.where(module.mask, module.weight, 0)


@pytest.mark.parametrize("layout", ["unstructured", "2:4", "block16", "block32"])
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_sparse_linear_matches_dense_float64(layout, grad_mode, sparsity):
    seeded(1)
    layer = SparseLinear(64, 96, sparsity=sparsity, layout=layout, grad_mode=grad_mode).double()
    if layout != "2:4":  # exact up to rounding the kept count to whole weights or blocks
        block = int(layout[len("block"):]) if layout.startswith("block") else 1
        assert abs(layer.sparsity - sparsity) <= 0.5 * block * block / layer.weight.numel() + 1e-12
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), grad_out)

    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, torch.where(layer.mask, w, 0), b)
    gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x_ref, w, b), grad_out)
    if grad_mode == "feedback":
        gw_ref = grad_out.reshape(-1, 96).T @ x.detach().reshape(-1, 64)
    for ours, expected in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(ours, expected)
    if grad_mode == "masked":
        assert (gw[~layer.mask] == 0).all()


@pytest.mark.parametrize("config", [
    dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=1, stride=2),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=3, padding="same"), dict(kernel_size=3, padding="valid"),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, groups=2), dict(kernel_size=3, padding=1, groups=8, bias=False),
], ids=str)
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_sparse_conv2d_matches_dense_float64(config, grad_mode):
    seeded(2)
    layer = SparseConv2d(8, 16, sparsity=0.7, grad_mode=grad_mode, **config).double()
    dense = nn.Conv2d(8, 16, **config).double()
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64, requires_grad=True)
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
    else:  # DPF: the gradient at w * m for every weight, the dense conv's weight gradient
        w_dense = torch.where(layer.mask, w, 0).detach().requires_grad_()
        (gw_dense,) = torch.autograd.grad(dense._conv_forward(x.detach(), w_dense, layer.bias), (w_dense,), grad_out)
        if layer.groups == 1:
            torch.testing.assert_close(grads[1], gw_dense)


def test_unbatched_conv_input():
    seeded(3)
    layer = SparseConv2d(3, 4, 3, sparsity=0.5)
    x = torch.randn(3, 7, 7)
    torch.testing.assert_close(layer(x), F.conv2d(x, masked_weight(layer), layer.bias))
    reflect = SparseConv2d(3, 4, 3, padding=1, padding_mode="reflect", sparsity=0.5)
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), masked_weight(reflect), reflect.bias)
    torch.testing.assert_close(reflect(x), expected)
    with pytest.raises(ValueError, match="3-D \\(unbatched\\) or 4-D"):
        layer(torch.randn(2, 2, 3, 7, 7))


def test_state_dict_matches_dense_module_and_dense_checkpoints_load():
    seeded(4)
    dense = nn.Linear(10, 6)
    layer = SparseLinear(10, 6, sparsity=0.5)
    assert set(layer.state_dict()) == {"weight", "bias", "mask"}
    mask_before = layer.mask.clone()
    layer.load_state_dict(dense.state_dict())  # no mask in a dense checkpoint: keep ours
    assert torch.equal(layer.weight, dense.weight) and torch.equal(layer.mask, mask_before)
    other = SparseLinear(10, 6, sparsity=0.8)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.mask, layer.mask)
    x = torch.randn(4, 10)
    torch.testing.assert_close(other(x), F.linear(x, masked_weight(layer), layer.bias))


def test_set_mask_rebuilds_the_plan_and_in_place_edits_are_noticed():
    seeded(5)
    layer = SparseLinear(12, 8, sparsity=0.5)
    x = torch.randn(3, 12)
    mask_buffer = layer.mask
    new_mask = torch.rand(8, 12) < 0.3
    layer.set_mask(new_mask)
    assert layer.mask is mask_buffer  # optimizers holding the buffer see the change
    torch.testing.assert_close(layer(x), F.linear(x, torch.where(new_mask, layer.weight, 0), layer.bias))
    with torch.no_grad():
        layer.mask[0] = True
    torch.testing.assert_close(layer(x), F.linear(x, masked_weight(layer), layer.bias))


@pytest.mark.parametrize("make,match,error", [
    (lambda: SparseLinear(8, 8, sparsity=1.0), "sparsity must be in", ValueError),
    (lambda: SparseLinear(8, 8, sparsity=-0.1), "sparsity must be in", ValueError),
    (lambda: SparseLinear(8, 8, layout="block24"), "unknown layout", ValueError),
    (lambda: SparseLinear(8, 8, layout="diagonal"), "unknown layout", ValueError),
    (lambda: SparseLinear(40, 8, layout="block16"), "multiples of 16", ValueError),
    (lambda: SparseLinear(6, 8, layout="2:4"), "divisible by 4", ValueError),
    (lambda: SparseLinear(8, 8, grad_mode="dense"), "unknown grad_mode", ValueError),
    (lambda: SparseConv2d(8, 8, 3, groups=2, layout="block16"), "grouped", ValueError),
    (lambda: SparseLinear(8, 8).set_mask(torch.ones(8, 8)), "torch.bool", TypeError),
    (lambda: SparseLinear(8, 8).set_mask(torch.ones(8, 9, dtype=torch.bool)), "shape", ValueError),
])
def test_bad_construction_is_a_clear_error(make, match, error):
    with pytest.raises(error, match=match):
        make()


def test_from_dense_to_dense_round_trip_and_repr():
    seeded(6)
    dense = nn.Conv2d(4, 8, 3, padding=1, bias=False).double()
    sparse = SparseConv2d.from_dense(dense, sparsity=0.75)
    assert sparse.weight.dtype == torch.float64 and sparse.bias is None
    assert abs(sparse.sparsity - 0.75) < 1e-9 and abs(sparse.density - 0.25) < 1e-9
    kept = sparse.weight.abs()[sparse.mask]
    assert kept.min() >= sparse.weight.abs()[~sparse.mask].max()  # magnitude mask
    back = sparse.to_dense()
    assert type(back) is nn.Conv2d and torch.equal(back.weight, masked_weight(sparse))
    assert "sparsity=0.750" in repr(sparse) and "grad_mode=feedback" in repr(sparse)


def test_sparsify_and_densify_a_cnn_and_an_mlp():
    seeded(7)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10), nn.Conv3d(2, 2, 1))
    x = torch.randn(2, 3, 6, 6)
    report = dynasparse.sparsify(model, 0.8, exclude=["0"])
    assert report.converted == ["2", "4", "6"]
    assert "7" in report.skipped and "Conv3d" in report.skipped["7"]
    assert type(model[0]) is nn.Conv2d and isinstance(model[4], SparseLinear)
    y_sparse = model[:7](x)
    assert dynasparse.densify(model) == ["2", "4", "6"]
    assert type(model[4]) is nn.Linear
    torch.testing.assert_close(model[:7](x), y_sparse)
    with pytest.raises(ValueError, match="could not convert"):
        dynasparse.sparsify(model, 0.5, strict=True)
    with pytest.raises(ValueError, match="the layer itself"):
        dynasparse.sparsify(nn.Linear(3, 3))


def test_sparse_masks_drive_the_fused_optimizer():
    seeded(8)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    dynasparse.sparsify(model, 0.75, grad_mode="masked")
    optimizer = dynasparse.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2,
                                     masks=sparse_masks(model))
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        optimizer.step()
    for layer in (model[0], model[2]):
        assert (layer.weight[~layer.mask] == 0).all()


@pytest.mark.parametrize("optimizer_class", [dynasparse.optim.SGD, dynasparse.optim.AdamW])
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_the_step_writes_the_packed_values_the_next_forward_reads(optimizer_class, grad_mode, monkeypatch):
    seeded(10)
    linear = SparseLinear(300, 37, sparsity=0.8, grad_mode=grad_mode)
    conv = SparseConv2d(3, 5, 3, padding=1, sparsity=0.7, grad_mode=grad_mode)
    transposed = SparseTransposedLinear(37, 11, sparsity=0.6, grad_mode=grad_mode)  # no packing: rows differ
    layers = nn.ModuleList([linear, conv, transposed])
    optimizer = optimizer_class(layers.parameters(), lr=0.05, masks=sparse_masks(layers))
    x, images = torch.randn(6, 300), torch.randn(2, 3, 7, 7)

    def loss():
        return linear(x).square().mean() + conv(images).square().mean() + transposed(linear(x)).square().mean()

    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    repacked = []
    original_pack = dynasparse.MaskPlan._pack
    monkeypatch.setattr(dynasparse.MaskPlan, "_pack",
                        lambda plan, weight: repacked.append(plan.shape) or original_pack(plan, weight))
    with torch.no_grad():
        outputs = [linear(x), conv(images), transposed(x[:, :37])]
    assert repacked == [(11, 37)]  # only the transposed layer packs w again
    expected = [x.double() @ masked_weight(linear).double().T + linear.bias.double(),
                F.conv2d(images.double(), masked_weight(conv).double(), conv.bias.double(), padding=1),
                x[:, :37].double() @ masked_weight(transposed).double() + transposed.bias.double()]
    for ours, exact in zip(outputs, expected):
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_sparsify_transformers_models_built_from_a_config(family):
    transformers = pytest.importorskip("transformers")

    def build():
        seeded(9)
        if family == "bert":
            return transformers.BertModel(transformers.BertConfig(
                num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50)).eval()
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)).eval()

    ids = torch.randint(0, 50, (2, 7))

    def output(model):
        out = model(ids)
        # BERT's pooler reads only the first token: add it so that every layer gets a gradient.
        return out.last_hidden_state + out.pooler_output[:, None] if family == "bert" else out.logits

    model = build()
    before = output(model)
    report = dynasparse.sparsify(model, 0.0)
    torch.testing.assert_close(output(model), before)  # sparsity 0: the same function
    if family == "gpt2":
        assert all(isinstance(model.get_submodule(name), SparseTransposedLinear) for name in report.converted)
        assert "lm_head" in report.skipped and "tied" in report.skipped["lm_head"]
    assert len(report.converted) == (2 * 6 + 1 if family == "bert" else 2 * 4)
    model = build()
    dynasparse.sparsify(model, 0.9)
    output(model).sum().backward()
    for name in report.converted:
        layer = model.get_submodule(name)
        assert abs(layer.sparsity - 0.9) < 0.01 and layer.weight.grad is not None


def test_compressed_checkpoint_is_small_exact_and_safe(tmp_path):
    seeded(10)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    dynasparse.sparsify(model, 0.9)
    path, plain = tmp_path / "model.dsp", tmp_path / "model.pt"
    dynasparse.save(model, path)
    torch.save(model.state_dict(), plain)
    assert os.path.getsize(path) <= 0.2 * os.path.getsize(plain)

    fresh = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    dynasparse.sparsify(fresh, 0.5)
    dynasparse.load(fresh, path)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        expected = torch.where(model.state_dict()[name.replace("weight", "mask")], a, 0) if name.endswith("weight") \
            else a
        assert torch.equal(b, expected), name
    state = dynasparse.load(None, path)
    assert set(state) == set(model.state_dict())

    data = path.read_bytes()
    (tmp_path / "truncated.dsp").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        dynasparse.load(None, tmp_path / "truncated.dsp")
    torch.save({"format": "something else"}, tmp_path / "other.dsp")
    with pytest.raises(ValueError, match="expected format"):
        dynasparse.load(None, tmp_path / "other.dsp")


def test_autocast_bfloat16_on_cpu():
    seeded(11)
    layer = SparseLinear(32, 16, sparsity=0.5)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    expected = F.linear(x.detach().bfloat16(), masked_weight(layer).bfloat16(), layer.bias.bfloat16())
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


def test_compiled_model_matches_eager_without_graph_breaks():
    seeded(12)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 8))
    dynasparse.sparsify(model, 0.8, grad_mode="masked")
    x = torch.randn(5, 24)
    eager = model(x).square().sum()
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True)
    out = compiled_model(x).square().sum()
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_cpu_conv_forward_is_an_implicit_gemm(grad_mode, monkeypatch):
    """A k x k float32 SparseConv2d on CPU runs conv2d_panels forward (never unfolding its
    input) and matches float64 F.conv2d of w * m forward and backward, batched or not."""
    seeded(13)
    conv = dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1))
    layer = SparseConv2d(5, 12, 3, sparsity=0.8, grad_mode=grad_mode, **conv)
    calls = []
    original = dynasparse.ops.conv2d_panels
    monkeypatch.setattr(dynasparse.ops, "conv2d_panels", lambda *args, **kwargs: calls.append(1) or original(*args,
                                                                                                             **kwargs))
    for shape in ((3, 5, 13, 70), (5, 9, 8)):
        x = torch.randn(shape, requires_grad=True)
        before = len(calls)
        with monkeypatch.context() as no_unfold:
            no_unfold.setattr(F, "unfold", None)
            y = layer(x)
        assert len(calls) == before + 1
        grad_out = torch.randn_like(y)
        gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), grad_out)
        x_ref = x.detach().double().requires_grad_()
        w_ref = torch.where(layer.mask, layer.weight, 0).detach().double().requires_grad_()
        b_ref = layer.bias.detach().double().requires_grad_()
        y_ref = F.conv2d(x_ref, w_ref, b_ref, **conv)
        gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x_ref, w_ref, b_ref), grad_out.double())
        if grad_mode == "masked":
            gw_ref = torch.where(layer.mask, gw_ref, 0)
        for got, want in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
            torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_size, conv", [
    ((3, 3), dict(padding=(1, 1))), ((3, 5), dict(padding=(0, 4), dilation=(1, 2))),
    ((2, 3), dict(padding=(1, 0))), ((3, 3), dict(padding=(3, 1))),
    ((3, 3), dict(padding=(1, 1), stride=(2, 2))), ((5, 3), dict(padding=(2, 0), stride=(3, 2), dilation=(1, 2))),
    ((3, 3), dict(padding=(2, 2), stride=(2, 2), dilation=(2, 2))), ((1, 1), dict(padding=(1, 0), stride=(2, 1))),
    ((4, 2), dict(padding=(5, 0), stride=(2, 3))), ((2, 2), dict(padding=(0, 0), stride=(4, 3))),
], ids=str)
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
@pytest.mark.parametrize("sparsity", [0.0, 0.85, 1.0])
def test_cpu_conv_input_gradient_runs_on_the_kernel(kernel_size, conv, grad_mode, sparsity, monkeypatch):
    """A float32 SparseConv2d on CPU computes its input gradient with conv2d_panels (nothing
    unfolded or folded in forward or backward): one call over the flipped, transposed weight
    at stride 1, one per phase (input positions alike modulo the stride that some tap reaches)
    otherwise, padding beyond the kernel's reach included; matches float64 F.conv2d of w * m
    within twice torch's own float32 error."""
    seeded(15)
    layer = SparseConv2d(7, 10, kernel_size, sparsity=min(sparsity, 0.5), grad_mode=grad_mode, **conv)
    if sparsity == 1.0:
        layer.set_mask(torch.zeros_like(layer.mask))
    calls = []
    original = dynasparse.ops.conv2d_panels
    monkeypatch.setattr(dynasparse.ops, "conv2d_panels", lambda *args, **kwargs: calls.append(1) or original(*args,
                                                                                                             **kwargs))
    monkeypatch.setattr(F, "unfold", None)
    monkeypatch.setattr(F, "fold", None)
    x = torch.randn(3, 7, 12, 17, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), grad_out)

    def torch_conv(dtype):
        x_ref = x.detach().to(dtype).requires_grad_()
        w_ref = torch.where(layer.mask, layer.weight, 0).detach().to(dtype).requires_grad_()
        b_ref = layer.bias.detach().to(dtype).requires_grad_()
        y_ref = F.conv2d(x_ref, w_ref, b_ref, **conv)
        gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x_ref, w_ref, b_ref), grad_out.to(dtype))
        if grad_mode == "masked":
            gw_ref = torch.where(layer.mask, gw_ref, 0)
        return y_ref, gx_ref, gw_ref, gb_ref

    for got, torch_own, exact in zip((y, gx, gw, gb), torch_conv(torch.float32), torch_conv(torch.float64)):
        assert_close_to_float64(got, torch_own, exact)
    phases = 1
    for size, kernel, pad, step, dilation in zip(x.shape[2:], kernel_size, conv["padding"], conv.get("stride", (1, 1)),
                                                 conv.get("dilation", (1, 1))):
        phases *= sum(any((residue + pad - dilation * tap) % step == 0 for tap in range(kernel))
                      for residue in range(min(step, size)))
    assert len(calls) == 1 + phases


def test_compiled_conv_matches_eager_without_graph_breaks():
    seeded(14)
    layer = SparseConv2d(6, 10, 3, padding=1, sparsity=0.7)
    x = torch.randn(2, 6, 9, 11, requires_grad=True)
    eager = layer(x).square().sum()
    eager_grads = torch.autograd.grad(eager, (x, layer.weight, layer.bias))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x).square().sum()
    grads = torch.autograd.grad(out, (x, layer.weight, layer.bias))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_conv_autocast_bfloat16_on_cpu():
    seeded(15)
    layer = SparseConv2d(4, 8, 3, padding=1, sparsity=0.5)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    expected = F.conv2d(x.detach().bfloat16(), masked_weight(layer).bfloat16(), layer.bias.bfloat16(), padding=1)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
