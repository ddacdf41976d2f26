"""Weight quantization (the baseline pruning is compared with at equal storage) and model size in bits.

    levels, scale = quantize.quantize_weight(layer.weight, bits=4)   # integers in [-7, 7], one scale per output
    small = quantize.fake_quantize(model, bits=4)                    # a copy computing with the dequantized weights
    quantize.model_bits(small, bits=4)                               # its storage
    quantize.model_bits(pruned)                                      # a pruned model: the cheaper sparse code per layer

Quantizer: symmetric, uniform, per output channel (row of the weight seen as [out, in * kernel]):
q = clamp(round(w / s), -Q, Q) with Q = 2**(bits - 1) - 1 and s = max|w_row| / Q, so the
largest weight of a row is exactly representable and |w - s q| <= s / 2 everywhere; a row of
zeros gets s = 0 and q = 0. `bits` is an int in [2, 16] (2 bits: the levels -1, 0, 1).

The weights quantized (and counted as weights below): those of nn.Linear, nn.Conv1d/2d/3d and
the dynasparse sparse layers (`WEIGHT_LAYERS`); a sparse layer's effective weight w * m is
quantized (pruned weights stay exactly 0, the mask is kept). Biases and every other parameter
stay float.

Storage (`model_bits`), exactly:
- a dense weight: numel x v bits, v = `bits` for a quantized model, else `float_bits` (32);
- a sparse layer's weight (one with a mask; n = numel, k = kept weights of the mask), the
  cheaper of two codes, chosen per layer: "position" k x (v + ceil(log2 n)) (each kept value
  with its flat index; at least 1 index bit) or "bitmask" n + k x v (one bit per weight, then
  the kept values); an empty mask costs 0;
- a quantized weight adds one scale per output channel, `scale_bits` (32) each;
- every other parameter (biases, normalization weights): numel x `float_bits`.
Buffers (masks, batch-norm statistics) and the architecture are not counted. For a dense,
unquantized model this is 32 x the parameter count, as `experiments.analysis.size_in_bits`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers

import torch
from torch import nn

from .modules import SPARSE_MODULES, SparseTransposedLinear

_OWNER = "dynasparse.nn.quantize"
BITS = (2, 16)
ENCODINGS = ("dense", "position", "bitmask")
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *SPARSE_MODULES)


def check_bits(owner: str, name: str, bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int in [{BITS[0]}, {BITS[1]}], got {type(bits).__name__} "
                        f"{bits!r}")
    if not BITS[0] <= bits <= BITS[1]:
        raise ValueError(f"{owner}: {name} must be an int in [{BITS[0]}, {BITS[1]}] (symmetric levels need 2 bits at "
                         f"least; above 16 use the float weights), got {bits}")


def _rows(layer: nn.Module | None, weight: torch.Tensor) -> torch.Tensor:
    """The weight as [output channels, rest] (a SparseTransposedLinear stores [in, out])."""
    if isinstance(layer, SparseTransposedLinear):
        return weight.T
    return weight.reshape(weight.shape[0], -1) if weight.dim() else weight.reshape(1, 1)


def quantize_weight(weight: torch.Tensor, bits: int, *, layer: nn.Module | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, scale): integer levels (int32, shaped like `weight`) in [-Q, Q] and one float
    scale per output channel (the module docstring's quantizer). `layer`: the module the
    weight belongs to, where its output channels are not its first dimension
    (SparseTransposedLinear)."""
    owner = f"{_OWNER}.quantize_weight"
    check_bits(owner, "bits", bits)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{owner}: weight must be a floating-point tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() < 1:
        raise ValueError(f"{owner}: weight must have an output dimension, got a 0-d tensor")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{owner}: weight holds NaN or infinite values; they have no quantized level")
    top = 2 ** (bits - 1) - 1
    with torch.no_grad():
        rows = _rows(layer, weight.detach())
        scale = rows.abs().amax(1) / top if rows.shape[1] else rows.new_zeros(rows.shape[0])
        safe = torch.where(scale > 0, scale, 1.0)[:, None]
        levels = torch.clamp(torch.round(rows / safe), -top, top).to(torch.int32)
        levels = levels.T.contiguous() if isinstance(layer, SparseTransposedLinear) else levels.reshape(weight.shape)
    return levels, scale


def dequantize(levels: torch.Tensor, scale: torch.Tensor, *, layer: nn.Module | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """scale x levels per output channel, in `dtype`."""
    rows = _rows(layer, levels).to(dtype) * scale.to(dtype)[:, None]
    return rows.T.contiguous() if isinstance(layer, SparseTransposedLinear) else rows.reshape(levels.shape)


def fake_quantize_weight(weight: torch.Tensor, bits: int, *, layer: nn.Module | None = None) -> torch.Tensor:
    """The weight after quantizing and dequantizing it (same dtype and shape)."""
    levels, scale = quantize_weight(weight, bits, layer=layer)
    return dequantize(levels, scale, layer=layer, dtype=weight.dtype)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights are quantized and counted as weights, by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, WEIGHT_LAYERS) and isinstance(getattr(module, "weight", None), torch.Tensor)}


def fake_quantize(model: nn.Module, bits: int) -> nn.Module:
    """A copy of `model` whose weight layers compute with their weights quantized to `bits`
    and dequantized (float tensors holding the quantized values; sparse layers keep their
    masks, pruned weights 0); biases and other parameters unchanged. `model` is left as it was."""
    owner = f"{_OWNER}.fake_quantize"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    check_bits(owner, "bits", bits)
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for module in weight_layers(quantized).values():
            weight = module.masked_weight() if isinstance(module, SPARSE_MODULES) else module.weight
            module.weight.copy_(fake_quantize_weight(weight, bits, layer=module))
    return quantized


def sparse_weight_bits(numel: int, kept: int, value_bits: int) -> tuple[int, str]:
    """(bits, code) of a sparse weight of `numel` entries with `kept` stored values: the cheaper
    of "position" and "bitmask" (module docstring); ties go to "position"."""
    if kept == 0:
        return 0, "position"
    position = kept * (value_bits + max(1, math.ceil(math.log2(numel))))
    bitmask = numel + kept * value_bits
    return (position, "position") if position <= bitmask else (bitmask, "bitmask")


@dataclasses.dataclass(frozen=True)
class LayerBits:
    """One weight's storage: `code` "dense", "position" or "bitmask"; `scales` the bits of its
    quantization scales (0 unquantized)."""

    name: str
    numel: int
    kept: int
    code: str
    bits: int
    scales: int = 0


@dataclasses.dataclass(frozen=True)
class Storage:
    """A model's storage: its weights layer by layer, and the other parameters' bits."""

    layers: list[LayerBits]
    other: int

    @property
    def total(self) -> int:
        return sum(layer.bits + layer.scales for layer in self.layers) + self.other


def storage(model: nn.Module, *, bits: int | None = None, float_bits: int = 32, scale_bits: int = 32) -> Storage:
    """The storage of `model` (module docstring), `bits` the quantized weights' bits (None:
    float weights)."""
    owner = f"{_OWNER}.storage"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
    if bits is not None:
        check_bits(owner, "bits", bits)
    for name, value in (("float_bits", float_bits), ("scale_bits", scale_bits)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
    value_bits = float_bits if bits is None else bits
    layers, counted = [], set()
    for name, module in weight_layers(model).items():
        weight = module.weight
        counted.add(id(weight))
        mask = getattr(module, "mask", None) if isinstance(module, SPARSE_MODULES) else None
        if mask is None:
            code, kept, size = "dense", weight.numel(), weight.numel() * value_bits
        else:
            kept = int(torch.count_nonzero(mask))
            size, code = sparse_weight_bits(weight.numel(), kept, value_bits)
        scales = 0 if bits is None else _rows(module, weight).shape[0] * scale_bits
        layers.append(LayerBits(name, weight.numel(), kept, code, size, scales))
    other = sum(p.numel() for p in model.parameters() if id(p) not in counted) * float_bits
    return Storage(layers, other)


def model_bits(model: nn.Module, *, bits: int | None = None, float_bits: int = 32, scale_bits: int = 32) -> int:
    """The storage of `model` in bits (module docstring): `storage(...).total`."""
    return storage(model, bits=bits, float_bits=float_bits, scale_bits=scale_bits).total


__all__ = ["BITS", "ENCODINGS", "LayerBits", "Storage", "WEIGHT_LAYERS", "check_bits", "dequantize", "fake_quantize",
           "fake_quantize_weight", "model_bits", "quantize_weight", "sparse_weight_bits", "storage", "weight_layers"]
