"""dynasparse.save / dynasparse.load: the safetensors format read back by an independent decoder
written from the format's documentation (raw bytes, sha256, bit unpacking by shifts), every
single-byte flip and every truncation refused, format-1 files (torch.save zip) still loading,
and each misuse its own clear error."""

import copy
import hashlib
import json
import random
import re
import struct

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import dynasparse
from dynasparse.nn import SparseConv2d, SparseLinear
from dynasparse.nn.modules import SparseTransposedLinear

SPARSE = (SparseLinear, SparseConv2d, SparseTransposedLinear)
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}
UNSET = b'"header_sha256":"' + b"0" * 64 + b'"'


class Net(nn.Module):
    """Every sparse layer kind (unstructured, 2:4 and block16 layouts, both grad modes), dense
    layers, and buffers of several dtypes including a 0-d one."""

    def __init__(self, sparsity: float, width: int = 16):
        super().__init__()
        self.conv = SparseConv2d(2, 4, 3, padding=1, sparsity=sparsity)  # 72 weights: a partial last mask word
        self.norm = nn.BatchNorm2d(4)
        self.transposed = SparseTransposedLinear(16, 12, sparsity=sparsity, grad_mode="masked")
        self.pairs = SparseLinear(12, width, sparsity=0.5, layout="2:4")
        self.blocks = SparseLinear(width, 32, sparsity=0.5, layout="block16", grad_mode="masked")
        self.head = nn.Linear(32, 3)
        self.register_buffer("scale", torch.rand(3, dtype=torch.float64))
        self.register_buffer("flags", torch.rand(5) < 0.5)
        self.register_buffer("brain", torch.randn(2, 3).bfloat16())
        self.register_buffer("step", torch.tensor(random.randrange(1000)))

    def forward(self, x):
        h = F.adaptive_avg_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1)
        h = self.blocks(torch.relu(self.pairs(torch.relu(self.transposed(h)))))
        return self.head(h).double() * self.scale


def trained_net(seed: int, sparsity: float = 0.7) -> Net:
    torch.manual_seed(seed)
    random.seed(seed)
    model = Net(sparsity)
    model(torch.randn(4, 2, 6, 6))  # batch norm statistics move away from their initial values
    return model.eval()


def pruned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a checkpoint restores: sparse weights at their pruned positions are 0."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, SPARSE):
            prefix = f"{name}." if name else ""
            state[prefix + "weight"] = torch.where(module.mask, module.weight.detach(), 0)
    return state


def assert_same_state(state, expected):
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert state[name].dtype == value.dtype and torch.equal(state[name], value), name


def decode_by_spec(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint only from the documented format: header JSON, the header checksum,
    each tensor's sha256 over its raw bytes, bit j of mask word w = element 32 * w + j."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    metadata = header.pop("__metadata__")
    assert metadata["format"] == "dynasparse.compressed/2"
    digest = metadata["header_sha256"].encode()
    assert hashlib.sha256(raw[:8 + length].replace(b'"header_sha256":"' + digest + b'"', UNSET)).hexdigest() == \
        digest.decode()
    digests, layers = json.loads(metadata["sha256"]), json.loads(metadata["layers"])
    assert set(digests) == set(header)
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        data = raw[8 + length + start: 8 + length + end]
        assert hashlib.sha256(data).hexdigest() == digests[name], name
        tensors[name] = torch.tensor(list(data), dtype=torch.uint8).view(TORCH_DTYPES[info["dtype"]]).reshape(
            info["shape"])
    for prefix, layer in layers.items():
        numel = 1
        for size in layer["shape"]:
            numel *= size
        words = tensors.pop(prefix + "mask.words")
        bits = (words.long().unsqueeze(1) >> torch.arange(32)) & 1
        mask = bits.reshape(-1)[:numel].bool()
        weight = torch.zeros(numel, dtype=tensors[prefix + "weight.values"].dtype)
        weight[mask] = tensors.pop(prefix + "weight.values")
        tensors[prefix + "weight"], tensors[prefix + "mask"] = weight.reshape(layer["shape"]), mask.reshape(
            layer["shape"])
    return tensors, layers


def sealed(tensors, metadata) -> bytes:
    """A format-2 file built from the documentation alone, checksums computed here."""
    metadata = dict(metadata, header_sha256="0" * 64)
    data = safetensors.torch.save(tensors, metadata)
    end = 8 + struct.unpack("<Q", data[:8])[0]
    digest = hashlib.sha256(data[:end]).hexdigest().encode()
    return data[:end].replace(UNSET, b'"header_sha256":"' + digest + b'"') + data[end:]


def write_sealed(path, tensors, metadata):
    path.write_bytes(sealed(tensors, metadata))


def tensor_sha256(tensor):
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def save_format_1(model: nn.Module, path) -> None:
    """dynasparse's writer before the move to safetensors (format "dynasparse.compressed/1"),
    kept as the definition of the files it left behind."""
    state = model.state_dict()
    sparse = {}
    for name, module in model.named_modules():
        if isinstance(module, SPARSE):
            prefix = f"{name}." if name else ""
            weight, mask = state.pop(prefix + "weight"), state.pop(prefix + "mask")
            sparse[prefix] = {"shape": list(weight.shape),
                              "mask_words": dynasparse.ops.pack_mask(mask.reshape(-1)).cpu(),
                              "values": weight[mask].detach().cpu()}
    torch.save({"format": "dynasparse.compressed/1", "dense": {k: v.detach().cpu() for k, v in state.items()},
                "sparse": sparse}, path)


CORRUPT = "not a valid dynasparse checkpoint"


def load_bytes(tmp_path, data: bytes):
    """dynasparse.load(None, ...) of `data` written as a new file (truncating and rewriting a
    file in place costs a disk flush each time)."""
    path = tmp_path / "damaged"
    path.write_bytes(data)
    try:
        return dynasparse.load(None, path)
    finally:
        path.unlink()


def tiny_net(seed: int) -> nn.Module:
    """Each sparse layer kind, a dense layer and buffers in a file of about 3 KB, small enough
    to damage at every byte."""
    torch.manual_seed(seed)
    return nn.Sequential(SparseConv2d(1, 2, 2, sparsity=0.5), nn.BatchNorm2d(2), nn.Flatten(),
                         SparseTransposedLinear(8, 4, sparsity=0.5), SparseLinear(4, 4, sparsity=0.5, layout="2:4"),
                         nn.Linear(4, 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_restores_the_pruned_model(tmp_path, seed):
    model = trained_net(seed)
    path = tmp_path / "model.dsp.safetensors"
    dynasparse.save(model, path)
    fresh = trained_net(seed + 10, sparsity=0.3)  # other weights, other masks, same layouts
    assert not torch.equal(fresh.conv.mask, model.conv.mask)
    assert dynasparse.load(fresh, path) is fresh
    assert_same_state(fresh.state_dict(), pruned_state(model))
    x = torch.randn(3, 2, 6, 6)
    assert torch.equal(fresh(x), model(x))
    state = dynasparse.load(None, path)
    assert_same_state(state, pruned_state(model))
    assert all(not value.requires_grad for value in state.values())


def test_file_is_plain_safetensors_in_the_documented_format(tmp_path):
    model = trained_net(2)
    path = tmp_path / "model.dsp.safetensors"
    dynasparse.save(model, path)
    decoded, layers = decode_by_spec(path)
    assert_same_state(decoded, pruned_state(model))
    assert layers == {
        "conv.": {"shape": [4, 2, 3, 3], "layout": "unstructured", "grad_mode": "feedback"},
        "transposed.": {"shape": [16, 12], "layout": "unstructured", "grad_mode": "masked"},
        "pairs.": {"shape": [16, 12], "layout": "2:4", "grad_mode": "feedback"},
        "blocks.": {"shape": [32, 16], "layout": "block16", "grad_mode": "masked"}}
    with safetensors.safe_open(path, framework="pt") as file:
        assert file.metadata()["format"] == "dynasparse.compressed/2"
        assert file.get_tensor("blocks.weight.values").numel() == 256  # one of two 16 x 16 blocks
    # A file written from the documentation alone loads the same.
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as file:
        metadata = file.metadata()
    write_sealed(tmp_path / "rewritten.safetensors", tensors, metadata)
    assert_same_state(dynasparse.load(None, tmp_path / "rewritten.safetensors"), pruned_state(model))


def test_a_header_length_that_reads_pk_is_still_safetensors(tmp_path):
    """A header of 0x4B50 bytes makes the file start with "PK", as a zip does."""
    model = tiny_net(18)
    dynasparse.save(model, tmp_path / "m.safetensors")
    tensors = safetensors.torch.load_file(tmp_path / "m.safetensors")
    with safetensors.safe_open(tmp_path / "m.safetensors", framework="pt") as file:
        metadata = file.metadata()
    unpadded = struct.unpack("<Q", sealed(tensors, dict(metadata, note=""))[:8])[0]
    for size in range(0x4B50 - unpadded - 8, 0x4B50 - unpadded + 8):
        data = sealed(tensors, dict(metadata, note="x" * size))
        if data[:2] == b"PK":
            break
    assert data[:8] == struct.pack("<Q", 0x4B50)
    assert_same_state(load_bytes(tmp_path, data), pruned_state(model))


def _all_pruned():
    model = nn.Sequential(SparseLinear(4, 6), nn.Linear(6, 2))
    model[0].set_mask(torch.zeros(6, 4, dtype=torch.bool))
    return model


@pytest.mark.parametrize("build", [
    lambda: SparseLinear(7, 5, sparsity=0.0),  # bare layer (prefix ""), 35 weights, all active
    lambda: SparseLinear(33, 3, bias=False, sparsity=0.9),
    _all_pruned,
    lambda: nn.Sequential(SparseLinear(0, 4), SparseLinear(4, 0)),
    lambda: nn.Sequential(SparseConv2d(3, 5, (1, 3), sparsity=0.6).double()),
], ids=["bare-dense-mask", "no-bias", "all-pruned", "zero-size", "float64-conv"])
def test_edge_layers_round_trip(tmp_path, build):
    torch.manual_seed(3)
    model = build()
    dynasparse.save(model, tmp_path / "m.safetensors")
    decoded, _ = decode_by_spec(tmp_path / "m.safetensors")
    assert_same_state(decoded, pruned_state(model))
    torch.manual_seed(4)
    fresh = build()
    dynasparse.load(fresh, tmp_path / "m.safetensors")
    assert_same_state(fresh.state_dict(), pruned_state(model))


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_and_dtypes_round_trip(tmp_path, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    layers = []
    for _ in range(3):
        kind = rng.choice([SparseLinear, SparseTransposedLinear])
        layer = kind(rng.randrange(1, 70), rng.randrange(1, 70), bias=rng.random() < 0.5, dtype=dtype)
        layer.set_mask(torch.rand(layer.weight.shape) < rng.choice([0.0, 1.0, rng.random()]))
        layers.append(layer)
    model = nn.ModuleList(layers)
    dynasparse.save(model, tmp_path / "m.safetensors")
    decoded, _ = decode_by_spec(tmp_path / "m.safetensors")
    assert_same_state(decoded, pruned_state(model))
    assert_same_state(dynasparse.load(None, tmp_path / "m.safetensors"), pruned_state(model))


def test_every_byte_flip_is_detected(tmp_path):
    path = tmp_path / "model.dsp.safetensors"
    dynasparse.save(tiny_net(5), path)
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    owner = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, end = info["data_offsets"]
            owner.update({8 + length + i: name for i in range(start, end)})
    assert len(owner) == len(data) - 8 - length  # the payload is exactly the tensors' bytes
    rng = random.Random(5)
    for position in range(len(data)):
        for flip in (rng.randrange(1, 256), 1 << rng.randrange(8)):
            damaged = bytearray(data)
            damaged[position] ^= flip
            with pytest.raises(ValueError, match=CORRUPT) as error:
                load_bytes(tmp_path, damaged)
            if position in owner:
                assert f"tensor {owner[position]!r} fails its sha256 checksum" in str(error.value), position


def test_every_truncation_and_extension_is_detected(tmp_path):
    path = tmp_path / "model.dsp.safetensors"
    dynasparse.save(tiny_net(6), path)
    data = path.read_bytes()
    for length in range(len(data)):
        with pytest.raises(ValueError, match=CORRUPT):
            load_bytes(tmp_path, data[:length])
    for tail in (b"\0", b" ", b"x" * 100):
        with pytest.raises(ValueError, match=CORRUPT):
            load_bytes(tmp_path, data + tail)


def test_format_1_files_still_load(tmp_path):
    model = trained_net(7)
    path = tmp_path / "model.dsp"
    save_format_1(model, path)
    assert path.read_bytes()[:2] == b"PK"
    fresh = trained_net(8, sparsity=0.2)
    dynasparse.load(fresh, path)
    assert_same_state(fresh.state_dict(), pruned_state(model))
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(fresh(x), model(x))
    assert_same_state(dynasparse.load(None, path), pruned_state(model))
    # Saving it again gives the new format, same contents.
    dynasparse.save(fresh, tmp_path / "model.dsp.safetensors")
    assert_same_state(dynasparse.load(None, tmp_path / "model.dsp.safetensors"), pruned_state(model))


def test_format_1_corruption_is_refused_or_harmless(tmp_path):
    """Format 1 has no checksums of its own: the zip's CRC-32 of each entry covers the tensors
    and the pickle; a flip in the zip's bookkeeping either is refused or changes nothing."""
    model = nn.Sequential(SparseLinear(8, 12, sparsity=0.6), nn.Linear(12, 4))
    path = tmp_path / "model.dsp"
    save_format_1(model, path)
    data = path.read_bytes()
    expected = dynasparse.load(None, path)
    rng = random.Random(9)
    central_directory = range(data.index(b"PK\x01\x02"), len(data))
    for position in sorted(set(rng.sample(range(len(data)), 400)) | set(central_directory)):
        # 0x10 in a zip entry's external attributes (central directory) marks it an MS-DOS
        # directory, which torch reads as uninitialized memory: each position gets that bit
        # as well as a random byte.
        for flip in (rng.randrange(1, 256), 0x10):
            corrupted = bytearray(data)
            corrupted[position] ^= flip
            try:
                state = load_bytes(tmp_path, corrupted)
            except ValueError as error:
                assert CORRUPT in str(error)
            else:
                assert_same_state(state, expected)
    for length in range(0, len(data), 7):
        with pytest.raises(ValueError, match=CORRUPT):
            load_bytes(tmp_path, data[:length])


def test_missing_file_directory_and_junk_each_have_their_message(tmp_path):
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        dynasparse.load(None, missing)
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        dynasparse.load(None, tmp_path)
    junk = tmp_path / "junk.bin"
    for content in (b"", b"{", b"hello, this is not a checkpoint", bytes(random.Random(1).randrange(256)
                                                                         for _ in range(500))):
        junk.write_bytes(content)
        with pytest.raises(ValueError, match="neither a safetensors file nor a torch.save zip"):
            dynasparse.load(None, junk)
    junk.write_bytes(b"PK\x03\x04 then garbage")
    with pytest.raises(ValueError, match=CORRUPT):
        dynasparse.load(None, junk)
    model = trained_net(11)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "hf.safetensors")
    with pytest.raises(ValueError, match="no field 'format'.*safetensors.torch.load_file"):
        dynasparse.load(None, tmp_path / "hf.safetensors")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="expected format 'dynasparse.compressed/1'"):
        dynasparse.load(None, tmp_path / "plain.pt")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        dynasparse.load(None, 3)
    with pytest.raises(TypeError, match="model must be an nn.Module or None"):
        dynasparse.load(model.state_dict(), tmp_path / "plain.pt")


def _without_head(model):
    del model.head
    return "not in the model: head.bias, head.weight"


def _extra_buffer(model):
    model.register_buffer("extra", torch.zeros(2))
    return "missing from the checkpoint: extra"


def _dense_pairs(model):
    model.pairs = nn.Linear(12, 16)
    return "pairs is a sparse layer in the checkpoint but not in the model"


def _unstructured_pairs(model):
    model.pairs = SparseLinear(12, 16, sparsity=0.5)
    return "pairs has layout '2:4' in the checkpoint but 'unstructured' in the model"


def _wider(model):
    model.pairs, model.blocks = SparseLinear(12, 32, sparsity=0.5, layout="2:4"), SparseLinear(32, 32, layout="block16")
    return re.escape("pairs.weight has shape [16, 12] in the checkpoint but [32, 12] in the model")


@pytest.mark.parametrize("change", [_without_head, _extra_buffer, _dense_pairs, _unstructured_pairs, _wider])
def test_loading_into_a_model_that_does_not_fit_is_refused_before_any_change(tmp_path, change):
    path = tmp_path / "model.dsp.safetensors"
    dynasparse.save(trained_net(12), path)
    fresh = trained_net(13)
    message = change(fresh)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=f"does not fit the Net: .*{message}"):
        dynasparse.load(fresh, path)
    assert_same_state(fresh.state_dict(), before)


def test_a_checkpoint_saved_before_sparsify_loads_and_keeps_the_masks(tmp_path):
    torch.manual_seed(14)
    dense = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    dynasparse.save(dense, tmp_path / "dense.safetensors")
    sparse = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    dynasparse.sparsify(sparse, 0.5)
    masks = [sparse[0].mask.clone(), sparse[2].mask.clone()]
    dynasparse.load(sparse, tmp_path / "dense.safetensors")
    for index, mask in zip((0, 2), masks):
        assert torch.equal(sparse[index].mask, mask)
        assert torch.equal(sparse[index].weight, dense[index].weight)


def _layer(name, key, value):
    def edit(tensors, layers):
        layers[name][key] = value
    return edit


def _tensor(name, change):
    def edit(tensors, layers):
        if change is None:
            del tensors[name]
        else:
            tensors[name] = change(tensors[name])
    return edit


def _metadata(key, value):
    def edit(metadata):
        metadata[key] = value
    return edit


def _checksums(change):
    def edit(metadata):
        digests = json.loads(metadata["sha256"])
        change(digests)
        metadata["sha256"] = json.dumps(digests)
    return edit


def _add_layer(tensors, layers):
    layers["ghost."] = {"shape": [2, 2], "layout": "unstructured", "grad_mode": "feedback"}


def _collide(tensors, layers):
    tensors["pairs.weight"] = torch.zeros(16, 12)


def _not_an_object(tensors, layers):
    layers["pairs."] = 3


# (edit of the tensors and layers, then of the metadata built from them, the error's words)
MALFORMED = {
    "newer format": (None, _metadata("format", "dynasparse.compressed/3"), "field 'format'"),
    "layers not JSON": (None, _metadata("layers", "[{"), "metadata field 'layers'"),
    "layers a list": (None, _metadata("layers", "[]"), "metadata field 'layers'"),
    "checksums a list": (None, _metadata("sha256", "[]"), "metadata field 'sha256'"),
    "checksums missing": (None, lambda metadata: metadata.pop("sha256"), "metadata field 'sha256'"),
    "negative size": (_layer("pairs.", "shape", [-16, 12]), None, "field 'shape' of sparse layer 'pairs.'"),
    "bool size": (_layer("pairs.", "shape", [True, 12]), None, "field 'shape' of sparse layer 'pairs.'"),
    "shape a string": (_layer("pairs.", "shape", "16x12"), None, "field 'shape' of sparse layer 'pairs.'"),
    "float size": (_layer("pairs.", "shape", [16.0, 12]), None, "field 'shape' of sparse layer 'pairs.'"),
    "unknown layout": (_layer("pairs.", "layout", "block7"), None, "field 'layout'"),
    "unknown grad mode": (_layer("pairs.", "grad_mode", None), None, "'grad_mode' of sparse layer 'pairs.'"),
    "layer not an object": (_not_an_object, None, "sparse layer 'pairs.' in metadata field 'layers' is not a JSON"),
    "short mask": (_tensor("pairs.mask.words", lambda t: t[:-1]), None, "tensor 'pairs.mask.words'"),
    "int64 mask": (_tensor("pairs.mask.words", lambda t: t.long()), None, "tensor 'pairs.mask.words'"),
    "2-d mask": (_tensor("pairs.mask.words", lambda t: t[None]), None, "tensor 'pairs.mask.words'"),
    "one value short": (_tensor("pairs.weight.values", lambda t: t[:-1]), None, "tensor 'pairs.weight.values'"),
    "2-d values": (_tensor("pairs.weight.values", lambda t: t[None]), None, "tensor 'pairs.weight.values'"),
    "values missing": (_tensor("pairs.weight.values", None), None,
                       "tensor 'pairs.weight.values' of sparse layer 'pairs.' is missing"),
    "layer without tensors": (_add_layer, None, "tensor 'ghost.mask.words' of sparse layer 'ghost.' is missing"),
    "tensor without checksum": (None, _checksums(lambda d: d.pop("head.bias")), "tensor 'head.bias' has no checksum"),
    "checksum without tensor": (None, _checksums(lambda d: d.update(ghost="0" * 64)),
                                "tensor 'ghost' has a checksum but is not in the file"),
    "wrong checksum": (None, _checksums(lambda d: d.update({"head.bias": "0" * 64})),
                       "tensor 'head.bias' fails its sha256 checksum"),
    "dense and sparse": (_collide, None, "tensor 'pairs.weight' is also a sparse layer's"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_fields_are_value_errors_naming_the_field(tmp_path, case):
    """Consistent checksums over inconsistent contents (as a buggy writer would make them)."""
    edit_contents, edit_metadata, message = MALFORMED[case]
    path = tmp_path / "model.dsp.safetensors"
    dynasparse.save(trained_net(15), path)
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, framework="pt") as file:
        layers = json.loads(file.metadata()["layers"])
    if edit_contents is not None:
        edit_contents(tensors, layers)
    metadata = {"format": "dynasparse.compressed/2", "layers": json.dumps(layers),
                "sha256": json.dumps({name: tensor_sha256(value) for name, value in tensors.items()})}
    if edit_metadata is not None:
        edit_metadata(metadata)
    write_sealed(tmp_path / "edited.safetensors", tensors, metadata)
    with pytest.raises(ValueError, match=re.escape(message)):
        dynasparse.load(None, tmp_path / "edited.safetensors")


def format_1(dense=None, **sparse):
    return {"format": "dynasparse.compressed/1", "dense": {} if dense is None else dense, "sparse": sparse}


WORDS = torch.tensor([5], dtype=torch.int32)  # elements 0 and 2 active


@pytest.mark.parametrize("payload, message", [
    (format_1(dense=[]), "field 'dense' or 'sparse' is missing"),
    (format_1(dense={"a": "text"}), "entry 'a' of field 'dense'"),
    (format_1(layer=5), "entry 'layer' of field 'sparse'"),
    (format_1(layer={"shape": "ab", "mask_words": WORDS, "values": torch.zeros(2)}), "field 'shape'"),
    (format_1(layer={"shape": [2, 3], "mask_words": [5], "values": torch.zeros(2)}),
     "field 'mask_words' of sparse layer 'layer' is a list"),
    (format_1(layer={"shape": [2, 3], "mask_words": WORDS}), "field 'values' of sparse layer 'layer' is missing"),
    (format_1(layer={"shape": [2, 3], "mask_words": WORDS, "values": torch.zeros(3)}),
     "field 'values' has shape [3] for the 2 active"),
    ({"format": "something else"}, "expected format"),
    ([1, 2], "expected format"),
], ids=["dense-a-list", "dense-string", "entry-an-int", "shape-string", "words-list", "values-missing",
        "values-count", "other-format", "a-list"])
def test_malformed_format_1_payloads(tmp_path, payload, message):
    torch.save(payload, tmp_path / "old.dsp")
    with pytest.raises(ValueError, match=re.escape(message)):
        dynasparse.load(None, tmp_path / "old.dsp")


class _WithExtraState(nn.Linear):
    def get_extra_state(self):
        return {"note": "not a tensor"}

    def set_extra_state(self, state):
        pass


def test_save_errors_name_the_argument(tmp_path):
    with pytest.raises(IsADirectoryError):
        dynasparse.save(nn.Linear(2, 2), tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        dynasparse.save(nn.Linear(2, 2), tmp_path / "no_such_dir" / "m.safetensors")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dynasparse.save({"weight": torch.zeros(2)}, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        dynasparse.save(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="'_extra_state' is a dict, not a tensor"):
        dynasparse.save(_WithExtraState(2, 2), tmp_path / "m.safetensors")
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'weight' is on the meta device"):
        dynasparse.save(meta, tmp_path / "m.safetensors")


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(16)
    model = nn.Sequential(nn.Embedding(10, 4), SparseLinear(4, 4, sparsity=0.5), nn.Linear(4, 10, bias=False))
    model[2].weight = model[0].weight
    dynasparse.save(model, tmp_path / "tied.safetensors")
    fresh = nn.Sequential(nn.Embedding(10, 4), SparseLinear(4, 4, sparsity=0.5), nn.Linear(4, 10, bias=False))
    fresh[2].weight = fresh[0].weight
    dynasparse.load(fresh, tmp_path / "tied.safetensors")
    assert_same_state(fresh.state_dict(), pruned_state(model))
    assert fresh[2].weight is fresh[0].weight


def test_map_location(tmp_path):
    model = trained_net(17)
    dynasparse.save(model, tmp_path / "m.safetensors")
    for device in ("cpu", torch.device("cpu")):
        assert_same_state(dynasparse.load(None, tmp_path / "m.safetensors", map_location=device), pruned_state(model))
    state = dynasparse.load(None, tmp_path / "m.safetensors", map_location="meta")
    assert all(value.is_meta for value in state.values())
    save_format_1(model, tmp_path / "old.dsp")
    for path in (tmp_path / "m.safetensors", tmp_path / "old.dsp"):
        with pytest.raises(ValueError, match="map_location must be a device"):
            dynasparse.load(None, path, map_location="nowhere")
    with pytest.raises(ValueError, match="a dict or a callable applies to format-1 files only"):
        dynasparse.load(None, tmp_path / "m.safetensors", map_location={"cuda:0": "cpu"})
    assert_same_state(dynasparse.load(None, tmp_path / "old.dsp", map_location={"cuda:0": "cpu"}), pruned_state(model))
    assert_same_state(dynasparse.load(None, tmp_path / "old.dsp", map_location="cpu"), pruned_state(model))


@pytest.mark.gpu
def test_cuda_model_round_trip(tmp_path):
    """The masks are packed on the GPU (CUDA or Triton pack_mask) and the file is the same."""
    model = trained_net(19).cuda()
    path = tmp_path / "m.safetensors"
    dynasparse.save(model, path)
    expected = {name: value.cpu() for name, value in pruned_state(model).items()}
    decoded, _ = decode_by_spec(path)
    assert_same_state(decoded, expected)
    state = dynasparse.load(None, path, map_location="cuda")
    assert all(value.is_cuda for value in state.values())
    assert_same_state({name: value.cpu() for name, value in state.items()}, expected)
    fresh = trained_net(20, sparsity=0.3).cuda()
    dynasparse.load(fresh, path)
    assert_same_state({name: value.cpu() for name, value in fresh.state_dict().items()}, expected)
