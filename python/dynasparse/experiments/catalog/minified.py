"""`dynasparse reproduce minified`: Harang & Sanders, "Magnificent Minified Models" (2023), on
MNIST-1D with the MLP and the 1-D CNN of `experiments.models` (`data="digits"`: the MLP and the
digits CNN on the 8 x 8 digits, the experiment `minified-digits`, i.e. `dynasparse reproduce
minified --data digits`).

A trained network has weights or whole neurons deleted; selection methods are compared, then
fine-tuning against training the pruned architecture from scratch, and against quantization at
equal storage. Per model and seed (3 seeds; `--quick`: 2 seeds, fewer methods, levels, steps):

- dense: trained `STEPS` SGD steps (batch 64, lr 0.05, cosine); 10% of the training set is held
  out (`data_options["validation"]`) for the dropout-damage estimate.
- Weight level, at 50/80/90/95/98% of the prunable weights (the models' `dense_layers`, the first
  convolution and the classifier, stay dense), one global threshold: random, magnitude (|w|),
  OBD (`pruning.obd`: h_kk w_k**2 / 2, empirical Fisher on 8 calibration batches of 64) and
  OBD-SD (mean - std of the per-batch saliencies over the same batches). Each pruned model
  (transform "minified-prune" on the dense run, `steps=0`: evaluated as pruned) then
  (a) is fine-tuned: a child run of it, `STEPS` steps at lr 0.01 (the mask fixed; the loaded
      sparse layers train in feedback mode, which for a fixed mask gives the active weights the
      masked updates: the forward never reads a pruned weight);
  (b) has its mask trained from a new random initialization with the same budget, `STEPS`
      steps at the dense run's lr (transform "structure-random" of experiments.structure).
- Neuron level, 25/50/75% of the units of every hidden layer (`neurons.removed_count` per
  layer): random, L2 norm of the incoming weights, neuron OBD (gate derivatives), dropout
  damage (64 Monte-Carlo passes, p = 0.5, on 4 held-out batches), Srinivas & Babu merging.
  The physically smaller network (`nn.shrink`; merging shrinks itself) is stored under a spec
  whose model_options name the smaller widths (transform "minified-neurons" / "minified-merge",
  `steps=0`), then (a) fine-tuned (child run, `STEPS` steps at lr 0.01) and (b) the same smaller
  architecture trained from scratch (no parent, a fresh initialization, `STEPS` steps at lr 0.05).
- Quantization: the dense model's weights at 8/6/4/3/2 bits, symmetric per output channel
  (`nn.quantize`, transform "minified-quantize", `steps=0`), not retrained.

Model size in bits (`nn.quantize.model_bits`, stored as `metrics["model_bits"]` by the
experiment's hook): float weights 32 bits; a pruned layer's weights as the cheaper of flat
positions (k x (32 + ceil(log2 n))) and a bitmask (n + 32 k); quantized weights b bits plus one
32-bit scale per output channel; biases 32 bits. Compression = the dense model's bits / the
model's bits.

The claims (section "Claims" of the report; `reports.VERDICT_RULE`): OBD-SD is slightly the best
selection method under heavy pruning (at 98%, against each other method, pruned and fine-tuned);
at weight level fine-tuning slightly beats training from scratch (the mean paired difference over
every method, level and seed is above 0); at neuron level training from scratch is much better
(our threshold for "much": the paired difference scratch - fine-tuned above 2 points).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from ... import pruning
from ...nn import quantize
from ...nn.shrink import shrink
from ...pruning import neurons, saliency
from ...pruning import obd as _obd  # noqa: F401  (registers "obd" and "obd_sd")
from ...pruning.schedules import check_real
from .. import reports, transforms
from .. import data as data_sets
from ..registry import Experiment, register
from ..spec import RunSpec
from ..store import Store
from ..structure import TRANSFORMS as STRUCTURE_TRANSFORMS
from ..trainer import Hook, TrainState

_OWNER = "dynasparse reproduce minified"

# model -> its hidden widths as model_options (explicit, so that the smaller ones are known)
VARIANTS = {"mnist1d": {"mlp": {"hidden": [128, 128]}, "cnn1d": {"channels": [32, 32, 32]}},
            "digits": {"mlp": {"hidden": [128, 128]}, "digits-cnn": {"channels": [16, 32], "hidden": 128}}}
# label -> pruning registry name
WEIGHT_METHODS = {"random": "random", "magnitude": "oneshot", "OBD": "obd", "OBD-SD": "obd_sd"}
WEIGHT_LEVELS = (0.5, 0.8, 0.9, 0.95, 0.98)
# label -> neurons.select method, or "merge"
NEURON_METHODS = {"random": "random", "L2": "l2", "neuron OBD": "obd", "damage": "damage", "merging": "merge"}
NEURON_LEVELS = (0.25, 0.5, 0.75)
BITS = (8, 6, 4, 3, 2)
STEPS, QUICK_STEPS = 1500, 200
SEEDS, QUICK_SEEDS = 3, 2
LR, FINE_TUNE_LR = 0.05, 0.01
CALIBRATION_BATCHES, QUICK_CALIBRATION_BATCHES = 8, 4
HELD_OUT_BATCHES = 4
VALIDATION = 0.1
QUICK = {"weight_methods": ("magnitude", "OBD", "OBD-SD", "random"), "weight_levels": (0.9, 0.98),
         "neuron_methods": tuple(NEURON_METHODS), "neuron_levels": (0.5,), "bits": (8, 4, 2)}
MUCH = 0.02  # "much better": more than 2 accuracy points
PRUNE, NEURONS, MERGE, QUANTIZE = "minified-prune", "minified-neurons", "minified-merge", "minified-quantize"
SCRATCH = STRUCTURE_TRANSFORMS["random"]


# -- widths ------------------------------------------------------------------------------------

def hidden_widths(model: str, options: dict) -> dict[str, int]:
    """{layer: units} of the hidden layers whose units the neuron-level protocol removes."""
    if model == "mlp":
        return {f"fc{i}": width for i, width in enumerate(options["hidden"], 1)}
    if model == "cnn1d":
        return {f"conv{i}": width for i, width in enumerate(options["channels"], 1)}
    if model == "digits-cnn":
        return {"conv1": options["channels"][0], "conv2": options["channels"][1], "fc1": options["hidden"]}
    raise ValueError(f"{_OWNER}: no neuron-level widths for model {model!r}")


def smaller_options(model: str, options: dict, fraction: float) -> dict:
    """The model_options of `model` with `neurons.removed_count(fraction, units)` units removed
    from every hidden layer."""
    kept = {name: units - neurons.removed_count(fraction, units) for name, units in hidden_widths(model, options).items()}
    result = copy.deepcopy(options)
    if model == "mlp":
        result["hidden"] = [kept[f"fc{i}"] for i in range(1, len(options["hidden"]) + 1)]
    elif model == "cnn1d":
        result["channels"] = [kept[f"conv{i}"] for i in range(1, len(options["channels"]) + 1)]
    else:
        result["channels"], result["hidden"] = [kept["conv1"], kept["conv2"]], kept["fc1"]
    return result


# -- transforms ----------------------------------------------------------------------------------

def _options(ctx: transforms.TransformContext, name: str, required: dict, optional: dict | None = None) -> dict:
    """The transform's options, checked: `required` {option: type}, `optional` {option: default}."""
    optional = optional or {}
    unknown = sorted(set(ctx.options) - set(required) - set(optional))
    missing = sorted(set(required) - set(ctx.options))
    if unknown or missing:
        raise ValueError(f"{_OWNER}: transform {name!r} takes options {sorted(required)} (and optionally "
                         f"{sorted(optional)}); unknown {unknown}, missing {missing}")
    for option, kind in required.items():
        if not isinstance(ctx.options[option], kind) or isinstance(ctx.options[option], bool):
            raise TypeError(f"{_OWNER}: transform {name!r} option {option!r} must be {kind}, got "
                            f"{ctx.options[option]!r}")
    if ctx.parent is None:
        raise ValueError(f"{_OWNER}: transform {name!r} works on the parent's trained model: the run needs a parent")
    return {**optional, **ctx.options}


def _seed(ctx: transforms.TransformContext) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=ctx.generator))


@transforms.register(PRUNE, "the parent's model pruned at weight level by a pruning method (options: method, "
                     "sparsity, batches, method_options), hard-pruned, masked")
def prune_weights(ctx: transforms.TransformContext) -> nn.Module:
    options = _options(ctx, PRUNE, {"method": str, "sparsity": float}, {"batches": 1, "method_options": {}})
    model = ctx.parent
    method_options = dict(options["method_options"])
    if "include" not in method_options and "exclude" not in method_options:
        method_options["exclude"] = list(getattr(model, "dense_layers", ()))
    if "seed" in pruning.describe(options["method"]) and "seed" not in method_options:
        method_options["seed"] = _seed(ctx)
    pruner = pruning.create(options["method"], model, sparsity=options["sparsity"], **method_options)
    if pruner.needs_data:
        pruner.calibrate(ctx.calibration_batches(options["batches"]))
    else:
        pruner.initialize()
    pruner.finalize()
    return model


def held_out_batches(ctx: transforms.TransformContext, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` batches of spec.batch_size of the validation split (held-out data)."""
    if ctx.dataset.validation is None:
        raise ValueError(f"{_OWNER}: dropout damage is estimated on held-out data: the data set needs a validation "
                         "split (data_options['validation'])")
    inputs, labels = ctx.dataset.validation
    size = ctx.spec.batch_size
    batches = [(inputs[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)][:count]
    return batches


def _install(ctx: transforms.TransformContext, small: nn.Module) -> nn.Module:
    """The shrunk weights copied into ctx.model (built from the spec's smaller widths)."""
    theirs = {name: tuple(value.shape) for name, value in small.state_dict().items()}
    ours = {name: tuple(value.shape) for name, value in ctx.model.state_dict().items()}
    if theirs != ours:
        differ = sorted(name for name in set(theirs) | set(ours) if theirs.get(name) != ours.get(name))
        raise ValueError(f"{_OWNER}: the shrunk model does not have the architecture of this spec's model_options "
                         f"{ctx.spec.model_options} (it differs at {', '.join(differ)}); build the child spec with "
                         "smaller_options()")
    ctx.model.load_state_dict(small.state_dict())
    return ctx.model


def _check_widths(ctx: transforms.TransformContext, fraction: float) -> list[str]:
    parent = ctx.spec.parent
    expected = smaller_options(parent.model, parent.model_options, fraction)
    if ctx.spec.model != parent.model or ctx.spec.model_options != expected:
        raise ValueError(f"{_OWNER}: removing {fraction:.0%} of the units of {parent.model} "
                         f"{parent.model_options} gives model_options {expected}, the spec has {ctx.spec.model} "
                         f"{ctx.spec.model_options}")
    return list(hidden_widths(parent.model, parent.model_options))


@transforms.register(NEURONS, "the parent's model with a fraction of the units of every hidden layer removed, "
                     "physically (options: method of neurons.select, fraction, batches, method_options); the "
                     "spec's model_options name the smaller widths")
def prune_neurons(ctx: transforms.TransformContext) -> nn.Module:
    options = _options(ctx, NEURONS, {"method": str, "fraction": float}, {"batches": 1, "method_options": {}})
    layers = _check_widths(ctx, options["fraction"])
    batches = (held_out_batches(ctx, options["batches"]) if options["method"] == "damage"
               else ctx.calibration_batches(options["batches"]))
    keep = neurons.select(ctx.parent, options["fraction"], options["method"], layers=layers, batches=batches,
                          generator=ctx.generator, **options["method_options"])
    return _install(ctx, shrink(ctx.parent, keep, example_input=batches[0][0]))


@transforms.register(MERGE, "the parent's model with a fraction of the units of every hidden layer merged away "
                     "(Srinivas & Babu; options: fraction); the spec's model_options name the smaller widths")
def merge_neurons(ctx: transforms.TransformContext) -> nn.Module:
    options = _options(ctx, MERGE, {"fraction": float})
    layers = _check_widths(ctx, options["fraction"])
    batches = ctx.calibration_batches(1)
    return _install(ctx, neurons.merge(ctx.parent, options["fraction"], layers=layers, batches=batches))


@transforms.register(QUANTIZE, "the parent's model with its weights quantized to `bits` (symmetric, per output "
                     "channel) and dequantized")
def quantize_weights(ctx: transforms.TransformContext) -> nn.Module:
    options = _options(ctx, QUANTIZE, {"bits": int})
    return quantize.fake_quantize(ctx.parent, options["bits"])


def quantized_bits(spec: RunSpec) -> int | None:
    """The bits of the quantized weights of run `spec` (None: float weights)."""
    return spec.transform_options["bits"] if spec.transform == QUANTIZE else None


class ModelBits(Hook):
    """Stores the run's model size in bits (`nn.quantize.storage`) and each weight's code."""

    def on_end(self, state: TrainState) -> None:
        found = quantize.storage(state.model, bits=quantized_bits(state.spec))
        state.metrics["model_bits"] = found.total
        state.metrics["weight_codes"] = {layer.name: layer.code for layer in found.layers}


def hooks(spec: RunSpec) -> list:
    return [ModelBits()]


# -- the population ----------------------------------------------------------------------------

def specs(quick: bool = False, *, data: str = "mnist1d", models: Sequence[str] | None = None,
          seeds: int | None = None, steps: int | None = None, weight_methods: Sequence[str] | None = None,
          weight_levels: Sequence[float] | None = None, neuron_methods: Sequence[str] | None = None,
          neuron_levels: Sequence[float] | None = None, bits: Sequence[int] | None = None, device: str = "cpu",
          threads: int = 1) -> list[RunSpec]:
    """The population (module docstring): per model and seed, the dense run; every weight
    method x level pruned, fine-tuned and trained from scratch on its mask; every neuron method
    x level shrunk and fine-tuned, and each smaller architecture from scratch; the quantized
    models. quick: 2 seeds, 200 steps, weight level at 90/98%, neuron level at 50%, 8/4/2 bits.
    Each list (methods by their labels in WEIGHT_METHODS / NEURON_METHODS, levels, bits) can be
    given instead."""
    if data not in VARIANTS:
        raise ValueError(f"{_OWNER}: data must be one of {', '.join(VARIANTS)}, got {data!r}")
    models = tuple(VARIANTS[data]) if models is None else tuple(models)
    unknown = [m for m in models if m not in VARIANTS[data]]
    if not models or unknown:
        raise ValueError(f"{_OWNER}: models must be some of {', '.join(VARIANTS[data])} for data {data!r}, got "
                         f"{list(models)}")
    seeds = (QUICK_SEEDS if quick else SEEDS) if seeds is None else seeds
    steps = (QUICK_STEPS if quick else STEPS) if steps is None else steps
    for name, value in (("seeds", seeds), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{_OWNER}: {name} must be an int >= 1, got {value!r}")
    plan = dict(QUICK if quick else {"weight_methods": tuple(WEIGHT_METHODS), "weight_levels": WEIGHT_LEVELS,
                                     "neuron_methods": tuple(NEURON_METHODS), "neuron_levels": NEURON_LEVELS,
                                     "bits": BITS})
    given = {"weight_methods": weight_methods, "weight_levels": weight_levels, "neuron_methods": neuron_methods,
             "neuron_levels": neuron_levels, "bits": bits}
    plan.update({name: tuple(value) for name, value in given.items() if value is not None})
    for name, known in (("weight_methods", WEIGHT_METHODS), ("neuron_methods", NEURON_METHODS)):
        unknown = [m for m in plan[name] if m not in known]
        if unknown:
            raise ValueError(f"{_OWNER}: unknown {name} {unknown}; they are {', '.join(known)}")
    for level in plan["weight_levels"]:
        check_real(_OWNER, "a weight level (fraction of weights removed)", level, "(0, 1)")
    for level in plan["neuron_levels"]:
        if level not in NEURON_LEVELS + QUICK["neuron_levels"]:
            raise ValueError(f"{_OWNER}: neuron levels are some of {NEURON_LEVELS} (the analysis recognizes the "
                             f"smaller architectures by them), got {level!r}")
    for value in plan["bits"]:
        quantize.check_bits(_OWNER, "bits", value)
    batches = QUICK_CALIBRATION_BATCHES if quick else CALIBRATION_BATCHES
    population = []
    for model in models:
        options = VARIANTS[data][model]
        for seed in range(seeds):
            dense = RunSpec(data=data, data_options={"validation": VALIDATION}, model=model, model_options=options,
                            steps=steps, lr=LR, seed=seed, device=device, threads=threads)
            population.append(dense)
            for label in plan["weight_methods"]:
                for level in plan["weight_levels"]:
                    pruned = dense.replace(parent=dense, transform=PRUNE, steps=0, transform_options={
                        "method": WEIGHT_METHODS[label], "sparsity": level, "batches": batches})
                    population += [pruned,
                                   pruned.replace(parent=pruned, transform=None, transform_options={},
                                                  steps=steps, lr=FINE_TUNE_LR),
                                   pruned.replace(parent=pruned, transform=SCRATCH, transform_options={}, steps=steps)]
            for level in plan["neuron_levels"]:
                small = smaller_options(model, options, level)
                population.append(dense.replace(model_options=small))  # the smaller architecture from scratch
                for label in plan["neuron_methods"]:
                    method = NEURON_METHODS[label]
                    if method == "merge":
                        transform, transform_options = MERGE, {"fraction": level}
                    else:
                        transform = NEURONS
                        transform_options = {"method": method, "fraction": level,
                                             "batches": HELD_OUT_BATCHES if method == "damage" else batches}
                    shrunk = dense.replace(model_options=small, parent=dense, transform=transform, steps=0,
                                           transform_options=transform_options)
                    population += [shrunk, shrunk.replace(parent=shrunk, transform=None, transform_options={},
                                                          steps=steps, lr=FINE_TUNE_LR)]
            population += [dense.replace(parent=dense, transform=QUANTIZE, transform_options={"bits": bits}, steps=0)
                           for bits in plan["bits"]]
    return population


# -- reading the records -----------------------------------------------------------------------

def _weight_label(method: str) -> str:
    return next(label for label, name in WEIGHT_METHODS.items() if name == method)


def _neuron_label(spec: RunSpec) -> str:
    if spec.transform == MERGE:
        return "merging"
    return next(label for label, name in NEURON_METHODS.items() if name == spec.transform_options["method"])


def classify(spec: RunSpec) -> dict | None:
    """What a run of the population is: {"kind": "dense" / "weight" / "neuron" / "quantized",
    "model", "seed", and "method", "level", "protocol" ("pruned", "fine-tuned", "scratch") or
    "bits"}; None for a run this experiment does not make."""
    base = {"model": spec.model, "seed": spec.seed}
    own = spec.parent if spec.transform is None and spec.parent is not None else spec
    if spec.transform == QUANTIZE:
        return {**base, "kind": "quantized", "bits": spec.transform_options["bits"]}
    if own.transform == PRUNE:
        protocol = "pruned" if spec is own else "fine-tuned"
        return {**base, "kind": "weight", "method": _weight_label(own.transform_options["method"]),
                "level": own.transform_options["sparsity"], "protocol": protocol}
    if spec.transform == SCRATCH and spec.parent is not None and spec.parent.transform == PRUNE:
        return {**base, "kind": "weight", "method": _weight_label(spec.parent.transform_options["method"]),
                "level": spec.parent.transform_options["sparsity"], "protocol": "scratch"}
    if own.transform in (NEURONS, MERGE):
        return {**base, "kind": "neuron", "method": _neuron_label(own), "level": own.transform_options["fraction"],
                "protocol": "pruned" if spec is own else "fine-tuned"}
    if spec.parent is None and spec.transform is None:
        variant = next((v for v in VARIANTS.values() if spec.model in v), {})
        options = variant.get(spec.model)
        if spec.model_options == options:
            return {**base, "kind": "dense"}
        for level in NEURON_LEVELS + QUICK["neuron_levels"]:
            if options is not None and spec.model_options == smaller_options(spec.model, options, level):
                return {**base, "kind": "neuron", "method": None, "level": level, "protocol": "scratch"}
    return None


def _table(records) -> dict:
    """{(kind, model, method, level, protocol or bits): {seed: record}}."""
    found: dict = {}
    for record in records:
        info = classify(record.spec)
        if info is None:
            continue
        key = (info["kind"], info["model"], info.get("method"), info.get("level"), info.get("protocol",
                                                                                         info.get("bits")))
        found.setdefault(key, {})[info["seed"]] = record
    return found


def _accuracies(group: dict) -> list[float]:
    return [group[seed].metrics["accuracy"] for seed in sorted(group)]


def _summary(group: dict | None, metric: str = "accuracy", scale: float = 100.0) -> str:
    if not group:
        return "-"
    mean, std = reports.mean_std([group[s].metrics[metric] for s in sorted(group)])
    return f"{scale * mean:.2f} ± {scale * std:.2f}"


def _mean(group: dict, metric: str) -> float:
    return statistics.fmean(group[s].metrics[metric] for s in sorted(group))


def _paired(a: dict, b: dict) -> list[float]:
    return [a[s].metrics["accuracy"] - b[s].metrics["accuracy"] for s in sorted(set(a) & set(b))]


# -- the analysis ------------------------------------------------------------------------------

def claims(table: dict, models: Sequence[str], weight_methods: Sequence[str], weight_levels: Sequence[float],
           neuron_levels: Sequence[float]) -> list[reports.Claim]:
    found = []
    options = dict(scale=100, unit="%")
    top = max(weight_levels)
    for model in models:
        for protocol in ("pruned", "fine-tuned"):
            ours = table.get(("weight", model, "OBD-SD", top, protocol))
            for other in weight_methods:
                theirs = table.get(("weight", model, other, top, protocol))
                if other == "OBD-SD" or not ours or not theirs:
                    continue
                found.append(reports.claim_greater(
                    f"{model}: OBD-SD is more accurate than {other} at {top:.0%} of the weights removed ({protocol})",
                    _accuracies(ours), _accuracies(theirs), a_name="OBD-SD", b_name=other, **options))
        found += _gap_claim(
            f"{model}: at weight level, fine-tuning beats training the same mask from a new initialization "
            "(paired differences fine-tuned - scratch over every method, level and seed)",
            [(table.get(("weight", model, method, level, "fine-tuned")),
              table.get(("weight", model, method, level, "scratch")))
             for method in weight_methods for level in weight_levels], 0.0, "fine-tuned - scratch", **options)
        found += _gap_claim(
            f"{model}: at neuron level, training the smaller architecture from scratch is much better than "
            f"fine-tuning the shrunk network (paired differences scratch - fine-tuned over every method, level "
            f"and seed above {100 * MUCH:.0f} points)",
            [(table.get(("neuron", model, None, level, "scratch")),
              table.get(("neuron", model, method, level, "fine-tuned")))
             for level in neuron_levels for method in NEURON_METHODS], MUCH, "scratch - fine-tuned", **options)
    return found


def _gap_claim(claim: str, pairs, bound: float, name: str, **options) -> list[reports.Claim]:
    """[the claim that the paired differences a - b, over the seeds of every (a, b) of groups
    in `pairs` where both were run, exceed `bound`], or [] without any such pair."""
    gaps = [gap for a, b in pairs if a and b for gap in _paired(a, b)]
    return [reports.claim_above(claim, gaps, bound, name=name, **options)] if gaps else []


def fisher_timing(model: nn.Module, dataset: data_sets.Dataset, *, examples: int = 1000, batch_size: int = 64,
                  repeats: int = 3) -> dict:
    """Seconds of the empirical Fisher (`saliency.fisher_diagonal`, every weight) over `examples`
    training examples against one training epoch's forward and backward passes (batch
    `batch_size`, no optimizer step), one thread, the best of `repeats` each."""
    inputs, labels = dataset.train
    work = copy.deepcopy(model)
    loss = nn.CrossEntropyLoss()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def epoch():
            start = time.perf_counter()
            for i in range(0, len(labels) - batch_size + 1, batch_size):
                work.zero_grad(set_to_none=True)
                loss(work(inputs[i:i + batch_size]), labels[i:i + batch_size]).backward()
            return time.perf_counter() - start

        def fisher():
            start = time.perf_counter()
            saliency.fisher_diagonal(work, [(inputs[:examples], labels[:examples])])
            return time.perf_counter() - start

        epoch_s = min(epoch() for _ in range(repeats))
        fisher_s = min(fisher() for _ in range(repeats))
    finally:
        torch.set_num_threads(before)
    return {"examples": min(examples, len(labels)), "fisher_s": fisher_s, "epoch_s": epoch_s,
            "epoch_examples": len(labels) // batch_size * batch_size, "ratio": fisher_s / epoch_s}


PROTOCOL_STYLES = {"pruned": ":", "fine-tuned": "-", "scratch": "--"}


def _points(groups, x=None) -> list[tuple[float, float, float]]:
    """(x, mean, std of the accuracy in %) of every non-empty group of the (x, group) pairs;
    with `x` a function, groups alone and x(group)."""
    found = []
    for item in groups:
        at, group = (None, item) if x is not None else item
        if group:
            mean, std = reports.mean_std(_accuracies(group))
            found.append((x(group) if x is not None else at, 100 * mean, 100 * std))
    return sorted(found)


def _figure(series: dict, *, xlabel: str, title: str, dense: float | None, log_x: bool = False):
    """Lines with error bars: label -> (points, color (a tab10 index or a name), line style); the
    legend outside."""
    plt = reports._pyplot()
    figure, axes = plt.subplots(figsize=(8.5, 4.5))
    colors = plt.get_cmap("tab10")
    if dense is not None:
        axes.axhline(dense, color="black", linewidth=1, label=f"dense ({dense:.1f})")
    for label, (points, color, style) in series.items():
        axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                      markersize=4, capsize=3, color=colors(color % 10) if isinstance(color, int) else color,
                      linestyle=style, label=label)
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    figure.tight_layout()
    return figure


def _plot_levels(table, model, kind, methods, levels, protocols, dense, xlabel):
    series = {}
    for color, method in enumerate(methods):
        for protocol in protocols:
            points = _points([(100 * level, table.get((kind, model, method, level, protocol))) for level in levels])
            if points:
                series[f"{method} {protocol}"] = (points, color, PROTOCOL_STYLES[protocol])
    if kind == "neuron":
        points = _points([(100 * level, table.get(("neuron", model, None, level, "scratch"))) for level in levels])
        if points:
            series["smaller architecture, scratch"] = (points, len(methods), PROTOCOL_STYLES["scratch"])
    return _figure(series, xlabel=xlabel, title=f"{model}: accuracy against compression ({kind} level)", dense=dense)


def _plot_bits(table, model, weight_methods, weight_levels, neuron_methods, neuron_levels, bits, dense):
    def size(group):
        return _mean(group, "model_bits") / 1e3

    series = {}
    for color, method in enumerate(weight_methods):
        points = _points([table.get(("weight", model, method, level, "fine-tuned")) for level in weight_levels], size)
        if points:
            series[f"{method}, weights, fine-tuned"] = (points, color, "-")
    for color, method in enumerate(neuron_methods, len(weight_methods)):
        points = _points([table.get(("neuron", model, method, level, "fine-tuned")) for level in neuron_levels], size)
        if points:
            series[f"{method}, neurons, fine-tuned"] = (points, color, "-.")
    points = _points([table.get(("neuron", model, None, level, "scratch")) for level in neuron_levels], size)
    if points:
        series["smaller architecture, scratch"] = (points, len(weight_methods) + len(neuron_methods), "--")
    points = _points([table.get(("quantized", model, None, None, b)) for b in bits], size)
    if points:
        series["quantized, 8..2 bits"] = (points, "black", ":")
    return _figure(series, xlabel="model size (kbit, log scale)", title=f"{model}: accuracy against model size",
                   dense=100 * _mean(dense, "accuracy") if dense else None, log_x=True)


def analyze(records, store: Store, quick: bool) -> reports.Report:
    table = _table(records)
    first = records[0].spec
    models = list(dict.fromkeys(key[1] for key in table))
    weight_methods = [m for m in WEIGHT_METHODS if any(k[0] == "weight" and k[2] == m for k in table)]
    weight_levels = sorted({k[3] for k in table if k[0] == "weight"})
    neuron_methods = [m for m in NEURON_METHODS if any(k[0] == "neuron" and k[2] == m for k in table)]
    neuron_levels = sorted({k[3] for k in table if k[0] == "neuron"})
    bits = sorted({k[4] for k in table if k[0] == "quantized"}, reverse=True)
    dense_runs = {model: table.get(("dense", model, None, None, None), {}) for model in models}
    seeds = max(len(group) for group in dense_runs.values())
    steps = next(iter(next(iter(dense_runs.values())).values())).spec.steps
    report = reports.Report(f"Magnificent Minified Models: {', '.join(models)} on {first.data}")
    report.text(
        f"{len(records)} runs, {seeds} seed(s) per model. Dense training {steps} SGD steps (batch {first.batch_size}, "
        f"lr {LR}, cosine; 10% of the training set held out); fine-tuning {steps} steps at lr {FINE_TUNE_LR}; "
        f"training from scratch {steps} steps at lr {LR} (the same budget). Weight level: global selection over the "
        "pruned layers (the first convolution and the classifier stay dense), OBD / OBD-SD saliencies from the "
        "empirical Fisher on calibration batches. Neuron level: the units of every hidden layer, the network "
        "physically shrunk. Quantization: symmetric per-channel weights, not retrained. Model size: see "
        "`dynasparse.nn.quantize` (sparse weights as the cheaper of positions and a bitmask)."
        + (" A quick run: too few steps and seeds to decide the claims." if quick else ""))
    for model in models:
        dense = dense_runs[model]
        dense_bits = _mean(dense, "model_bits") if dense else math.nan
        rows = []
        for method in weight_methods:
            for level in weight_levels:
                groups = {p: table.get(("weight", model, method, level, p)) for p in ("pruned", "fine-tuned", "scratch")}
                fine = groups["fine-tuned"] or groups["pruned"]
                rows.append({"method": method, "weights removed": f"{level:.0%}",
                             "pruned %": _summary(groups["pruned"]), "fine-tuned %": _summary(groups["fine-tuned"]),
                             "scratch %": _summary(groups["scratch"]),
                             "kbit": f"{_mean(fine, 'model_bits') / 1e3:.1f}" if fine else "-",
                             "compression": f"{dense_bits / _mean(fine, 'model_bits'):.1f}x" if fine else "-"})
        report.text(f"## {model}\n\nDense: {_summary(dense)} % ({dense_bits / 1e3:.1f} kbit).\n\nWeight level:")
        report.table(f"{model}-weights", rows)
        rows = []
        for level in neuron_levels:
            scratch = table.get(("neuron", model, None, level, "scratch"))
            for method in neuron_methods:
                pruned = table.get(("neuron", model, method, level, "pruned"))
                fine = table.get(("neuron", model, method, level, "fine-tuned"))
                rows.append({"method": method, "units removed": f"{level:.0%}", "shrunk %": _summary(pruned),
                             "fine-tuned %": _summary(fine), "scratch %": _summary(scratch),
                             "parameters": int(_mean(pruned, "parameters")) if pruned else "-",
                             "compression": f"{dense_bits / _mean(pruned, 'model_bits'):.1f}x" if pruned else "-"})
        report.text("Neuron level (the scratch column: the same smaller architecture, whatever the method):")
        report.table(f"{model}-neurons", rows)
        rows = []
        for b in bits:
            group = table.get(("quantized", model, None, None, b))
            if not group:
                continue
            size = _mean(group, "model_bits")
            # the most accurate fine-tuned pruned model that is not larger (equal storage)
            best = None
            for method in weight_methods:
                for level in weight_levels:
                    fine = table.get(("weight", model, method, level, "fine-tuned"))
                    if fine and _mean(fine, "model_bits") <= size:
                        accuracy = _mean(fine, "accuracy")
                        if best is None or accuracy > best[0]:
                            best = (accuracy, method, level, _mean(fine, "model_bits"))
            rows.append({"bits": b, "quantized %": _summary(group), "kbit": f"{size / 1e3:.1f}",
                         "compression": f"{dense_bits / size:.1f}x",
                         "best pruned + fine-tuned at <= size": "-" if best is None else
                         f"{100 * best[0]:.2f} % ({best[1]} {best[2]:.0%}, {best[3] / 1e3:.1f} kbit)"})
        report.text("Quantization against pruning at equal storage:")
        report.table(f"{model}-quantization", rows)
        report.figure(f"{model}-weights", _plot_levels(table, model, "weight", weight_methods, weight_levels,
                                                       ("pruned", "fine-tuned", "scratch"),
                                                       100 * _mean(dense, "accuracy") if dense else None,
                                                       "weights removed (% of the pruned layers)"),
                      f"{model}: accuracy against the fraction of weights removed (mean ± std over seeds)")
        report.figure(f"{model}-neurons", _plot_levels(table, model, "neuron", neuron_methods, neuron_levels,
                                                       ("pruned", "fine-tuned"),
                                                       100 * _mean(dense, "accuracy") if dense else None,
                                                       "units removed (% of every hidden layer)"),
                      f"{model}: accuracy against the fraction of units removed")
        report.figure(f"{model}-bits", _plot_bits(table, model, weight_methods, weight_levels, neuron_methods,
                                                  neuron_levels, bits, dense),
                      f"{model}: accuracy against model size in bits, pruning and quantization")
    for claim in claims(table, models, weight_methods, weight_levels, neuron_levels):
        report.claim(claim)
    timing = None
    cnn = next((m for m in models if m != "mlp"), None)
    if cnn is not None and dense_runs[cnn]:
        seed = min(dense_runs[cnn])
        dataset = data_sets.load(first.data, **first.data_options)
        timing = fisher_timing(store.load_model(dense_runs[cnn][seed].run_id), dataset)
        report.text(f"Empirical Fisher of every weight of the trained {cnn} over {timing['examples']} examples: "
                    f"{timing['fisher_s']:.3f} s, against {timing['epoch_s']:.3f} s for one training epoch's forward "
                    f"and backward passes ({timing['epoch_examples']} examples, batch 64): ratio "
                    f"{timing['ratio']:.2f} (target: under 5). One thread, best of 3, measured while the report was "
                    "written (other work on the machine included).")
    report.numbers.update(fisher_timing=timing, runs=[
        {"run_id": r.run_id, **(classify(r.spec) or {}),
         **{k: r.metrics.get(k) for k in ("accuracy", "loss", "sparsity", "parameters", "nonzero_parameters",
                                          "model_bits", "seconds")}} for r in records])
    return report


def digits_specs(quick: bool = False) -> list[RunSpec]:
    """`specs` on the 8 x 8 digits: the MLP and the digits CNN (the experiment minified-digits)."""
    return specs(quick, data="digits")


register(Experiment("minified", "Harang & Sanders 2023 (Magnificent Minified Models): weight (random, magnitude, OBD, "
                    "OBD-SD) and neuron (random, L2, OBD, damage, merging) pruning, fine-tuned against from scratch, "
                    "and quantization at equal size, on MNIST-1D", specs, analyze, hooks=hooks))
register(Experiment("minified-digits", "Magnificent Minified Models on the 8 x 8 digits (the MLP and the digits CNN)",
                    digits_specs, analyze, hooks=hooks))
