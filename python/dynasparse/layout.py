"""Masks and their kernel plans: what a sparse layer builds once per mask change.

A `MaskPlan` holds, for one bool mask m [N, K] on one device, the index structures the
masked matmul kernels read (for m, and for m.T, which the input gradient needs), and caches
the packed weight values, repacked only when the weight has changed (its version counter).
`plan.linear(x, weight, bias, grad_mode)` is the differentiable product every sparse module
wires: forward x @ (w * m).T + bias, input gradient through the plan of m.T, and the weight
gradient either dense (feedback: DPF trains every weight) or only at the mask (masked).
`weight_grad=` overrides the weight gradient alone ("dense", "nonzeros" or "none"), whatever
the optimizer then does with it: RigL takes a dense gradient on its mask-update steps while its
updates stay masked.

Kernels per device and layout (`MaskPlan.kernel` names the one chosen):
- "panels": packed values + 16-bit column offsets in K-panels (CPU C++, CUDA C++);
- "blocks": packed b x b blocks (CPU C++);
- "bitmask": w read in place, masked in registers from its bitmask, empty tiles skipped
  (Triton, on CUDA devices).
Unstructured and 2:4 masks use "panels" on the CPU and "bitmask" on CUDA; block masks use
"blocks" on the CPU and "bitmask" with one tile per block on CUDA.
"""

from __future__ import annotations

import weakref

import torch

from . import checks, dispatch, ops
from .reference.matmul import as_rows, block_rows

LAYOUTS = ("unstructured", "block", "2:4")
KERNELS = ("panels", "blocks", "bitmask")
GRAD_MODES = ("feedback", "masked")
# The weight gradient a backward computes, apart from the update rule: a grad mode implies one
# (feedback: dense, masked: at the nonzeros), `weight_grad` overrides it.
WEIGHT_GRADS = ("dense", "nonzeros", "none")
BLOCK_SIZES = (16, 32, 64)
# K-panel width of the CPU kernels: a panel of x for a 128-row batch chunk stays in L2.
CPU_PANEL = 256
# Tile of the fused bitmask kernels for unstructured masks.
BITMASK_TILE = 64


def _default_kernel(layout: str, device: torch.device) -> str:
    if device.type == "cuda" and "masked_mm" in dispatch._TRITON_OPS and dispatch.status("triton").usable:
        return "bitmask"
    return "blocks" if layout == "block" else "panels"


def _panel_width(kernel_device: torch.device, k: int) -> int:
    # GPU row-split kernels want whole rows: one panel when K fits 16-bit offsets.
    if kernel_device.type == "cuda":
        return max(1, min(k, checks.MAX_PANEL))
    return CPU_PANEL


def _tile(kernel: str, layout: str, block: int | None) -> int:
    if kernel == "blocks":
        return block
    # The fused kernels' tiles are 32, 64 or 128: a block-16 mask is visited in 32 x 32 tiles
    # (a tile is skipped only when all four of its blocks are empty).
    return max(block, 32) if layout == "block" else BITMASK_TILE


def check_layout(layout: str, block: int | None, mask: torch.Tensor) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"dynasparse: unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "block":
        if block not in BLOCK_SIZES:
            raise ValueError(f"dynasparse: layout 'block' needs block in {BLOCK_SIZES}, got {block!r}")
    elif block is not None:
        raise ValueError(f"dynasparse: block={block} only applies to layout 'block', not {layout!r}")
    if layout == "2:4":
        if mask.shape[-1] % 4 != 0:
            raise ValueError(f"dynasparse: layout '2:4' needs K divisible by 4, got a mask of shape {list(mask.shape)}")
        if mask.numel() and int(mask.reshape(-1, 4).sum(-1).max()) > 2:
            raise ValueError("dynasparse: layout '2:4' needs at most 2 active weights in every group of 4 "
                             "consecutive weights of a row (dynasparse.ops.nm_mask(scores, 2, 4) makes such a mask)")


def write_generation(tensor: torch.Tensor) -> int:
    """How often the tensor (or the tensor it is a view of) was handed out through `.data` or
    changed by an optimizer that does not bump version counters: writes that `_version` misses.
    Counted by the sparse layers' weights and masks (dynasparse.nn.modules)."""
    if "_dynasparse_generation" in tensor.__dict__ or tensor._base is None:
        return tensor.__dict__.get("_dynasparse_generation", 0)
    return tensor._base.__dict__.get("_dynasparse_generation", 0)


class WeightStamp:
    """What the cached packed values were packed from: the weight's root tensor (held weakly, so
    a temporary that died, such as an autocast copy or a reshape copy, never matches a new one
    that reuses its memory), the view into it, and its write counts."""

    def __init__(self, weight: torch.Tensor):
        root = weight._base if weight._base is not None else weight
        self._root = weakref.ref(root)
        self._view = (weight.data_ptr(), weight._version, write_generation(weight), weight.dtype, weight.stride())

    def matches(self, weight: torch.Tensor) -> bool:
        root = weight._base if weight._base is not None else weight
        return self._root() is root and self._view == (weight.data_ptr(), weight._version, write_generation(weight),
                                                       weight.dtype, weight.stride())


def traced_by_functorch(*tensors) -> bool:
    """True for tensors wrapped by a torch.func transform (grad, vmap, jacrev, functional_call's
    per-sample params): the kernel ops have no rules for those, so the product runs as torch ops."""
    if not torch._C._are_functorch_transforms_active():
        return False
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def weight_grad_of(grad_mode: str | None, weight_grad: str | None = None) -> str:
    """The weight gradient to compute: `weight_grad` where given (then `grad_mode` is not
    consulted), else the grad mode's ("feedback": "dense", "masked": "nonzeros")."""
    if weight_grad is not None:
        if weight_grad not in WEIGHT_GRADS:
            raise ValueError(f"dynasparse: unknown weight_grad {weight_grad!r}; choose one of "
                             f"{', '.join(WEIGHT_GRADS)} (or None: the grad mode's)")
        return weight_grad
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"dynasparse: unknown grad_mode {grad_mode!r}; choose one of {', '.join(GRAD_MODES)}")
    return "dense" if grad_mode == "feedback" else "nonzeros"


def masked_weight_for(weight: torch.Tensor, mask: torch.Tensor, grad_mode: str | None,
                      weight_grad: str | None = None) -> torch.Tensor:
    """w * m as differentiable torch ops: with a dense weight gradient (feedback mode) its
    gradient reaches every weight (straight through, as the kernels' feedback backward), at
    the nonzeros (masked mode) only the active ones, with "none" no weight."""
    kind = weight_grad_of(grad_mode, weight_grad)
    if kind == "nonzeros":
        return torch.where(mask, weight, 0)
    if kind == "none":
        return torch.where(mask, weight.detach(), 0)
    return weight - torch.where(mask, 0, weight).detach()


class MaskPlan:
    """Kernel plans of one bool mask [N, K], built once; see the module docstring.

    The plan keeps a reference to the mask and its version: using it after the mask was
    modified in place, or with another mask, raises instead of computing with a stale plan.
    """

    def __init__(self, mask: torch.Tensor, layout: str = "unstructured", *, block: int | None = None,
                 kernel: str | None = None, backend: str | None = None):
        checks.check_plan_mask("MaskPlan", mask)
        check_layout(layout, block, mask)
        kernel = kernel if kernel is not None else _default_kernel(layout, mask.device)
        if kernel not in KERNELS:
            raise ValueError(f"dynasparse.MaskPlan: unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if kernel == "blocks" and layout != "block":
            raise ValueError(f"dynasparse.MaskPlan: kernel 'blocks' needs layout 'block', got {layout!r}")
        self.layout, self.kernel, self.backend = layout, kernel, backend
        self.shape = tuple(mask.shape)
        self.mask = mask
        self.mask_version = mask._version
        n, k = self.shape
        mask_t = mask.T
        if kernel == "panels":
            self.size, self.size_t = _panel_width(mask.device, k), _panel_width(mask.device, n)
            self.index = ops.plan_panels(mask, self.size, backend=backend)
            self.index_t = ops.plan_panels(mask_t, self.size_t, backend=backend)
        else:
            self.size = self.size_t = _tile(kernel, layout, block)
            self.index = ops.plan_blocks(mask, self.size, backend=backend)
            self.index_t = ops.plan_blocks(mask_t, self.size, backend=backend)
        if kernel == "bitmask":
            self.words = ops.pack_mask(mask, backend=backend)
            self.words_t = ops.pack_mask(mask_t, backend=backend)
        self._values = None
        self._values_key = None
        self._order_t = None

    # --- validity ---

    def check(self, mask: torch.Tensor | None = None) -> None:
        """Raise if the plan no longer describes its mask (modified in place) or `mask`."""
        if mask is not None and mask is not self.mask:
            raise ValueError("dynasparse.MaskPlan: this plan was built for another mask tensor; "
                             "build a new plan (MaskPlan(mask, ...)) after replacing a mask")
        # Version counters are invisible to a traced graph; a compiled caller that swaps in a
        # new plan object is recompiled by dynamo's guards instead.
        if not torch.compiler.is_compiling() and self.mask._version != self.mask_version:
            raise ValueError("dynasparse.MaskPlan: the mask was modified in place after the plan was built; "
                             "rebuild the plan (the old one would compute with the old mask)")

    def _check_weight(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"dynasparse.MaskPlan: weight has shape {list(weight.shape)} but the plan's mask "
                             f"has shape {list(self.shape)}")
        if weight.device != self.mask.device:
            raise ValueError(f"dynasparse.MaskPlan: weight is on {weight.device} but the plan is on {self.mask.device}")

    # --- packed values ---

    def pack(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed values of w for this plan (None for the bitmask kernel, which reads w
        in place). Cached: repacked only when w is another tensor or has changed since."""
        self._check_weight(weight)
        if self.kernel == "bitmask":
            return None
        if torch.compiler.is_compiling():
            # Version counters are invisible to a traced graph: compiled code packs every call.
            return self._pack(weight.detach())
        if self._values_key is None or not self._values_key.matches(weight):
            with torch.no_grad():
                self._values = self._pack(weight.detach())
            self._values_key = WeightStamp(weight)
        return self._values

    def packed_target(self, weight: torch.Tensor) -> tuple | None:
        """(values, row_ptr, cols, panel) for a fused optimizer step to write w's packed values
        into (`packed=` of dynasparse.ops.sgd_step / adamw_step), or None where this plan does
        not read panel-packed fp32 values. Until `packed_written(weight)` the cache is invalid."""
        self._check_weight(weight)
        if self.kernel != "panels" or weight.dtype != torch.float32:
            return None
        nonzeros = self.index[1].numel()
        if self._values is None or self._values.dtype != torch.float32 or self._values.numel() != nonzeros:
            self._values = torch.empty(nonzeros, dtype=torch.float32, device=weight.device)
        self._values_key = None
        return self._values, self.index[0], self.index[1], self.size

    def packed_written(self, weight: torch.Tensor) -> None:
        """The step that `packed_target(weight)` was given to has written w's packed values."""
        self._values_key = WeightStamp(weight)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        if self.kernel == "panels":
            return ops.pack_panels(weight, *self.index, self.size, backend=self.backend)
        return ops.pack_blocks(weight, self.mask, *self.index, self.size, backend=self.backend)

    def _pack_t(self, weight: torch.Tensor) -> torch.Tensor:
        # w.T's values in the plan of m.T are w's values in the plan of m, reordered: while the
        # forward's packed values are current (as in a backward), a gather from them (a few MB)
        # replaces a strided pass over all of w.
        if (not torch.compiler.is_compiling() and self._values_key is not None
                and self._values_key.matches(weight)):
            values_t = self._values.index_select(0, self._transposed_order())
            return values_t if self.kernel == "panels" else values_t.transpose(1, 2).contiguous()
        if self.kernel == "panels":
            return ops.pack_panels(weight.T, *self.index_t, self.size_t, backend=self.backend)
        return ops.pack_blocks(weight.T, self.mask.T, *self.index_t, self.size_t, backend=self.backend)

    def _transposed_order(self) -> torch.Tensor:
        """Where each packed value (or block) of the plan of m.T sits among those of m; built
        at the first use and kept for the plan's lifetime."""
        if self._order_t is None:
            n, k = self.shape
            if self.kernel == "panels":
                # Float64 positions are exact below 2**53 nonzeros.
                positions = torch.arange(self.index[1].numel(), dtype=torch.float64, device=self.mask.device)
                dense = ops.unpack_panels(positions, *self.index, self.size, n, k, backend=self.backend)
                self._order_t = ops.pack_panels(dense.T, *self.index_t, self.size_t, backend=self.backend).long()
            else:
                # Block (r, c) of m.T is block (c, r) of m; m's blocks are sorted row-major.
                column_blocks = checks.ceil_div(k, self.size)
                keys = block_rows(self.index[0]) * column_blocks + self.index[1].long()
                keys_t = self.index_t[1].long() * column_blocks + block_rows(self.index_t[0])
                self._order_t = torch.searchsorted(keys, keys_t)
        return self._order_t

    # --- the three products ---

    def forward(self, x: torch.Tensor, weight: torch.Tensor, values: torch.Tensor | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ (w * m).T (+ bias); `values` from `pack(weight)`."""
        n = self.shape[0]
        if self.kernel == "panels":
            return ops.spmm_panels(x, values, *self.index, self.size, n, bias, backend=self.backend)
        if self.kernel == "blocks":
            return ops.spmm_blocks(x, values, *self.index, n, bias, backend=self.backend)
        return ops.masked_mm(x, weight, self.words, *self.index, self.size, bias, backend=self.backend)

    def pack_transposed(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The packed values of w.T for the plan of m.T (None for the bitmask kernel). Not
        cached: training changes w between one backward and the next."""
        self._check_weight(weight)
        return None if self.kernel == "bitmask" else self._pack_t(weight.detach())

    def grad_input(self, grad_out: torch.Tensor, weight: torch.Tensor,
                   values_t: torch.Tensor | None = None) -> torch.Tensor:
        """grad_out @ (w * m), through the plan of m.T; `values_t` from `pack_transposed`
        (packed here when not given)."""
        k = self.shape[1]
        if self.kernel != "bitmask" and values_t is None:
            values_t = self._pack_t(weight)
        if self.kernel == "panels":
            return ops.spmm_panels(grad_out, values_t, *self.index_t, self.size_t, k, backend=self.backend)
        if self.kernel == "blocks":
            return ops.spmm_blocks(grad_out, values_t, *self.index_t, k, backend=self.backend)
        return ops.masked_mm(grad_out, weight.T, self.words_t, *self.index_t, self.size_t, backend=self.backend)

    def grad_weight_masked(self, grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Dense [N, K] grad_out.T @ x at the mask's nonzeros, zero elsewhere (SDDMM)."""
        n, k = self.shape
        if self.kernel == "panels":
            values = ops.sddmm_panels(grad_out, x, *self.index, self.size, backend=self.backend)
            return ops.unpack_panels(values, *self.index, self.size, n, k, backend=self.backend)
        if self.kernel == "blocks":
            values = ops.sddmm_blocks(grad_out, x, self.mask, *self.index, self.size, backend=self.backend)
            return ops.unpack_blocks(values, *self.index, n, k, backend=self.backend)
        return ops.masked_sddmm(grad_out, x, self.words, *self.index, self.size, backend=self.backend)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               grad_mode: str = "feedback", *, weight_grad: str | None = None) -> torch.Tensor:
        """Differentiable x @ (w * m).T + bias (see the module docstring for grad_mode and
        weight_grad)."""
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"dynasparse: unknown grad_mode {grad_mode!r}; choose one of {', '.join(GRAD_MODES)}")
        kind = weight_grad_of(grad_mode, weight_grad)
        self.check()
        if not torch.compiler.is_compiling() and traced_by_functorch(weight, bias):
            # Per-sample or functional weights: the packed values would be of one weight.
            return torch.nn.functional.linear(x, masked_weight_for(weight, self.mask, None, kind), bias)
        return self.product(x, weight, bias, kind)

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                weight_grad: str) -> torch.Tensor:
        """`linear` for a caller that has checked the plan, the weight gradient kind and that
        `weight` is no torch.func-wrapped tensor (the sparse layers do, once per call). A call
        that records no gradient skips the autograd.Function: a small layer's call is mostly
        overhead."""
        values = self.pack(weight)
        if (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))) \
                or (not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()):
            return _MaskedLinear.apply(x, weight, bias, values, self, weight_grad)
        return self.forward(x, weight, values, bias)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"MaskPlan([{n}, {k}], layout={self.layout!r}, kernel={self.kernel!r}, "
                f"{'panel' if self.kernel == 'panels' else 'tile'}={self.size}, device={self.mask.device})")


def fold_vmap_dim(x: torch.Tensor, x_dim: int | None, batch_size: int) -> torch.Tensor:
    """x with its vmapped dimension moved to the front (broadcast there when x is not batched):
    the products take any leading dims, so a vmapped call is one call over a bigger batch."""
    if x_dim is None:
        return x.unsqueeze(0).expand(batch_size, *x.shape)
    return x.movedim(x_dim, 0)


class FullArgsFunction(torch.autograd.Function):
    """An autograd.Function whose callers pass every argument: torch's apply binds the
    arguments of a setup_context-style forward to its signature (inspect.signature) on every
    call, some 20 us that a small layer cannot afford; with no defaults to fill, that binding
    is skipped outside torch.func transforms and torch.compile, which get torch's own apply."""

    @classmethod
    def apply(cls, *args):
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*args)


class _MaskedLinear(FullArgsFunction):
    """x @ (w * m).T + bias on the plan's kernels. setup_context form, so torch.func transforms
    (grad, vjp, jacrev, vmap) compose with it; a backward that must itself be differentiable
    (create_graph=True, torch.func's nested transforms) runs as torch ops on w * m."""

    @staticmethod
    def forward(x, weight, bias, values, plan, weight_grad):
        return plan.forward(x, weight, values, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _, plan, weight_grad = inputs
        ctx.plan, ctx.weight_grad = plan, weight_grad
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, values, plan, weight_grad):
        x_dim, weight_dim, bias_dim, values_dim = in_dims[:4]
        if weight_dim is not None or bias_dim is not None or values_dim is not None:
            raise ValueError("dynasparse: vmap over a sparse layer's weight or bias is not supported by the kernel "
                             "path; per-sample weights go through torch.func.functional_call, which runs torch ops")
        x = fold_vmap_dim(x, x_dim, info.batch_size)
        return _MaskedLinear.apply(x, weight, bias, values, plan, weight_grad), 0

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():
            return (*_differentiable_linear_backward(ctx, grad_out, x, weight), None, None, None)
        grad_out = grad_out.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = plan.grad_input(grad_out, weight)
        if ctx.needs_input_grad[1] and ctx.weight_grad != "none":
            if ctx.weight_grad == "nonzeros":
                grad_weight = plan.grad_weight_masked(grad_out, x)
            else:
                grad_weight = as_rows(grad_out).T @ as_rows(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = as_rows(grad_out).sum(0)
        return grad_x, grad_weight, grad_bias, None, None, None


def _differentiable_linear_backward(ctx, grad_out, x, weight):
    """The gradients of x @ (w * m).T + b as torch ops, so that they have gradients themselves."""
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_out @ masked_weight_for(weight, ctx.plan.mask, None, ctx.weight_grad)
    if ctx.needs_input_grad[1] and ctx.weight_grad != "none":
        grad_weight = as_rows(grad_out).T @ as_rows(x)
        if ctx.weight_grad == "nonzeros":
            grad_weight = torch.where(ctx.plan.mask, grad_weight, 0)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = as_rows(grad_out).sum(0)
    return grad_x, grad_weight, grad_bias
