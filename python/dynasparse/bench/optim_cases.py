"""Benchmark cases of the fused optimizer steps, registered on import.

Baseline: what one writes without dynasparse: torch.optim with foreach=True, then the masking
(pruned weights and state * mask) or the statistics (|g| summed per weight) and the error
norms (||w * ~m|| per tensor) as separate foreach ops. Variant: dynasparse.optim's one pass,
through the op backends usable on the device. The "masked-packed" cases have [rows, 1024]
weights with a MaskPlan each: the baseline then also repacks the active values as a sparse
layer's next forward would (plan.pack), where dynasparse.optim writes them in its step. Both step the same parameters (each call moves
them a little; only speed is compared here, correctness is tested in tests/optim).
"""

from __future__ import annotations

import functools

import torch

from dynasparse import MaskPlan, usable_backends
from dynasparse import optim as sparse_optim

from .harness import Case, measure, register, synchronizer

DENSITY = 0.2
# (total parameters, tensors): 25M over 50 tensors is a mid-size CNN or transformer; the quick
# case keeps a smoke run within seconds.
SIZES = ((25_000_000, 50, False), (1_000_000, 50, True))
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, sparse_optim.SGD, dict(lr=1e-3, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, sparse_optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}


PACKED_COLUMNS = 1024


def _tensors(total: int, count: int, device: torch.device, matrices: bool = False):
    generator = torch.Generator().manual_seed(0)
    # Uneven sizes, like the layers of a real network.
    weights = torch.rand(count, generator=generator) + 0.5
    sizes = (weights / weights.sum() * total).long().tolist()
    if matrices:
        sizes = [(max(1, size // PACKED_COLUMNS), PACKED_COLUMNS) for size in sizes]
    params = [torch.nn.Parameter(torch.randn(size, generator=generator).to(device)) for size in sizes]
    for param in params:
        param.grad = 1e-3 * torch.randn(param.shape, generator=generator).to(device)
    masks = [(torch.rand(size, generator=generator) < DENSITY).to(device) for size in sizes]
    return params, masks


def optim_workload(device: torch.device, optimizer: str, mode: str, total: int, tensors: int):
    torch_cls, ours_cls, kwargs = OPTIMIZERS[optimizer]
    packed = mode == "masked-packed"
    mode = "masked" if packed else mode
    params, masks = _tensors(total, tensors, device, matrices=packed)
    plans = [MaskPlan(mask) for mask in masks] if packed else []
    grads = [p.grad for p in params]
    baseline_optimizer = torch_cls(params, foreach=True, **kwargs)
    pruned = [~mask for mask in masks]
    statistics = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def baseline():
        if mode == "masked":
            baseline_optimizer.step()
            torch._foreach_mul_(params, masks)
            for state_key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                state = [baseline_optimizer.state[p][state_key] for p in params
                         if state_key in baseline_optimizer.state[p]]
                if state:
                    torch._foreach_mul_(state, masks)
            for plan, param in zip(plans, params):
                plan.pack(param)
            return None
        torch._foreach_add_(statistics, torch._foreach_abs(grads))
        baseline_optimizer.step()
        return torch._foreach_norm(torch._foreach_mul(params, pruned))

    sparse = {p: (m, mode) for p, m in zip(params, masks)}
    for param, plan in zip(params, plans):
        sparse[param] += (lambda plan=plan: plan,)
    ours = ours_cls(params, masks=sparse, statistic=None if mode == "masked" else "abs", **kwargs)
    device_backends = [b for b in usable_backends(device, f"{optimizer}_step")
                       if b != "reference" and not (b == "triton" and device.type == "cpu")]
    # The optimizer picks the backend itself (the first usable one), so it is one variant.
    variants = {device_backends[0]: ours.step} if device_backends else {}
    return baseline, variants


# Bytes per weight that a step must read and write at least once (fp32 weights, state and
# grads, a 1-byte mask): masked SGD reads w, g, momentum, mask and writes w, momentum;
# feedback with statistics also reads and writes the statistic; AdamW has two moments;
# packing writes 4 bytes per active weight (DENSITY of them, rounded up).
REQUIRED_BYTES_PER_WEIGHT = {("sgd", "masked"): 21, ("sgd", "feedback"): 29, ("sgd", "masked-packed"): 22,
                             ("adamw", "masked"): 29, ("adamw", "feedback"): 37, ("adamw", "masked-packed"): 30}
_copy_bandwidth: dict[str, float] = {}


def copy_bandwidth(device: torch.device) -> float:
    """The device's copy bandwidth in bytes/s (bytes read + written by a 256 MiB copy), the
    ceiling a memory-bound step is measured against; measured once per device."""
    if device.type not in _copy_bandwidth:
        source = torch.empty(64 << 20, dtype=torch.float32, device=device).fill_(1.0)
        target = torch.empty_like(source)
        timing = measure(lambda: target.copy_(source), sync=synchronizer(device), target_s=0.5)
        _copy_bandwidth[device.type] = 2 * source.nbytes / (timing.median_ms * 1e-3)
    return _copy_bandwidth[device.type]


def bandwidth_metrics(step, device: torch.device, *, required_bytes: int) -> dict[str, float]:
    """The required bytes over the step's time, absolute and as a fraction of copy bandwidth
    (the issue's GPU target: >= 0.8 for the fused step)."""
    seconds = measure(step, sync=synchronizer(device), target_s=0.5).median_ms * 1e-3
    achieved = required_bytes / seconds
    return {"GB_per_s": achieved / 1e9, "vs_copy_bandwidth": achieved / copy_bandwidth(device)}


def _register_optim_cases() -> None:
    for total, tensors, quick in SIZES:
        for optimizer in OPTIMIZERS:
            for mode, detail in (("masked", "masked"), ("feedback", "feedback-stats"),
                                 ("masked-packed", "masked-packed")):
                params = {"optimizer": optimizer, "mode": mode, "total": total, "tensors": tensors}
                required = total * REQUIRED_BYTES_PER_WEIGHT[optimizer, mode]
                register(Case("optim", f"{optimizer}-{detail}-{total // 1_000_000}M-{tensors}t", params,
                              optim_workload, quick=quick, check=None,
                              metrics=functools.partial(bandwidth_metrics, required_bytes=required)))


_register_optim_cases()
