"""Benchmark cases, registered on import.

bitmask: packing a bool mask into int32 words (32 elements a word) and back. The baseline
is the pure-PyTorch reference, the way one would pack without dynasparse; the variants are
the compiled backends that can run on the device.
"""

from __future__ import annotations

import functools

import torch

from dynasparse import ops, usable_backends
from dynasparse.reference import bitmask as reference

from .harness import Case, register

BITMASK_SPARSITY = 0.9
# The quick shape keeps a smoke run within seconds; 4096 x 4096 is a large layer's mask.
BITMASK_SHAPES = (((1024, 1024), True), ((4096, 4096), False))


def _random_mask(shape: list[int], sparsity: float, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(shape, generator=generator) >= sparsity).to(device)


def _compiled_backends(op: str, device: torch.device) -> list[str]:
    # Triton on CPU tensors is the interpreter, a correctness tool: timing it means nothing.
    return [backend for backend in usable_backends(device, op)
            if backend != "reference" and not (backend == "triton" and device.type == "cpu")]


def pack_mask_workload(device: torch.device, shape: list[int], sparsity: float):
    mask = _random_mask(shape, sparsity, device)
    return (functools.partial(reference.pack_mask, mask),
            {backend: functools.partial(ops.pack_mask, mask, backend=backend)
             for backend in _compiled_backends("pack_mask", device)})


def unpack_mask_workload(device: torch.device, shape: list[int], sparsity: float):
    k = shape[-1]
    packed = reference.pack_mask(_random_mask(shape, sparsity, device))
    return (functools.partial(reference.unpack_mask, packed, k),
            {backend: functools.partial(ops.unpack_mask, packed, k, backend=backend)
             for backend in _compiled_backends("unpack_mask", device)})


def _register_bitmask_cases() -> None:
    for shape, quick in BITMASK_SHAPES:
        params = {"shape": list(shape), "sparsity": BITMASK_SPARSITY}
        suffix = f"{'x'.join(map(str, shape))}-s{BITMASK_SPARSITY}"
        register(Case("bitmask", f"pack_mask-{suffix}", params, pack_mask_workload, quick=quick))
        register(Case("bitmask", f"unpack_mask-{suffix}", params, unpack_mask_workload, quick=quick))


_register_bitmask_cases()
