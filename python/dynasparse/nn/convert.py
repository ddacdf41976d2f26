"""sparsify(model) / densify(model): swap nn.Linear / nn.Conv1d / nn.Conv2d for their sparse versions in place.

Modules are matched by their qualified names (as in `model.named_modules()`): `include` and
`exclude` take fnmatch patterns ("encoder.*", "*.classifier") or a callable
`(name, module) -> bool`. Every matching weight matrix (a parameter of two or more dimensions)
that is not converted is reported in the returned `SparsifyReport` with the reason, never
silently skipped: other layer types (nn.Conv3d, nn.ConvTranspose2d, nn.Embedding, RNN / LSTM /
GRU, nn.MultiheadAttention's own projections), bare `nn.Parameter` matrices of any module,
tied weights, and layers the sparse layer class refuses (a layout that does not fit a layer's
shape); `strict=True` makes them an error.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .costs import check_backend
from .modules import (SPARSE_MODULES, SparseConv1d, SparseConv2d, SparseLinear, SparseTransposedLinear,
                      check_grad_mode, check_sparsity, magnitude_mask, parse_layout)

Selector = Sequence[str] | str | Callable[[str, nn.Module], bool] | None

_CONVERTED = "nn.Linear, nn.Conv1d, nn.Conv2d and GPT-2 Conv1D"
DENSE_TO_SPARSE = {nn.Linear: SparseLinear, nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d}


@dataclasses.dataclass
class SparsifyReport:
    """What sparsify did: converted layer names, already sparse layers re-pruned in place, and
    what was not converted with the reason (keyed by module name; the model's own parameters
    by parameter name)."""

    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    repruned: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"sparsified {len(self.converted)} layer(s)"]
        if self.repruned:
            lines.append(f"re-pruned {len(self.repruned)} already sparse layer(s)")
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def check_selector(argument: str, selector: Selector) -> None:
    # A generator would be used up by the first module it is matched against.
    if selector is None or isinstance(selector, str) or callable(selector):
        return
    if isinstance(selector, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in selector):
        return
    raise TypeError(f"dynasparse: {argument} must be an fnmatch pattern, a list / tuple / set of them, or a callable "
                    f"(name, module) -> bool, got {selector!r}")


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


def _matrices(module: nn.Module) -> list[str]:
    """The module's own weight matrices (1-D biases and norm scales are not candidates)."""
    return [name for name, param in module.named_parameters(recurse=False) if param.dim() >= 2]


def _unconverted_reason(model: nn.Module, name: str, module: nn.Module, matrices: list[str]) -> str:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return ("nn.MultiheadAttention multiplies by out_proj.weight itself (F.multi_head_attention_forward) without "
                "calling out_proj, so a sparse layer there would be ignored; it stays dense")
    verb = "stays" if len(matrices) == 1 else "stay"
    return (f"{type(module).__name__} is not a layer sparsify converts ({_CONVERTED}): its {', '.join(matrices)} "
            f"{verb} dense")


def _repruned_mask(module: nn.Module, sparsity: float, layout: str, grad_mode: str) -> torch.Tensor | str:
    """The mask re-pruning an already sparse layer gives it: the magnitude mask of its weight
    at `sparsity`, as a first sparsify of the same weights gives; or why not, when the layout
    or grad mode asked for differ from its own."""
    if module.layout != layout or module.grad_mode != grad_mode:
        return (f"already sparse with layout={module.layout!r}, grad_mode={module.grad_mode!r}; re-pruning keeps "
                "both, so pass them (or densify the model first to change them)")
    return module._from_2d(magnitude_mask(module._weight_2d(), sparsity, layout))


def sparsify(model: nn.Module, sparsity: float = 0.9, *, layout: str = "unstructured", include: Selector = None,
             exclude: Selector = None, grad_mode: str = "feedback", strict: bool = False,
             backend: str | None = None) -> SparsifyReport:
    """Replace every matching nn.Linear / nn.Conv1d / nn.Conv2d of `model` (in place, keeping
    weights, devices and dtypes) by SparseLinear / SparseConv1d / SparseConv2d with a magnitude
    mask at `sparsity`.

    Layers that are already sparse are re-pruned in place to the magnitude mask of their
    weights at `sparsity` (listed in `report.repruned`): calling sparsify again at another
    sparsity moves the model there, as one call on the same weights would; their layout and
    grad mode stay, so a call asking for others reports them as skipped. Layout "2:4" keeps
    the 2 largest of every 4 weights, a sparsity of exactly 0.5, so it takes sparsity=0.5.
    `backend`: of the new layers ("auto", "sparse", "dense"; None: the default backend, see
    `set_default_backend`); layers already sparse keep theirs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dynasparse.sparsify: model must be an nn.Module, got {type(model).__name__}")
    check_sparsity(sparsity)
    check_grad_mode(grad_mode)
    if backend is not None:
        check_backend(backend)
    kind, _ = parse_layout(layout)
    if kind == "2:4" and sparsity != 0.5:
        raise ValueError(f"dynasparse.sparsify: layout '2:4' keeps the 2 largest of every 4 weights, a sparsity of "
                         f"0.5, but sparsity={sparsity!r}; pass sparsity=0.5 (a dynasparse.pruning pruner can prune "
                         "2:4 layers further, keeping at most 2 of every 4)")
    check_selector("include", include)
    check_selector("exclude", exclude)
    if isinstance(model, SPARSE_MODULES):
        raise ValueError("dynasparse.sparsify: the model is itself a sparse layer, which sparsify cannot replace or "
                         "re-prune in place; pass the model that contains it, or call its set_mask")
    if type(model) in DENSE_TO_SPARSE or _is_transposed_linear(model):
        raise ValueError("dynasparse.sparsify: pass the model that contains the layer (the layer itself cannot be "
                         "replaced in place); for one layer use SparseLinear.from_dense / SparseConv2d.from_dense")
    report = SparsifyReport()
    # Everything is decided before the model changes, so that strict=True leaves it untouched.
    new_masks: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    new_layers: dict[str, tuple[nn.Module, nn.Module]] = {}
    uses = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for name, module in list(model.named_modules()):
        if not _matches(include, name, module, True) or _matches(exclude, name, module, False):
            continue
        if isinstance(module, SPARSE_MODULES):
            mask = _repruned_mask(module, sparsity, layout, grad_mode)
            if isinstance(mask, str):
                report.skipped[name] = mask
            else:
                new_masks[name] = module, mask
            continue
        if not name:
            # The model itself has no name to report it by: its own matrices go by theirs.
            for param_name in _matrices(module):
                report.skipped[param_name] = (f"a parameter of the model itself ({type(module).__name__}), not of a "
                                              f"layer sparsify converts ({_CONVERTED}): it stays dense")
            continue
        kind = type(module)
        weight = getattr(module, "weight", None)
        if _is_transposed_linear(module):
            kind = SparseTransposedLinear
        elif kind not in DENSE_TO_SPARSE:
            matrices = _matrices(module)
            if matrices:
                report.skipped[name] = _unconverted_reason(model, name, module, matrices)
            continue
        if uses.get(id(weight), 0) > 1:
            report.skipped[name] = ("its weight is shared with another module (tied weights); a sparse copy would "
                                    "untie them")
            continue
        sparse_cls = DENSE_TO_SPARSE.get(kind, kind)
        try:
            new = sparse_cls.from_dense(module, sparsity=sparsity, layout=layout, grad_mode=grad_mode,
                                        backend=backend)
        except ValueError as error:
            report.skipped[name] = str(error)
            continue
        new_layers[name] = module, new
    if strict and report.skipped:
        raise ValueError(f"dynasparse.sparsify: could not convert every matching layer (the model is unchanged):\n"
                         f"{report}")
    for name, (module, mask) in new_masks.items():
        module.set_mask(mask)
        report.repruned.append(name)
    for name, (module, new) in new_layers.items():
        new.train(module.training)
        _replace(model, name, new)
        report.converted.append(name)
    return report


def densify(model: nn.Module) -> list[str]:
    """Replace every SparseLinear / SparseConv1d / SparseConv2d by the dense layer holding `w * mask`;
    returns the names replaced. (A SparseTransposedLinear keeps its class, since the dense
    original's class is not ours to build: its weight is set to `w * mask` and its mask to
    all ones.) The model must contain the sparse layers: a model that is itself one cannot be
    replaced in place, which is an error (use its `to_dense()`)."""
    if isinstance(model, SPARSE_MODULES):
        advice = "use its to_dense()" if hasattr(model, "to_dense") else "wrap it, e.g. densify(nn.Sequential(layer))"
        raise ValueError(f"dynasparse.densify: the model is itself a {type(model).__name__}, which densify cannot "
                         f"replace in place; {advice}")
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseTransposedLinear):
            with torch.no_grad():
                module.weight.copy_(module.masked_weight())
            module.set_mask(torch.ones_like(module.mask))
            replaced.append(name)
        elif isinstance(module, SPARSE_MODULES):
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
