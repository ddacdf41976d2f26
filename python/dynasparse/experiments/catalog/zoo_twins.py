"""Sparsified Model Zoo Twins (Honegger, Schürholt & Borth 2023): `dynasparse reproduce zoo-twins`.

Two model zoos on MNIST-1D, each model then sparsified into twins (child runs whose parent is
the zoo model, trained once and reused by every twin):

- the seed zoo: the same small CNN trained from `seeds` seeds (100; 20 with --quick), SGD
  (lr 0.05, momentum 0.9, weight decay 1e-4, cosine) for `zoo_epochs` epochs of batch 50;
- the hyperparameter zoo: a grid over activation (relu, tanh, gelu), initialization (kaiming
  uniform, xavier normal), optimizer with learning rate (SGD 0.05 / 0.01, AdamW 3e-3 / 1e-3) and
  weight decay (0, 1e-3): 48 models (6 of them, spread over the grid, with --quick). Dropout,
  the zoo's sixth hyperparameter, is not covered: the 1-D CNN of experiments.models has none.

The CNN: `models.cnn1d` with channels [12, 12, 12], kernels [5, 5, 3], strides [1, 2, 2] and
a linear classifier, 2,458 parameters (the paper's 2-D zoo CNN has 2,464 on 28 x 28 MNIST;
models.zoo_cnn takes images, MNIST-1D is a signal).

Twins of every zoo model, all weight layers pruned (biases excluded), each sparsification
phase with AdamW (lr 1e-3, no weight decay, constant lr, batch 50) from the trained model:
- VD: sparse variational dropout ("vd", dynasparse.pruning.variational_dropout) for
  `vd_epochs` epochs (25; 4 with --quick), beta ramped 0 -> 0.01 over 25 epochs (also when the
  run is shorter, so that its early epochs compare with the paper's), the threshold mask
  (log_alpha < 3) refreshed every 16 steps; sparsity and accuracy recorded every epoch;
- MP: one global magnitude threshold ("oneshot") at 10, 20, ..., 90% without fine-tuning
  (steps=0) and with `finetune_epochs` (2; 1 with --quick) of masked fine-tuning;
- MP at VD's sparsity: the original pruned by global magnitude at the sparsity of each VD
  epoch, no fine-tuning (computed in the analysis).

Analyses: accuracy against sparsity per method (mean and std over the population), layer-wise
sparsity distributions per method, agreement (fraction of test inputs where twin and
original predict the same class), Pearson and Spearman correlation of original vs twin
accuracy, and the crossover sparsity where VD starts to beat MP with a bootstrap interval over
the models of the population.
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
from ...pruning import variational_dropout  # noqa: F401  registers "vd"
from .. import analysis, data, reports, transforms
from ..registry import Experiment, register
from ..spec import RunSpec
from ..trainer import Hook

NAME = "zoo-twins"
DATA = "mnist1d"
MODEL = "cnn1d"
ARCHITECTURE = {"channels": [12, 12, 12], "kernels": [5, 5, 3], "strides": [1, 2, 2]}
BATCH = 50
EPOCH = 80  # steps: MNIST-1D's 4000 training examples in batches of 50
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAGNITUDE = "global-magnitude"  # the transform of the MP twins
ALL_LAYERS = {"exclude": []}  # every weight layer, the first convolution and the classifier included
VD_UPDATE_EVERY = 16  # divides EPOCH: the mask is fresh at every epoch's evaluation
# beta's ramp spans the paper's 25 epochs also when a run stops earlier (--quick), so that the
# trajectory's early epochs are comparable with the paper's.
VD_RAMP_EPOCHS = 25
SPARSIFY = {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant", "optimizer_options": {"weight_decay": 0.0}}
SEED_ZOO = {"optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "activation": "relu", "init": None}
GRID = {"activation": ("relu", "tanh", "gelu"), "init": ("kaiming_uniform", "xavier_normal"),
        "optimizer": (("sgd", 0.05), ("sgd", 0.01), ("adamw", 3e-3), ("adamw", 1e-3)), "weight_decay": (0.0, 1e-3)}
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
    return [{"activation": a, "init": i, "optimizer": o, "lr": lr, "weight_decay": wd}
            for a, i, (o, lr), wd in itertools.product(GRID["activation"], GRID["init"], GRID["optimizer"],
                                                       GRID["weight_decay"])]


def _zoo_spec(settings: dict, seed: int, epochs: int) -> RunSpec:
    model_options = dict(ARCHITECTURE, activation=settings["activation"])
    if settings["init"] is not None:
        model_options["init"] = settings["init"]
    optimizer_options = {} if "weight_decay" not in settings else {"weight_decay": settings["weight_decay"]}
    return RunSpec(data=DATA, model=MODEL, model_options=model_options, optimizer=settings["optimizer"],
                   optimizer_options=optimizer_options, lr=settings["lr"], schedule=settings.get("schedule", "cosine"),
                   steps=epochs * EPOCH, batch_size=BATCH, seed=seed)


def zoo(size: Size) -> dict[str, list[RunSpec]]:
    """{"seed": the seed zoo, "hyper": the hyperparameter zoo}."""
    indexed = list(enumerate(grid()))
    if size.hyper is not None:
        # Every 7th setting (cyclically): 7 is coprime with the grid's strides, so 6 settings
        # reach every level of every factor.
        indexed = [indexed[(7 * i) % len(indexed)] for i in range(min(size.hyper, len(indexed)))]
    return {"seed": [_zoo_spec(SEED_ZOO, seed, size.zoo_epochs) for seed in range(size.seeds)],
            "hyper": [_zoo_spec(settings, HYPER_SEED + i, size.zoo_epochs) for i, settings in indexed]}


def twins(parent: RunSpec, size: Size) -> dict[str, list[RunSpec]]:
    """The twins of one zoo model: {"vd": [1 run], "mp": [per ratio], "mp-ft": [per ratio]}."""
    base = dict(data=parent.data, data_options=parent.data_options, model=parent.model,
                model_options=parent.model_options, batch_size=BATCH, seed=parent.seed, parent=parent, **SPARSIFY)
    return {"vd": [RunSpec(**base, method="vd", method_options=dict(ALL_LAYERS, update_every=VD_UPDATE_EVERY,
                                                                    ramp_steps=VD_RAMP_EPOCHS * EPOCH),
                           steps=size.vd_epochs * EPOCH, eval_every=EPOCH)],
            "mp": [RunSpec(**base, transform=MAGNITUDE, transform_options={"sparsity": r}, steps=0)
                   for r in size.ratios],
            "mp-ft": [RunSpec(**base, transform=MAGNITUDE, transform_options={"sparsity": r},
                              steps=size.finetune_epochs * EPOCH) for r in size.ratios]}


def specs(quick: bool = False, size: Size | None = None) -> list[RunSpec]:
    """The zoos and their twins (`size`: FULL, QUICK with quick=True, or another Size)."""
    size = size if size is not None else QUICK if quick else FULL
    population = []
    for models in zoo(size).values():
        for parent in models:
            population.append(parent)
            for runs in twins(parent, size).values():
                population += runs
    return population


class RecordTrajectory(Hook):
    """Stores a VD run's [step, sparsity] at every mask update as metrics["vd_trajectory"]."""

    def on_end(self, state) -> None:
        trajectory = getattr(state.pruner, "trajectory", None)
        if trajectory is not None:
            state.metrics["vd_trajectory"] = [list(point) for point in trajectory]


def hooks(spec: RunSpec) -> list[Hook]:
    return [RecordTrajectory()] if spec.method == "vd" else []


# -- the analyses (plain functions of numbers, tested on hand-made populations) -------------------

def vd_points(metrics: Mapping, epoch: int = EPOCH) -> list[dict]:
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


def crossover(per_model: Sequence[Sequence[tuple[float, float]]], bins: Sequence[float] = BINS) -> dict:
    """Where VD starts to beat MP: per sparsity bin the mean of the (sparsity, VD - MP)
    differences pooled over the models; the crossover is the first up-crossing of zero of the
    binned means (linear between bin centers). kind: "crossing", "vd-ahead" (VD >= MP in the
    first bin with data: no crossover above it), "mp-ahead" (VD < MP in every bin)."""
    edges = np.asarray(bins, dtype=float)
    pooled = [(s, d) for model in per_model for s, d in model]
    curve = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = [d for s, d in pooled if low <= s < high or (high == edges[-1] and s == high)]
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


def bootstrap_crossover(per_model: Sequence[Sequence[tuple[float, float]]], *, samples: int = BOOTSTRAP,
                        seed: int = 0, bins: Sequence[float] = BINS) -> dict:
    """The crossover of the population and its bootstrap over the models (resampled with
    replacement): the 2.5 and 97.5 percentiles of the crossovers of the samples that have one,
    and the fraction of samples of each kind."""
    estimate = crossover(per_model, bins)
    rng = np.random.default_rng(seed)
    found, kinds = [], {"crossing": 0, "vd-ahead": 0, "mp-ahead": 0, "no-data": 0}
    n = len(per_model)
    for _ in range(samples if n else 0):
        sample = [per_model[i] for i in rng.integers(0, n, n)]
        result = crossover(sample, bins)
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


def _method(spec: RunSpec) -> str:
    if spec.method == "vd":
        return "vd"
    return "mp" if spec.steps == 0 else "mp-ft"


def collect(records, store) -> list[dict]:
    """One entry per zoo model (a run without a parent): its record, zoo, accuracy, and its
    twins (accuracy, sparsity, layer sparsity, agreement with the original on the test split),
    with MP at VD's epoch sparsities computed here."""
    test = None
    population = []
    for record in (r for r in records if r.spec.parent is None):
        run_id, kind = record.run_id, "hyper" if record.spec.seed >= HYPER_SEED else "seed"
        if test is None:
            test = data.load(record.spec.data, **record.spec.data_options).test
        inputs, labels = test
        original = store.load_model(run_id)
        original_outputs = analysis.logits(original, inputs)
        entry = {"run_id": run_id, "zoo": kind, "seed": record.spec.seed, "spec": record.spec,
                 "accuracy": record.metrics["accuracy"], "twins": []}
        for child in (r for r in records if r.spec.parent is not None and r.spec.parent.run_id == run_id):
            method = _method(child.spec)
            outputs = analysis.logits(store.load_model(child.run_id), inputs)
            twin = {"method": method, "ratio": child.spec.transform_options.get("sparsity"),
                    "sparsity": child.metrics["sparsity"], "accuracy": child.metrics["accuracy"],
                    "layer_sparsity": child.metrics["layer_sparsity"],
                    "agreement": analysis.agreement(outputs, original_outputs)}
            if method == "vd":
                twin["points"] = vd_points(child.metrics)
                twin["points"][-1]["agreement"] = twin["agreement"]  # the final twin is the stored one
                matched = []
                for point in twin["points"]:
                    pruned = magnitude_twin(original, point["sparsity"])
                    pruned_outputs = analysis.logits(pruned, inputs)
                    matched.append({"epoch": point["epoch"], "sparsity": point["sparsity"],
                                    "accuracy": analysis.accuracy(pruned_outputs, labels),
                                    "agreement": analysis.agreement(pruned_outputs, original_outputs),
                                    "layer_sparsity": analysis.layer_sparsity(analysis.masks(pruned))})
                twin["mp_matched"] = matched
            entry["twins"].append(twin)
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
    original at exactly that sparsity) or "mp" / "mp-ft" (their curves over the ratios, with the
    original at sparsity 0, interpolated)."""
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
                                              if t["method"] == against]
        result.append(differences([(p["sparsity"], p["accuracy"]) for p in points], curve))
    return result


# -- figures and the report -------------------------------------------------------------------

def _accuracy_figure(rows, original: float):
    series = {}
    for row in rows:
        label = {"mp": "MP (no fine-tune)", "mp-ft": "MP + fine-tune", "vd": "VD (per epoch)",
                 "mp@vd": "MP at VD's sparsity"}[row["method"]]
        series.setdefault(label, []).append((100 * row["sparsity"], 100 * row["accuracy"], 100 * row["accuracy_std"]))
    return reports.plot_lines(series, xlabel="sparsity (%)", ylabel="test accuracy (%)",
                              title="Zoo twins: accuracy against sparsity (mean ± std)",
                              baselines={"originals": 100 * original})


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
    axes.set_ylabel("layer sparsity (%)")
    axes.set_title("Layer-wise sparsity over the population (mean ± std)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _correlation_figure(pairs: dict[str, tuple[list[float], list[float]]]):
    plt = reports._pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    for label, (x, y) in pairs.items():
        axes.scatter([100 * v for v in x], [100 * v for v in y], s=12, label=label)
    axes.set_xlabel("original accuracy (%)")
    axes.set_ylabel("twin accuracy (%)")
    axes.set_title("Original vs twin accuracy")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _trajectory_figure(rows):
    plt = reports._pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    vd = [row for row in rows if row["method"] == "vd"]
    epochs = [int(row["at"].split()[1]) for row in vd]
    axes.errorbar(epochs, [100 * row["sparsity"] for row in vd], yerr=[100 * row["sparsity_std"] for row in vd],
                  marker="o", capsize=3, label="measured (mean ± std)")
    axes.scatter(list(PAPER_TRAJECTORY), [100 * v for v in PAPER_TRAJECTORY.values()], marker="x", color="black",
                 s=60, label="paper (MNIST zoo)", zorder=3)
    axes.set_xlabel("VD epoch")
    axes.set_ylabel("sparsity (%)")
    axes.set_title("VD sparsity trajectory")
    axes.legend()
    figure.tight_layout()
    return figure


def _crossover_figure(results: dict[str, dict]):
    plt = reports._pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.axhline(0, color="black", linewidth=0.8)
    for label, result in results.items():
        if result["curve"]:
            axes.plot([100 * c for c, _, _ in result["curve"]], [100 * d for _, d, _ in result["curve"]], marker="o",
                      label=label)
    axes.axvline(100 * PAPER_CROSSOVER, color="grey", linestyle=":", label="paper's crossover (~80%)")
    axes.set_xlabel("sparsity (%)")
    axes.set_ylabel("VD - MP accuracy (points)")
    axes.set_title("Where VD starts to beat MP (binned mean over the population)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


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


def analyze(records, store, quick: bool, size: Size | None = None) -> reports.Report:
    size = size if size is not None else QUICK if quick else FULL
    population = collect(records, store)
    rows = accuracy_rows(population)
    seed_zoo = [e for e in population if e["zoo"] == "seed"]
    originals = [e["accuracy"] for e in population]
    report = reports.Report("Sparsified Model Zoo Twins: MP vs VD on an MNIST-1D CNN zoo")
    report.text(
        f"{len(seed_zoo)} seed-zoo and {len(population) - len(seed_zoo)} hyperparameter-zoo models "
        f"(`cnn1d` {ARCHITECTURE}, 2,458 parameters, MNIST-1D, {size.zoo_epochs} epochs of batch {BATCH}); "
        f"twins: VD for {size.vd_epochs} epochs (beta 0 -> 0.01 over {VD_RAMP_EPOCHS} epochs, log_alpha < 3), "
        f"global MP at "
        f"{', '.join(f'{r:.0%}' for r in size.ratios)} without and "
        f"with {size.finetune_epochs} epoch(s) of masked fine-tuning, AdamW lr 1e-3 for both; every weight layer "
        f"pruned. Original accuracy {100 * statistics.fmean(originals):.2f} ± "
        f"{100 * (statistics.stdev(originals) if len(originals) > 1 else 0):.2f} %. Not covered: dropout in the "
        "hyperparameter zoo (the 1-D CNN has none); the paper's 2-D zoo CNN on 28 x 28 MNIST."
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
        accuracy=rows, layers=layers, correlations=correlations, crossovers=crossovers,
        models=[{"run_id": e["run_id"], "zoo": e["zoo"], "seed": e["seed"], "accuracy": e["accuracy"],
                 "twins": [{k: v for k, v in t.items() if k != "layer_sparsity"} for t in e["twins"]]}
                for e in population])
    return report


register(Experiment(NAME, "Sparsified Model Zoo Twins: MNIST-1D CNN zoos (seeds, hyperparameters) sparsified by VD "
                    "and global MP; accuracy, agreement, correlation, crossover", specs, analyze, hooks))
