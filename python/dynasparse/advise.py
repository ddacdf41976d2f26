"""`dynasparse.advise(model, example_inputs)`: will pruning make this model faster here?

Before anyone trains, for each layer `sparsify` would convert, on this machine and for each
layout and sparsity asked: the layer's forward (inference) and forward + backward (a
training step's share, the gradients `autograd.grad` returns) timed sparse (the kernels) and
dense (the original layer), on the very inputs the layer gets in one forward of
`example_inputs`, interleaved, medians (`nn.costs.time_both`). Layers of one shape fed inputs
of one shape are timed once and counted by their calls.

The whole model: its dense inference and training step (forward and backward of the sum of
its outputs; no optimizer) are timed, and the sparse model's time is estimated as the dense
one minus the converted layers' dense share plus their time in the way `backend="auto"`
would run each (the faster); the sparse copy with `backend="auto"` is then timed too.

    advice = dynasparse.advise(model, (x,), sparsity=(0.9, 0.95), layouts=("unstructured", "block16"))
    print(advice.table()); advice.save("advice/")        # advice.json, advice.png
    dynasparse advise BertConfig --kwargs '{"num_hidden_layers": 4}' --batch 8 --seq-len 128

A layer's verdict: "sparse" when its kernels are at least 5% faster than dense, "dense" when
at least 5% slower (auto then runs it dense), else "even".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .nn import SparseLinear, SparseTransposedLinear, sparsify
from .nn.costs import time_both
from .nn.modules import LAYOUT_NAMES, check_sparsity

_OWNER = "dynasparse.advise"
_MARGIN = 0.05


@dataclasses.dataclass
class LayerAdvice:
    name: str
    kind: str
    shape: list[int]
    input_shape: list[int]
    calls: int
    layout: str
    sparsity: float
    dense_ms: float
    sparse_ms: float
    dense_train_ms: float | None
    sparse_train_ms: float | None

    @property
    def ratio(self) -> float:
        return self.dense_ms / self.sparse_ms

    @property
    def train_ratio(self) -> float | None:
        return None if self.sparse_train_ms is None else self.dense_train_ms / self.sparse_train_ms

    def verdict(self, training: bool = False) -> str:
        ratio = self.train_ratio if training else self.ratio
        return "sparse" if ratio >= 1 + _MARGIN else "dense" if ratio <= 1 - _MARGIN else "even"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio, "train_ratio": self.train_ratio,
                "verdict": self.verdict(), "train_verdict": None if self.sparse_train_ms is None else
                self.verdict(True)}


@dataclasses.dataclass
class ModelAdvice:
    """Per (layout, sparsity): the dense model's times, the estimate from the layer timings with
    each layer run the faster way, and the sparse copy with backend="auto" measured."""

    layout: str
    sparsity: float
    dense_ms: float
    estimated_ms: float
    measured_auto_ms: float
    dense_train_ms: float | None
    estimated_train_ms: float | None
    measured_auto_train_ms: float | None

    def to_dict(self) -> dict:
        ratios = {"estimated_ratio": self.dense_ms / self.estimated_ms,
                  "measured_auto_ratio": self.dense_ms / self.measured_auto_ms}
        if self.dense_train_ms is not None:
            ratios.update(estimated_train_ratio=self.dense_train_ms / self.estimated_train_ms,
                          measured_auto_train_ratio=self.dense_train_ms / self.measured_auto_train_ms)
        return {**dataclasses.asdict(self), **ratios}


@dataclasses.dataclass
class Advice:
    layers: list[LayerAdvice]
    models: list[ModelAdvice]
    threads: int
    skipped: dict[str, str]

    def best_layouts(self, training: bool = False) -> dict[tuple[str, float], str]:
        """(layer, sparsity) -> the layout whose kernels are fastest there."""
        best: dict[tuple[str, float], LayerAdvice] = {}
        for row in self.layers:
            ratio = row.train_ratio if training else row.ratio
            key = (row.name, row.sparsity)
            if key not in best or ratio > (best[key].train_ratio if training else best[key].ratio):
                best[key] = row
        return {key: row.layout for key, row in best.items()}

    def table(self) -> str:
        from .experiments.reports import text_table

        training = any(row.sparse_train_ms is not None for row in self.layers)
        best = self.best_layouts(training)
        rows = []
        for row in self.layers:
            cells = [row.name, "x".join(map(str, row.shape)), str(row.calls), row.layout, f"{row.sparsity:.0%}",
                     f"{row.dense_ms:.3f}", f"{row.sparse_ms:.3f}", f"{row.ratio:.2f}x", row.verdict()]
            if training:
                cells += [f"{row.dense_train_ms:.3f}", f"{row.sparse_train_ms:.3f}", f"{row.train_ratio:.2f}x",
                          row.verdict(True)]
            cells.append("*" if best[(row.name, row.sparsity)] == row.layout else "")
            rows.append(cells)
        header = ["layer", "shape", "calls", "layout", "sparsity", "dense ms", "sparse ms", "ratio", "verdict"]
        if training:
            header += ["dense train ms", "sparse train ms", "train ratio", "train verdict"]
        header.append("best layout")
        lines = [text_table(rows, header), "", f"whole model ({self.threads} thread(s); ratio = dense / sparse):"]
        for model in self.models:
            numbers = model.to_dict()
            line = (f"  {model.layout} {model.sparsity:.0%}: inference {numbers['estimated_ratio']:.2f}x estimated, "
                    f"{numbers['measured_auto_ratio']:.2f}x measured with backend='auto'")
            if model.dense_train_ms is not None:
                line += (f"; training step {numbers['estimated_train_ratio']:.2f}x estimated, "
                         f"{numbers['measured_auto_train_ratio']:.2f}x measured")
            lines.append(line)
        for name, reason in self.skipped.items():
            lines.append(f"  not convertible: {name}: {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"threads": self.threads, "layers": [row.to_dict() for row in self.layers],
                "models": [model.to_dict() for model in self.models], "skipped": self.skipped}

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """advice.json, advice.png (each layer's ratio per layout and sparsity) and advice.txt."""
        from .experiments.reports import _pyplot

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": directory / "advice.json", "png": directory / "advice.png", "txt": directory / "advice.txt"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        paths["txt"].write_text(self.table() + "\n")
        plt = _pyplot()
        names = list(dict.fromkeys(row.name for row in self.layers))
        combos = list(dict.fromkeys((row.layout, row.sparsity) for row in self.layers))
        figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 3), 4.5))
        width = 0.8 / max(len(combos), 1)
        for index, (layout, sparsity) in enumerate(combos):
            ratios = {row.name: (row.train_ratio or row.ratio) for row in self.layers
                      if (row.layout, row.sparsity) == (layout, sparsity)}
            axes.bar([i + index * width for i in range(len(names))], [ratios.get(name, 0.0) for name in names],
                     width, label=f"{layout} {sparsity:.0%}")
        axes.axhline(1.0, color="black", linewidth=0.8)
        axes.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=60, ha="right", fontsize=7)
        training = any(row.sparse_train_ms is not None for row in self.layers)
        axes.set_ylabel(("training" if training else "inference") + " speedup (dense / sparse)")
        axes.set_title(f"dynasparse advise ({self.threads} thread(s))")
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(paths["png"], dpi=120)
        plt.close(figure)
        return paths


def _as_call(example_inputs) -> Callable[[nn.Module], object]:
    if isinstance(example_inputs, torch.Tensor):
        return lambda model: model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return lambda model: model(**example_inputs)
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return lambda model: model(*example_inputs)
    raise TypeError(f"{_OWNER}: example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
                    f"inputs, got {type(example_inputs).__name__}")


def _float_outputs(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [tensor for item in output for tensor in _float_outputs(item)]
    return []


def _model_step(model: nn.Module, call, training: bool) -> Callable[[], None]:
    def inference() -> None:
        with torch.no_grad():
            call(model)

    def step() -> None:
        outputs = _float_outputs(call(model))
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(sum(o.float().sum() for o in outputs), params, allow_unused=True)

    return step if training else inference


def _captured_inputs(model: nn.Module, names: Sequence[str], call) -> dict[str, list[torch.Tensor]]:
    """The input of each call of the named layers during one forward (with grad, as in training)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0].detach().requires_grad_(args[0].requires_grad)))
        for name in names]
    try:
        call(model)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _layer_times(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, training: bool) -> tuple:
    def inference(module):
        def run():
            with torch.no_grad():
                module(x)
        return run

    def step(module):
        inputs = ([x] if x.requires_grad else []) + [p for p in module.parameters() if p.requires_grad]

        def run():
            out = module(x)
            torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
        return run

    sparse_s, dense_s = time_both(inference(sparse), inference(dense), x.device)
    if not training:
        return dense_s, sparse_s, None, None
    with torch.enable_grad():
        sparse_train_s, dense_train_s = time_both(step(sparse), step(dense), x.device)
    return dense_s, sparse_s, dense_train_s, sparse_train_s


def _median_ms(run: Callable[[], None], device: torch.device, repeats: int = 5) -> float:
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def advise(model: nn.Module, example_inputs, *, sparsity: float | Sequence[float] = 0.9,
           layouts: str | Sequence[str] = ("unstructured",), training: bool = True, include=None, exclude=None,
           threads: int | None = None, progress: bool | None = None) -> Advice:
    """Time each convertible layer of `model` sparse against dense on this machine (see the
    module docstring). `example_inputs`: a tensor, a tuple of positional inputs or a dict of
    keyword inputs of one forward; `training`: also time forward + backward; `include` /
    `exclude`: as `sparsify`; `threads`: torch threads for the measurement (default: as set).
    The model is not changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OWNER}: model must be an nn.Module, got {type(model).__name__}")
    sparsities = [sparsity] if isinstance(sparsity, (int, float)) else list(sparsity)
    layouts = [layouts] if isinstance(layouts, str) else list(layouts)
    if not sparsities or not layouts:
        raise ValueError(f"{_OWNER}: give at least one sparsity and one layout")
    for value in sparsities:
        check_sparsity(value)
    for layout in layouts:
        if layout not in LAYOUT_NAMES:
            raise ValueError(f"{_OWNER}: unknown layout {layout!r}; choose from {', '.join(LAYOUT_NAMES)}")
        if layout == "2:4" and any(value != 0.5 for value in sparsities):
            raise ValueError(f"{_OWNER}: layout '2:4' has sparsity 0.5 only; ask for it with sparsity=0.5")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{_OWNER}: threads must be None or an int >= 1, got {threads!r}")
    call = _as_call(example_inputs)
    show = sys.stderr.isatty() if progress is None else progress
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        dense_ms = _median_ms(_model_step(model, call, False), device)
        dense_train_ms = _median_ms(_model_step(model, call, True), device) if training else None
        layers, models, skipped = [], [], {}
        for layout in layouts:
            for value in sparsities:
                sparse_model = copy.deepcopy(model)
                report = sparsify(sparse_model, value, layout=layout, include=include, exclude=exclude,
                                  backend="sparse")
                skipped.update(report.skipped)
                names = list(report.converted)
                inputs = _captured_inputs(model, names, call)
                memo: dict[tuple, tuple] = {}
                saved = saved_train = 0.0
                for index, name in enumerate(names):
                    if show:
                        print(f"\r{_OWNER}: {layout} {value:.0%}: layer {index + 1}/{len(names)} {name}",
                              end="", file=sys.stderr, flush=True)
                    calls = inputs[name]
                    if not calls:
                        continue  # not reached by this forward
                    dense_layer, sparse_layer = model.get_submodule(name), sparse_model.get_submodule(name)
                    x = calls[0]
                    linear = isinstance(sparse_layer, (SparseLinear, SparseTransposedLinear))
                    geometry = () if linear else (tuple(dense_layer.stride), str(dense_layer.padding),
                                                  tuple(dense_layer.dilation), dense_layer.groups)
                    key = (type(sparse_layer).__name__, tuple(dense_layer.weight.shape), geometry, tuple(x.shape),
                           x.dtype, x.requires_grad)
                    if key not in memo:
                        memo[key] = _layer_times(dense_layer, sparse_layer, x, training)
                    dense_s, sparse_s, dense_train_s, sparse_train_s = memo[key]
                    row = LayerAdvice(name, type(sparse_layer).__name__, list(dense_layer.weight.shape),
                                      list(x.shape), len(calls), layout, value, 1000 * dense_s, 1000 * sparse_s,
                                      None if dense_train_s is None else 1000 * dense_train_s,
                                      None if sparse_train_s is None else 1000 * sparse_train_s)
                    layers.append(row)
                    saved += len(calls) * (row.dense_ms - min(row.dense_ms, row.sparse_ms))
                    if training:
                        saved_train += len(calls) * (row.dense_train_ms - min(row.dense_train_ms,
                                                                              row.sparse_train_ms))
                for module in sparse_model.modules():
                    if hasattr(module, "backend"):
                        module.backend = "auto"
                auto_ms = _median_ms(_model_step(sparse_model, call, False), device)
                auto_train_ms = _median_ms(_model_step(sparse_model, call, True), device) if training else None
                models.append(ModelAdvice(layout, value, dense_ms, max(dense_ms - saved, 1e-6), auto_ms,
                                          dense_train_ms, None if not training else
                                          max(dense_train_ms - saved_train, 1e-6), auto_train_ms))
                del sparse_model
        if show:
            print(file=sys.stderr)
        return Advice(layers, models, torch.get_num_threads(), skipped)
    finally:
        torch.set_num_threads(previous_threads)


# -- the command line -------------------------------------------------------------------------

def _target(args) -> tuple[nn.Module, object]:
    """The model and its example inputs from the command line's TARGET."""
    options = json.loads(args.kwargs) if args.kwargs else {}
    if not isinstance(options, dict):
        raise ValueError("--kwargs must be a JSON object")
    if ":" in args.target:
        import importlib

        module_name, _, attribute = args.target.partition(":")
        factory = getattr(importlib.import_module(module_name), attribute, None)
        if not callable(factory):
            raise ValueError(f"{args.target}: {module_name} has no callable {attribute!r}")
        built = factory(**options)
        model, inputs = built if isinstance(built, tuple) else (built, None)
        if inputs is None:
            if not args.input_shape:
                raise ValueError(f"{args.target} returned a model without example inputs: give --input-shape")
            inputs = torch.randn(args.batch, *args.input_shape)
        return model, inputs
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{args.target}: a config class name needs transformers installed (pip install "
                         "transformers), or give module:factory") from None
    config_class = getattr(transformers, args.target, None)
    if config_class is None or not isinstance(config_class, type) or not args.target.endswith("Config"):
        raise ValueError(f"{args.target}: not a transformers config class (such as BertConfig, GPT2Config), and not "
                         "module:factory")
    config = config_class(**options)
    model = transformers.AutoModel.from_config(config)
    vocabulary = getattr(config, "vocab_size", 1000)
    return model, {"input_ids": torch.randint(0, vocabulary, (args.batch, args.seq_len))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynasparse advise", description="Time each layer sparsify would convert, "
                                     "sparse against dense, on this machine: will pruning make the model faster here?")
    parser.add_argument("target", help="a transformers config class name (BertConfig, GPT2Config, ...) or an "
                        "importable module:factory returning a model or (model, example_inputs)")
    parser.add_argument("--kwargs", default=None, help="JSON object of arguments for the config class or factory, "
                        "e.g. '{\"num_hidden_layers\": 4}'")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
    parser.add_argument("--layouts", nargs="+", default=["unstructured"], choices=LAYOUT_NAMES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example (transformers models)")
    parser.add_argument("--input-shape", type=int, nargs="+", default=None,
                        help="one example's shape for a factory that returns no inputs, e.g. 3 32 32")
    parser.add_argument("--inference-only", action="store_true", help="skip the training-step timings")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write advice.json, advice.png and advice.txt there")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seq_len < 1:
        parser.error("--batch and --seq-len must be >= 1")
    try:
        model, inputs = _target(args)
        advice = advise(model, inputs, sparsity=args.sparsity, layouts=args.layouts,
                        training=not args.inference_only, threads=args.threads)
    except (ValueError, TypeError, ImportError) as error:
        parser.error(str(error))
    print(advice.table())
    if args.out is not None:
        paths = advice.save(args.out)
        print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return 0
