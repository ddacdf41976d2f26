"""SparseLinear and SparseConv2d: nn.Linear / nn.Conv2d with a bool mask and kernels that skip it.

Each keeps its dense `weight` (dynamic sparse training needs the pruned weights: they can come
back) and a bool `mask` buffer of the same shape; `state_dict` has `weight` and `bias` exactly
as the dense module (a dense checkpoint loads) plus `mask`. The forward and backward run the
masked matmul ops through a `dynasparse.layout.MaskPlan`, rebuilt whenever the mask changes
(`set_mask`, `load_state_dict`, a move to another device), never a materialized `w * m`.

grad_mode: "feedback" gives every weight the gradient taken at `w * m` (DPF), "masked" only the
active ones (pruned weights get exactly 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..layout import BLOCK_SIZES, GRAD_MODES, MaskPlan

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


class _SparseMixin:
    """Mask, plan and grad mode shared by the sparse modules; `_weight_2d()` is the [N, K]
    matrix the masked matmul sees."""

    def _init_sparse(self, sparsity: float, layout: str, grad_mode: str) -> None:
        check_sparsity(sparsity)
        check_grad_mode(grad_mode)
        self.layout, self.grad_mode = layout, grad_mode
        self._layout_kind, self._block = parse_layout(layout)
        self._check_layout_fits()
        self.register_buffer("mask", self._from_2d(magnitude_mask(self._weight_2d(), sparsity, layout)))
        self._rebuild_plan()

    def _check_layout_fits(self) -> None:
        n, k = self._weight_2d().shape
        if self._layout_kind == "2:4" and k % 4:
            raise ValueError(f"dynasparse: layout '2:4' needs the weight's K = {k} (inputs per output) to be "
                             "divisible by 4")
        if self._layout_kind == "block" and (n % self._block or k % self._block):
            raise ValueError(f"dynasparse: layout {self.layout!r} needs the weight's [N, K] = [{n}, {k}] to be "
                             f"multiples of {self._block}")

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (copied into the `mask` buffer, so optimizers holding it see the
        change) and rebuild the plan."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"dynasparse: a mask must be a torch.bool tensor, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"dynasparse: mask has shape {list(mask.shape)} but weight has shape "
                             f"{list(self.weight.shape)}")
        with torch.no_grad():
            self.mask.copy_(mask)
        self._rebuild_plan()

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
        return float(self.mask.sum()) / max(self.mask.numel(), 1)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def plan(self) -> MaskPlan:
        """The mask's kernel plan. Rebuilt eagerly whenever the module changes the mask
        (`set_mask`, `load_state_dict`, a move), so compiled code never builds one; in eager
        mode an in-place edit of the `mask` buffer is also noticed here."""
        if not torch.compiler.is_compiling() and (self._plan is None or
                                                  self._plan.mask_version != self.mask._version):
            self._rebuild_plan()
        return self._plan

    def packing_plan(self) -> MaskPlan | None:
        """The plan whose packed values a fused optimizer step may write from `weight` seen as
        [size(0), numel / size(0)], i.e. when that is the matrix the plan multiplies."""
        return self.plan()

    def _rebuild_plan(self) -> None:
        # A view of the buffer: it shares the buffer's version counter.
        self._plan = MaskPlan(self._mask_2d(), self._layout_kind, block=self._block)

    def _mask_2d(self) -> torch.Tensor:
        return self.mask.reshape(self._weight_2d().shape)

    def _from_2d(self, mask_2d: torch.Tensor) -> torch.Tensor:
        return mask_2d.reshape(self.weight.shape)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_plan", None) is not None:
            self._rebuild_plan()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A dense checkpoint has no mask: keep this module's.
        if prefix + "mask" not in state_dict:
            state_dict = dict(state_dict)
            state_dict[prefix + "mask"] = self.mask
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._rebuild_plan()

    def _autocast(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: torch.Tensor | None):
        """The operands in autocast's dtype where it is on; else x must match the weight."""
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight_2d = x.to(dtype), weight_2d.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif x.dtype != weight_2d.dtype:
            raise TypeError(f"dynasparse: input is {x.dtype} but the layer's weight is {weight_2d.dtype}")
        return x, weight_2d, bias

    def _sparse_linear(self, x: torch.Tensor, weight_2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x, weight_2d, bias = self._autocast(x, weight_2d, bias)
        return self.plan().linear(x, weight_2d, bias, self.grad_mode)

    def _sparse_repr(self) -> str:
        return f"layout={self.layout}, sparsity={self.sparsity:.3f}, grad_mode={self.grad_mode}"


class SparseLinear(_SparseMixin, nn.Linear):
    """nn.Linear with a mask: same arguments, plus keyword-only `sparsity` (initial mask: the
    largest |w|), `layout` ("unstructured", "2:4", "block16", "block32", "block64") and
    `grad_mode` ("feedback" or "masked")."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 sparsity: float = 0.0, layout: str = "unstructured", grad_mode: str = "feedback"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_sparse(sparsity, layout, grad_mode)

    def _weight_2d(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._sparse_linear(x, self.weight, self.bias)

    @classmethod
    def from_dense(cls, module: nn.Linear, *, sparsity: float = 0.0, layout: str = "unstructured",
                   grad_mode: str = "feedback", mask: torch.Tensor | None = None) -> SparseLinear:
        """A SparseLinear sharing nothing with `module` but its values (same device, dtype)."""
        sparse = cls(module.in_features, module.out_features, module.bias is not None, device=module.weight.device,
                     dtype=module.weight.dtype, layout=layout, grad_mode=grad_mode)
        return sparse._adopt(module, sparsity, mask)

    def to_dense(self) -> nn.Linear:
        """The pruned layer as nn.Linear (weight * mask)."""
        return self._fill_dense(nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                          device=self.weight.device, dtype=self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


class SparseConv2d(_SparseMixin, nn.Conv2d):
    """nn.Conv2d with a mask: same arguments, plus keyword-only `sparsity`, `layout` and
    `grad_mode` as SparseLinear. The convolution is lowered to the masked matmul over the
    weight viewed as [out_channels, in_channels * kh * kw]: 1x1 convolutions directly on the
    channels; k x k ones, on CPU with the panel plan (unstructured and 2:4 layouts), by the
    implicit-GEMM op `conv2d_panels` (im2col tiles built in cache, NCHW output written
    directly), elsewhere (block layouts, CUDA) on unfolded patches. Backward passes go through
    the unfolded patches in every case. Grouped convolutions (groups > 1, depthwise included)
    fall back to a dense convolution of `w * m`: correct, no faster than dense."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 sparsity: float = 0.0, layout: str = "unstructured", grad_mode: str = "feedback"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self._init_sparse(sparsity, layout, grad_mode)

    def _weight_2d(self) -> torch.Tensor:
        return self.weight.reshape(self.out_channels, -1)

    def _check_layout_fits(self) -> None:
        if self.groups != 1 and self._layout_kind != "unstructured":
            raise ValueError(f"dynasparse: layout {self.layout!r} is not supported for grouped convolutions "
                             f"(groups={self.groups}); use layout='unstructured'")
        super()._check_layout_fits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"dynasparse.SparseConv2d: expected a 3-D (unbatched) or 4-D input, got {x.dim()}-D")
        if self.groups != 1:
            return self._conv_forward(x, self.masked_weight(), self.bias)
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        elif self.padding == "valid":
            padding = (0, 0)
        elif self.padding == "same":
            padding = self._same_padding()
        else:
            padding = tuple(self.padding)
        n, _, height, width = x.shape
        kh, kw = self.kernel_size
        out_h = (height + 2 * padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (width + 2 * padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if (kh, kw) == (1, 1) and padding == (0, 0):
            rows = x[:, :, ::self.stride[0], ::self.stride[1]].permute(0, 2, 3, 1)
        elif x.device.type == "cpu" and self.plan().kernel == "panels":
            y = self._implicit_gemm(x, padding)
            return y if batched else y.squeeze(0)
        else:
            patches = F.unfold(x, (kh, kw), dilation=self.dilation, padding=padding, stride=self.stride)
            rows = patches.transpose(1, 2)
        y = self._sparse_linear(rows, self._weight_2d(), self.bias)
        y = y.reshape(n, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
        return y if batched else y.squeeze(0)

    def _implicit_gemm(self, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        x, weight_2d, bias = self._autocast(x, self._weight_2d(), self.bias)
        plan = self.plan()
        plan.check()
        geometry = (tuple(self.kernel_size), tuple(self.stride), padding, tuple(self.dilation))
        return _PanelConv2d.apply(x, weight_2d, bias, plan.pack(weight_2d), plan, self.grad_mode, geometry)

    def _same_padding(self) -> tuple[int, int]:
        pads = []
        for dilation, size in zip(self.dilation, self.kernel_size):
            total = dilation * (size - 1)
            if total % 2:
                raise ValueError("dynasparse.SparseConv2d: padding='same' with an even effective kernel size is "
                                 "not supported (it pads unevenly); give explicit padding")
            pads.append(total // 2)
        return tuple(pads)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, *, sparsity: float = 0.0, layout: str = "unstructured",
                   grad_mode: str = "feedback", mask: torch.Tensor | None = None) -> SparseConv2d:
        sparse = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                     padding=module.padding, dilation=module.dilation, groups=module.groups,
                     bias=module.bias is not None, padding_mode=module.padding_mode, device=module.weight.device,
                     dtype=module.weight.dtype, layout=layout, grad_mode=grad_mode)
        return sparse._adopt(module, sparsity, mask)

    def to_dense(self) -> nn.Conv2d:
        return self._fill_dense(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                                          padding=self.padding, dilation=self.dilation, groups=self.groups,
                                          bias=self.bias is not None, padding_mode=self.padding_mode,
                                          device=self.weight.device, dtype=self.weight.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


class _PanelConv2d(torch.autograd.Function):
    """conv2d_panels forward; the backward works on the unfolded patches, rows = output pixels,
    as the masked matmul's does on its rows: grad_input through the plan of m.T, folded back;
    the weight gradient dense (feedback) or at the mask (masked)."""

    @staticmethod
    def forward(ctx, x, weight_2d, bias, values, plan, grad_mode, geometry):
        ctx.plan, ctx.grad_mode, ctx.geometry = plan, grad_mode, geometry
        ctx.save_for_backward(x, weight_2d)
        ctx.has_bias = bias is not None
        return ops.conv2d_panels(x, values, *plan.index, plan.size, plan.shape[0], *geometry, bias,
                                 backend=plan.backend)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_2d = ctx.saved_tensors
        plan = ctx.plan
        kernel_size, stride, padding, dilation = ctx.geometry
        conv = {"dilation": dilation, "padding": padding, "stride": stride}
        batch, n = grad_out.shape[:2]
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(batch, -1, n)  # [B, pixels, N]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_patches = plan.grad_input(grad_rows, weight_2d)  # [B, pixels, K]
            grad_x = F.fold(grad_patches.transpose(1, 2), x.shape[2:], kernel_size, **conv)
        if ctx.needs_input_grad[1]:
            patches = F.unfold(x, kernel_size, **conv)  # [B, K, pixels]
            if ctx.grad_mode == "masked":
                grad_weight = plan.grad_weight_masked(grad_rows, patches.transpose(1, 2))
            else:
                grad_weight = (grad_out.reshape(batch, n, -1) @ patches.transpose(1, 2)).sum(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None


class SparseTransposedLinear(_SparseMixin, nn.Module):
    """A linear layer whose weight is stored [in_features, out_features] (y = x @ W + b), as
    transformers' GPT-2 `Conv1D`: its sparse version, with the same `weight`/`bias` state_dict
    layout, so checkpoints of the original load. The mask has the weight's shape; kernels run
    on the transposed views."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 sparsity: float = 0.0, layout: str = "unstructured", grad_mode: str = "feedback"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=0.02)
        self._init_sparse(sparsity, layout, grad_mode)

    def _weight_2d(self) -> torch.Tensor:
        return self.weight.T

    def _mask_2d(self) -> torch.Tensor:
        return self.mask.T

    def _from_2d(self, mask_2d: torch.Tensor) -> torch.Tensor:
        return mask_2d.T.contiguous()

    def packing_plan(self) -> None:
        # The plan multiplies weight.T: the stored rows are not its rows.
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._sparse_linear(x, self.weight.T, self.bias)

    @classmethod
    def from_dense(cls, module: nn.Module, *, sparsity: float = 0.0, layout: str = "unstructured",
                   grad_mode: str = "feedback", mask: torch.Tensor | None = None) -> SparseTransposedLinear:
        """From any module with weight [in, out] and bias [out] computing x @ weight + bias."""
        in_features, out_features = module.weight.shape
        sparse = cls(in_features, out_features, getattr(module, "bias", None) is not None,
                     device=module.weight.device, dtype=module.weight.dtype, layout=layout, grad_mode=grad_mode)
        return sparse._adopt(module, sparsity, mask)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight stored [in, out], {self._sparse_repr()}")


SPARSE_MODULES = (SparseLinear, SparseConv2d, SparseTransposedLinear)
