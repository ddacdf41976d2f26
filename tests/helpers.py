"""Helpers shared by the test modules."""

import pytest
import torch

from dynasparse import dispatch

CUDA = torch.cuda.is_available()


def backend_device_params(op: str):
    """(backend, device) pairs for every compiled backend, the GPU ones marked `gpu`."""
    params = [pytest.param("cpu", "cpu", id="cpu")]
    if dispatch.status("triton").built:
        params.append(pytest.param("triton", "cpu", id="triton-interpreted",
                                   marks=pytest.mark.skipif(CUDA, reason="Triton runs compiled on this GPU machine")))
        params.append(pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu))
    params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu))
    return params


def poison_allocator(nbytes: int, device: str) -> None:
    """Leave a freed block full of 0xA5 where the next allocation of this size likely lands,
    so an output element a kernel forgets to write shows up as garbage, not as zero."""
    if nbytes:
        block = torch.full((nbytes,), 0xA5, dtype=torch.uint8, device=device)
        del block
