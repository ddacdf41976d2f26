"""Sparse variational dropout layers (Molchanov, Ashukha & Vetrov 2017) on the masked kernels.

VDLinear, VDConv2d and VDConv1d are sparse layers (a `weight`, a bool `mask`, a kernel plan,
a grad mode, as dynasparse.nn.modules) with one more parameter per weight, `log_sigma2`
(initialized to -10). The weight is `theta`, the mean of each weight's Gaussian posterior
(`layer.theta` is `layer.weight`, so pruners, optimizers and checkpoints treat it as any sparse
layer's weight); the dropout rate is

    log_alpha = clamp(log_sigma2 - 2 * log(|theta| + 1e-8), -10, 10).

Training forward, the local reparameterization trick, both products on the masked kernels
(pruned weights are skipped by both, and get no gradient from them in masked mode):

    mu  = x @ (theta * m).T + b,   var = (x * x) @ (alpha * theta**2 * m).T,
    out = mu + sqrt(var + 1e-8) * eps,   eps ~ N(0, 1), one draw per output (torch's generator).

Convolutions: the same with the convolution (on CPU both products on the implicit-GEMM kernel
of SparseConv2d, elsewhere over the same unfolded patches). Eval forward: the mean product with
the weights at `log_alpha >= threshold` (3) zeroed, i.e. x @ (theta * m * [log_alpha < 3]).T + b;
`to_sparse()` returns that as a plain SparseLinear / SparseConv2d / SparseConv1d (mask
m & [log_alpha < 3], pruned weights zero). The mask is what the kernels skip:
`refresh_mask()` (or the "vd" pruner, dynasparse.pruning.variational_dropout) sets it to
`log_alpha < threshold`. `kl()` is the layer's KL term, Molchanov et al.'s approximation summed
over its active weights:

    KL(log_alpha) ~= k1 - k1 * sigmoid(k2 + k3 * log_alpha) + 0.5 * log1p(exp(-log_alpha)),
    k1, k2, k3 = 0.63576, 1.87320, 1.48695;

a pruned weight (outside the mask) is exactly zero, its alpha infinite, and the approximation's
limit there is 0. So the KL, and in masked mode the variance weights, are computed on the
active weights only (gathered once per mask) on the kernels: the elementwise work per weight,
not only the products, skips the pruned weights, which is what makes a VD step at high sparsity
cheaper than a dense one. (With a dense weight gradient, feedback mode, the variance of every weight is
computed, so that the pruned ones get the gradient taken at the masked weights.)

Layouts: unstructured only (a threshold mask has no block or 2:4 structure). Backend, as the
other sparse layers (dynasparse.nn.costs; the default backend when not given, a sparse source
layer's in `from_dense`): "sparse" runs both products on the kernels, "dense" as torch's dense
ops on the masked weights (what a dense VD layer computes: the variance and the KL over every
weight, masked), "auto" each call as the faster of the two for its key, measured on its first
call (the training forward with its backward; the eval forward is keyed apart). The noise is
drawn in the output's logical order either way: the same generator state gives the same output
on both (up to the products' rounding), and measuring draws none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import masked_weight_for, weight_grad_of
from .modules import SparseConv1d, SparseConv2d, SparseLinear, _PanelConv2d

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_RANGE = (-10.0, 10.0)
THRESHOLD = 3.0
LOG_SIGMA2_INIT = -10.0
# |theta| + EPS in log_alpha, var + EPS under the square root (Molchanov et al.'s constants).
EPS = 1e-8


def log_alpha_of(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """clamp(log_sigma2 - 2 * log(|theta| + 1e-8), -10, 10), differentiable in both."""
    return torch.clamp(log_sigma2 - 2.0 * torch.log(theta.abs() + EPS), *LOG_ALPHA_RANGE)


def kl_approximation(log_alpha: torch.Tensor) -> torch.Tensor:
    """Molchanov et al.'s approximation of KL(q || log-uniform prior) per weight (elementwise)."""
    return K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * F.softplus(-log_alpha)


def _check_real(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ValueError(f"dynasparse.{owner}: {name} must be a finite number, got {value!r}")
    return float(value)


class _VariationalMixin:
    """log_sigma2, log_alpha, the KL term, the threshold mask and the two forwards, on top of
    _SparseMixin's mask and plan. `_products(x, dense)` gives the products' input, the layer's
    masked product (linear or convolution) of it with a given weight of the layer's shape (on
    the kernels, or with `dense` torch's dense op), and the function turning a product's output
    into the layer's."""

    def _init_variational(self, log_sigma2: float, threshold: float) -> None:
        owner = type(self).__name__
        if self.layout != "unstructured":
            raise ValueError(f"dynasparse.{owner}: layout must be 'unstructured' (the threshold mask log_alpha < "
                             f"{threshold} has no block or 2:4 structure), got {self.layout!r}")
        self.threshold = _check_real(owner, "threshold", threshold)
        init = _check_real(owner, "log_sigma2", log_sigma2)
        self.log_sigma2 = nn.Parameter(torch.full(self.weight.shape, init, device=self.weight.device,
                                                  dtype=self.weight.dtype))

    def _rebuild_plan(self) -> None:
        super()._rebuild_plan()
        # Flat positions of the active weights, rebuilt with the plan (never in compiled code).
        self._active = None if self.mask.is_meta else self.mask.reshape(-1).nonzero().squeeze(1)

    def _active_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """theta and log_alpha at the active weights (flat, in `_active` order), differentiable."""
        theta = self.weight.reshape(-1).index_select(0, self._active)
        return theta, log_alpha_of(theta, self.log_sigma2.reshape(-1).index_select(0, self._active))

    @property
    def theta(self) -> torch.Tensor:
        """The posterior means: the layer's weight."""
        return self.weight

    def log_alpha(self) -> torch.Tensor:
        return log_alpha_of(self.weight, self.log_sigma2)

    def kl(self) -> torch.Tensor:
        """The layer's KL term over its active weights (pruned ones contribute 0, see the
        module docstring): a 0-d tensor, differentiable in theta and log_sigma2. Gathered at
        the active weights while the forward runs the kernels; where it runs dense, over every
        weight masked, as a dense VD computes it (the same value and gradients)."""
        if not torch.compiler.is_compiling():
            self.plan()  # a mask changed in place is noticed, and its positions rebuilt
        if self._active is None or self.backend == "dense" or (self.backend == "auto" and self._dense_last):
            return torch.where(self.mask, kl_approximation(self.log_alpha()), 0).sum()
        return kl_approximation(self._active_values()[1]).sum()

    def threshold_mask(self) -> torch.Tensor:
        """log_alpha < threshold: the weights VD keeps (a new bool tensor)."""
        with torch.no_grad():
            return self.log_alpha() < self.threshold

    def refresh_mask(self) -> None:
        """Set the mask to `threshold_mask()`, so that both products skip the pruned weights; in
        masked mode the pruned weights are zeroed (as a pruner's masked update does)."""
        mask = self.threshold_mask()
        self.set_mask(mask)
        if self.grad_mode == "masked":
            with torch.no_grad():
                self.weight.masked_fill_(~mask, 0.0)

    def masked_weight(self) -> torch.Tensor:
        """The weights the eval forward uses: theta where the mask and log_alpha < threshold, else 0."""
        return torch.where(self.mask & self.threshold_mask(), self.weight, 0)

    def _call_key(self, x: torch.Tensor):
        # The training forward (two products) and the eval forward (one) each get their own
        # measured choice.
        return (super()._call_key(x), "lrt" if self.training else "eval")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not torch.compiler.is_compiling():
            self.plan()  # a mask changed in place is noticed, and `_active` rebuilt
        dense = self._runs_torch_ops(x) or self._runs_dense(x, self._timed_way)
        return self._way(x, dense, _noise)

    def _timed_way(self, x: torch.Tensor, dense: bool) -> torch.Tensor:
        # What backend "auto" times: the forward without drawing noise, so that measuring
        # leaves torch's generator (the training's noise) where it was.
        return self._way(x, dense, torch.zeros_like)

    def _runs_torch_ops(self, x: torch.Tensor) -> bool:
        """Calls with no kernel plan (meta tensors, torch.func), which run torch's dense ops."""
        return self._reference_product(x)

    def _way(self, x: torch.Tensor, dense: bool, noise) -> torch.Tensor:
        """The forward on the kernels, or `dense`: torch's dense ops on the masked weights."""
        inputs, product, finish = self._products(x, dense)
        if not self.training:
            kept = self.log_alpha() < self.threshold
            return finish(product(inputs, torch.where(kept, self.weight, 0), self.bias))
        mean = product(inputs, self.weight, self.bias)
        if dense or self._active is None or weight_grad_of(self.grad_mode, self.weight_grad) == "dense":
            # Every weight's variance (the product masks it): the dense way computes what a
            # dense VD does; with a dense weight gradient (feedback) the pruned weights get the
            # gradient taken at the masked weights too.
            variance_weight = torch.exp(self.log_alpha()) * self.weight.square()
        else:
            # Masked, on the kernels: zero at the pruned weights, which neither the product nor
            # its gradient reads, and no elementwise work there.
            theta, log_alpha = self._active_values()
            variance_weight = theta.new_zeros(self.weight.numel()).index_copy(
                0, self._active, torch.exp(log_alpha) * theta.square()).reshape(self.weight.shape)
        mean, variance = finish(mean), finish(product(inputs * inputs, variance_weight, None))
        return mean + torch.sqrt(variance + EPS) * noise(mean)

    def to_sparse(self) -> nn.Module:
        """The eval forward as the plain sparse layer of this class (SparseLinear, SparseConv2d,
        SparseConv1d): mask m & [log_alpha < threshold], pruned weights zero, the same grad mode
        and backend."""
        return self._PLAIN.from_dense(self.to_dense(), mask=self.mask & self.threshold_mask(),
                                      grad_mode=self.grad_mode, backend=self.backend)

    def _check_source_layout(self, module: nn.Module) -> None:
        if getattr(module, "layout", "unstructured") != "unstructured":
            raise ValueError(f"dynasparse.{type(self).__name__}.from_dense: the source layer has layout "
                             f"{module.layout!r}; VD layers are unstructured (densify it first)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


def _noise(like: torch.Tensor) -> torch.Tensor:
    """One standard normal draw per output, in the output's logical order whatever its strides:
    the same generator state gives the same noise on the kernels and on torch's ops."""
    return torch.randn_like(like, memory_format=torch.contiguous_format)


def _unchanged(y: torch.Tensor) -> torch.Tensor:
    return y


def _source_options(module: nn.Module, grad_mode: str | None, mask: torch.Tensor | None, backend: str | None):
    """A sparse source layer gives its mask, grad mode and backend unless they are given."""
    if mask is None and isinstance(getattr(module, "mask", None), torch.Tensor):
        mask = module.mask.detach().clone()
    if grad_mode is None:
        grad_mode = getattr(module, "grad_mode", "masked")
    if backend is None:
        backend = getattr(module, "backend", None)
    return grad_mode, mask, backend


class VDLinear(_VariationalMixin, SparseLinear):
    """A linear layer with sparse variational dropout (see the module docstring): the
    arguments of nn.Linear, plus keyword-only `log_sigma2` (its initial value, -10),
    `threshold` (3), `grad_mode` ("masked": pruned weights get no gradient from the data) and
    `backend` (None: the default backend, see the module docstring)."""

    _PLAIN = SparseLinear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 log_sigma2: float = LOG_SIGMA2_INIT, threshold: float = THRESHOLD, grad_mode: str = "masked",
                 backend: str | None = None):
        super().__init__(in_features, out_features, bias, device, dtype, grad_mode=grad_mode, backend=backend)
        self._init_variational(log_sigma2, threshold)

    def _check_input(self, x: torch.Tensor) -> None:
        self._check_features(x)

    def _products(self, x: torch.Tensor, dense: bool):
        return x, lambda inputs, weight, bias: self._sparse_linear(inputs, weight, bias, dense), _unchanged

    @classmethod
    def from_dense(cls, module: nn.Linear, *, log_sigma2: float = LOG_SIGMA2_INIT, threshold: float = THRESHOLD,
                   grad_mode: str | None = None, mask: torch.Tensor | None = None,
                   backend: str | None = None) -> VDLinear:
        """A VDLinear with theta = module's weight (and its bias), log_sigma2 filled with
        `log_sigma2`; the mask is `mask`, else a sparse module's own mask, else all kept; the
        grad mode is `grad_mode`, else a sparse module's, else "masked"; the backend
        `backend`, else a sparse module's, else the default."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"dynasparse.{cls.__name__}.from_dense: module must be an nn.Linear (or SparseLinear), "
                            f"got {type(module).__name__}")
        grad_mode, mask, backend = _source_options(module, grad_mode, mask, backend)
        layer = cls(module.in_features, module.out_features, module.bias is not None, device=module.weight.device,
                    dtype=module.weight.dtype, log_sigma2=log_sigma2, threshold=threshold, grad_mode=grad_mode,
                    backend=backend)
        layer._check_source_layout(module)
        return layer._adopt(module, 0.0, mask)


class _VariationalConv(_VariationalMixin):
    """The convolution products shared by VDConv2d and VDConv1d (a 1-D convolution is the 2-D
    one over [B, C, 1, L] with (1, k) kernels). On CPU with the panel plan both run on the
    implicit-GEMM kernel as SparseConv2d's forward does (no unfolded patches; its backward's
    input gradient on the kernel at stride 1, torch's dense weight gradient kept at the mask);
    elsewhere as the masked matmul over the same unfolded patches (rows = output pixels).
    Grouped convolutions, meta / torch.func tensors and the dense way run torch's convolution of
    the masked weights instead."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 log_sigma2: float = LOG_SIGMA2_INIT, threshold: float = THRESHOLD, grad_mode: str = "masked",
                 backend: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, grad_mode=grad_mode, backend=backend)
        self._init_variational(log_sigma2, threshold)

    @classmethod
    def from_dense(cls, module: nn.Module, *, log_sigma2: float = LOG_SIGMA2_INIT, threshold: float = THRESHOLD,
                   grad_mode: str | None = None, mask: torch.Tensor | None = None,
                   backend: str | None = None) -> _VariationalConv:
        """As VDLinear.from_dense, from the nn convolution the class replaces (or its sparse version)."""
        dense = cls._DENSE
        if not isinstance(module, dense):
            raise TypeError(f"dynasparse.{cls.__name__}.from_dense: module must be an nn.{dense.__name__} (or its "
                            f"sparse version), got {type(module).__name__}")
        grad_mode, mask, backend = _source_options(module, grad_mode, mask, backend)
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode,
                    module.weight.device, module.weight.dtype, log_sigma2=log_sigma2, threshold=threshold,
                    grad_mode=grad_mode, backend=backend)
        layer._check_source_layout(module)
        return layer._adopt(module, 0.0, mask)

    def _runs_torch_ops(self, x: torch.Tensor) -> bool:
        return self.groups != 1 or self._reference_product(x)

    def _products(self, x: torch.Tensor, dense: bool):
        """(the products' input, the product of it with a weight of the layer's shape and a
        bias, the function giving the layer's output from a product's)."""
        if dense:
            def convolution(inputs, weight, bias):
                weight = masked_weight_for(weight, self.mask, self.grad_mode, self.weight_grad)
                return self._conv_forward(inputs, weight, bias)
            return x, convolution, _unchanged
        x, _, _ = self._autocast(x, self.weight, None)  # refuses a dtype the kernels cannot take
        x, restore = self._as_2d_input(x)
        geometry = self._geometry_2d()
        kernel_size, stride, padding, dilation = geometry

        if x.device.type == "cpu" and self.plan().kernel == "panels":
            def implicit_gemm(inputs, weight, bias):
                inputs, weight_2d, bias = self._autocast(inputs, weight.reshape(self.out_channels, -1), bias)
                plan = self.plan()
                plan.check()
                return _PanelConv2d.apply(inputs, weight_2d, self._guarded_bias(plan, bias, inputs),
                                          plan.pack(weight_2d), plan, weight_grad_of(self.grad_mode, self.weight_grad),
                                          geometry, self._grad_input_plan)

            return x, implicit_gemm, restore
        n, _, height, width = x.shape
        out_h = (height + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
        rows = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)

        def matmul(inputs, weight, bias):
            return self._sparse_linear(inputs, weight.reshape(self.out_channels, -1), bias)

        def finish(y: torch.Tensor) -> torch.Tensor:
            return restore(y.reshape(n, out_h, out_w, self.out_channels).permute(0, 3, 1, 2))

        return rows, matmul, finish

    def _check_input(self, x: torch.Tensor) -> None:
        name, dims = type(self).__name__, self._SPATIAL + 2
        if x.dim() not in (dims - 1, dims):
            raise ValueError(f"dynasparse.{name}: expected a {dims - 1}-D (unbatched) or {dims}-D input, got "
                             f"{x.dim()}-D")
        channels = x.shape[-dims + 1]
        if channels != self.in_channels:
            raise RuntimeError(f"dynasparse.{name}: expected input of shape {list(x.shape)} to have "
                               f"{self.in_channels} channels (in_channels), got {channels}")


class VDConv2d(_VariationalConv, SparseConv2d):
    """nn.Conv2d with sparse variational dropout (see the module docstring): its arguments,
    plus keyword-only `log_sigma2`, `threshold`, `grad_mode` and `backend` as VDLinear;
    `to_sparse()` gives the eval forward as a SparseConv2d."""

    _PLAIN = SparseConv2d


class VDConv1d(_VariationalConv, SparseConv1d):
    """nn.Conv1d with sparse variational dropout (see the module docstring): its arguments,
    plus keyword-only `log_sigma2`, `threshold`, `grad_mode` and `backend` as VDLinear;
    `to_sparse()` gives the eval forward as a SparseConv1d, `to_dense()` as nn.Conv1d."""

    _PLAIN = SparseConv1d


VD_MODULES = (VDLinear, VDConv2d, VDConv1d)
