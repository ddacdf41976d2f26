"""Benchmark cases of the masked matmul family, registered on import.

One case per (product, layout, sparsity, batch, dtype). The baseline is the dense torch op
a dense layer runs on the same (already masked) weight: forward `x @ w.T`, input gradient
`grad_out @ w`, weight gradient `grad_out.T @ x`. Variants:
- `dynasparse`: our kernel for the device, with the weight's packed values ready (as after a
  fused optimizer step, or between two weight changes);
- `dynasparse+pack`: the same, repacking the values from w on every call: the cost of the lazy
  refresh when w changed (forward and input gradient; the bitmask kernel reads w in place
  and has nothing to pack);
- `dynasparse+unpack` (weight gradient): the SDDMM plus its scatter into the dense [N, K]
  gradient autograd hands the optimizer;
- `torch-csr`, `torch-bsr`: torch's own sparse formats (`to_sparse_csr`, `to_sparse_bsr`,
  `torch.sparse.mm`, `torch.sparse.sampled_addmm`), so users see where each wins;
- on CUDA, `materialize`: `torch.where(m, w, 0)` then the dense product (what masking
  libraries do), and `torch-bsr_dense_mm` (torch's Triton BSR kernel) for block layouts.
Plan building (`plan/...` cases) is timed against one dense forward matmul of the same
weight at batch 128, the budget the issue sets for it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from dynasparse import ops
from dynasparse.layout import MaskPlan

from .harness import Case, register

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
CPU_BATCHES = (1, 32, 128)
CPU_SHAPE = (4096, 4096)
QUICK_SHAPE = (1024, 1024)
# The GPU targets: bf16, x 8192 x 4096, w 4096 x 4096.
GPU_BATCH = 8192
LAYOUTS = ("unstructured", "block16", "block32", "block64", "2:4")
PRODUCTS = ("forward", "grad_input", "sddmm")


@dataclasses.dataclass(frozen=True)
class Sampled:
    """An SDDMM result (packed values, a dense or a sparse tensor) with what the output check
    needs to compare it to the dense baseline: how to make it dense, and the sampled mask."""

    output: torch.Tensor
    mask: torch.Tensor
    unpack: functools.partial | None = None


def _check(output, expected):
    if isinstance(output, Sampled):
        expected = torch.where(output.mask, expected, 0)
        output = output.unpack(output.output) if output.unpack is not None else output.output
    if output.layout != torch.strided:
        output = output.to_dense()
    scale = expected.abs().max().item() + 1.0 if expected.numel() else 1.0
    tolerance = (1e-4 if expected.dtype in (torch.float32, torch.float64) else 3e-2) * scale
    torch.testing.assert_close(output.double(), expected.double(), rtol=0, atol=tolerance)


def _layout(name: str) -> tuple[str, int | None]:
    if name.startswith("block"):
        return "block", int(name[len("block"):])
    return name, None


def _mask(layout: str, block: int | None, sparsity: float, shape, generator) -> torch.Tensor:
    n, k = shape
    if layout == "block":
        kept = torch.rand(-(-n // block), -(-k // block), generator=generator) >= sparsity
        return kept.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k].contiguous()
    if layout == "2:4":
        return ops.nm_mask(torch.rand(n, k, generator=generator), 2, 4, backend="reference")
    return torch.rand(n, k, generator=generator) >= sparsity


@functools.lru_cache(maxsize=1)  # cases are registered so that neighbours share a layer
def _layer(device_type: str, layout_name: str, sparsity: float, dtype_name: str, shape: tuple[int, int]):
    device, dtype = torch.device(device_type), getattr(torch, dtype_name)
    layout, block = _layout(layout_name)
    generator = torch.Generator().manual_seed(0)
    mask = _mask(layout, block, sparsity, shape, generator).to(device)
    weight = torch.where(mask, torch.randn(shape, generator=generator).to(device, dtype), 0)
    plan = MaskPlan(mask, layout, block=block)
    return mask, weight, plan


def _torch_formats(weight: torch.Tensor, block: int | None):
    """torch's CSR (and BSR for block layouts) of w and w.T, where this torch supports them."""
    formats = {}
    try:
        formats["torch-csr"] = (weight.to_sparse_csr(), weight.T.contiguous().to_sparse_csr())
        if block is not None:
            formats["torch-bsr"] = (weight.to_sparse_bsr((block, block)),
                                    weight.T.contiguous().to_sparse_bsr((block, block)))
    except (RuntimeError, NotImplementedError):
        pass
    return formats


def matmul_workload(device: torch.device, product: str, layout: str, sparsity: float, batch: int, dtype: str,
                    shape: list[int]):
    mask, weight, plan = _layer(device.type, layout, sparsity, dtype, tuple(shape))
    n, k = shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, k, generator=generator).to(device, weight.dtype)
    grad_out = torch.randn(batch, n, generator=generator).to(device, weight.dtype)
    block = _layout(layout)[1]
    formats = _torch_formats(weight, block) if product != "sddmm" else {}
    variants = {}

    if product == "forward":
        values = plan.pack(weight)
        baseline = functools.partial(torch.matmul, x, weight.T)
        variants["dynasparse"] = functools.partial(plan.forward, x, weight, values)
        if plan.kernel != "bitmask":
            variants["dynasparse+pack"] = lambda: plan.forward(x, weight, plan._pack(weight))
        for name, (sparse, _) in formats.items():
            variants[name] = functools.partial(lambda s: torch.sparse.mm(s, x.T).T, sparse)
    elif product == "grad_input":
        values_t = plan.pack_transposed(weight)
        baseline = functools.partial(torch.matmul, grad_out, weight)
        variants["dynasparse"] = functools.partial(plan.grad_input, grad_out, weight, values_t)
        if plan.kernel != "bitmask":
            variants["dynasparse+pack"] = functools.partial(plan.grad_input, grad_out, weight)
        for name, (_, sparse_t) in formats.items():
            variants[name] = functools.partial(lambda s: torch.sparse.mm(s, grad_out.T).T, sparse_t)
    else:
        baseline = lambda: grad_out.T @ x  # noqa: E731
        if plan.kernel == "panels":
            unpack = functools.partial(ops.unpack_panels, row_ptr=plan.index[0], cols=plan.index[1],
                                       panel=plan.size, n=n, k=k)
            variants["dynasparse"] = lambda: Sampled(ops.sddmm_panels(grad_out, x, *plan.index, plan.size), mask,
                                                     unpack)
        elif plan.kernel == "blocks":
            unpack = functools.partial(ops.unpack_blocks, row_ptr=plan.index[0], cols=plan.index[1], n=n, k=k)
            variants["dynasparse"] = lambda: Sampled(
                ops.sddmm_blocks(grad_out, x, mask, *plan.index, plan.size), mask, unpack)
        variants["dynasparse+unpack"] = lambda: Sampled(plan.grad_weight_masked(grad_out, x), mask)
        if device.type == "cpu" or dtype == "float32":
            csr_mask = torch.where(mask, 1.0, 0.0).to(device, weight.dtype).to_sparse_csr()
            variants["torch-sampled_addmm"] = lambda: Sampled(
                torch.sparse.sampled_addmm(csr_mask, grad_out.T, x, beta=0.0), mask)

    if device.type == "cuda" and product != "sddmm":
        if product == "forward":
            variants["materialize"] = lambda: x @ torch.where(mask, weight, 0).T
        else:
            variants["materialize"] = lambda: grad_out @ torch.where(mask, weight, 0)
        if block is not None:
            from torch.sparse._triton_ops import bsr_dense_mm

            other = x if product == "forward" else grad_out
            bsr = (weight if product == "forward" else weight.T.contiguous()).to_sparse_bsr((block, block))
            variants["torch-bsr_dense_mm"] = lambda: bsr_dense_mm(bsr, other.T).T
        if layout == "unstructured" and plan.kernel != "panels":
            # The CUDA C++ row-split SpMM, beside the default fused bitmask kernel.
            panels = MaskPlan(mask, kernel="panels")
            if product == "forward":
                variants["dynasparse-panels"] = functools.partial(panels.forward, x, weight, panels.pack(weight))
            else:
                variants["dynasparse-panels"] = functools.partial(panels.grad_input, grad_out, weight,
                                                                  panels.pack_transposed(weight))
    return baseline, variants


def plan_workload(device: torch.device, layout: str, sparsity: float, shape: list[int]):
    """Building the plans of m and m.T (MaskPlan) against one dense matmul at batch 128."""
    mask, weight, _ = _layer(device.type, layout, sparsity, "float32", tuple(shape))
    layout_name, block = _layout(layout)
    x = torch.randn(128, shape[1], generator=torch.Generator().manual_seed(2)).to(device)
    return (lambda: torch.matmul(x, weight.T)), {"plan": lambda: MaskPlan(mask, layout_name, block=block)}


def _register(device_types, shape, batches, dtype, quick=False, layouts=LAYOUTS, sparsities=SPARSITIES,
              suffix=""):
    for layout in layouts:
        for sparsity in (0.5,) if layout == "2:4" else sparsities:
            for batch in batches:
                for product in PRODUCTS:
                    params = {"product": product, "layout": layout, "sparsity": sparsity, "batch": batch,
                              "dtype": dtype, "shape": list(shape)}
                    name = f"{product}-{layout}-s{sparsity}-b{batch}-{dtype}{suffix}"
                    register(Case("matmul", name, params, matmul_workload, devices=device_types, quick=quick,
                                  check=_check))


def _register_all() -> None:
    _register(("cpu",), QUICK_SHAPE, (32,), "float32", quick=True, layouts=("unstructured", "block32"),
              sparsities=(0.9,), suffix="-quick")
    _register(("cpu",), CPU_SHAPE, CPU_BATCHES, "float32")
    _register(("cpu",), CPU_SHAPE, (32,), "bfloat16", sparsities=(0.9,))
    # Block 16 runs in 32 x 32 tiles on the GPU (the fused kernels' smallest): no case of its own.
    _register(("cuda",), CPU_SHAPE, (GPU_BATCH,), "bfloat16", layouts=("unstructured", "block32", "block64", "2:4"))
    _register(("cuda",), CPU_SHAPE, (GPU_BATCH,), "float32", layouts=("unstructured",), sparsities=(0.9, 0.95))
    for layout in ("unstructured", "block32"):
        register(Case("matmul", f"plan-{layout}-s0.9", {"layout": layout, "sparsity": 0.9, "shape": list(CPU_SHAPE)},
                      plan_workload, check=None))


_register_all()
