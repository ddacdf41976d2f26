"""Compressed checkpoints: dynasparse.save(model, path) / dynasparse.load(model_or_none, path).

What is saved is the pruned model: a weight at a pruned position loads as 0 (in feedback
mode the dense weights there are not kept; save the plain state_dict with torch.save to
resume DPF training exactly).

The file is a safetensors file (suggested name `*.dsp.safetensors`; the content, not the
name, decides how it is read): no pickle, memory-mapped on loading, readable by any
safetensors reader. Format "dynasparse.compressed/2":

- Tensors. Every state_dict entry is stored under its own name, except a sparse layer's
  `weight` and `mask` (layer prefix P, e.g. "encoder.0."; "" for a bare layer):
  `P.weight.values`, its active weights in row-major order, and `P.mask.words`, the
  flattened mask packed into int32 words, bit j of word w being element 32 * w + j
  (dynasparse.ops.pack_mask; tail bits zero).
- `__metadata__` (safetensors' string-to-string map):
  `format`: "dynasparse.compressed/2";
  `layers`: JSON {P: {"shape": [...], "layout": ..., "grad_mode": ...}} for each sparse layer;
  `sha256`: JSON {tensor name: sha256 hex digest of its bytes as stored};
  `header_sha256`: sha256 of the file's first 8 + header-length bytes (the length prefix and
  the header JSON with its padding) as written with this value set to 64 "0" characters.
  Together the two checksums cover every byte of the file: any change to the header (names,
  dtypes, shapes, offsets, metadata, even whitespace), to a tensor's bytes, or to the length
  is refused with an error naming what failed. They detect corruption, not deliberate edits.

Format "dynasparse.compressed/1" files (a torch.save zip, written by dynasparse before the
move to safetensors) still load, through torch.load(weights_only=True), after the zip's
CRC-32 checks of each entry.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import struct
import zipfile
import zlib

import safetensors
import safetensors.torch
import torch
from torch import nn

from .. import ops
from ..layout import GRAD_MODES
from .modules import LAYOUT_NAMES, SPARSE_MODULES

FORMAT = "dynasparse.compressed/2"
FORMAT_1 = "dynasparse.compressed/1"
_VALUES, _WORDS = "weight.values", "mask.words"
_HEADER_DIGEST = "header_sha256"
_UNSET_DIGEST = "0" * 64
# What a damaged zip or pickle can raise from zipfile and torch.load.
_ARCHIVE_ERRORS = (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, NotImplementedError,
                   OverflowError, struct.error, zlib.error, pickle.UnpicklingError)


def _sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"{name}." if name else "", module) for name, module in model.named_modules()
            if isinstance(module, SPARSE_MODULES)]


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _digest_field(digest: str) -> bytes:
    return f'"{_HEADER_DIGEST}":"{digest}"'.encode()


def _compress(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    state = model.state_dict()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"dynasparse.save: state_dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                             "a safetensors checkpoint holds tensors only")
        if value.is_meta:
            raise ValueError(f"dynasparse.save: state_dict entry {name!r} is on the meta device (it has no values)")
    tensors, layers = {}, {}
    for prefix, module in _sparse_layers(model):
        weight, mask = state.pop(prefix + "weight"), state.pop(prefix + "mask")
        layers[prefix] = {"shape": list(weight.shape), "layout": module.layout, "grad_mode": module.grad_mode}
        tensors[prefix + _WORDS] = ops.pack_mask(mask.reshape(-1)).cpu()
        tensors[prefix + _VALUES] = weight[mask].detach().cpu()
    storages = set()
    for name, value in state.items():
        if name in tensors:
            raise ValueError(f"dynasparse.save: state_dict entry {name!r} has the name a sparse layer's compressed "
                             "weight is stored under")
        value = value.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory (tied weights): each gets its own copy.
        if value.untyped_storage().data_ptr() in storages:
            value = value.clone()
        storages.add(value.untyped_storage().data_ptr())
        tensors[name] = value
    return tensors, layers


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write `model`'s state with its sparse layers compressed, as a checksummed safetensors
    file (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"dynasparse.save: model must be an nn.Module, got {type(model).__name__}")
    path = _fspath(path, "save")
    tensors, layers = _compress(model)
    metadata = {"format": FORMAT, "layers": json.dumps(layers, sort_keys=True),
                "sha256": json.dumps({name: _sha256(value) for name, value in tensors.items()}, sort_keys=True),
                _HEADER_DIGEST: _UNSET_DIGEST}
    with open(path, "wb"):  # Python's errors name the path (a directory, a missing folder); safetensors' do not
        pass
    safetensors.torch.save_file(tensors, path, metadata)
    with open(path, "r+b") as file:
        header = file.read(8)
        header += file.read(int.from_bytes(header, "little"))
        if header.count(_digest_field(_UNSET_DIGEST)) != 1:
            raise RuntimeError("dynasparse.save: this safetensors version writes its header in a form dynasparse "
                               f"does not recognize (no single {_HEADER_DIGEST} field)")
        file.seek(0)
        file.write(header.replace(_digest_field(_UNSET_DIGEST), _digest_field(hashlib.sha256(header).hexdigest())))


def _fspath(path, caller: str):
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(f"dynasparse.{caller}: path must be a str or os.PathLike, got {type(path).__name__}") from None


def _corrupt(path, why: str) -> ValueError:
    return ValueError(f"dynasparse.load: {path} is not a valid dynasparse checkpoint ({why}); "
                      "the file may be truncated or corrupted")


def _shape(prefix: str, shape, path) -> list[int]:
    if not isinstance(shape, (list, tuple)) or not all(type(size) is int and size >= 0 for size in shape):
        raise _corrupt(path, f"field 'shape' of sparse layer {prefix!r} is {shape!r}, not a list of sizes")
    return list(shape)


def _sparse_weight(prefix: str, shape: list[int], words, values, names: tuple[str, str],
                   path) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, mask) of a sparse layer from its packed mask and active values; `names`
    are what the file calls those two (tensor names, or format 1's fields)."""
    numel = 1
    for size in shape:
        numel *= size
    for name, tensor in zip(names, (words, values)):
        if not isinstance(tensor, torch.Tensor):
            raise _corrupt(path, f"{name} of sparse layer {prefix!r} is " +
                           ("missing" if tensor is None else f"a {type(tensor).__name__}, not a tensor"))
    if words.dtype != torch.int32 or words.shape != ((numel + 31) // 32,):
        raise _corrupt(path, f"{names[0]} ({words.dtype}, shape {list(words.shape)}) does not fit the shape {shape} "
                             f"of sparse layer {prefix!r}")
    mask = ops.unpack_mask(words, numel)
    active = int(torch.count_nonzero(mask))  # a tenth of the time of mask.sum() on a bool tensor
    if values.dim() != 1 or values.numel() != active:
        raise _corrupt(path, f"{names[1]} has shape {list(values.shape)} for the {active} active weights of sparse "
                             f"layer {prefix!r}")
    weight = values.new_zeros(numel).masked_scatter_(mask, values)
    return weight.reshape(shape), mask.reshape(shape)


def _read_head(path) -> bytes:
    try:
        with open(path, "rb") as file:
            head = file.read(9)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "dynasparse.load: no checkpoint file at this path", path) from None
    except IsADirectoryError:
        raise IsADirectoryError(errno.EISDIR, "dynasparse.load: this path is a directory, not a checkpoint file",
                                path) from None
    return head


def _json_field(metadata: dict, field: str, path) -> dict:
    try:
        value = json.loads(metadata.get(field))
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise _corrupt(path, f"metadata field {field!r} is not a JSON object")
    return value


def _safetensors_metadata(path, file_size: int) -> dict:
    """The header's metadata, after checking `header_sha256` over the raw header bytes."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little")
        if 8 + length > file_size:
            raise _corrupt(path, f"a header of {length} bytes does not fit in the file's {file_size} bytes")
        raw = prefix + file.read(length)
    try:
        header = json.loads(raw[8:])
    except (UnicodeDecodeError, ValueError) as error:
        raise _corrupt(path, f"its header is not valid JSON: {error}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        metadata = {}
    if "format" not in metadata and _HEADER_DIGEST not in metadata:
        raise _corrupt(path, "a safetensors file without dynasparse's metadata (no field 'format'); a plain "
                             "safetensors file reads with safetensors.torch.load_file")
    digest = metadata.get(_HEADER_DIGEST)
    if not (isinstance(digest, str) and len(digest) == 64 and raw.count(_digest_field(digest)) == 1):
        raise _corrupt(path, f"metadata field {_HEADER_DIGEST!r} is missing or malformed")
    if hashlib.sha256(raw.replace(_digest_field(digest), _digest_field(_UNSET_DIGEST))).hexdigest() != digest:
        raise _corrupt(path, "its header (tensor names, dtypes, shapes, offsets or metadata) fails its sha256 "
                             "checksum")
    if metadata.get("format") != FORMAT:
        raise _corrupt(path, f"metadata field 'format' is {metadata.get('format')!r}; this dynasparse reads "
                             f"{FORMAT!r} and {FORMAT_1!r}")
    return metadata


def _load_safetensors(path, file_size: int) -> tuple[dict[str, torch.Tensor], dict]:
    metadata = _safetensors_metadata(path, file_size)
    layers, digests = _json_field(metadata, "layers", path), _json_field(metadata, "sha256", path)
    try:
        with safetensors.safe_open(path, framework="pt") as file:
            names = set(file.keys())
            unmatched = sorted(names ^ digests.keys())
            if unmatched:
                raise _corrupt(path, f"tensor {unmatched[0]!r} " + ("has no checksum" if unmatched[0] in names else
                                                                      "has a checksum but is not in the file"))
            tensors = {name: file.get_tensor(name) for name in names}
    except safetensors.SafetensorError as error:
        raise _corrupt(path, f"safetensors: {error}") from None
    for name, tensor in tensors.items():
        if _sha256(tensor) != digests[name]:
            raise _corrupt(path, f"tensor {name!r} fails its sha256 checksum")
    state = {}
    for prefix, info in layers.items():
        if not isinstance(info, dict):
            raise _corrupt(path, f"sparse layer {prefix!r} in metadata field 'layers' is not a JSON object")
        if info.get("layout") not in LAYOUT_NAMES or info.get("grad_mode") not in GRAD_MODES:
            raise _corrupt(path, f"field 'layout' or 'grad_mode' of sparse layer {prefix!r} is "
                                 f"{info.get('layout')!r} / {info.get('grad_mode')!r}")
        shape = _shape(prefix, info.get("shape"), path)
        names = prefix + _WORDS, prefix + _VALUES
        state[prefix + "weight"], state[prefix + "mask"] = _sparse_weight(
            prefix, shape, tensors.pop(names[0], None), tensors.pop(names[1], None),
            tuple(f"tensor {name!r}" for name in names), path)
    both = sorted(tensors.keys() & state.keys())
    if both:
        raise _corrupt(path, f"tensor {both[0]!r} is also a sparse layer's compressed weight or mask")
    state.update(tensors)
    return state, layers


def _load_format_1(path, map_location) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            # torch's zip reader returns uninitialized memory for an entry marked as an MS-DOS directory.
            directories = [info.filename for info in archive.infolist() if info.is_dir() or info.external_attr & 0x10]
        if damaged is None and not directories:
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except _ARCHIVE_ERRORS as error:
        raise _corrupt(path, f"{type(error).__name__}: {error}") from None
    if damaged is not None:
        raise _corrupt(path, f"zip entry {damaged!r} fails its CRC-32 check")
    if directories:
        raise _corrupt(path, f"zip entry {directories[0]!r} is marked as a directory")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_1:
        raise _corrupt(path, f"a torch.save zip, but not of the expected format {FORMAT_1!r}")
    dense, sparse = payload.get("dense"), payload.get("sparse")
    if not isinstance(dense, dict) or not isinstance(sparse, dict):
        raise _corrupt(path, "field 'dense' or 'sparse' is missing")
    for name, value in dense.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise _corrupt(path, f"entry {name!r} of field 'dense' is not a named tensor")
    state, layers = dict(dense), {}
    for prefix, entry in sparse.items():
        if not isinstance(prefix, str) or not isinstance(entry, dict):
            raise _corrupt(path, f"entry {prefix!r} of field 'sparse' is not a named dict")
        shape = _shape(prefix, entry.get("shape"), path)
        state[prefix + "weight"], state[prefix + "mask"] = _sparse_weight(
            prefix, shape, entry.get("mask_words"), entry.get("values"), ("field 'mask_words'", "field 'values'"),
            path)
        layers[prefix] = {"shape": shape}
    return state, layers


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], layers: dict, path) -> None:
    """Refuse, before anything is copied, a checkpoint whose entries do not match the model's."""
    expected = model.state_dict()
    sparse_here = dict(_sparse_layers(model))
    # A dense checkpoint of a layer leaves the model's mask as it is (the layers' own rule).
    kept_masks = {prefix + "mask" for prefix in sparse_here
                  if prefix + "mask" not in state and prefix + "weight" in state}
    problems = []
    for prefix, info in sorted(layers.items()):
        module = sparse_here.get(prefix)
        if module is None:
            problems.append(f"{prefix[:-1] or 'the root module'} is a sparse layer in the checkpoint but not in the "
                            "model (sparsify the model first)")
        elif "layout" in info and module.layout != info["layout"]:
            problems.append(f"{prefix[:-1] or 'the root module'} has layout {info['layout']!r} in the checkpoint "
                            f"but {module.layout!r} in the model")
    missing = sorted(name for name in expected if name not in state and name not in kept_masks)
    unexpected = sorted(name for name in state if name not in expected)
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing)}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected)}")
    for name, value in state.items():
        if name in expected and value.shape != expected[name].shape:
            problems.append(f"{name} has shape {list(value.shape)} in the checkpoint but "
                            f"{list(expected[name].shape)} in the model")
    if problems:
        raise ValueError(f"dynasparse.load: {path} does not fit the {type(model).__name__}: " + "; ".join(problems))


def load(model: nn.Module | None, path: str | os.PathLike, *, map_location=None):
    """Read a checkpoint written by `save` (or by dynasparse's earlier torch.save format),
    refusing any corruption. With a model (already sparsified with the same layouts; grad
    modes may differ), check that every entry fits, then load into it and return it; with
    None, return the decompressed state_dict (on `map_location`, a device, when given; else
    on the CPU)."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"dynasparse.load: model must be an nn.Module or None, got {type(model).__name__}")
    path = _fspath(path, "load")
    # torch.load's other forms (a dict, a callable) are passed on for format-1 files only.
    device = None
    if map_location is not None and not isinstance(map_location, dict) and not callable(map_location):
        try:
            device = torch.device(map_location)
        except (RuntimeError, TypeError):
            raise ValueError(f"dynasparse.load: map_location must be a device, got {map_location!r}") from None
    head = _read_head(path)
    # Byte 8 first: a safetensors header length can begin with the bytes "PK"; in a zip it is
    # the compression method's low byte, never "{".
    if head[8:] == b"{":
        if map_location is not None and device is None:
            raise ValueError("dynasparse.load: map_location must be a device for a safetensors checkpoint (a dict or "
                             f"a callable applies to format-1 files only), got {map_location!r}")
        state, layers = _load_safetensors(path, os.path.getsize(path))
        if device is not None:
            state = {name: value.to(device) for name, value in state.items()}
    elif head[:2] == b"PK":
        state, layers = _load_format_1(path, map_location)
    else:
        raise _corrupt(path, "neither a safetensors file nor a torch.save zip")
    if model is None:
        return state
    _check_fits(model, state, layers, path)
    model.load_state_dict(state)
    return model
