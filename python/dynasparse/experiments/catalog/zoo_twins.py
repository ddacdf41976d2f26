"""Sparsified Model Zoo Twins (Honegger, Schürholt & Borth 2023): `dynasparse reproduce zoo-twins`.

Two model zoos, each model then sparsified into twins (child runs whose parent is the zoo
model, trained once and reused by every twin), on MNIST-1D (`zoo-twins`) or on the 8 x 8 digits
(`zoo-twins-digits`, `dynasparse reproduce zoo-twins --data digits`):

- the seed zoo: the same small CNN trained from `seeds` seeds (100; 20 with --quick), SGD
  (lr 0.05, momentum 0.9, weight decay 1e-4, cosine) for `zoo_epochs` epochs of batch 50;
- the hyperparameter zoo: a grid over activation (relu, tanh, gelu), initialization (kaiming
  uniform, xavier normal), optimizer with learning rate (SGD 0.05 / 0.01, AdamW 3e-3 / 1e-3),
  weight decay (0, 1e-3) and dropout (0, or 0.2 after every activation: our level for a network
  of 12 channels): 96 models (6 of them, spread over the grid so that every level of every factor
  is in, with --quick).

The CNNs: on MNIST-1D `models.cnn1d` with channels [12, 12, 12], kernels [5, 5, 3], strides
[1, 2, 2] and a linear classifier, 2,458 parameters (the paper's 2-D zoo CNN has 2,464 on
28 x 28 MNIST; models.zoo_cnn takes images, MNIST-1D is a signal); on the digits the paper's zoo
CNN itself (`models.zoo_cnn`: conv 5x5 (8), conv 5x5 (6), conv 2x2 (4), fc 20, fc 10, its
convolutions padded by 2 for 8 x 8 images), 3,744 parameters.

Twins of every zoo model, all weight layers pruned (biases excluded), each sparsification
phase with AdamW (lr 1e-3, no weight decay, constant lr, batch 50) from the trained model:
- VD: sparse variational dropout ("vd", dynasparse.pruning.variational_dropout) for
  `vd_epochs` epochs (25; 4 with --quick), beta ramped 0 -> 0.01 over 25 epochs (also when the
  run is shorter, so that its early epochs compare with the paper's), the threshold mask
  (log_alpha < 3) refreshed 5 times an epoch on MNIST-1D, twice on the digits (at every epoch's
  end among them); sparsity and accuracy recorded every epoch;
- MP: one global magnitude threshold ("oneshot") at 10, 20, ..., 90% without fine-tuning
  (steps=0) and with `finetune_epochs` (2; 1 with --quick) of masked fine-tuning;
- MP at VD's sparsity: the original pruned by global magnitude at exactly the final sparsity of
  its VD twin, without and with the same fine-tuning: runs of the population like the others,
  which the analysis adds once the VD twins are stored (their sparsity is VD's outcome), and
  a later reproduction reuses; at VD's earlier epochs, the same pruning without fine-tuning
  evaluated in the analysis.

Analyses: accuracy against sparsity per method (mean and std over the population), layer-wise
sparsity distributions per method, agreement (fraction of test inputs where twin and
original predict the same class), Pearson and Spearman correlation of original vs twin
accuracy, VD against MP at VD's own sparsity (paired per model), and the crossover sparsity
where VD starts to beat MP with a bootstrap interval over the models of the population.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ... import pruning
from ...nn import backend_default
from ...pruning import variational_dropout  # noqa: F401  registers "vd"
from .. import analysis, data, reports, transforms
from ..registry import Experiment, register
from ..runner import run_population
from ..spec import RunSpec
from ..trainer import Hook

NAME = "zoo-twins"
BATCH = 50


@dataclasses.dataclass(frozen=True)
class ZooSetup:
    """A zoo's data set and network: `epoch` is the steps of one pass over the training set in
    batches of BATCH (the last partial batch dropped), `update_every` VD's mask refresh, which
    divides it (the mask is fresh at every epoch's evaluation)."""

    data: str
    model: str
    architecture: dict
    parameters: int
    epoch: int
    update_every: int
    description: str


ZOOS = {"mnist1d": ZooSetup("mnist1d", "cnn1d", {"channels": [12, 12, 12], "kernels": [5, 5, 3], "strides": [1, 2, 2]},
                       2458, 80, 16, "MNIST-1D, `cnn1d` channels [12, 12, 12], kernels [5, 5, 3], strides [1, 2, 2]"),
        "digits": ZooSetup("digits", "zoo-cnn", {"padding": 2}, 3744, 28, 14,
                      "the 8 x 8 digits, the paper's `zoo-cnn` (8, 6, 4 channels, fc 20) padded by 2")}
DATA = "mnist1d"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAGNITUDE = "global-magnitude"  # the transform of the MP twins
ALL_LAYERS = {"exclude": []}  # every weight layer, the first convolution and the classifier included
# beta's ramp spans the paper's 25 epochs also when a run stops earlier (--quick), so that the
# trajectory's early epochs are comparable with the paper's.
VD_RAMP_EPOCHS = 25
SPARSIFY = {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant", "optimizer_options": {"weight_decay": 0.0}}
SEED_ZOO = {"optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "activation": "relu", "init": None}
GRID = {"activation": ("relu", "tanh", "gelu"), "init": ("kaiming_uniform", "xavier_normal"),
        "optimizer": (("sgd", 0.05), ("sgd", 0.01), ("adamw", 3e-3), ("adamw", 1e-3)), "weight_decay": (0.0, 1e-3),
        "dropout": (0.0, 0.2)}
# The quick hyperparameter zoo takes every QUICK_STRIDE-th setting of the grid (cyclically):
# coprime with its 96 settings, 13 puts every level of every factor among the first 6.
QUICK_STRIDE = 13
HYPER_SEED = 1000  # the hyperparameter zoo's seeds: HYPER_SEED + its index in the grid
# The paper's VD sparsity on its MNIST zoo after 2, 4 and 25 epochs.
PAPER_TRAJECTORY = {2: 0.26, 4: 0.5, 25: 0.78}
TRAJECTORY_MARGIN = 0.1
PAPER_CROSSOVER = 0.8
STRONG_CORRELATION = 0.7
BOOTSTRAP = 1000
BINS = tuple(i / 20 for i in range(21))


@dataclasses.dataclass(frozen=True)
class Size:
    seeds: int
    hyper: int | None  # None: the whole grid
    zoo_epochs: int
    vd_epochs: int
    finetune_epochs: int
    ratios: tuple[float, ...] = RATIOS


FULL = Size(seeds=100, hyper=None, zoo_epochs=20, vd_epochs=25, finetune_epochs=2)
QUICK = Size(seeds=20, hyper=6, zoo_epochs=10, vd_epochs=4, finetune_epochs=1)


def grid() -> list[dict]:
    """The hyperparameter zoo's settings, in a fixed order."""
    return [{"activation": a, "init": i, "optimizer": o, "lr": lr, "weight_decay": wd, "dropout": p}
            for a, i, (o, lr), wd, p in itertools.product(GRID["activation"], GRID["init"], GRID["optimizer"],
                                                          GRID["weight_decay"], GRID["dropout"])]


def _zoo_spec(setup: ZooSetup, settings: dict, seed: int, epochs: int) -> RunSpec:
    model_options = dict(setup.architecture, activation=settings["activation"])
    if settings["init"] is not None:
        model_options["init"] = settings["init"]
    if settings.get("dropout"):  # absent at 0: the model and its run id are those without the option
        model_options["dropout"] = settings["dropout"]
    optimizer_options = {} if "weight_decay" not in settings else {"weight_decay": settings["weight_decay"]}
    return RunSpec(data=setup.data, model=setup.model, model_options=model_options, optimizer=settings["optimizer"],
                   optimizer_options=optimizer_options, lr=settings["lr"], schedule=settings.get("schedule", "cosine"),
                   steps=epochs * setup.epoch, batch_size=BATCH, seed=seed)


def _setup_of(data_name: str) -> ZooSetup:
    if data_name not in ZOOS:
        raise ValueError(f"{NAME}: data must be one of {', '.join(ZOOS)}, got {data_name!r}")
    return ZOOS[data_name]


def zoo(size: Size, data_name: str = DATA) -> dict[str, list[RunSpec]]:
    """{"seed": the seed zoo, "hyper": the hyperparameter zoo} on data set `data_name`."""
    setup = _setup_of(data_name)
    indexed = list(enumerate(grid()))
    if size.hyper is not None:
        indexed = [indexed[(QUICK_STRIDE * i) % len(indexed)] for i in range(min(size.hyper, len(indexed)))]
    return {"seed": [_zoo_spec(setup, SEED_ZOO, seed, size.zoo_epochs) for seed in range(size.seeds)],
            "hyper": [_zoo_spec(setup, settings, HYPER_SEED + i, size.zoo_epochs) for i, settings in indexed]}


def _base(parent: RunSpec) -> dict:
    """What every twin of `parent` shares: its data and model, the sparsification phase's
    optimizer, the parent's seed."""
    return dict(data=parent.data, data_options=parent.data_options, model=parent.model,
                model_options=parent.model_options, batch_size=BATCH, seed=parent.seed, parent=parent, **SPARSIFY)


def magnitude_twins(parent: RunSpec, sparsity: float, size: Size) -> tuple[RunSpec, RunSpec]:
    """`parent` pruned by global magnitude at `sparsity`: (without fine-tuning, with it)."""
    epoch = _setup_of(parent.data).epoch
    pruned = RunSpec(**_base(parent), transform=MAGNITUDE, transform_options={"sparsity": sparsity}, steps=0)
    return pruned, pruned.replace(steps=size.finetune_epochs * epoch)


def twins(parent: RunSpec, size: Size) -> dict[str, list[RunSpec]]:
    """The twins of one zoo model known before any is trained: {"vd": [1 run], "mp": [per
    ratio], "mp-ft": [per ratio]} (MP at VD's sparsity: `matched_twins`)."""
    setup = _setup_of(parent.data)
    vd = RunSpec(**_base(parent), method="vd", method_options=dict(
        ALL_LAYERS, update_every=setup.update_every, ramp_steps=VD_RAMP_EPOCHS * setup.epoch),
        steps=size.vd_epochs * setup.epoch, eval_every=setup.epoch)
    mp = [magnitude_twins(parent, ratio, size) for ratio in size.ratios]
    return {"vd": [vd], "mp": [pruned for pruned, _ in mp], "mp-ft": [tuned for _, tuned in mp]}


def matched_twins(records, size: Size) -> list[RunSpec]:
    """MP at VD's sparsity: for every stored VD twin, its parent pruned by global magnitude at
    exactly the VD twin's final sparsity, without and with fine-tuning."""
    return [spec for record in records if record.spec.method == "vd" and record.complete
            for spec in magnitude_twins(record.spec.parent, float(record.metrics["sparsity"]), size)]


def specs(quick: bool = False, size: Size | None = None, data_name: str = DATA) -> list[RunSpec]:
    """The zoos and their twins known before training (`size`: FULL, QUICK with quick=True,
    or another Size; `data_name`: a data set of ZOOS); `analyze` adds MP at VD's sparsity."""
    size = size if size is not None else QUICK if quick else FULL
    population = []
    for models in zoo(size, data_name).values():
        for parent in models:
            population.append(parent)
            for runs in twins(parent, size).values():
                population += runs
    return population


def digits_specs(quick: bool = False) -> list[RunSpec]:
    """`specs` on the 8 x 8 digits (the experiment zoo-twins-digits)."""
    return specs(quick, data_name="digits")


class RecordTrajectory(Hook):
    """Stores a VD run's [step, sparsity] at every mask update as metrics["vd_trajectory"]."""

    def on_end(self, state) -> None:
        trajectory = getattr(state.pruner, "trajectory", None)
        if trajectory is not None:
            state.metrics["vd_trajectory"] = [list(point) for point in trajectory]


def hooks(spec: RunSpec) -> list[Hook]:
    return [RecordTrajectory()] if spec.method == "vd" else []


# -- the analyses (plain functions of numbers, tested on hand-made populations) -------------------

def vd_points(metrics: Mapping, epoch: int) -> list[dict]:
    """A VD run's (epoch, sparsity, accuracy) at every epoch end: the curve's evaluations
    paired with the trajectory's sparsity at the same step, and the final metrics."""
    sparsity_at = {int(step): float(value) for step, value in metrics["vd_trajectory"]}
    points = [{"epoch": point["step"] // epoch, "sparsity": sparsity_at[point["step"]], "accuracy": point["accuracy"]}
              for point in metrics.get("curve", []) if point["step"] % epoch == 0 and point["step"] in sparsity_at]
    points.append({"epoch": metrics["steps"] // epoch, "sparsity": float(metrics["sparsity"]),
                   "accuracy": float(metrics["accuracy"])})
    return points


def differences(vd: Sequence[tuple[float, float]], mp: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(sparsity, VD accuracy - MP accuracy) at each VD point inside the MP curve's sparsity
    range, MP interpolated linearly between its points (sparsity, accuracy)."""
    mp = sorted(mp)
    xs, ys = [p[0] for p in mp], [p[1] for p in mp]
    return [(s, a - float(np.interp(s, xs, ys))) for s, a in vd if xs[0] <= s <= xs[-1]]


def _binned(per_model: Sequence[Sequence[tuple[float, float]]], edges: np.ndarray) -> list[list[list[float]]]:
    """Per model, per sparsity bin of `edges`, the differences d of its points (s, d) in that
    bin (the last bin closed)."""
    bins = list(zip(edges[:-1], edges[1:]))
    models = [list(model) for model in per_model]
    return [[[d for s, d in model if low <= s < high or (high == edges[-1] and s == high)] for low, high in bins]
            for model in models]


def _binned_crossover(models: Sequence[Sequence[list[float]]], edges: np.ndarray) -> dict:
    """`crossover` of models already binned by `_binned` (a bootstrap bins each model once:
    fmean is an exactly rounded sum over the pooled differences, whatever their order, so the
    result is that of binning the pooled points)."""
    curve = []
    for b, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        inside = [d for model in models for d in model[b]]
        if inside:
            curve.append(((low + high) / 2, statistics.fmean(inside), len(inside)))
    if not curve:
        return {"kind": "no-data", "crossover": None, "curve": []}
    if curve[0][1] >= 0:
        return {"kind": "vd-ahead", "crossover": None, "curve": curve}
    for (c0, d0, _), (c1, d1, _) in zip(curve[:-1], curve[1:]):
        if d0 < 0 <= d1:
            return {"kind": "crossing", "crossover": c0 + (c1 - c0) * (-d0) / (d1 - d0), "curve": curve}
    return {"kind": "mp-ahead", "crossover": None, "curve": curve}


def crossover(per_model: Sequence[Sequence[tuple[float, float]]], bins: Sequence[float] = BINS) -> dict:
    """Where VD starts to beat MP: per sparsity bin the mean of the (sparsity, VD - MP)
    differences pooled over the models; the crossover is the first up-crossing of zero of the
    binned means (linear between bin centers). kind: "crossing", "vd-ahead" (VD >= MP in the
    first bin with data: no crossover above it), "mp-ahead" (VD < MP in every bin)."""
    edges = np.asarray(bins, dtype=float)
    return _binned_crossover(_binned(per_model, edges), edges)


def bootstrap_crossover(per_model: Sequence[Sequence[tuple[float, float]]], *, samples: int = BOOTSTRAP,
                        seed: int = 0, bins: Sequence[float] = BINS) -> dict:
    """The crossover of the population and its bootstrap over the models (resampled with
    replacement): the 2.5 and 97.5 percentiles of the crossovers of the samples that have one,
    and the fraction of samples of each kind."""
    edges = np.asarray(bins, dtype=float)
    binned = _binned(per_model, edges)
    estimate = _binned_crossover(binned, edges)
    rng = np.random.default_rng(seed)
    found, kinds = [], {"crossing": 0, "vd-ahead": 0, "mp-ahead": 0, "no-data": 0}
    n = len(per_model)
    for _ in range(samples if n else 0):
        result = _binned_crossover([binned[i] for i in rng.integers(0, n, n)], edges)
        kinds[result["kind"]] += 1
        if result["crossover"] is not None:
            found.append(result["crossover"])
    low, high = (float(np.percentile(found, 2.5)), float(np.percentile(found, 97.5))) if found else (None, None)
    return {"estimate": estimate["crossover"], "kind": estimate["kind"], "curve": estimate["curve"], "low": low,
            "high": high, "samples": samples, "fractions": {k: v / samples for k, v in kinds.items()} if n else {},
            "models": n}


def crossover_verdict(result: dict, reference: float = PAPER_CROSSOVER, margin: float = 0.1) -> str:
    """Holds when the estimate is within `margin` of the reference and the bootstrap interval
    inside (reference - 2 margin, reference + 2 margin); does not hold when the interval misses
    [reference - margin, reference + margin] or 95% of the samples have no crossover;
    inconclusive otherwise."""
    crossing = result.get("fractions", {}).get("crossing", 0.0)
    if result["estimate"] is None or result["low"] is None:
        return reports.FAILS if crossing <= 0.05 else reports.INCONCLUSIVE
    if crossing <= 0.05 or result["high"] < reference - margin or result["low"] > reference + margin:
        return reports.FAILS
    if (abs(result["estimate"] - reference) <= margin and result["low"] > reference - 2 * margin
            and result["high"] < reference + 2 * margin):
        return reports.HOLDS
    return reports.INCONCLUSIVE


def pearson_interval(r: float, n: int) -> tuple[float, float]:
    """95% interval of a Pearson correlation (Fisher's z)."""
    if n < 4 or not math.isfinite(r) or abs(r) >= 1:
        return (r, r) if math.isfinite(r) and abs(r) >= 1 else (math.nan, math.nan)
    z, half = math.atanh(r), 1.959964 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def correlation_claim(claim: str, original: Sequence[float], twin: Sequence[float],
                      strong: float = STRONG_CORRELATION) -> reports.Claim:
    """Holds when the 95% interval of Pearson's r lies above `strong`, does not hold when it
    lies below, inconclusive otherwise (also for a constant sample)."""
    found = analysis.correlations(original, twin)
    low, high = pearson_interval(found["pearson"], found["n"])
    if not math.isfinite(low):
        verdict = reports.INCONCLUSIVE
    else:
        verdict = reports.HOLDS if low > strong else reports.FAILS if high < strong else reports.INCONCLUSIVE
    measured = (f"Pearson r = {found['pearson']:.3f} (95% CI {low:.3f} .. {high:.3f}, p = {found['pearson_p']:.2g}), "
                f"Spearman rho = {found['spearman']:.3f} (p = {found['spearman_p']:.2g}), n = {found['n']}; "
                f"strong: r > {strong}")
    return reports.Claim(claim, measured, verdict, found["pearson_p"], {**found, "pearson_low": low,
                                                                      "pearson_high": high, "strong": strong})


# -- from the stored runs to the population -----------------------------------------------------

def magnitude_twin(original: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """A copy of `original` pruned by one global magnitude threshold over all its weight
    layers at `sparsity` (the "oneshot" method's first mask, no fine-tuning)."""
    model = copy.deepcopy(original)
    pruner = pruning.create("oneshot", model, sparsity=min(sparsity, 0.999999), **ALL_LAYERS)
    pruner.initialize()
    pruner.finalize()
    return model


@transforms.register(MAGNITUDE, "the parent pruned by one global magnitude threshold over all its weight layers at "
                     "options['sparsity'] (Model Zoo Twins' MP)")
def global_magnitude(ctx: transforms.TransformContext) -> torch.nn.Module:
    sparsity = ctx.options.get("sparsity")
    if ctx.parent is None or set(ctx.options) != {"sparsity"}:
        raise ValueError(f"{NAME}: transform {MAGNITUDE!r} needs a parent run and exactly the option 'sparsity', got "
                         f"{sorted(ctx.options)}")
    return magnitude_twin(ctx.parent, sparsity)


def collect(records, store, ratios: Sequence[float] = RATIOS) -> list[dict]:
    """One entry per zoo model (a run without a parent): its record, zoo, accuracy, and its
    twins (accuracy, sparsity, layer sparsity, agreement with the original on the test split):
    "vd"; "mp" and "mp-ft" at each of `ratios`; "mp@vd" and "mp-ft@vd", the stored runs at the
    VD twin's final sparsity. The VD twin also holds "mp_matched": MP at the sparsity of each
    of its epochs (computed here, the last one the stored "mp@vd" run). The models run their
    sparse kernels, as in training: with backend "auto" every freshly loaded layer would time
    both ways first, and the outputs would depend on which way the timings chose."""
    with backend_default("sparse"):
        return _collect(records, store, ratios)


def _collect(records, store, ratios: Sequence[float]) -> list[dict]:
    test = None
    population = []
    children: dict[str, list] = {}
    for record in records:
        if record.spec.parent is not None:
            children.setdefault(record.spec.parent.run_id, []).append(record)
    for record in (r for r in records if r.spec.parent is None):
        run_id, kind = record.run_id, "hyper" if record.spec.seed >= HYPER_SEED else "seed"
        if test is None:
            test = data.load(record.spec.data, **record.spec.data_options).test
        inputs, labels = test
        original = store.load_model(run_id)
        original_outputs = analysis.logits(original, inputs)
        entry = {"run_id": run_id, "zoo": kind, "seed": record.spec.seed, "spec": record.spec,
                 "accuracy": record.metrics["accuracy"], "twins": []}
        mine = children.get(run_id, [])
        vd_sparsity = next((float(c.metrics["sparsity"]) for c in mine if c.spec.method == "vd"), None)
        for child in mine:
            outputs = analysis.logits(store.load_model(child.run_id), inputs)
            twin = {"ratio": child.spec.transform_options.get("sparsity"), "sparsity": child.metrics["sparsity"],
                    "accuracy": child.metrics["accuracy"], "layer_sparsity": child.metrics["layer_sparsity"],
                    "agreement": analysis.agreement(outputs, original_outputs)}
            if child.spec.method == "vd":
                twin["points"] = vd_points(child.metrics, _setup_of(child.spec.data).epoch)
                twin["points"][-1]["agreement"] = twin["agreement"]  # the final twin is the stored one
                entry["twins"].append({"method": "vd", **twin})
                continue
            tuned = "-ft" if child.spec.steps else ""
            if twin["ratio"] in ratios:
                entry["twins"].append({"method": "mp" + tuned, **twin})
            if twin["ratio"] == vd_sparsity:  # the same spec as a grid twin when VD lands on a ratio
                entry["twins"].append({"method": f"mp{tuned}@vd", **twin})
        for vd in (t for t in entry["twins"] if t["method"] == "vd"):
            matched = []
            for point in vd["points"][:-1]:
                pruned = magnitude_twin(original, point["sparsity"])
                pruned_outputs = analysis.logits(pruned, inputs)
                matched.append({"sparsity": point["sparsity"], "accuracy": analysis.accuracy(pruned_outputs, labels),
                                "agreement": analysis.agreement(pruned_outputs, original_outputs),
                                "layer_sparsity": analysis.layer_sparsity(analysis.masks(pruned))})
            final = next((t for t in entry["twins"] if t["method"] == "mp@vd"), None)
            if final is not None:
                matched.append({k: final[k] for k in ("sparsity", "accuracy", "agreement", "layer_sparsity")})
            vd["mp_matched"] = [{"epoch": point["epoch"], **m} for point, m in zip(vd["points"], matched)]
        population.append(entry)
    return population


def _twins(population, method: str, ratio: float | None = None, zoo_kind: str | None = None):
    return [(entry, twin) for entry in population if zoo_kind in (None, entry["zoo"]) for twin in entry["twins"]
            if twin["method"] == method and (ratio is None or twin["ratio"] == ratio)]


def accuracy_rows(population) -> list[dict]:
    """Accuracy against sparsity per method: mean and std over the population (MP per ratio,
    VD per epoch, MP at VD's sparsity per VD epoch), with agreement."""
    rows = []
    for method in ("mp", "mp-ft"):
        ratios = sorted({t["ratio"] for _, t in _twins(population, method)})
        for ratio in ratios:
            rows.append(_row(method, f"{ratio:.1f}", [t for _, t in _twins(population, method, ratio)]))
    vd = _twins(population, "vd")
    epochs = sorted({p["epoch"] for _, t in vd for p in t["points"]})
    for label, key in (("vd", "points"), ("mp@vd", "mp_matched")):
        for epoch in epochs:
            rows.append(_row(label, f"epoch {epoch}", [p for _, t in vd for p in t[key] if p["epoch"] == epoch]))
    tuned = [t for _, t in _twins(population, "mp-ft@vd")]
    if tuned:
        rows.append(_row("mp-ft@vd", f"epoch {epochs[-1]}", tuned))
    return rows


def _row(method: str, at: str, twins: Sequence[dict]) -> dict:
    accuracy, accuracy_std = reports.mean_std([t["accuracy"] for t in twins])
    sparsity, sparsity_std = reports.mean_std([t["sparsity"] for t in twins])
    agreements = [t["agreement"] for t in twins if t.get("agreement") is not None]
    return {"method": method, "at": at, "n": len(twins), "sparsity": sparsity, "sparsity_std": sparsity_std,
            "accuracy": accuracy, "accuracy_std": accuracy_std,
            "agreement": statistics.fmean(agreements) if agreements else None}


def layer_rows(population) -> list[dict]:
    """Layer-wise sparsity distributions over the population: VD's final twins, MP at VD's
    final sparsity (the same total sparsity, a global threshold), MP at 50% and 90%."""
    groups = {"vd (final)": [t["layer_sparsity"] for _, t in _twins(population, "vd")],
              "mp@vd (final)": [t["mp_matched"][-1]["layer_sparsity"] for _, t in _twins(population, "vd")],
              "mp 50%": [t["layer_sparsity"] for _, t in _twins(population, "mp", 0.5)],
              "mp 90%": [t["layer_sparsity"] for _, t in _twins(population, "mp", 0.9)]}
    rows = []
    for method, layers in groups.items():
        if layers:
            for layer, stats in analysis.sparsity_distribution(layers).items():
                rows.append({"method": method, "layer": layer, **stats})
    return rows


def vd_differences(population, against: str) -> list[list[tuple[float, float]]]:
    """Per model, (sparsity, VD - MP accuracy) at every VD epoch: against "mp@vd" (MP of the
    original at exactly that sparsity) or "mp" / "mp-ft" (their curves over the ratios and the
    run at VD's final sparsity, with the original at sparsity 0, interpolated)."""
    result = []
    for entry in population:
        vd = [t for t in entry["twins"] if t["method"] == "vd"]
        if not vd:
            continue
        points = vd[0]["points"]
        if against == "mp@vd":
            result.append([(p["sparsity"], p["accuracy"] - m["accuracy"])
                           for p, m in zip(points, vd[0]["mp_matched"])])
            continue
        curve = [(0.0, entry["accuracy"])] + [(t["sparsity"], t["accuracy"]) for t in entry["twins"]
                                              if t["method"] in (against, against + "@vd")]
        result.append(differences([(p["sparsity"], p["accuracy"]) for p in points], curve))
    return result


def matched_differences(population, against: str) -> list[tuple[float, float]]:
    """Per model, (VD's final sparsity, VD twin - MP twin accuracy) with the MP twin `against`
    ("mp@vd" or "mp-ft@vd"): the stored run at exactly that sparsity."""
    found = []
    for entry in population:
        vd = next((t for t in entry["twins"] if t["method"] == "vd"), None)
        mp = next((t for t in entry["twins"] if t["method"] == against), None)
        if vd is not None and mp is not None:
            found.append((vd["sparsity"], vd["accuracy"] - mp["accuracy"]))
    return found


def matched_claim(population, against: str, label: str, reference: float = PAPER_CROSSOVER) -> reports.Claim | None:
    """The paper's ordering at VD's own final sparsity: below `reference` (its crossover) MP
    (`against`, run at each model's exact VD sparsity) beats VD, above it VD beats MP; tested
    on the paired per-model differences (the mean sparsity decides which side applies)."""
    found = matched_differences(population, against)
    if not found:
        return None
    sparsity = statistics.fmean(s for s, _ in found)
    if sparsity < reference:
        claim = (f"Below the paper's crossover (~{reference:.0%}), {label} beats VD at VD's own final sparsity "
                 f"(mean {sparsity:.1%}; MP run at each model's exact VD sparsity)")
        return reports.claim_above(claim, [-d for _, d in found], 0.0, name=f"{label} - VD", scale=100,
                                   unit=" points")
    claim = (f"Above the paper's crossover (~{reference:.0%}), VD beats {label} at VD's own final sparsity "
             f"(mean {sparsity:.1%}; MP run at each model's exact VD sparsity)")
    return reports.claim_above(claim, [d for _, d in found], 0.0, name=f"VD - {label}", scale=100, unit=" points")


# -- figures and the report -------------------------------------------------------------------

def _accuracy_figure(rows, original: float):
    series = {}
    for row in rows:
        label = {"mp": "MP (no fine-tune)", "mp-ft": "MP + fine-tune", "vd": "VD (per epoch)",
                 "mp@vd": "MP at VD's sparsity", "mp-ft@vd": "MP + fine-tune at VD's final sparsity"}[row["method"]]
        series.setdefault(label, []).append((100 * row["sparsity"], 100 * row["accuracy"], 100 * row["accuracy_std"]))
    return reports.plot_lines(series, xlabel="sparsity (%)", ylabel="test accuracy (%)",
                              title="Zoo twins: accuracy against sparsity (mean ± std)",
                              baselines={"originals": 100 * original})


def _labelled(figure, axes, *, ylabel: str, title: str, xlabel: str | None = None, fontsize=None):
    """The figure with its axis labels, title and legend, laid out."""
    if xlabel is not None:
        axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=fontsize)
    figure.tight_layout()
    return figure


def _layer_figure(rows):
    plt = reports._pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        found = {row["layer"]: row for row in rows if row["method"] == method}
        axes.bar([j + i * width for j in range(len(layers))], [100 * found[layer]["mean"] for layer in layers],
                 width, yerr=[100 * found[layer]["std"] for layer in layers], capsize=2, label=method)
    axes.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers)
    return _labelled(figure, axes, ylabel="layer sparsity (%)",
                     title="Layer-wise sparsity over the population (mean ± std)", fontsize=8)


def _correlation_figure(pairs: dict[str, tuple[list[float], list[float]]]):
    plt = reports._pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    for label, (x, y) in pairs.items():
        axes.scatter([100 * v for v in x], [100 * v for v in y], s=12, label=label)
    return _labelled(figure, axes, xlabel="original accuracy (%)", ylabel="twin accuracy (%)",
                     title="Original vs twin accuracy", fontsize=8)


def _trajectory_figure(rows):
    plt = reports._pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    vd = [row for row in rows if row["method"] == "vd"]
    epochs = [int(row["at"].split()[1]) for row in vd]
    axes.errorbar(epochs, [100 * row["sparsity"] for row in vd], yerr=[100 * row["sparsity_std"] for row in vd],
                  marker="o", capsize=3, label="measured (mean ± std)")
    axes.scatter(list(PAPER_TRAJECTORY), [100 * v for v in PAPER_TRAJECTORY.values()], marker="x", color="black",
                 s=60, label="paper (MNIST zoo)", zorder=3)
    return _labelled(figure, axes, xlabel="VD epoch", ylabel="sparsity (%)", title="VD sparsity trajectory")


def _crossover_figure(results: dict[str, dict]):
    plt = reports._pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.axhline(0, color="black", linewidth=0.8)
    for label, result in results.items():
        if result["curve"]:
            axes.plot([100 * c for c, _, _ in result["curve"]], [100 * d for _, d, _ in result["curve"]], marker="o",
                      label=label)
    axes.axvline(100 * PAPER_CROSSOVER, color="grey", linestyle=":", label="paper's crossover (~80%)")
    return _labelled(figure, axes, xlabel="sparsity (%)", ylabel="VD - MP accuracy (points)",
                     title="Where VD starts to beat MP (binned mean over the population)", fontsize=8)


def _trajectory_claims(population) -> list[reports.Claim]:
    found = []
    by_epoch: dict[int, list[float]] = {}
    for _, twin in _twins(population, "vd"):
        for point in twin["points"]:
            by_epoch.setdefault(point["epoch"], []).append(point["sparsity"])
    for epoch, reference in PAPER_TRAJECTORY.items():
        claim = f"VD sparsity after {epoch} epochs is about {reference:.2f} (within ±{TRAJECTORY_MARGIN})"
        if epoch not in by_epoch:
            found.append(reports.Claim(claim, f"not measured: this run has {max(by_epoch, default=0)} VD epochs",
                                       reports.INCONCLUSIVE))
            continue
        values = by_epoch[epoch]
        found.append(reports.claim_equivalent(claim, values, [reference, reference], TRAJECTORY_MARGIN,
                                              a_name=f"sparsity at epoch {epoch}", b_name="paper", scale=100,
                                              unit="%"))
    return found


def settings_of(spec: RunSpec) -> dict:
    """A zoo model's hyperparameters, as the grid names them."""
    return {"activation": spec.model_options.get("activation"), "init": spec.model_options.get("init"),
            "optimizer": spec.optimizer, "lr": spec.lr, "weight_decay": spec.optimizer_options.get("weight_decay"),
            "dropout": spec.model_options.get("dropout", 0.0)}


def hyper_rows(population) -> list[dict]:
    """The hyperparameter zoo, a row per model: its settings, original accuracy, and its VD
    twin's sparsity and accuracy next to MP + fine-tune at that sparsity."""
    rows = []
    for entry in (e for e in population if e["zoo"] == "hyper"):
        twin = {t["method"]: t for t in entry["twins"]}
        vd, tuned = twin.get("vd"), twin.get("mp-ft@vd")
        rows.append({"seed": entry["seed"], **settings_of(entry["spec"]), "original": entry["accuracy"],
                     "vd sparsity": None if vd is None else vd["sparsity"],
                     "vd": None if vd is None else vd["accuracy"],
                     "mp-ft@vd": None if tuned is None else tuned["accuracy"]})
    return rows


def train_matched(records, store, size: Size, executor=None) -> list:
    """The records with MP at VD's sparsity added: its runs (`matched_twins`) trained into the
    store where missing (`executor` as run_population's; default: worker processes), reused
    where stored. Raises when one fails (no report), naming it."""
    records = list(records)
    wanted = matched_twins(records, size)
    if not wanted:
        return records
    result = run_population(wanted, store.directory, executor=executor, hooks=hooks,
                            description=f"{NAME}: MP at VD's sparsity")
    if not result.complete:
        failed = "; ".join(f"{r.run_id} {r.spec.label}: {(r.error or r.status).strip().splitlines()[-1]}"
                           for r in result.failed)
        raise RuntimeError(f"{NAME}: {len(result.failed)} run(s) of MP at VD's sparsity failed, no report written "
                           f"(run the reproduction again to retry them): {failed}")
    known = {record.run_id for record in records}
    return records + [record for record in result.records if record.run_id not in known]


def analyze(records, store, quick: bool, size: Size | None = None, *, executor=None) -> reports.Report:
    """The report of the stored runs, once MP at VD's sparsity is trained (`train_matched`)."""
    size = size if size is not None else QUICK if quick else FULL
    records = train_matched(records, store, size, executor)
    population = collect(records, store, size.ratios)
    rows = accuracy_rows(population)
    seed_zoo = [e for e in population if e["zoo"] == "seed"]
    originals = [e["accuracy"] for e in population]
    setup = _setup_of(population[0]["spec"].data)
    report = reports.Report(f"Sparsified Model Zoo Twins: MP vs VD on {setup.data} CNN zoos")
    report.text(
        f"{len(seed_zoo)} seed-zoo and {len(population) - len(seed_zoo)} hyperparameter-zoo models "
        f"({setup.description}, {setup.parameters:,} parameters, {size.zoo_epochs} epochs of batch {BATCH}; the "
        f"hyperparameter grid: activation {', '.join(GRID['activation'])}, init "
        f"{', '.join(GRID['init'])}, optimizer and lr {', '.join(f'{o} {lr:g}' for o, lr in GRID['optimizer'])}, "
        f"weight decay {', '.join(f'{w:g}' for w in GRID['weight_decay'])}, dropout "
        f"{', '.join(f'{d:g}' for d in GRID['dropout'])}); twins: VD for {size.vd_epochs} epochs (beta 0 -> 0.01 "
        f"over {VD_RAMP_EPOCHS} epochs, log_alpha < 3), global MP at "
        f"{', '.join(f'{r:.0%}' for r in size.ratios)} and at each VD twin's final sparsity, without and "
        f"with {size.finetune_epochs} epoch(s) of masked fine-tuning, AdamW lr 1e-3 for both; every weight layer "
        f"pruned. Original accuracy {100 * statistics.fmean(originals):.2f} ± "
        f"{100 * (statistics.stdev(originals) if len(originals) > 1 else 0):.2f} %. Rows mp@vd: MP at the "
        "sparsity of each VD epoch (the last epoch's the stored run at the VD twin's final sparsity, the earlier "
        "ones evaluated in the analysis, without fine-tuning); mp-ft@vd: the stored runs with fine-tuning at the "
        "final sparsity. Not covered: the paper's 2-D zoo CNN on 28 x 28 MNIST."
        + (f" A quick run: {size.vd_epochs} VD epochs, so the 25-epoch point of the trajectory is not measured."
           if size.vd_epochs < 25 else ""))
    report.table("accuracy", rows)
    layers = layer_rows(population)
    report.table("layers", layers)
    vd_pairs = _twins(population, "vd")
    changes = [t["accuracy"] - e["accuracy"] for e, t in vd_pairs]
    claims = [reports.claim_above("VD twins are robust: accuracy within 4 points of their originals (paper: 2-4 "
                                  "points lost)", changes, -0.04, name="VD twin - original", scale=100, unit=" points")]
    for ratio in (0.5, 0.8):
        pairs = _twins(population, "mp-ft", ratio)
        if pairs:
            claims.append(reports.claim_above(
                f"MP twins are robust: MP + fine-tune at {ratio:.0%} within 4 points of their originals",
                [t["accuracy"] - e["accuracy"] for e, t in pairs], -0.04, name=f"MP-FT {ratio:.0%} - original",
                scale=100, unit=" points"))
    crossovers = {f"VD vs {label}": bootstrap_crossover(vd_differences(population, key))
                  for label, key in (("MP at VD's sparsity", "mp@vd"), ("MP + fine-tune", "mp-ft"))}
    for label, result in crossovers.items():
        shown = "none" if result["estimate"] is None else f"{100 * result['estimate']:.1f}%"
        interval = ("" if result["low"] is None else
                    f", bootstrap 95% interval {100 * result['low']:.1f} .. {100 * result['high']:.1f}%")
        claims.append(reports.Claim(
            f"MP beats VD below about 80% sparsity, VD wins above ({label})",
            f"crossover {shown} ({result['kind']}){interval}; bootstrap samples with a crossover: "
            f"{100 * result['fractions'].get('crossing', 0):.0f}%, VD ahead throughout: "
            f"{100 * result['fractions'].get('vd-ahead', 0):.0f}%, MP ahead throughout: "
            f"{100 * result['fractions'].get('mp-ahead', 0):.0f}% ({result['models']} models)",
            crossover_verdict(result), None, {k: v for k, v in result.items() if k != "curve"}))
    claims += [claim for claim in (matched_claim(population, "mp@vd", "MP"),
                                   matched_claim(population, "mp-ft@vd", "MP + fine-tune")) if claim is not None]
    claims.append(reports.claim_above("VD twins agree highly with their originals (agreement above 0.9)",
                                      [t["agreement"] for _, t in vd_pairs], 0.9, name="VD agreement"))
    pairs = _twins(population, "mp-ft", 0.5)
    if pairs:
        claims.append(reports.claim_above("MP twins agree highly with their originals (MP + fine-tune at 50%, "
                                          "agreement above 0.9)", [t["agreement"] for _, t in pairs], 0.9,
                                          name="MP-FT 50% agreement"))
    correlations = []
    for zoo_kind, label in ((None, "both zoos"), ("seed", "seed zoo"), ("hyper", "hyperparameter zoo")):
        for method, ratio, name in (("vd", None, "VD"), ("mp-ft", 0.5, "MP + fine-tune 50%"),
                                    ("mp", 0.5, "MP 50%")):
            pairs = _twins(population, method, ratio, zoo_kind)
            if len(pairs) < 3:  # a correlation needs 3 pairs (its interval 4)
                continue
            claim = correlation_claim(f"Original and twin accuracy are strongly correlated ({name}, {label})",
                                      [e["accuracy"] for e, _ in pairs], [t["accuracy"] for _, t in pairs])
            correlations.append({"zoo": label, "twin": name, **{k: claim.details[k] for k in (
                "n", "pearson", "pearson_low", "pearson_high", "pearson_p", "spearman", "spearman_p")}})
            if method != "mp":
                claims.append(claim)
    claims += _trajectory_claims(population)
    for claim in claims:
        report.claim(claim)
    report.table("correlations", correlations)
    hyper = hyper_rows(population)
    if hyper:
        report.text("The hyperparameter zoo, model by model (VD twin and MP + fine-tune at its final sparsity):")
        report.table("hyperparameter-zoo", hyper)
    report.text("Claims on crossover use this rule: it holds when the estimate is within 10 points of 80% and the "
                "bootstrap interval inside 60..100%; it does not hold when the interval misses 70..90% or at most "
                "5% of the bootstrap samples have a crossover. Correlation claims hold when the 95% Fisher-z interval "
                f"of Pearson's r lies above {STRONG_CORRELATION}, and do not hold when it lies below.")
    report.figure("accuracy", _accuracy_figure(rows, statistics.fmean(originals)),
                  "test accuracy against sparsity per method, mean ± std over the population")
    report.figure("trajectory", _trajectory_figure(rows), "VD sparsity per epoch against the paper's MNIST reference")
    report.figure("layers", _layer_figure(layers), "layer-wise sparsity over the population per method")
    report.figure("correlation", _correlation_figure({
        "VD": ([e["accuracy"] for e, _ in vd_pairs], [t["accuracy"] for _, t in vd_pairs]),
        "MP + FT 50%": ([e["accuracy"] for e, _ in _twins(population, "mp-ft", 0.5)],
                        [t["accuracy"] for _, t in _twins(population, "mp-ft", 0.5)])}),
        "original against twin accuracy over the population")
    report.figure("crossover", _crossover_figure(crossovers), "VD minus MP accuracy per sparsity bin")
    report.numbers.update(
        accuracy=rows, layers=layers, correlations=correlations, crossovers=crossovers, hyperparameter_zoo=hyper,
        models=[{"run_id": e["run_id"], "zoo": e["zoo"], "seed": e["seed"], "accuracy": e["accuracy"],
                 "twins": [{k: v for k, v in t.items() if k != "layer_sparsity"} for t in e["twins"]]}
                for e in population])
    return report


register(Experiment(NAME, "Sparsified Model Zoo Twins: MNIST-1D CNN zoos (seeds, hyperparameters) sparsified by VD "
                    "and global MP; accuracy, agreement, correlation, crossover", specs, analyze, hooks))
register(Experiment(f"{NAME}-digits", "Sparsified Model Zoo Twins on the 8 x 8 digits (the paper's zoo CNN, padded)",
                    digits_specs, analyze, hooks))
