"""Mask packing on every backend against numpy's packbits, an oracle independent of dynasparse."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynasparse import ops
from dynasparse.ops import bitmask as bitmask_ops
from tests.helpers import backend_device_params, poison_allocator, random_mask

BACKENDS = backend_device_params("pack_mask") + [pytest.param("reference", "cpu", id="reference")]


def packbits_oracle(mask: torch.Tensor) -> torch.Tensor:
    array = mask.cpu().numpy()
    k = array.shape[-1]
    words = -(-k // 32)
    padded = np.zeros((*array.shape[:-1], words * 32), dtype=np.uint8)
    padded[..., :k] = array
    as_bytes = np.packbits(padded, axis=-1, bitorder="little")  # element i -> bit i of its byte
    return torch.from_numpy(np.ascontiguousarray(as_bytes).view("<u4").view(np.int32).copy())


SHAPES = [(1,), (7,), (32,), (33,), (257,), (3, 31), (3, 64), (2, 3, 65), (5, 100), (1, 1, 1, 31),
          (0,), (0, 5), (4, 0), (0, 0), (2, 0, 33)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_pack_matches_packbits_and_round_trips(backend, device, shape, density):
    generator = torch.Generator().manual_seed(hash((shape, density)) % 2**31)
    mask = random_mask(shape, 1 - density, generator, device)
    expected = packbits_oracle(mask)
    poison_allocator(expected.numel() * 4, device)
    packed = ops.pack_mask(mask, backend=backend)
    assert packed.dtype == torch.int32 and packed.device.type == device
    assert torch.equal(packed.cpu(), expected)
    poison_allocator(mask.numel(), device)
    unpacked = ops.unpack_mask(packed, shape[-1], backend=backend)
    assert unpacked.dtype == torch.bool and unpacked.shape == mask.shape
    assert torch.equal(unpacked, mask)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_ones_sets_the_sign_bit(backend, device):
    packed = ops.pack_mask(torch.ones(2, 64, dtype=torch.bool, device=device), backend=backend)
    assert (packed == -1).all()
    tail = ops.pack_mask(torch.ones(1, 40, dtype=torch.bool, device=device), backend=backend)
    assert tail.cpu().tolist() == [[-1, 0xFF]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    generator = torch.Generator().manual_seed(1)
    base = random_mask((70, 90), 0.5, generator, device)
    for mask in (base.t(), base[:, ::3], base[1::2, 5:77]):
        assert not mask.is_contiguous()
        assert torch.equal(ops.pack_mask(mask, backend=backend).cpu(), packbits_oracle(mask))
    packed = ops.pack_mask(base, backend=backend)
    strided = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.int32, device=device)[:, ::2]
    strided.copy_(packed)
    assert torch.equal(ops.unpack_mask(strided, 90, backend=backend), base)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_mask(backend, device):
    if backend == "triton" and device == "cpu":
        shape = (64, 4099)  # the interpreter is slow; still several program instances
    else:
        shape = (1024, 4099)
    mask = random_mask(shape, 0.9, torch.Generator().manual_seed(2), device)
    packed = ops.pack_mask(mask, backend=backend)
    assert torch.equal(packed.cpu(), packbits_oracle(mask))
    assert torch.equal(ops.unpack_mask(packed, shape[-1], backend=backend), mask)


@settings(max_examples=40, deadline=None)
@given(leading=st.lists(st.integers(0, 4), max_size=2), k=st.integers(0, 200),
       density=st.sampled_from([0.0, 0.03, 0.5, 0.97, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_cpu_pack_property(leading, k, density, seed):
    mask = random_mask((*leading, k), 1 - density, torch.Generator().manual_seed(seed))
    packed = ops.pack_mask(mask, backend="cpu")
    assert torch.equal(packed, packbits_oracle(mask))
    assert torch.equal(packed, ops.pack_mask(mask, backend="reference"))
    assert torch.equal(ops.unpack_mask(packed, k, backend="cpu"), mask)


BAD_PACK = [
    (torch.zeros(3, 4), TypeError, "mask must be torch.bool, got Float"),
    (torch.zeros(3, 4, dtype=torch.uint8), TypeError, "mask must be torch.bool, got Byte"),
    (torch.tensor(True), ValueError, "at least one dimension"),
]
BAD_UNPACK = [
    (torch.zeros(3, 1, dtype=torch.int64), 5, TypeError, "packed must be torch.int32"),
    (torch.tensor(3, dtype=torch.int32), 5, ValueError, "at least one dimension"),
    (torch.zeros(3, 2, dtype=torch.int32), 5, ValueError, "packs into 1 int32 words, but packed has 2"),
    (torch.zeros(3, 1, dtype=torch.int32), -1, ValueError, "k must be >= 0"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad,error,message", BAD_PACK)
def test_pack_rejects_bad_input_alike_on_every_backend(backend, device, bad, error, message):
    with pytest.raises(error, match=message):
        ops.pack_mask(bad.to(device), backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad,k,error,message", BAD_UNPACK)
def test_unpack_rejects_bad_input_alike_on_every_backend(backend, device, bad, k, error, message):
    with pytest.raises(error, match=message):
        ops.unpack_mask(bad.to(device), k, backend=backend)


def test_backend_that_cannot_run_here_is_a_clear_error():
    mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.pack_mask(mask, backend="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
            ops.pack_mask(mask, backend="cuda")


@pytest.mark.parametrize("op,args", [
    (bitmask_ops._pack, lambda device: (torch.rand(5, 77, device=device) > 0.5,)),
    (bitmask_ops._unpack, lambda device: (ops.pack_mask(torch.rand(3, 4, 77, device=device) > 0.5), 77)),
])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck_every_overload(op, args, device):
    overloads = op.overloads()
    assert [o.name() for o in overloads][: 1] == [f"dynasparse::{op.name}"]
    for overload in overloads:
        torch.library.opcheck(overload, args(device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compiles_fullgraph(backend, device):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, dynamic=False)
    def round_trip(mask):
        return ops.unpack_mask(ops.pack_mask(mask, backend=backend), mask.shape[-1], backend=backend)

    mask = random_mask((6, 45), 0.5, torch.Generator().manual_seed(3), device)
    assert torch.equal(round_trip(mask), mask)


@pytest.mark.gpu
def test_cuda_kernels_run_on_the_current_stream():
    """Producer and kernel on a side stream, no sync in between: a kernel on the default
    stream would read the mask before the producer has finished writing it."""
    side = torch.cuda.Stream()
    generator = torch.Generator(device="cuda").manual_seed(4)
    with torch.cuda.stream(side):
        big = torch.randn(4096, 4096, device="cuda", generator=generator)
        for _ in range(8):
            big = big @ big.T / 64
        mask = big[:512] > 0
        for backend in ("cuda", "triton"):
            packed = ops.pack_mask(mask, backend=backend)
            unpacked = ops.unpack_mask(packed, mask.shape[-1], backend=backend)
            assert torch.equal(unpacked, mask), backend
    side.synchronize()
