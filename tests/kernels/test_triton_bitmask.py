"""Triton bitmask kernels against an arithmetic pure-torch reference written here."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton fixes interpret mode when a @triton.jit decorator runs, so before the import below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dynasparse.kernels import bitmask  # noqa: E402
from tests.helpers import random_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KS = [0, 1, 7, 31, 32, 33, 64, 65, 100, 257]
LEADING = [(), (1,), (3,), (2, 3), (0,), (2, 0)]

# Powers of two by multiplication, not shifts: the reference should not share the kernels' logic.
_BIT_VALUES = torch.tensor([2**j for j in range(32)], dtype=torch.int64)


def reference_pack(mask: torch.Tensor) -> torch.Tensor:
    k = mask.shape[-1]
    words = -(-k // 32)
    padded = torch.zeros((*mask.shape[:-1], words * 32), dtype=torch.int64)
    padded[..., :k] = mask.cpu().to(torch.int64)
    unsigned = (padded.reshape(*mask.shape[:-1], words, 32) * _BIT_VALUES).sum(-1)
    return torch.where(unsigned >= 2**31, unsigned - 2**32, unsigned).to(torch.int32)


def reference_unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    unsigned = packed.cpu().to(torch.int64) % 2**32
    bits = torch.div(unsigned[..., None], _BIT_VALUES, rounding_mode="floor") % 2
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 32)[..., :k].to(torch.bool)


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    # Compare bool results byte for byte: a poison byte may read as True in bool comparisons.
    return mask.cpu().view(torch.uint8)



@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("leading", LEADING, ids=str)
def test_pack_matches_reference(leading, k, density, poisoned_empty):
    mask = random_mask((*leading, k), 1 - density, 0, DEVICE)
    packed = bitmask.pack_mask(mask)
    assert packed.dtype == torch.int32 and packed.device == mask.device
    assert packed.shape == (*leading, -(-k // 32))
    assert torch.equal(packed.cpu(), reference_pack(mask))


@pytest.mark.parametrize("words", ["random", "zeros", "ones"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("leading", LEADING, ids=str)
def test_unpack_matches_reference(leading, k, words, poisoned_empty):
    shape = (*leading, -(-k // 32))
    # Random words include set tail bits past k, which unpacking must ignore.
    packed = {
        "random": torch.randint(-2**31, 2**31, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0)),
        "zeros": torch.zeros(shape, dtype=torch.int32),
        "ones": torch.full(shape, -1, dtype=torch.int32),
    }[words].to(DEVICE)
    mask = bitmask.unpack_mask(packed, k)
    assert mask.dtype == torch.bool and mask.device == packed.device
    assert mask.shape == (*leading, k)
    assert torch.equal(as_bytes(mask), as_bytes(reference_unpack(packed, k)))


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("leading", [(3,), (2, 3)], ids=str)
def test_round_trip(leading, k, density):
    mask = random_mask((*leading, k), 1 - density, 1, DEVICE)
    assert torch.equal(as_bytes(bitmask.unpack_mask(bitmask.pack_mask(mask), k)), as_bytes(mask))


def test_bit_order_and_sign_bit():
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 0] = True
    mask[0, 31] = True
    mask[1, 32] = True
    packed = bitmask.pack_mask(mask.to(DEVICE)).cpu()
    assert packed.tolist() == [[1 - 2**31, 0], [0, 1]]


def test_unpack_rejects_a_word_count_that_does_not_match_k():
    packed = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="packs into 3 int32 words, but packed has 2"):
        bitmask.unpack_mask(packed, 65)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: 2 GiB masks are too slow to interpret")
def test_offsets_past_int32_range():
    # rows * k passes 2**31 bytes, so int32 offsets would wrap; only the last rows are checked,
    # against the same rows packed on their own.
    k = 33
    rows = 2**31 // k + 1000
    mask = torch.empty(rows * k, dtype=torch.uint8, device="cuda").random_(0, 2).view(torch.bool).view(rows, k)
    packed = bitmask.pack_mask(mask)
    tail = mask[-3:].contiguous()
    assert torch.equal(packed[-3:].cpu(), reference_pack(tail))
    unpacked = bitmask.unpack_mask(packed, k)
    assert torch.equal(as_bytes(unpacked[-3:]), as_bytes(tail))
