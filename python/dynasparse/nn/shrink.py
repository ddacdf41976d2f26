"""shrink(model, keep): remove pruned neurons / filters for real, as smaller dense (or sparse) layers.

`keep` maps layer names (as in `model.named_modules()`) to the indices of the output units
(Linear neurons, Conv filters) that stay. The model is traced with torch.fx and every consumer
of a shrunk layer's output is narrowed with it:
- the next nn.Linear / nn.Conv1d/2d/3d loses the matching input columns / channels (through an
  nn.Flatten / torch.flatten: the flattened features of the removed channels);
- BatchNorm loses the matching channels (weight, bias, running statistics);
- elementwise activations, dropout and pooling (over other dimensions) pass the units through;
- an addition (residual) passes them only when both operands are narrowed identically (the
  same kept positions along the same dimension): shrink the convolutions of both branches with
  the same indices; one narrowed operand and one full one is refused, naming the layer.

What "removed" means: a removed unit's contribution to every consumer is gone, i.e. the shrunk
model computes exactly what the original computes with the input columns / channels of those
units zeroed in every weight layer that consumes them. That is not "the unit's output zeroed"
when a BatchNorm follows it (the BatchNorm turns a zero into its shift), which is why it is
defined at the consumers. Anything shrink cannot reproduce that way is refused with
`NotShrinkable` (a ValueError) naming the layer and the operation, never a silently different
model: unknown modules or functions on the units' path, reshapes other than flatten, a
concatenation, a LayerNorm / GroupNorm whose statistics mix the units (a smaller norm would
normalize over other units than the original), grouped convolutions, a layer whose units reach
the model's output (the classifier), a module called more than once, parameters read directly.

Sparse layers: unstructured SparseLinear / SparseConv2d shrink like dense ones, their dense
weight and mask sliced alike (layout, grad mode and weight_grad kept); block and 2:4 layouts and
SparseTransposedLinear are refused (sliced rows / columns would not keep whole blocks or groups).

`example_input` (a tensor or a tuple of the forward's tensors) gives the shapes that a flatten or
a BatchNorm1d need to locate the units; it runs one forward of a copy of the model in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import statistics
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .convert import _replace
from .modules import SPARSE_MODULES, SparseConv2d, SparseLinear, SparseTransposedLinear

_OWNER = "dynasparse.nn.shrink"

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
    nn.Dropout, nn.AlphaDropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)

# (module types, number of trailing dimensions they pool over)
_POOLING_MODULES = (
    ((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d), 1),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), 2),
    ((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), 3))

_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.dropout,
    torch.abs, torch.neg, operator.neg, operator.pos}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "neg", "contiguous", "clone"}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
           torch.add, torch.sub, torch.mul}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}


class NotShrinkable(ValueError):
    """The model cannot be shrunk at these layers without changing what it computes."""


@dataclasses.dataclass(frozen=True)
class Narrowed:
    """Units of shrunk layers along one dimension of a traced value.

    dim: the (negative) dimension holding them; size: its full length; keep: the positions
    that stay, sorted; units: the unit index (in its layer) of every position, where the
    value comes from one layer; sources: the layers."""

    dim: int
    size: int
    keep: torch.Tensor
    units: torch.Tensor | None
    sources: tuple[str, ...]

    def same_positions(self, other: Narrowed) -> bool:
        return self.dim == other.dim and self.size == other.size and torch.equal(self.keep, other.keep)

    @property
    def named(self) -> str:
        return ", ".join(repr(source) for source in self.sources)


@dataclasses.dataclass
class Plan:
    """What shrinking does: `inputs[name]`, the narrowed input of a module (weight layers and
    BatchNorms); `outputs[name]`, the kept units of a shrunk layer."""

    inputs: dict[str, Narrowed] = dataclasses.field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, SPARSE_MODULES) or super().is_leaf_module(module, qualified_name)


class Traced:
    """The model's fx graph (of an eval-mode copy), with shapes when an example input is given."""

    def __init__(self, model: nn.Module, example_input=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_OWNER}: model must be an nn.Module, got {type(model).__name__}")
        probe = copy.deepcopy(model).eval()
        try:
            graph = _Tracer().trace(probe)
        except Exception as error:  # fx raises many kinds (TraceError, TypeError, ...) on untraceable code
            raise NotShrinkable(f"{_OWNER}: torch.fx cannot trace the model ({type(error).__name__}: {error}); shrink "
                                "needs a traceable forward to find the consumers of the shrunk layers") from None
        self.graph = graph
        self.modules = dict(probe.named_modules())
        self.has_shapes = example_input is not None
        if example_input is not None:
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            if not all(isinstance(arg, torch.Tensor) for arg in args):
                raise TypeError(f"{_OWNER}: example_input must be a tensor or a tuple of tensors, got "
                                f"{type(example_input).__name__}")
            with torch.no_grad():
                try:
                    ShapeProp(fx.GraphModule(probe, graph)).propagate(*args)
                except Exception as error:  # the model's own error on a bad input, whatever its type
                    raise ValueError(f"{_OWNER}: the model cannot run on example_input ({type(error).__name__}: "
                                     f"{error})") from None


def weight_layer_names(model: nn.Module) -> list[str]:
    """The modules shrink can shrink the outputs of (by kind; whether their consumers allow it
    is `plan`'s business)."""
    return [name for name, module in model.named_modules() if name and isinstance(module, WEIGHT_LAYERS)]


def check_layer(model: nn.Module, name, argument: str = "keep") -> nn.Module:
    if not isinstance(name, str):
        raise TypeError(f"{_OWNER}: {argument} keys must be layer names (str), got {name!r}")
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise ValueError(f"{_OWNER}: {argument} names layer {name!r}, which the model does not have; its weight layers "
                         f"are {', '.join(weight_layer_names(model)) or 'none'}")
    module = modules[name]
    if isinstance(module, SparseTransposedLinear):
        raise NotShrinkable(f"{_OWNER}: layer {name!r} is a SparseTransposedLinear, which shrink does not support")
    if not isinstance(module, WEIGHT_LAYERS):
        raise ValueError(f"{_OWNER}: {argument} names {name!r}, a {type(module).__name__}; shrink removes output units "
                         "of nn.Linear / nn.Conv1d/2d/3d (and their sparse versions)")
    return module


def units_of(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def unit_dim(module: nn.Module) -> int:
    """The (negative) dimension of the module's inputs and outputs that holds its units."""
    return -1 if isinstance(module, nn.Linear) else -(len(module.kernel_size) + 1)


def check_keep(model: nn.Module, keep) -> dict[str, torch.Tensor]:
    """`keep` validated: {layer name: sorted unique int64 indices on the CPU}."""
    if not isinstance(keep, Mapping):
        raise TypeError(f"{_OWNER}: keep must be a dict {{layer name: LongTensor of kept unit indices}}, got "
                        f"{type(keep).__name__}")
    checked = {}
    for name, indices in keep.items():
        module = check_layer(model, name)
        count = units_of(module)
        if not isinstance(indices, torch.Tensor) or indices.dtype == torch.bool or indices.is_floating_point() \
                or indices.is_complex():
            raise TypeError(f"{_OWNER}: keep[{name!r}] must be an integer tensor of kept unit indices, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if indices.dim() != 1:
            raise ValueError(f"{_OWNER}: keep[{name!r}] must be 1-D, got shape {list(indices.shape)}")
        indices = indices.detach().to("cpu", torch.int64)
        if indices.numel() == 0:
            raise ValueError(f"{_OWNER}: keep[{name!r}] keeps no unit of {name!r}; keep at least one (a layer "
                             "without outputs cuts the network)")
        if int(indices.min()) < 0 or int(indices.max()) >= count:
            raise ValueError(f"{_OWNER}: keep[{name!r}] has indices outside [0, {count}) ({name!r} has {count} units)")
        indices = torch.sort(indices).values
        if bool((indices[1:] == indices[:-1]).any()):
            raise ValueError(f"{_OWNER}: keep[{name!r}] has repeated indices")
        if isinstance(module, SPARSE_MODULES) and module._layout_kind != "unstructured":
            raise NotShrinkable(f"{_OWNER}: layer {name!r} has layout {module.layout!r}; removing units would break "
                                "its blocks / groups; only unstructured sparse layers shrink")
        if getattr(module, "groups", 1) != 1:
            raise NotShrinkable(f"{_OWNER}: layer {name!r} is a grouped convolution (groups={module.groups}); "
                                "shrink does not remove filters of grouped convolutions")
        checked[name] = indices
    return checked


def _shape(node: fx.Node, traced: Traced, why: str) -> torch.Size:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        if not traced.has_shapes:
            raise ValueError(f"{_OWNER}: {why} needs the shapes of the model's values: pass example_input")
        raise NotShrinkable(f"{_OWNER}: {why}, but the value at {node.name!r} is not a single tensor")
    return meta.shape


def _flattened(state: Narrowed, shape: torch.Size, start: int, end: int) -> Narrowed:
    rank = len(shape)
    start, end = start % rank if rank else 0, end % rank if rank else 0
    position = rank + state.dim
    new_rank = rank - (end - start)
    if position < start:
        return dataclasses.replace(state, dim=position - new_rank)
    if position > end:
        return state
    prefix = 1
    for size in shape[start:position]:
        prefix *= size
    suffix = 1
    for size in shape[position + 1:end + 1]:
        suffix *= size
    count = state.size
    keep = (torch.arange(prefix)[:, None, None] * count * suffix + state.keep[None, :, None] * suffix
            + torch.arange(suffix)[None, None, :]).flatten()
    units = None if state.units is None else state.units.repeat_interleave(suffix).repeat(prefix)
    return Narrowed(start - new_rank, prefix * count * suffix, keep, units, state.sources)


def _refuse(state: Narrowed, what: str) -> NotShrinkable:
    return NotShrinkable(f"{_OWNER}: cannot shrink layer(s) {state.named}: their units reach {what}")


def plan(traced: Traced, keep: dict[str, torch.Tensor]) -> Plan:
    """Follow the kept units of the `keep` layers through the traced graph (see the module
    docstring): which modules are narrowed and how, or NotShrinkable naming why not."""
    result = Plan()
    states: dict[fx.Node, Narrowed] = {}
    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        affected = [states[arg] for arg in node.all_input_nodes if arg in states]
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            module = traced.modules[node.target]
            out = _through_module(node, module, affected, states, traced, result)
            if node.target in keep:
                result.outputs[node.target] = keep[node.target]
                out = Narrowed(unit_dim(module), units_of(module), keep[node.target],
                               torch.arange(units_of(module)), (node.target,))
        elif not affected:
            continue
        elif node.op == "call_function":
            out = _through_function(node, affected, states, traced)
        elif node.op == "call_method":
            out = _through_method(node, affected, states, traced)
        elif node.op == "output":
            raise _refuse(affected[0], "the model's output (e.g. a classifier's units are the model's outputs); "
                                       "shrink would change the output's shape")
        else:
            raise _refuse(affected[0], f"graph node {node.name!r} ({node.op}), which shrink does not handle")
        if out is not None:
            states[node] = out
    touched = set(result.inputs) | set(result.outputs)
    for name in keep:
        if name not in calls:
            raise NotShrinkable(f"{_OWNER}: layer {name!r} is not called by the model's forward")
    for name in sorted(touched):
        if calls.get(name, 0) > 1:
            raise NotShrinkable(f"{_OWNER}: module {name!r} is called {calls[name]} times by the forward; shrink "
                                "narrows a module for one use only")
    for node in traced.graph.nodes:
        if node.op == "get_attr" and any(node.target.startswith(name + ".") for name in touched):
            raise NotShrinkable(f"{_OWNER}: the forward reads {node.target!r} directly; shrink cannot narrow that use")
    return result


def _through_module(node, module, affected, states, traced, result) -> Narrowed | None:
    if not affected:
        return None
    name = node.target
    first = node.args[0] if node.args else None
    state = states.get(first) if isinstance(first, fx.Node) else None
    if state is None or len(affected) > 1:
        raise _refuse(affected[0], f"module {name!r} ({type(module).__name__}) in an argument other than its input")
    if isinstance(module, SparseTransposedLinear):
        raise _refuse(state, f"{name!r}, a SparseTransposedLinear, which shrink does not narrow")
    if isinstance(module, WEIGHT_LAYERS):
        if isinstance(module, SPARSE_MODULES) and module._layout_kind != "unstructured":
            raise _refuse(state, f"{name!r}, a sparse layer with layout {module.layout!r}, whose blocks / groups "
                                 "removed inputs would break")
        if getattr(module, "groups", 1) != 1:
            raise _refuse(state, f"{name!r}, a grouped convolution (groups={module.groups})")
        inputs = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        if state.dim != unit_dim(module) or state.size != inputs:
            raise _refuse(state, f"{name!r} ({type(module).__name__}) along another dimension than its inputs")
        result.inputs[name] = state
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
            channel = -3 if isinstance(module, nn.BatchNorm2d) else -4
        else:
            channel = 1 - len(_shape(first, traced, f"BatchNorm1d {name!r} after layer(s) {state.named}"))
        if state.dim != channel or state.size != module.num_features:
            raise _refuse(state, f"BatchNorm {name!r} along another dimension than its channels (its statistics "
                                 "would mix the units)")
        result.inputs[name] = state
        return state
    if isinstance(module, nn.LayerNorm):
        if state.dim >= -len(module.normalized_shape):
            raise _refuse(state, f"LayerNorm {name!r}, which normalizes over them: its statistics include the "
                                 "removed units, so no smaller LayerNorm computes the original")
        return state
    if isinstance(module, _ELEMENTWISE_MODULES):
        return state
    for kinds, pooled in _POOLING_MODULES:
        if isinstance(module, kinds):
            if state.dim >= -pooled:
                raise _refuse(state, f"pooling {name!r} over the dimension holding them")
            return state
    if isinstance(module, nn.Flatten):
        shape = _shape(first, traced, f"nn.Flatten {name!r} after layer(s) {state.named}")
        return _flattened(state, shape, module.start_dim, module.end_dim)
    raise _refuse(state, f"module {name!r} ({type(module).__name__}), which shrink does not know how to narrow")


def _only_first(node, affected, states, what) -> Narrowed:
    state = states.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    others = [arg for arg in node.all_input_nodes if arg is not node.args[0]]
    if state is None or others:
        raise _refuse(affected[0], f"{what} with other tensor arguments")
    return state


def _binary(node, affected, states, what) -> Narrowed:
    operands = list(node.args[:2]) + [value for key, value in node.kwargs.items() if key == "other"]
    tensors = [arg for arg in operands if isinstance(arg, fx.Node)]
    if len(tensors) != len(node.all_input_nodes):
        raise _refuse(affected[0], f"{what} with tensor keyword arguments")
    narrowed = [states.get(arg) for arg in tensors]
    if any(state is None for state in narrowed):
        raise _refuse(affected[0], f"{what} at {node.name!r} (a residual addition?) whose other operand is not "
                                   "narrowed; shrink the layers of both branches with the same kept indices")
    first = narrowed[0]
    for other in narrowed[1:]:
        if not first.same_positions(other):
            raise _refuse(first, f"{what} at {node.name!r} with layer(s) {other.named} narrowed differently; "
                                 "give both branches the same kept indices")
    sources = tuple(dict.fromkeys(source for state in narrowed for source in state.sources))
    same_units = all(state.units is not None and torch.equal(state.units, first.units) for state in narrowed)
    return dataclasses.replace(first, units=first.units if same_units and len(sources) == 1 else None,
                               sources=sources)


def _flatten_args(node, default_start: int):
    names = ("input", "start_dim", "end_dim")
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    return values.get("start_dim", default_start), values.get("end_dim", -1)


def _through_function(node, affected, states, traced) -> Narrowed:
    target = node.target
    name = getattr(target, "__name__", str(target))
    if target in _ELEMENTWISE_FUNCTIONS:
        return _only_first(node, affected, states, f"{name}")
    if target in _BINARY:
        return _binary(node, affected, states, f"{name}")
    if target is torch.flatten:
        state = _only_first(node, affected, states, "torch.flatten")
        start, end = _flatten_args(node, 0)
        shape = _shape(node.args[0], traced, f"torch.flatten after layer(s) {state.named}")
        return _flattened(state, shape, start, end)
    raise _refuse(affected[0], f"function {name} (at {node.name!r}), which shrink does not know how to narrow")


def _through_method(node, affected, states, traced) -> Narrowed:
    if node.target in _ELEMENTWISE_METHODS:
        return _only_first(node, affected, states, f".{node.target}()")
    if node.target in _BINARY_METHODS:
        return _binary(node, affected, states, f".{node.target}()")
    if node.target == "flatten":
        state = _only_first(node, affected, states, ".flatten()")
        start, end = _flatten_args(node, 0)
        shape = _shape(node.args[0], traced, f".flatten() after layer(s) {state.named}")
        return _flattened(state, shape, start, end)
    raise _refuse(affected[0], f"method .{node.target}() (at {node.name!r}), which shrink does not know how to narrow")


def _parameter(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.clone(), requires_grad=like.requires_grad)


def _narrow_layer(module: nn.Module, rows: torch.Tensor | None, columns: torch.Tensor | None) -> nn.Module:
    """The weight layer without the removed output rows / input columns; dense layers are
    narrowed in place (the caller owns a copy), sparse ones rebuilt with the sliced mask."""
    device = module.weight.device
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    mask = module.mask if isinstance(module, SPARSE_MODULES) else None
    if rows is not None:
        rows = rows.to(device)
        weight = weight.index_select(0, rows)
        bias = None if bias is None else bias.index_select(0, rows)
        mask = None if mask is None else mask.index_select(0, rows)
    if columns is not None:
        columns = columns.to(device)
        weight = weight.index_select(1, columns)
        mask = None if mask is None else mask.index_select(1, columns)
    out_units, in_units = weight.shape[0], weight.shape[1]
    if isinstance(module, SPARSE_MODULES):
        if isinstance(module, SparseLinear):
            dense = nn.Linear(in_units, out_units, bias is not None, device=device, dtype=weight.dtype)
        else:
            dense = nn.Conv2d(in_units, out_units, module.kernel_size, stride=module.stride, padding=module.padding,
                              dilation=module.dilation, bias=bias is not None, padding_mode=module.padding_mode,
                              device=device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if bias is not None:
                dense.bias.copy_(bias)
        sparse_cls = SparseLinear if isinstance(module, SparseLinear) else SparseConv2d
        new = sparse_cls.from_dense(dense, layout=module.layout, grad_mode=module.grad_mode, mask=mask.contiguous())
        new.weight.requires_grad_(module.weight.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(module.bias.requires_grad)
        new.weight_grad = module.weight_grad
        new.train(module.training)
        return new
    module.weight = _parameter(weight, module.weight)
    if bias is not None:
        module.bias = _parameter(bias, module.bias)
    if isinstance(module, nn.Linear):
        module.in_features, module.out_features = in_units, out_units
    else:
        module.in_channels, module.out_channels = in_units, out_units
    return module


def _narrow_norm(module: nn.Module, channels: torch.Tensor) -> None:
    channels = channels.to(module.weight.device if module.weight is not None else module.running_mean.device)
    module.num_features = len(channels)
    for name in ("weight", "bias"):
        param = getattr(module, name)
        if param is not None:
            setattr(module, name, _parameter(param.detach().index_select(0, channels), param))
    for name in ("running_mean", "running_var"):
        buffer = getattr(module, name)
        if buffer is not None:
            setattr(module, name, buffer.index_select(0, channels).clone())


def apply_plan(model: nn.Module, result: Plan) -> nn.Module:
    """A copy of `model` narrowed as `result` says."""
    shrunk = copy.deepcopy(model)
    for name in sorted(set(result.inputs) | set(result.outputs)):
        module = shrunk.get_submodule(name)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _narrow_norm(module, result.inputs[name].keep)
            continue
        state = result.inputs.get(name)
        new = _narrow_layer(module, result.outputs.get(name), None if state is None else state.keep)
        if new is not module:
            _replace(shrunk, name, new)
    return shrunk


def shrink(model: nn.Module, keep: Mapping[str, torch.Tensor], *, example_input=None) -> nn.Module:
    """A new model where each layer named in `keep` has only the output units `keep[name]`
    (indices, any order, no repeats) and every consumer of them is narrowed to match (see the
    module docstring for what is handled, what is refused and what "removed" means). `model`
    is not changed. `example_input`: the forward's input (tensor or tuple), needed where a
    flatten or a BatchNorm1d sits on the units' path."""
    keep = check_keep(model, keep)
    traced = Traced(model, example_input)
    return apply_plan(model, plan(traced, keep))


@dataclasses.dataclass
class ShrinkReport:
    """Parameter counts and median inference latency (seconds, eval mode, no_grad) of a model
    and its shrunk version on the same input."""

    parameters: int
    shrunk_parameters: int
    latency_s: float
    shrunk_latency_s: float
    repeats: int

    @property
    def speedup(self) -> float:
        return self.latency_s / self.shrunk_latency_s

    @property
    def parameter_ratio(self) -> float:
        return self.shrunk_parameters / self.parameters

    def __str__(self) -> str:
        return (f"parameters {self.parameters} -> {self.shrunk_parameters} ({self.parameter_ratio:.3f}x), "
                f"latency {self.latency_s * 1e3:.3f} ms -> {self.shrunk_latency_s * 1e3:.3f} ms "
                f"({self.speedup:.2f}x faster, median of {self.repeats})")


def parameter_count(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def shrink_report(original: nn.Module, shrunk: nn.Module, example_input, *, repeats: int = 50,
                  warmup: int = 5) -> ShrinkReport:
    """Parameters and measured latency of `original` and `shrunk` on `example_input`; the two
    are timed alternately (one forward each, in turn) so that load changes hit both alike."""
    if not (isinstance(repeats, int) and repeats >= 1 and isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"{_OWNER}: repeats must be an int >= 1 and warmup an int >= 0, got {repeats!r}, {warmup!r}")
    models = [copy.deepcopy(original).eval(), copy.deepcopy(shrunk).eval()]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    times: list[list[float]] = [[], []]
    with torch.no_grad():
        for i in range(warmup + repeats):
            for model, record in zip(models, times):
                start = time.perf_counter()
                model(*args)
                if i >= warmup:
                    record.append(time.perf_counter() - start)
    return ShrinkReport(parameter_count(original), parameter_count(shrunk), statistics.median(times[0]),
                        statistics.median(times[1]), repeats)
