"""Weight quantization: the per-channel error bound, the levels, all-zero channels, the fake-
quantized model against a float64 reference, sparse layers, and the storage accounting
counted by hand; bits outside [2, 16] refused."""

import copy
import math

import pytest
import torch
from torch import nn

import dynasparse
from dynasparse.nn import quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 13, 16])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 1, 3), (1, 1), (6, 0)])
def test_quantized_weights_are_within_half_a_step_per_channel(bits, shape):
    generator = torch.Generator().manual_seed(bits * 100 + len(shape))
    weight = torch.randn(shape, generator=generator) * torch.rand(shape[0], *[1] * (len(shape) - 1),
                                                                  generator=generator) * 5
    levels, scale = quantize.quantize_weight(weight, bits)
    top = 2 ** (bits - 1) - 1
    assert levels.dtype == torch.int32 and levels.shape == weight.shape and scale.shape == (shape[0],)
    assert bool((levels.abs() <= top).all())
    rows = weight.double().reshape(shape[0], -1)
    expected_scale = rows.abs().amax(1) / top if rows.shape[1] else torch.zeros(shape[0], dtype=torch.float64)
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    restored = quantize.dequantize(levels, scale, dtype=torch.float64).reshape(shape[0], -1)
    error = (rows - restored).abs()
    # half a step, plus float32 rounding of w / s near a half-way point
    assert bool((error <= scale.double()[:, None] * (0.5 + 1e-5)).all())
    if rows.shape[1]:
        largest = rows.abs().argmax(1)
        assert torch.equal(levels.reshape(shape[0], -1).abs().gather(1, largest[:, None]).squeeze(1),
                           torch.full((shape[0],), top, dtype=torch.int32))
    torch.testing.assert_close(quantize.fake_quantize_weight(weight, bits).double(),
                               restored.reshape(shape), rtol=0, atol=1e-6)


def test_levels_are_the_nearest_integers_of_w_over_s():
    weight = torch.tensor([[1.0, -0.55, 0.26, 0.16, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    levels, scale = quantize.quantize_weight(weight, 3)  # Q = 3, s = 1 / 3
    assert levels.tolist() == [[3, -2, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert scale[0].item() == pytest.approx(1 / 3) and scale[1].item() == 0.0
    restored = quantize.dequantize(levels, scale)
    assert bool(torch.isfinite(restored).all()) and restored[1].abs().sum() == 0
    two = quantize.quantize_weight(torch.tensor([[0.2, -1.0, 0.6]]), 2)[0]
    assert two.tolist() == [[0, -1, 1]]


@pytest.mark.parametrize("bits", [1, 17, 0, -3])
def test_bits_outside_the_range_are_refused(bits):
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 16\]"):
        quantize.quantize_weight(torch.ones(2, 2), bits)
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 16\]"):
        quantize.fake_quantize(nn.Linear(2, 2), bits)
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 16\]"):
        quantize.model_bits(nn.Linear(2, 2), bits=bits)


@pytest.mark.parametrize("bits", [2.0, True, "4", None])
def test_bits_of_the_wrong_type_are_refused(bits):
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize.quantize_weight(torch.ones(2, 2), bits)


def test_non_finite_and_non_float_weights_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize.quantize_weight(torch.tensor([[1.0, math.inf]]), 4)
    with pytest.raises(TypeError, match="floating-point"):
        quantize.quantize_weight(torch.ones(2, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="0-d"):
        quantize.quantize_weight(torch.tensor(1.0), 4)


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
                         nn.LayerNorm(5), nn.Linear(5, 4))


def test_fake_quantized_model_computes_with_the_dequantized_weights():
    model = _model(0)
    original = copy.deepcopy(model.state_dict())
    small = quantize.fake_quantize(model, 4)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # left alone
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        for name in ("0", "3", "5"):
            weight = reference.get_submodule(name).weight
            rows = weight.reshape(weight.shape[0], -1)
            scale = rows.abs().amax(1, keepdim=True) / 7
            weight.copy_((torch.round(rows / scale).clamp(-7, 7) * scale).reshape(weight.shape))
    x = torch.randn(6, 2, 4, 4)
    torch.testing.assert_close(small(x).double(), reference(x.double()), rtol=1e-5, atol=1e-5)
    for name in ("0.bias", "3.bias", "4.weight", "4.bias", "5.bias"):
        assert torch.equal(small.state_dict()[name], original[name])


def test_sparse_layers_keep_their_masks_and_zeros():
    model = _model(1)
    dynasparse.nn.sparsify(model, 0.7, include=["3"], grad_mode="feedback")
    layer = model[3]
    with torch.no_grad():
        layer.weight.add_(1.0)  # pruned positions hold nonzero values in feedback mode
    small = quantize.fake_quantize(model, 3)
    assert torch.equal(small[3].mask, layer.mask)
    assert bool((small[3].weight[~layer.mask] == 0).all())
    expected = quantize.fake_quantize_weight(layer.masked_weight().detach(), 3)
    assert torch.equal(small[3].weight.detach(), expected)


def test_transposed_sparse_layers_quantize_per_output_channel():
    source = nn.Module()
    source.weight = nn.Parameter(torch.randn(6, 4))  # [in, out]
    source.bias = nn.Parameter(torch.zeros(4))
    layer = dynasparse.nn.SparseTransposedLinear.from_dense(source)
    levels, scale = quantize.quantize_weight(layer.weight, 5, layer=layer)
    assert scale.shape == (4,)
    torch.testing.assert_close(scale, layer.weight.detach().abs().amax(0) / 15)
    restored = quantize.dequantize(levels, scale, layer=layer)
    assert restored.shape == (6, 4)
    assert bool(((restored - layer.weight.detach()).abs() <= scale * (0.5 + 1e-5)).all())


def test_model_bits_counted_by_hand():
    model = _model(2)
    # conv 3x2x3x3 = 54, fc 5x48 = 240, fc 4x5 = 20 weights; biases 3 + 5 + 4, LayerNorm 5 + 5
    others = 3 + 5 + 4 + 10
    assert quantize.model_bits(model) == (54 + 240 + 20 + others) * 32
    assert quantize.model_bits(model) == sum(p.numel() for p in model.parameters()) * 32
    assert quantize.model_bits(model, bits=4) == (54 + 240 + 20) * 4 + (3 + 5 + 4) * 32 + others * 32
    assert quantize.model_bits(model, bits=8, scale_bits=16, float_bits=16) == (
        (54 + 240 + 20) * 8 + (3 + 5 + 4) * 16 + others * 16)
    dynasparse.nn.sparsify(model, 0.0, include=["3", "5"])
    with torch.no_grad():
        fc = model[3].mask.clone().fill_(False)
        fc.view(-1)[:12] = True  # 12 of 240 kept: position 12 * (32 + 8) = 480 < bitmask 240 + 12 * 32
        model[3].set_mask(fc)
        last = model[5].mask.clone()
        last[0, 0] = False  # 19 of 20 kept: bitmask 20 + 19 * 32 = 628 < position 19 * (32 + 5)
        model[5].set_mask(last)
    found = quantize.storage(model)
    codes = {layer.name: (layer.code, layer.kept, layer.bits) for layer in found.layers}
    assert codes == {"0": ("dense", 54, 54 * 32), "3": ("position", 12, 480), "5": ("bitmask", 19, 628)}
    assert found.total == 54 * 32 + 480 + 628 + others * 32 == quantize.model_bits(model)
    # quantized and pruned: the values at 2 bits, one scale per output channel
    assert quantize.model_bits(model, bits=2) == (54 * 2 + 3 * 32) + (12 * (2 + 8) + 5 * 32) + (
        (20 + 19 * 2) + 4 * 32) + others * 32
    with torch.no_grad():
        model[5].set_mask(torch.zeros_like(last))
    assert quantize.storage(model).layers[2].bits == 0


def test_sparse_code_is_the_cheaper_one():
    for numel in (1, 2, 7, 64, 1000):
        for kept in sorted({0, 1, numel // 3, numel // 2, numel}):
            for value_bits in (2, 8, 32):
                bits, code = quantize.sparse_weight_bits(numel, kept, value_bits)
                position = kept * (value_bits + max(1, math.ceil(math.log2(numel))))
                bitmask = numel + kept * value_bits
                assert bits == (0 if kept == 0 else min(position, bitmask))
                if kept:
                    assert code == ("position" if position <= bitmask else "bitmask")


def test_storage_refusals():
    with pytest.raises(ValueError, match="float_bits must be an int >= 1"):
        quantize.model_bits(nn.Linear(2, 2), float_bits=0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize.model_bits(torch.ones(2))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        quantize.fake_quantize("model", 4)
