"""Benchmark cases of the top-k family, registered on import.

topk: the mask of the k = 10% largest scores, as a user without dynasparse would get it:
`torch.topk` and a scatter into a mask, `torch.kthvalue` and a comparison, or, over a list
of tensors, `torch.cat` then `topk`. One case per baseline, so each ratio is timed against
its own baseline in the same run. The scores are distinct positive float32 values
(consecutive bit patterns in random order: a few octaves, like the |weight| of a layer).
Distinct, so that every baseline's mask is exactly the k largest, comparable element for
element: with ties at the threshold, `>= kthvalue` keeps more than k, and which of the tied
elements `topk` returns is unspecified.

Every baseline and variant also reports its peak extra memory: the most bytes it held at
once beyond what it returns, relative to the scores' size. On CUDA this is
torch.cuda.max_memory_allocated; on the CPU it is the allocation timeline of torch's
profiler, which sees every allocation through torch's CPU allocator. The CPU kernels' own
scratch (per-thread histograms of 2^11 64-bit counters and per-chunk tables, about
threads x 16 KiB + 1 KiB) is plain heap memory the profiler does not see.
"""

from __future__ import annotations

import functools
import math

import torch

from dynasparse import ops

from .cases import _compiled_backends
from .harness import Case, register

DENSITY = 0.1
# (name suffix, total scores, number of tensors, quick)
SINGLE_SIZES = (("1M", 1 << 20, True), ("16M", 16 << 20, False))
GLOBAL_SIZES = (("50-tensors-1M", 1 << 20, True), ("50-tensors-25M", 25 << 20, False))
GLOBAL_TENSORS = 50
# GPU only (CPU runs cover 16M and 25M): the GPU targets, 100M scores against
# torch.topk, and global selection over the weights of a ResNet-50 in under 2 ms.
GPU_SINGLE_SIZES = (("100M", 100_000_000),)


# float32 1e-3: the smallest score; 25M consecutive bit patterns above it span 3 octaves.
LOWEST_SCORE_BITS = 0x3A83126F


def _distinct_scores(numel: int, device: torch.device, generator) -> torch.Tensor:
    bits = torch.randperm(numel, generator=generator, dtype=torch.int64) + LOWEST_SCORE_BITS
    return bits.to(torch.int32).view(torch.float32).to(device)


def _layer_sizes(total: int, count: int, generator) -> list[int]:
    """Uneven sizes, multiples of 256 like real layers, summing to about `total`."""
    weights = torch.rand(count, generator=generator) + 0.2
    return [max(256, round(total * float(w) / float(weights.sum()) / 256) * 256) for w in weights]


def _mask_from_indices(indices: torch.Tensor, numel: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(numel, dtype=torch.bool, device=like.device).index_fill_(0, indices, True)


def topk_baseline(flat: torch.Tensor, k: int) -> torch.Tensor:
    return _mask_from_indices(torch.topk(flat, k, sorted=False).indices, flat.numel(), flat)


def kthvalue_baseline(flat: torch.Tensor, k: int) -> torch.Tensor:
    # Exactly k only without ties at the threshold (true of these scores).
    return flat >= torch.kthvalue(flat, flat.numel() - k + 1).values


def cat_topk_baseline(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([tensor.reshape(-1) for tensor in scores])
    mask = topk_baseline(flat, k)
    return [piece.reshape(tensor.shape) for piece, tensor in zip(mask.split([t.numel() for t in scores]), scores)]


def topk_mask_workload(device: torch.device, numel: int, density: float, baseline: str):
    flat = _distinct_scores(numel, device, torch.Generator().manual_seed(0))
    k = round(density * numel)
    reference = {"topk": topk_baseline, "kthvalue": kthvalue_baseline}[baseline]
    return (functools.partial(reference, flat, k),
            {backend: (lambda backend=backend: ops.topk_mask(flat, k, backend=backend)[0])
             for backend in _compiled_backends("topk_mask", device)})


def topk_mask_global_workload(device: torch.device, numel: int, tensors: int, density: float):
    generator = torch.Generator().manual_seed(0)
    sizes = _layer_sizes(numel, tensors, generator)
    flat = _distinct_scores(sum(sizes), device, generator)
    scores = [piece.reshape(size // 256, 256) for piece, size in zip(flat.split(sizes), sizes)]
    k = round(density * sum(tensor.numel() for tensor in scores))
    return (functools.partial(cat_topk_baseline, scores, k),
            {backend: (lambda backend=backend: ops.topk_mask_global(scores, k, backend=backend)[0])
             for backend in _compiled_backends("topk_mask_global", device)})


def resnet50_weight_shapes() -> list[tuple[int, ...]]:
    """The conv and linear weight shapes of torchvision's ResNet-50 (25.5M weights), derived
    from its architecture rather than built, so no torchvision is needed."""
    shapes = [(64, 3, 7, 7)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if block == 0:
                shapes.append((4 * width, in_channels, 1, 1))  # the downsampling shortcut
            in_channels = 4 * width
    return shapes + [(1000, 2048)]


def resnet50_global_workload(device: torch.device, density: float):
    generator = torch.Generator().manual_seed(0)
    shapes = resnet50_weight_shapes()
    sizes = [math.prod(shape) for shape in shapes]
    flat = _distinct_scores(sum(sizes), device, generator)
    scores = [piece.reshape(shape) for piece, shape in zip(flat.split(sizes), shapes)]
    k = round(density * flat.numel())
    return (functools.partial(cat_topk_baseline, scores, k),
            {backend: (lambda backend=backend: ops.topk_mask_global(scores, k, backend=backend)[0])
             for backend in _compiled_backends("topk_mask_global", device)})


def _allocation_timeline_peak(fn) -> tuple[int, int]:
    """(peak, final) bytes allocated by `fn` through torch's CPU allocator, from the profiler."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        output = fn()
    del output  # freed after the profile: its bytes count as kept, not as extra
    allocations = []
    nodes = list(profiler.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(allocations):
        held += size
        peak = max(peak, held)
    return peak, held


def peak_extra_memory(fn, device: torch.device, *, scores_bytes: int) -> dict[str, float]:
    """Most bytes `fn` holds at once beyond what it returns, in MiB and as a fraction of
    the scores' bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        output = fn()
        torch.cuda.synchronize(device)
        peak, final = torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before
        del output
    else:
        peak, final = _allocation_timeline_peak(fn)
    extra = peak - final
    return {"peak_extra_MiB": extra / 2**20, "peak_extra_vs_scores": extra / scores_bytes}


def _register_topk_cases() -> None:
    for suffix, numel, quick in SINGLE_SIZES:
        for baseline in ("topk", "kthvalue"):
            register(Case("topk", f"topk_mask-{suffix}-vs-{baseline}",
                          {"numel": numel, "density": DENSITY, "baseline": baseline}, topk_mask_workload,
                          quick=quick, metrics=functools.partial(peak_extra_memory, scores_bytes=4 * numel)))
    for suffix, numel, quick in GLOBAL_SIZES:
        register(Case("topk", f"topk_mask_global-{suffix}-vs-cat-topk",
                      {"numel": numel, "tensors": GLOBAL_TENSORS, "density": DENSITY}, topk_mask_global_workload,
                      quick=quick, metrics=functools.partial(peak_extra_memory, scores_bytes=4 * numel)))
    for suffix, numel in GPU_SINGLE_SIZES:
        register(Case("topk", f"topk_mask-{suffix}-vs-topk", {"numel": numel, "density": DENSITY, "baseline": "topk"},
                      topk_mask_workload, devices=("cuda",),
                      metrics=functools.partial(peak_extra_memory, scores_bytes=4 * numel)))
    resnet_numel = sum(math.prod(shape) for shape in resnet50_weight_shapes())
    register(Case("topk", "topk_mask_global-resnet50-vs-cat-topk", {"density": DENSITY}, resnet50_global_workload,
                  devices=("cuda",), metrics=functools.partial(peak_extra_memory, scores_bytes=4 * resnet_numel)))


_register_topk_cases()
