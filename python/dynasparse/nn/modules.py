"""SparseLinear and SparseConv2d: nn.Linear / nn.Conv2d with a bool mask and kernels that skip it.

Each keeps its dense `weight` (dynamic sparse training needs the pruned weights: they can come
back) and a bool `mask` buffer of the same shape; `state_dict` has `weight` and `bias` exactly
as the dense module (a dense checkpoint loads) plus `mask`. The forward and backward run the
masked matmul ops through a `dynasparse.layout.MaskPlan`, rebuilt whenever the mask changes
(`set_mask`, `load_state_dict`, a move to another device), never a materialized `w * m`.

grad_mode: "feedback" gives every weight the gradient taken at `w * m` (DPF), "masked" only the
active ones (pruned weights get exactly 0). `weight_grad` ("dense", "nonzeros", "none"; None:
the grad mode's) overrides the weight gradient alone, step by step (a pruner sets it: RigL's
dense gradient on its update steps); it is a training setting, not part of the state_dict.

backend: "auto" (the default, see `dynasparse.nn.set_default_backend`) runs each call as the
faster of the sparse kernels and the dense computation on `w * m`, measured per call shape
on this machine (costs.py); same values and gradients either way. "sparse" pins the kernels,
"dense" the dense computation. Not part of the state_dict either.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import ops
from ..layout import (BLOCK_SIZES, GRAD_MODES, FullArgsFunction, MaskPlan, WeightStamp, check_layout,
                      fold_vmap_dim, masked_weight_for, traced_by_functorch, weight_grad_of, write_generation)
from . import costs

LAYOUT_NAMES = ("unstructured", "2:4") + tuple(f"block{b}" for b in BLOCK_SIZES)


def parse_layout(layout: str) -> tuple[str, int | None]:
    """"block32" -> ("block", 32); "unstructured" and "2:4" stand alone."""
    if layout in ("unstructured", "2:4"):
        return layout, None
    if isinstance(layout, str) and layout.startswith("block") and layout[len("block"):].isdigit():
        block = int(layout[len("block"):])
        if block in BLOCK_SIZES:
            return "block", block
    raise ValueError(f"dynasparse: unknown layout {layout!r}; choose one of {', '.join(LAYOUT_NAMES)}")


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"dynasparse: sparsity must be in [0, 1) (the fraction of weights pruned), got {sparsity!r}")


def check_grad_mode(grad_mode: str) -> None:
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"dynasparse: unknown grad_mode {grad_mode!r}; choose one of {', '.join(GRAD_MODES)}")


def magnitude_mask(weight_2d: torch.Tensor, sparsity: float, layout: str) -> torch.Tensor:
    """The mask keeping the largest |w| at this sparsity, in the layout's structure; exact
    counts, ties to the lower index (dynasparse.ops' selection rules)."""
    kind, block = parse_layout(layout)
    scores = weight_2d.detach().abs().float()
    if kind == "2:4":
        return ops.nm_mask(scores, 2, 4)
    if kind == "block":
        block_scores = ops.block_scores(scores, (block, block))
        keep = round(block_scores.numel() * (1.0 - sparsity))
        kept_blocks, _ = ops.topk_mask(block_scores, keep)
        return ops.expand_block_mask(kept_blocks, block)
    keep, _ = ops.topk_mask(scores, round(scores.numel() * (1.0 - sparsity)))
    return keep


class _CountsHiddenWrites:
    """The weight and mask of a sparse layer count the writes that their version counter misses,
    so that the layer's cached plan and packed values never go stale: `.data` hands out an
    alias with a fresh version counter (`w.data.mul_(2)`, `for p in model.parameters():
    p.data...`), and some optimizers (torch's fused Adam) write without bumping it (counted by
    an optimizer step hook below). Writes that bypass torch altogether (NumPy views, DLPack,
    raw pointers) are not seen: call the layer's `weight_changed()` after them."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def count_write(self) -> None:
        self.__dict__["_dynasparse_generation"] = self.__dict__.get("_dynasparse_generation", 0) + 1

    @property
    def data(self):
        self.count_write()
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value):
        self.count_write()
        torch._C.TensorBase.data.__set__(self, value)

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            with torch.no_grad():
                copy = torch._C.TensorBase.clone(self)
            if isinstance(self, nn.Parameter):
                copy = nn.Parameter(copy, self.requires_grad)
            copy.__class__ = type(self)
            memo[id(self)] = copy
        return memo[id(self)]


class SparseWeight(_CountsHiddenWrites, nn.Parameter):
    """A sparse layer's weight: an nn.Parameter that counts hidden writes (see above)."""


class SparseMask(_CountsHiddenWrites, torch.Tensor):
    """A sparse layer's mask buffer: a bool tensor that counts hidden writes (see above)."""


def _counting(tensor: torch.Tensor, cls: type) -> torch.Tensor:
    # In place, so that optimizers and user code holding the tensor keep the same object.
    if type(tensor) in (nn.Parameter, torch.Tensor):
        tensor.__class__ = cls
    return tensor


def _count_optimizer_writes(optimizer, args, kwargs) -> None:
    if getattr(optimizer, "bumps_version_counters", False):
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if isinstance(param, SparseWeight):
                param.count_write()


register_optimizer_step_post_hook(_count_optimizer_writes)


class _SparseMixin:
    """Mask, plan and grad mode shared by the sparse modules; `_weight_2d()` is the [N, K]
    matrix the masked matmul sees.

    The methods every call runs (`plan`, `_mask_stamp`, `_reference_product`, `_runs_dense`,
    `_dense_weight`) read the weight, bias and mask from `_parameters` / `_buffers`:
    nn.Module's `__getattr__` is a Python call per read, and a dozen of them were a third of a
    small layer's Python path."""

    def _init_sparse(self, sparsity: float, layout: str, grad_mode: str, backend: str | None) -> None:
        check_sparsity(sparsity)
        check_grad_mode(grad_mode)
        self.layout, self.grad_mode = layout, grad_mode
        self.backend = costs.default_backend() if backend is None else backend
        self._choices: dict[tuple, str] = {}  # cost key -> "sparse" / "dense", this layer's calls so far
        self._dense_last = False  # what compiled code runs (see costs.py)
        self._dense_cache = None  # (weight stamp, mask stamp, w * m) of the dense way's inference calls
        self.weight_grad = None
        self._layout_kind, self._block = parse_layout(layout)
        self._check_layout_fits()
        _counting(self.weight, SparseWeight)
        self._plan = None
        # On the meta device (models built before their weights exist) the magnitude mask is
        # chosen once real weights are there: at load_state_dict, or at the first use.
        self._pending_sparsity = sparsity if self.weight.is_meta else None
        # Its own storage (not a view), so that its write count is its own.
        initial = (torch.ones_like(self.weight, dtype=torch.bool) if self.weight.is_meta else
                   self._from_2d(magnitude_mask(self._weight_2d(), sparsity, layout)).clone())
        self.register_buffer("mask", _counting(initial, SparseMask))
        self._register_state_dict_hook(_masked_mode_state_dict)
        self._rebuild_plan()

    def __setattr__(self, name, value):
        # `layer.mask = new` goes through set_mask: validated, and copied into the buffer that
        # optimizers hold.
        if name == "mask" and getattr(self, "_plan_stamp", None) is not None and isinstance(value, torch.Tensor):
            self.set_mask(value)
            return
        if name == "weight_grad" and value is not None:
            weight_grad_of(None, value)  # a bad value fails here, not at the next backward
        if name == "backend":
            costs.check_backend(value)
        super().__setattr__(name, value)

    def _check_layout_fits(self) -> None:
        n, k = self._weight_2d().shape
        if self._layout_kind == "2:4" and k % 4:
            raise ValueError(f"dynasparse: layout '2:4' needs the weight's K = {k} (inputs per output) to be "
                             "divisible by 4")
        if self._layout_kind == "block" and (n % self._block or k % self._block):
            raise ValueError(f"dynasparse: layout {self.layout!r} needs the weight's [N, K] = [{n}, {k}] to be "
                             f"multiples of {self._block}")

    def _check_mask(self, mask, what: str = "a mask") -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"dynasparse: {what} must be a torch.bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"dynasparse: {what} has shape {list(mask.shape)} but weight has shape "
                             f"{list(self.weight.shape)}")
        if not mask.is_meta:
            check_layout(self._layout_kind, self._block, self.as_matrix(mask))

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (copied into the `mask` buffer, so optimizers holding it see the
        change) and rebuild the plan. A mask that does not fit the layer or its layout is
        refused before anything changes."""
        self._check_mask(mask)
        with torch.no_grad():
            self.mask.copy_(mask)
        self._pending_sparsity = None
        self._rebuild_plan()

    def weight_changed(self) -> None:
        """Tell the layer its weight was written behind torch's back (NumPy, DLPack, raw
        pointers): its cached packed values are rebuilt at the next use."""
        self.weight.count_write()

    def _adopt(self, module: nn.Module, sparsity: float, mask: torch.Tensor | None):
        """Take `module`'s weight and bias, then `mask` or the magnitude mask at `sparsity`."""
        check_sparsity(sparsity)
        with torch.no_grad():
            self.weight.copy_(module.weight)
            if self.bias is not None:
                self.bias.copy_(module.bias)
        self.set_mask(mask if mask is not None else
                      self._from_2d(magnitude_mask(self._weight_2d(), sparsity, self.layout)))
        return self

    def masked_weight(self) -> torch.Tensor:
        """w * mask (pruned positions exactly 0, whatever w holds there)."""
        return torch.where(self.mask, self.weight, 0)

    def _fill_dense(self, dense: nn.Module) -> nn.Module:
        with torch.no_grad():
            dense.weight.copy_(self.masked_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    @property
    def density(self) -> float:
        return int(torch.count_nonzero(self.mask)) / max(self.mask.numel(), 1)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def plan(self) -> MaskPlan:
        """The mask's kernel plan. Rebuilt eagerly whenever the module changes the mask
        (`set_mask`, `load_state_dict`, a move), so compiled code never builds one; in eager
        mode any other change of the `mask` buffer (in place, through `.data`, replaced) is
        also noticed here."""
        if not torch.compiler.is_compiling():
            weight = self._parameters["weight"]
            if self._pending_sparsity is not None and not weight.is_meta:
                self._choose_pending_mask()
            _counting(weight, SparseWeight)
            if self._plan_stamp != self._mask_stamp():
                self._check_mask(self.mask, "the layer's mask (changed outside set_mask)")
                self._rebuild_plan()
        return self._plan

    def packing_plan(self) -> MaskPlan | None:
        """The plan whose packed values a fused optimizer step may write from `weight` seen as
        [size(0), numel / size(0)], i.e. when that is the matrix the plan multiplies."""
        return self.plan()

    def _mask_stamp(self) -> tuple:
        mask = self._buffers["mask"]
        return (id(mask), mask.data_ptr(), mask._version, write_generation(mask), mask.shape, mask.dtype,
                mask.device)

    def _rebuild_plan(self) -> None:
        _counting(self.mask, SparseMask)
        # A view of the buffer: it shares the buffer's version counter.
        self._plan = None if self.mask.is_meta else MaskPlan(self._mask_2d(), self._layout_kind, block=self._block)
        self._plan_stamp = self._mask_stamp()
        self._density_key = None if self.mask.is_meta else round(self.density, 2)

    def _choose_pending_mask(self) -> None:
        sparsity, self._pending_sparsity = self._pending_sparsity, None
        self.set_mask(self._from_2d(magnitude_mask(self._weight_2d(), sparsity, self.layout)))

    def _mask_2d(self) -> torch.Tensor:
        return self.as_matrix(self.mask)

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor as the [N, K] matrix the kernels multiply."""
        return tensor.reshape(self._weight_2d().shape)

    def _from_2d(self, mask_2d: torch.Tensor) -> torch.Tensor:
        return mask_2d.reshape(self.weight.shape)

    def _apply(self, fn, *args, **kwargs):
        was_meta = self.mask.is_meta if getattr(self, "_plan_stamp", None) is not None else False
        result = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_plan_stamp", None) is not None:
            _counting(self.weight, SparseWeight)
            if was_meta and not self.mask.is_meta:
                # to_empty: the buffer holds arbitrary bytes until the pending mask is chosen.
                with torch.no_grad():
                    self.mask.fill_(True)
            self._rebuild_plan()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "mask"
        if key in state_dict:
            try:
                self._check_mask(state_dict[key], f"the checkpoint's {key}")
            except (TypeError, ValueError) as error:
                error_msgs.append(str(error))
                return
            self._pending_sparsity = None
        else:
            # A dense checkpoint has no mask: keep this module's (or choose the pending one
            # from the loaded weights).
            state_dict = dict(state_dict)
            state_dict[key] = self.mask
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        _counting(self.weight, SparseWeight)
        if self._pending_sparsity is not None and not self.weight.is_meta:
            self._choose_pending_mask()
        self._rebuild_plan()

    def _autocast(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: torch.Tensor | None):
        """The operands in autocast's dtype where it is on; else x must match the weight."""
        if not x.is_meta and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight_2d = x.to(dtype), weight_2d.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif x.dtype != weight_2d.dtype:
            raise TypeError(f"dynasparse: input is {x.dtype} but the layer's weight is {weight_2d.dtype}")
        return x, weight_2d, bias

    def _guarded_bias(self, plan: MaskPlan, bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """Under torch.compile the graph cannot see the mask's version counter: a guard op
        checks it at run time (its zero result feeds the bias, so it is never dropped)."""
        if not torch.compiler.is_compiling():
            return bias
        # The plan's view of the buffer: a plain tensor sharing the buffer's version counter.
        zero = torch.ops.dynasparse.mask_guard(plan.mask, plan.mask_version, like)
        return zero.expand(plan.shape[0]) if bias is None else bias + zero

    def _reference_product(self, x: torch.Tensor) -> bool:
        """Meta tensors and torch.func-wrapped weights run as torch ops (no kernel plan for them)."""
        parameters = self._parameters
        weight = parameters["weight"]
        return weight.is_meta or x.is_meta or (not torch.compiler.is_compiling()
                                               and traced_by_functorch(weight, parameters["bias"]))

    def _sparse_linear(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: torch.Tensor | None,
                       dense: bool = False) -> torch.Tensor:
        x, weight_2d, bias = self._autocast(x, weight_2d, bias)
        if self._reference_product(x):
            return F.linear(x, masked_weight_for(weight_2d, self._mask_2d(), self.grad_mode, self.weight_grad), bias)
        if dense:
            return F.linear(x, self._dense_weight(weight_2d, as_matrix=True), bias)
        plan = self.plan()  # checked against the mask buffer's stamp; weights are unwrapped (above)
        return plan.product(x, weight_2d, self._guarded_bias(plan, bias, x),
                            weight_grad_of(self.grad_mode, self.weight_grad))

    # -- sparse or dense (costs.py) -------------------------------------------------------------

    def _runs_dense(self, x: torch.Tensor, run: Callable[[torch.Tensor, bool], torch.Tensor]) -> bool:
        """Whether this call runs dense on w * m: the pinned backend, or with "auto" the faster
        way for this call's key, measured by `run(probe, dense)` on the first call with it."""
        backend = self.backend
        if backend != "auto":
            return backend == "dense"
        if torch.compiler.is_compiling():
            return self._dense_last
        if self._reference_product(x):
            return False
        if torch._C._are_functorch_transforms_active():
            return True  # torch.func wraps the input: torch ops on w * m, nothing measured
        self.plan()  # a changed mask is noticed before its density keys the choice
        parameters = self._parameters
        bias = parameters["bias"]
        training = torch.is_grad_enabled() and (x.requires_grad or parameters["weight"].requires_grad
                                                or (bias is not None and bias.requires_grad))
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        key = (type(self).__name__, self._geometry_key(), self._call_key(x), self.layout, self.grad_mode,
               self.weight_grad, self._density_key, dtype, device, torch.get_num_threads(),
               "training" if training else "inference")
        choice = self._choices.get(key)
        if choice is None:
            name = costs.key_name(key)
            choice = costs.COSTS.choice(name) or self._measure(name, x, run, training)
            self._choices[key] = choice
        dense = choice == "dense"
        if dense != self._dense_last:  # nn.Module's __setattr__ costs more than the rest of a small call
            self._dense_last = dense
        return dense

    def _measure(self, name: str, x: torch.Tensor, run, training: bool) -> str:
        probe = x.detach().requires_grad_(x.requires_grad)
        params = [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]
        inputs = ([probe] if probe.requires_grad else []) + params

        def way(dense: bool) -> Callable[[], None]:
            def call() -> None:
                out = run(probe, dense)
                if training:
                    # Gradients returned, not accumulated: the layer's .grad stays as it was.
                    torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
            return call

        with torch.enable_grad() if training else torch.no_grad():
            sparse_s, dense_s = costs.time_both(way(False), way(True), x.device)
        return costs.COSTS.record(name, sparse_s, dense_s)

    def _dense_weight(self, weight: torch.Tensor, as_matrix: bool) -> torch.Tensor:
        """w * m for the dense way (`weight` the [N, K] matrix with `as_matrix`, else shaped
        like the mask): differentiable as the grad mode says while a gradient is wanted; else
        kept until the weight or the mask changes (inference calls then cost what the dense
        layer's do)."""
        if (torch.is_grad_enabled() and weight.requires_grad) or torch.compiler.is_compiling():
            mask = self._mask_2d() if as_matrix else self._buffers["mask"]
            return masked_weight_for(weight, mask, self.grad_mode, self.weight_grad)
        self.plan()  # its stamp is the mask's, refreshed by any change of the buffer
        cached = self._dense_cache
        if cached is None or cached[1] != self._plan_stamp or not cached[0].matches(weight):
            mask = self._mask_2d() if as_matrix else self._buffers["mask"]
            with torch.no_grad():
                cached = self._dense_cache = (WeightStamp(weight), self._plan_stamp, torch.where(mask, weight, 0))
        return cached[2]

    def _geometry_key(self) -> tuple:
        return tuple(self._weight_2d().shape)

    def _call_key(self, x: torch.Tensor):
        return costs.rows_bucket(x.numel() // max(x.shape[-1], 1))

    def backend_report(self) -> list[dict]:
        """Each call key this layer has seen, with the measured seconds of both ways and the
        way it runs (pinned layers: the backend, unmeasured)."""
        if self.backend != "auto":
            return [{"backend": self.backend, "choice": self.backend}]
        rows = []
        for key, choice in self._choices.items():
            entry = costs.COSTS.entry(costs.key_name(key)) or {}
            rows.append({"key": key, "choice": choice, "sparse_s": entry.get("sparse_s"),
                         "dense_s": entry.get("dense_s")})
        return rows

    def _check_features(self, x: torch.Tensor) -> None:
        in_features = self._weight_2d().shape[1]
        if x.dim() == 0 or x.shape[-1] != in_features:
            raise RuntimeError(f"dynasparse.{type(self).__name__}: the input's last dimension must be "
                               f"in_features = {in_features}, got input of shape {list(x.shape)}")

    def _sparse_repr(self) -> str:
        override = "" if self.weight_grad is None else f", weight_grad={self.weight_grad}"
        backend = f", backend={self.backend}"
        if self.backend == "auto" and self._choices:
            dense = sum(choice == "dense" for choice in self._choices.values())
            backend += f" (dense at {dense} of {len(self._choices)} call shapes)"
        return f"layout={self.layout}, sparsity={self.sparsity:.3f}, grad_mode={self.grad_mode}{override}{backend}"


def _masked_mode_state_dict(module, state_dict, prefix, local_metadata):
    """In masked mode the pruned weights are dead: the state_dict holds w * m, so a checkpoint
    saved the way Hugging Face saves (state_dict, no mask) loads into the dense class with the
    same outputs. (keep_vars=True asks for the parameters themselves: left alone.)"""
    key = prefix + "weight"
    if module.grad_mode == "masked" and key in state_dict and not isinstance(state_dict[key], nn.Parameter):
        state_dict[key] = torch.where(module.mask, state_dict[key], 0)


@torch.library.custom_op("dynasparse::mask_guard", mutates_args=())
def _mask_guard(mask: torch.Tensor, version: int, like: torch.Tensor) -> torch.Tensor:
    """A 0-d zero of like's dtype, or an error when `mask` was modified in place since its
    plan was built at `version` (a compiled graph cannot notice that itself)."""
    # Greater, not different: version counters only grow, and a copy (as opcheck makes) starts at 0.
    if mask._version > version:
        raise RuntimeError("dynasparse: a sparse layer's mask was modified in place under torch.compile, so the "
                           "compiled graph would compute with the old mask; change masks with layer.set_mask(mask) "
                           "(which makes dynamo retrace)")
    return like.new_zeros(())


@_mask_guard.register_fake
def _(mask, version, like):
    return like.new_empty(())


# A constant zero: nothing flows back through it.
_mask_guard.register_autograd(lambda ctx, grad: (None, None, None))


class SparseLinear(_SparseMixin, nn.Linear):
    """nn.Linear with a mask: same arguments, plus keyword-only `sparsity` (initial mask: the
    largest |w|), `layout` ("unstructured", "2:4", "block16", "block32", "block64"),
    `grad_mode` ("feedback" or "masked") and `backend` ("auto", "sparse", "dense"; None: the
    default backend)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 sparsity: float = 0.0, layout: str = "unstructured", grad_mode: str = "feedback",
                 backend: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_sparse(sparsity, layout, grad_mode, backend)

    def _weight_2d(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_features(x)
        return self._linear(x, self._runs_dense(x, self._linear))

    def _linear(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        parameters = self._parameters
        return self._sparse_linear(x, parameters["weight"], parameters["bias"], dense)

    @classmethod
    def from_dense(cls, module: nn.Linear, *, sparsity: float = 0.0, layout: str = "unstructured",
                   grad_mode: str = "feedback", mask: torch.Tensor | None = None,
                   backend: str | None = None) -> SparseLinear:
        """A SparseLinear sharing nothing with `module` but its values (same device, dtype)."""
        _check_source(cls, module, nn.Linear)
        sparse = cls(module.in_features, module.out_features, module.bias is not None, device=module.weight.device,
                     dtype=module.weight.dtype, layout=layout, grad_mode=grad_mode,
                     backend=backend)
        return sparse._adopt(module, sparsity, mask)

    def to_dense(self) -> nn.Linear:
        """The pruned layer as nn.Linear (weight * mask)."""
        return self._fill_dense(nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                          device=self.weight.device, dtype=self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


class _SparseConvNd(_SparseMixin):
    """What SparseConv1d and SparseConv2d share: the convolution lowered to the masked matmul
    over the weight viewed as [out_channels, in_channels * prod(kernel_size)]; a 1-D one runs
    as the 2-D one of a (1, k) kernel over its signal viewed [C, 1, L] (the same matrix)."""

    _DENSE: type  # the nn module it replaces
    _SPATIAL: int  # its spatial dimensions

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 sparsity: float = 0.0, layout: str = "unstructured", grad_mode: str = "feedback",
                 backend: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self._init_sparse(sparsity, layout, grad_mode, backend)

    def _weight_2d(self) -> torch.Tensor:
        return self.weight.reshape(self.out_channels, -1)

    def _check_layout_fits(self) -> None:
        if self.groups != 1 and self._layout_kind != "unstructured":
            raise ValueError(f"dynasparse: layout {self.layout!r} is not supported for grouped convolutions "
                             f"(groups={self.groups}); use layout='unstructured'")
        if self.padding == "same":
            self._same_padding()  # refuses an even effective kernel at construction, not at the first forward
        super()._check_layout_fits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name, spatial = type(self).__name__, self._SPATIAL
        if x.dim() not in (spatial + 1, spatial + 2):
            raise ValueError(f"dynasparse.{name}: expected a {spatial + 1}-D (unbatched) or {spatial + 2}-D input, "
                             f"got {x.dim()}-D")
        if x.shape[-spatial - 1] != self.in_channels:
            raise RuntimeError(f"dynasparse.{name}: expected input of shape {list(x.shape)} to have "
                               f"{self.in_channels} channels (in_channels), got {x.shape[-spatial - 1]}")
        # Grouped convolutions have no kernel: dense on w * m, unmeasured.
        dense = self.groups != 1 or self._reference_product(x) or self._runs_dense(x, self._convolution)
        return self._convolution(x, dense)

    def _convolution(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        if dense:
            if self._reference_product(x):
                weight = masked_weight_for(self.weight, self.mask, self.grad_mode, self.weight_grad)
            else:
                weight = self._dense_weight(self.weight, as_matrix=False)
            return self._conv_forward(x, weight, self.bias)
        x, restore = self._as_2d_input(x)
        return restore(self._convolution_2d(x, *self._geometry_2d()))

    def _as_2d_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """x as the batched 4-D input of the 2-D kernels (padded first where padding_mode is not
        zeros), and the function giving a 4-D output of them the layout of x."""
        batched = x.dim() == self._SPATIAL + 2
        if not batched:
            x = x.unsqueeze(0)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        one_d = self._SPATIAL == 1
        if one_d:
            x = x.unsqueeze(2)

        def restore(y: torch.Tensor) -> torch.Tensor:
            y = y.squeeze(2) if one_d else y
            return y if batched else y.squeeze(0)

        return x, restore

    def _convolution_2d(self, x, kernel_size, stride, padding, dilation) -> torch.Tensor:
        """The sparse way on a batched 4-D x with 2-D geometry."""
        n, _, height, width = x.shape
        kh, kw = kernel_size
        out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        if (kh, kw) == (1, 1) and padding == (0, 0):
            rows = x[:, :, ::stride[0], ::stride[1]].permute(0, 2, 3, 1)
        elif x.device.type == "cpu" and self.plan().kernel == "panels":
            x, weight_2d, bias = self._autocast(x, self._weight_2d(), self.bias)
            plan = self.plan()
            plan.check()
            return _PanelConv2d.apply(x, weight_2d, self._guarded_bias(plan, bias, x), plan.pack(weight_2d), plan,
                                      weight_grad_of(self.grad_mode, self.weight_grad),
                                      (kernel_size, stride, padding, dilation), self._grad_input_plan)
        else:
            patches = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
            rows = patches.transpose(1, 2)
        y = self._sparse_linear(rows, self._weight_2d(), self.bias)
        return y.reshape(n, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)

    def _reference_product(self, x: torch.Tensor) -> bool:
        # Under torch.func with a wrapped input (grad or jacrev over x, functional_call of an
        # earlier layer) the weight's [out, in * k] reshape is wrapped too: no packed values.
        return super()._reference_product(x) or (not torch.compiler.is_compiling() and traced_by_functorch(x))

    def _effective_padding(self) -> tuple[int, ...]:
        """The zero padding the kernels apply (a padding_mode other than zeros pads the input
        itself first)."""
        if self.padding_mode != "zeros" or self.padding == "valid":
            return (0,) * self._SPATIAL
        if self.padding == "same":
            return self._same_padding()
        return tuple(self.padding)

    def _geometry_2d(self) -> tuple[tuple[int, int], ...]:
        """(kernel_size, stride, padding, dilation) of the 2-D convolution the kernels run; a
        1-D one runs as a (1, k) kernel over its signal viewed [C, 1, L]."""
        geometry = (tuple(self.kernel_size), tuple(self.stride), self._effective_padding(), tuple(self.dilation))
        if self._SPATIAL == 1:
            return tuple((0 if index == 2 else 1, *part) for index, part in enumerate(geometry))
        return geometry

    def _rebuild_plan(self) -> None:
        super()._rebuild_plan()
        # The backward's input gradient on conv2d_panels (see _InputGradientPlans), for the
        # convolutions that run the implicit GEMM forward.
        plan = self._plan
        geometry = self._geometry_2d()
        runs_on_kernel = (plan is not None and plan.kernel == "panels" and self.groups == 1
                          and not (geometry[0] == (1, 1) and geometry[2] == (0, 0)))
        self._grad_input_plan = (_InputGradientPlans(plan, self.mask.reshape(*self.mask.shape[:2], *geometry[0]),
                                                     geometry) if runs_on_kernel else None)

    def _geometry_key(self) -> tuple:
        return (tuple(self.weight.shape), tuple(self.stride), str(self.padding), tuple(self.dilation), self.groups,
                self.padding_mode)

    def _call_key(self, x: torch.Tensor):
        batched = x.dim() == self._SPATIAL + 2
        return (costs.rows_bucket(x.shape[0]) if batched else 1, *x.shape[-self._SPATIAL:])

    def _same_padding(self) -> tuple[int, ...]:
        pads = []
        for dilation, size in zip(self.dilation, self.kernel_size):
            total = dilation * (size - 1)
            if total % 2:
                raise ValueError(f"dynasparse.{type(self).__name__}: padding='same' with an even effective kernel "
                                 "size is not supported (it pads unevenly); give explicit padding")
            pads.append(total // 2)
        return tuple(pads)

    @classmethod
    def from_dense(cls, module: nn.Module, *, sparsity: float = 0.0, layout: str = "unstructured",
                   grad_mode: str = "feedback", mask: torch.Tensor | None = None,
                   backend: str | None = None) -> _SparseConvNd:
        """The sparse layer sharing nothing with `module` (the nn class it replaces) but its values."""
        _check_source(cls, module, cls._DENSE)
        sparse = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                     padding=module.padding, dilation=module.dilation, groups=module.groups,
                     bias=module.bias is not None, padding_mode=module.padding_mode, device=module.weight.device,
                     dtype=module.weight.dtype, layout=layout, grad_mode=grad_mode, backend=backend)
        return sparse._adopt(module, sparsity, mask)

    def to_dense(self) -> nn.Module:
        """The pruned layer as the nn class it replaces (weight * mask)."""
        return self._fill_dense(self._DENSE(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                            padding=self.padding, dilation=self.dilation, groups=self.groups,
                                            bias=self.bias is not None, padding_mode=self.padding_mode,
                                            device=self.weight.device, dtype=self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


class SparseConv2d(_SparseConvNd, nn.Conv2d):
    """nn.Conv2d with a mask: same arguments, plus keyword-only `sparsity`, `layout`,
    `grad_mode` and `backend` as SparseLinear. The convolution is lowered to the masked matmul
    over the weight viewed as [out_channels, in_channels * kh * kw]: 1x1 convolutions directly
    on the channels; k x k ones, on CPU with the panel plan (unstructured and 2:4 layouts), by
    the implicit-GEMM op `conv2d_panels` (im2col tiles built in cache, NCHW output written
    directly), elsewhere (block layouts, CUDA) on unfolded patches. On the implicit-GEMM path the
    input gradient runs on the same kernel (the flipped, transposed weight's plans, one per
    stride phase, built with the mask's), and the weight gradient is torch's dense one (kept at
    the mask in masked mode); the other paths
    differentiate through the unfolded patches. Grouped convolutions (groups > 1, depthwise
    included) fall back to a dense convolution of `w * m`: correct, no faster than dense."""

    _DENSE, _SPATIAL = nn.Conv2d, 2


class SparseConv1d(_SparseConvNd, nn.Conv1d):
    """nn.Conv1d with a mask (1-D CNNs, audio models): its arguments plus those of
    SparseLinear; its `state_dict` is nn.Conv1d's plus the mask. It runs SparseConv2d's kernels
    as a (1, k) convolution over the signal viewed [C, 1, L] (no copy of the weight)."""

    _DENSE, _SPATIAL = nn.Conv1d, 1


class _PanelConv2d(FullArgsFunction):
    """conv2d_panels forward. Backward: the input gradient on the same kernel, as convolutions
    of grad_out over `grad_input_plan` (an _InputGradientPlans); the weight gradient is torch's
    dense one (feedback), conv2d_sddmm_panels at the mask's nonzeros (masked) or none
    (`weight_grad`). A backward that must itself be differentiable (create_graph=True,
    torch.func) runs torch's convolutions of w * m."""

    @staticmethod
    def forward(x, weight_2d, bias, values, plan, weight_grad, geometry, grad_input_plan):
        return ops.conv2d_panels(x, values, *plan.index, plan.size, plan.shape[0], *geometry, bias,
                                 backend=plan.backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight_2d, bias, _, plan, weight_grad, geometry, grad_input_plan = inputs
        ctx.plan, ctx.weight_grad, ctx.geometry, ctx.grad_input_plan = plan, weight_grad, geometry, grad_input_plan
        ctx.save_for_backward(x, weight_2d)
        ctx.has_bias = bias is not None

    @staticmethod
    def vmap(info, in_dims, x, weight_2d, bias, values, plan, weight_grad, geometry, grad_input_plan):
        if any(dim is not None for dim in in_dims[1:4]):
            raise ValueError("dynasparse: vmap over a SparseConv2d's weight or bias is not supported by the kernel "
                             "path; per-sample weights go through torch.func.functional_call, which runs torch ops")
        x = fold_vmap_dim(x, in_dims[0], info.batch_size)
        out = _PanelConv2d.apply(x.flatten(0, 1), weight_2d, bias, values, plan, weight_grad, geometry,
                                 grad_input_plan)
        return out.unflatten(0, x.shape[:2]), 0

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_2d = ctx.saved_tensors
        kernel_size, stride, padding, dilation = ctx.geometry
        weight = weight_2d.reshape(weight_2d.shape[0], x.shape[1], *kernel_size)
        mask = ctx.plan.mask.reshape(weight.shape)
        wants_x = ctx.needs_input_grad[0]
        wants_weight = ctx.needs_input_grad[1] and ctx.weight_grad != "none"
        grad_x = _kernel_grad_input(ctx, grad_out, x, weight_2d) if wants_x else None
        grad_weight = grad_bias = None
        if wants_weight and ctx.weight_grad == "nonzeros" and not torch.is_grad_enabled() and x.is_cpu:
            # Masked mode: the weight gradient at the nonzeros only, an implicit-GEMM SDDMM (on
            # CUDA it would run the unfolding reference, slower than torch's dense gradient).
            values = ops.conv2d_sddmm_panels(grad_out, x, *ctx.plan.index, ctx.plan.size, *ctx.geometry,
                                             backend=ctx.plan.backend)
            grad_weight = ops.unpack_panels(values, *ctx.plan.index, ctx.plan.size, *weight_2d.shape,
                                            backend=ctx.plan.backend)
            wants_weight = False
        if wants_weight or (wants_x and grad_x is None):
            # One call of torch's convolution backward for what the kernels do not compute: the
            # dense weight gradient of feedback mode, or the input gradient of a backward that must
            # be differentiable. The weight's values only matter to the input gradient.
            torch_computes_x = wants_x and grad_x is None
            torch_x, torch_weight, _ = torch.ops.aten.convolution_backward(
                grad_out, x, masked_weight_for(weight, mask, None, ctx.weight_grad) if torch_computes_x else weight,
                None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
                [torch_computes_x, wants_weight, False])
            grad_x = torch_x if grad_x is None else grad_x
            if torch_weight is not None:
                if ctx.weight_grad == "nonzeros":
                    torch_weight = torch.where(mask, torch_weight, 0)
                grad_weight = torch_weight.reshape(weight_2d.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _kernel_grad_input(ctx, grad_out, x, weight_2d):
    """The input gradient on conv2d_panels, or None where it does not run there (a backward
    that must itself be differentiable, or a geometry the plans were not built for)."""
    plans = ctx.grad_input_plan
    if plans is None or torch.is_grad_enabled() or plans.geometry != tuple(map(tuple, ctx.geometry)):
        return None
    # The forward's packed values (cached: the weight has not changed since).
    return plans.grad_input(grad_out, ctx.plan.pack(weight_2d), x.shape)


class _InputGradientPlans:
    """The input gradient of a convolution as convolutions of the output gradient on
    conv2d_panels. Per spatial dimension, the input positions h = r (mod stride) form a phase:
    the kernel taps i with (r + padding - dilation * i) divisible by the stride reach it, and
    grad_x[r + stride * t] = sum over those taps of w[i] * grad_out[t + (r + padding -
    dilation * i) / stride], a stride-1 correlation of grad_out with the taps in reverse order
    (spaced dilation / gcd(dilation, stride) apart), channels in for out. Stride 1 is one phase
    with every tap, the flipped, transposed kernel; stride s has up to s phases per dimension
    whose taps together are the kernel, so the work is the dense gradient's times the density.
    Built with the mask's plan (never in compiled code): per phase a plan and where its packed
    values sit among the forward's (a gather replaces repacking the weight at every backward)."""

    def __init__(self, plan: MaskPlan, mask: torch.Tensor, geometry):
        self.geometry = tuple(map(tuple, geometry))
        kernel_size, stride, padding, dilation = self.geometry
        n, k = plan.shape
        # Float64 positions are exact below 2**53 nonzeros.
        order = torch.arange(plan.index[1].numel(), dtype=torch.float64, device=mask.device)
        positions = ops.unpack_panels(order, *plan.index, plan.size, n, k, backend=plan.backend).reshape(mask.shape)
        per_dimension = [_phases(*parts) for parts in zip(kernel_size, stride, padding, dilation)]
        self.phases = []
        for residue_h, taps_h, step_h in per_dimension[0]:
            for residue_w, taps_w, step_w in per_dimension[1]:
                taps = (taps_h, taps_w)
                phase_plan = MaskPlan(_flipped_transposed(_taps(mask, taps)), backend=plan.backend)
                gather = ops.pack_panels(_flipped_transposed(_taps(positions, taps)), *phase_plan.index,
                                         phase_plan.size, backend=plan.backend).long()
                self.phases.append(((residue_h, residue_w), taps, (step_h, step_w), phase_plan, gather))
        # Whether every input position is reached (else the unreached ones get a zero gradient).
        self.covering = len(self.phases) == stride[0] * stride[1]

    def grad_input(self, grad_out: torch.Tensor, values: torch.Tensor, input_shape) -> torch.Tensor:
        kernel_size, stride, padding, dilation = self.geometry
        grad_out = grad_out.contiguous()
        single_phase = stride == (1, 1)
        grad_x = None
        if not single_phase:
            grad_x = (grad_out.new_empty if self.covering else grad_out.new_zeros)(input_shape)
        for residues, taps, steps, plan, gather in self.phases:
            # Per dimension: the phase's input count, and the output gradient's padding on each
            # side (negative: cropped) lining its taps up with a stride-1 correlation of that
            # count. The kernel pads both sides alike: the larger of the two, and the extra
            # rows or columns of its output are sliced off.
            counts, pads, offsets = [], [], []
            for d in range(2):
                count = -(-(input_shape[2 + d] - residues[d]) // stride[d])
                left = -((residues[d] + padding[d] - dilation[d] * taps[d][-1]) // stride[d])
                right = count + steps[d] * (len(taps[d]) - 1) - grad_out.shape[2 + d] - left
                counts.append(count)
                pads.append(max(0, left, right))
                offsets.append(pads[-1] - left)
            if min(counts) <= 0:
                continue
            part = ops.conv2d_panels(grad_out, values.index_select(0, gather), *plan.index, plan.size,
                                     input_shape[1], [len(taps[0]), len(taps[1])], [1, 1], pads, list(steps),
                                     backend=plan.backend)
            part = part[:, :, offsets[0]:offsets[0] + counts[0], offsets[1]:offsets[1] + counts[1]]
            if single_phase:
                return part
            grad_x[:, :, residues[0]::stride[0], residues[1]::stride[1]] = part
        return grad_x if grad_x is not None else grad_out.new_zeros(input_shape)


def _phases(kernel: int, stride: int, padding: int, dilation: int) -> list[tuple[int, list[int], int]]:
    """(residue, its taps ascending, their step in the output gradient) of each input phase
    that some tap reaches, for one spatial dimension."""
    phases = []
    for residue in range(stride):
        taps = [tap for tap in range(kernel) if (residue + padding - dilation * tap) % stride == 0]
        if taps:
            phases.append((residue, taps, dilation // math.gcd(dilation, stride)))
    return phases


def _taps(weight: torch.Tensor, taps: tuple[list[int], list[int]]) -> torch.Tensor:
    """weight [out, in, kh, kw] at the given rows and columns of the kernel."""
    if len(taps[0]) == weight.shape[2] and len(taps[1]) == weight.shape[3]:
        return weight
    return weight[:, :, taps[0]][:, :, :, taps[1]]


def _flipped_transposed(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, *kernel] -> [in, out * prod(kernel)], the kernel flipped: the matrix of the
    convolution that maps an output gradient back onto the input."""
    return weight.flip(tuple(range(2, weight.dim()))).transpose(0, 1).reshape(weight.shape[1], -1)


class SparseTransposedLinear(_SparseMixin, nn.Module):
    """A linear layer whose weight is stored [in_features, out_features] (y = x @ W + b), as
    transformers' GPT-2 `Conv1D`: its sparse version, with the same `weight`/`bias` state_dict
    layout, so checkpoints of the original load. The mask has the weight's shape; kernels run
    on the transposed views."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 sparsity: float = 0.0, layout: str = "unstructured", grad_mode: str = "feedback",
                 backend: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        self._init_sparse(sparsity, layout, grad_mode, backend)

    def _weight_2d(self) -> torch.Tensor:
        return self.weight.T

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.T

    def _from_2d(self, mask_2d: torch.Tensor) -> torch.Tensor:
        return mask_2d.T.contiguous()

    def packing_plan(self) -> None:
        # The plan multiplies weight.T: the stored rows are not its rows.
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_features(x)
        return self._linear(x, self._runs_dense(x, self._linear))

    def _linear(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        return self._sparse_linear(x, self.weight.T, self.bias, dense)

    @classmethod
    def from_dense(cls, module: nn.Module, *, sparsity: float = 0.0, layout: str = "unstructured",
                   grad_mode: str = "feedback", mask: torch.Tensor | None = None,
                   backend: str | None = None) -> SparseTransposedLinear:
        """From any module with weight [in, out] and bias [out] computing x @ weight + bias."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(f"dynasparse.SparseTransposedLinear.from_dense: module must have a 2-D weight [in, out] "
                            f"(as transformers' Conv1D), got {type(module).__name__}")
        in_features, out_features = weight.shape
        sparse = cls(in_features, out_features, getattr(module, "bias", None) is not None,
                     device=module.weight.device, dtype=module.weight.dtype, layout=layout, grad_mode=grad_mode,
                     backend=backend)
        return sparse._adopt(module, sparsity, mask)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight stored [in, out], {self._sparse_repr()}")


SPARSE_MODULES = (SparseLinear, SparseConv1d, SparseConv2d, SparseTransposedLinear)


def _check_source(cls: type, module: nn.Module, expected: type) -> None:
    if not isinstance(module, expected):
        raise TypeError(f"dynasparse.{cls.__name__}.from_dense: module must be an nn.{expected.__name__}, "
                        f"got {type(module).__name__}")
