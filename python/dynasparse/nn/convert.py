"""sparsify(model) / densify(model): swap nn.Linear / nn.Conv2d for their sparse versions in place.

Modules are matched by their qualified names (as in `model.named_modules()`): `include` and
`exclude` take fnmatch patterns ("encoder.*", "*.classifier") or a callable
`(name, module) -> bool`. Layers that match but cannot be converted (other layer types with a
weight, such as nn.Conv1d, nn.ConvTranspose2d, nn.Embedding or transformers' GPT-2 Conv1D,
or a layout that does not fit a layer's shape) are reported in the returned `SparsifyReport`,
never silently skipped; `strict=True` makes them an error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .modules import (SPARSE_MODULES, SparseConv2d, SparseLinear, SparseTransposedLinear, check_grad_mode,
                      check_sparsity, parse_layout)

Selector = Sequence[str] | str | Callable[[str, nn.Module], bool] | None


@dataclasses.dataclass
class SparsifyReport:
    """What sparsify did: converted layer names, and the skipped ones with the reason."""

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"sparsified {len(self.converted)} layer(s)"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _matches(selector: Selector, name: str, module: nn.Module, default: bool) -> bool:
    if selector is None:
        return default
    if callable(selector):
        return bool(selector(name, module))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _is_transposed_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): y = x @ weight + bias with weight [in, out]; recognised by
    # shape and name so that transformers need not be installed.
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, sparsity: float = 0.9, *, layout: str = "unstructured", include: Selector = None,
             exclude: Selector = None, grad_mode: str = "feedback", strict: bool = False) -> SparsifyReport:
    """Replace every matching nn.Linear / nn.Conv2d of `model` (in place, keeping weights,
    devices and dtypes) by SparseLinear / SparseConv2d with a magnitude mask at `sparsity`."""
    check_sparsity(sparsity)
    check_grad_mode(grad_mode)
    parse_layout(layout)
    if isinstance(model, SPARSE_MODULES) or type(model) in (nn.Linear, nn.Conv2d):
        raise ValueError("dynasparse.sparsify: pass the model that contains the layer (the layer itself cannot be "
                         "replaced in place); for one layer use SparseLinear.from_dense / SparseConv2d.from_dense")
    report = SparsifyReport()
    uses = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, SPARSE_MODULES):
            continue
        if not _matches(include, name, module, True) or _matches(exclude, name, module, False):
            continue
        kind = type(module)
        weight = getattr(module, "weight", None)
        if _is_transposed_linear(module):
            kind = SparseTransposedLinear
        elif kind not in (nn.Linear, nn.Conv2d):
            # Weight matrices of other layer types; norms' 1-D scales are not candidates.
            if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
                report.skipped[name] = f"{kind.__name__} is not supported (only nn.Linear and nn.Conv2d)"
            continue
        if uses.get(id(weight), 0) > 1:
            report.skipped[name] = ("its weight is shared with another module (tied weights); a sparse copy would "
                                    "untie them")
            continue
        sparse_cls = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}.get(kind, kind)
        try:
            new = sparse_cls.from_dense(module, sparsity=sparsity, layout=layout, grad_mode=grad_mode)
        except ValueError as error:
            report.skipped[name] = str(error)
            continue
        new.train(module.training)
        _replace(model, name, new)
        report.converted.append(name)
    if strict and report.skipped:
        raise ValueError(f"dynasparse.sparsify: could not convert every matching layer:\n{report}")
    return report


def densify(model: nn.Module) -> list[str]:
    """Replace every SparseLinear / SparseConv2d by the dense layer holding `w * mask`;
    returns the names replaced. (A SparseTransposedLinear keeps its class, since the dense
    original's class is not ours to build: its weight is set to `w * mask` and its mask to
    all ones.)"""
    replaced = []
    for name, module in list(model.named_modules()):
        if name and isinstance(module, SparseTransposedLinear):
            with torch.no_grad():
                module.weight.copy_(module.masked_weight())
            module.set_mask(torch.ones_like(module.mask))
            replaced.append(name)
        elif name and isinstance(module, SPARSE_MODULES):
            dense = module.to_dense()
            dense.train(module.training)
            _replace(model, name, dense)
            replaced.append(name)
    return replaced


def sparse_masks(model: nn.Module) -> dict[torch.Tensor, tuple[torch.Tensor, str, Callable]]:
    """{weight: (mask, grad_mode, packing_plan)} of every sparse layer: the `masks=` argument of
    dynasparse.optim.SGD / AdamW, which then keep pruned weights and state at zero in
    "masked" mode, update every weight in "feedback" mode, and write the packed values the
    layer's next forward reads in the same step."""
    return {module.weight: (module.mask, module.grad_mode, module.packing_plan) for module in model.modules()
            if isinstance(module, SPARSE_MODULES)}
