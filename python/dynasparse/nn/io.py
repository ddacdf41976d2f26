"""Compressed checkpoints: dynasparse.save(model, path) / dynasparse.load(model_or_none, path).

A sparse layer's weight is stored as its active values (in row-major order) plus the mask
packed 32 bits a word; everything else in the state_dict is stored as is. Loading goes
through torch.load(weights_only=True), so a checkpoint can hold tensors and plain data
only, never code. What is saved is the pruned model: a weight at a pruned position loads
as 0 (in feedback mode the dense weights there are not kept; save the plain state_dict
with torch.save to resume DPF training exactly).
"""

from __future__ import annotations

import os
import zipfile

import torch
from torch import nn

from .. import ops
from .modules import SPARSE_MODULES

FORMAT = "dynasparse.compressed/1"


def _sparse_prefixes(model: nn.Module) -> list[str]:
    return [f"{name}." if name else "" for name, module in model.named_modules() if isinstance(module, SPARSE_MODULES)]


def compress_state_dict(model: nn.Module) -> dict:
    state = model.state_dict()
    sparse = {}
    for prefix in _sparse_prefixes(model):
        weight, mask = state.pop(prefix + "weight"), state.pop(prefix + "mask")
        sparse[prefix] = {"shape": list(weight.shape), "mask_words": ops.pack_mask(mask.reshape(-1)).cpu(),
                          "values": weight[mask].detach().cpu()}
    return {"format": FORMAT, "dense": {k: v.detach().cpu() for k, v in state.items()}, "sparse": sparse}


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model`'s state with its sparse layers compressed (see the module docstring)."""
    torch.save(compress_state_dict(model), path)


def _corrupt(path, why: str) -> ValueError:
    return ValueError(f"dynasparse.load: {path} is not a valid dynasparse checkpoint ({why}); "
                      "the file may be truncated or corrupted")


def decompress_state_dict(payload, path="<checkpoint>") -> dict[str, torch.Tensor]:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _corrupt(path, f"expected format {FORMAT!r}")
    dense, sparse = payload.get("dense"), payload.get("sparse")
    if not isinstance(dense, dict) or not isinstance(sparse, dict):
        raise _corrupt(path, "missing its dense or sparse section")
    state = dict(dense)
    for prefix, entry in sparse.items():
        try:
            shape, words, values = entry["shape"], entry["mask_words"], entry["values"]
        except (KeyError, TypeError) as error:
            raise _corrupt(path, f"sparse entry {prefix!r} is incomplete") from error
        numel = 1
        for size in shape:
            numel *= int(size)
        if words.dtype != torch.int32 or words.shape != ((numel + 31) // 32,):
            raise _corrupt(path, f"mask of {prefix!r} does not fit its shape {shape}")
        mask = ops.unpack_mask(words, numel)
        if values.dim() != 1 or values.numel() != int(mask.sum()):
            raise _corrupt(path, f"{prefix!r} has {values.numel()} values for {int(mask.sum())} active weights")
        weight = values.new_zeros(numel)
        weight[mask] = values
        state[prefix + "weight"] = weight.reshape(shape)
        state[prefix + "mask"] = mask.reshape(shape)
    return state


def load(model: nn.Module | None, path: str | os.PathLike, *, map_location=None):
    """Read a checkpoint written by `save`. With a model (already sparsified the same way),
    load into it and return it; with None, return the decompressed state_dict."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise _corrupt(path, f"{type(error).__name__}: {error}") from error
    state = decompress_state_dict(payload, path)
    if model is None:
        return state
    model.load_state_dict(state)
    return model
