"""The demo experiment (`dynasparse demo`, `dynasparse reproduce demo`): DPF against magnitude
pruning and RigL where the methods separate.

MNIST-1D (generated offline) and the 1-D CNN of `models.cnn1d`; its middle convolutions are
pruned, the first convolution and the classifier stay dense. Methods, each at 90%, 95% and
98% sparsity over several seeds, all with the same SGD steps, cosine learning rate and, per
seed, the same initialization and batch order:
- dense: no pruning;
- one-shot: dense training for 75% of the steps, one-shot global magnitude pruning
  ("oneshot"), masked fine-tuning for the remaining 25%;
- gradual: gradual magnitude pruning (Zhu & Gupta), cubic ramp to 75% of training, masked;
- dpf: DPF (Lin et al. 2020), the same ramp, feedback training, hard-pruned at the end;
- rigl: RigL (Evci et al. 2020), ERK random sparse start, drop / grow every 100 steps.

The claims (DPF paper, section 5): DPF beats gradual and gradual beats one-shot at 98%; DPF's
advantage over no-feedback pruning grows with sparsity; DPF is within a point of dense at
90%. `--data digits` runs the same methods with the digits CNN on scikit-learn's 8 x 8 digits.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .. import reports
from ..registry import Experiment, register
from ..spec import RunSpec

# label -> (registry name, prune_at)
METHODS = {"dense": ("dense", 0.0), "one-shot": ("oneshot", 0.75), "gradual": ("gradual", 0.0),
           "dpf": ("dpf", 0.0), "rigl": ("rigl", 0.0)}
SPARSITIES = (0.9, 0.95, 0.98)
VARIANTS = {"mnist1d": {"data": "mnist1d", "model": "cnn1d"}, "digits": {"data": "digits", "model": "digits-cnn"}}
STEPS = {"mnist1d": 1200, "digits": 480}
QUICK_STEPS = 100
SEEDS = 3


def specs(quick: bool = False, *, data: str = "mnist1d", seeds: int | None = None, steps: int | None = None,
          methods: Sequence[str] = tuple(METHODS), device: str = "cpu", threads: int = 1) -> list[RunSpec]:
    """The demo's population: dense once per seed, every other method at every sparsity."""
    if data not in VARIANTS:
        raise ValueError(f"dynasparse demo: data must be one of {', '.join(VARIANTS)}, got {data!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"dynasparse demo: unknown method(s) {', '.join(unknown)}; the demo's are "
                         f"{', '.join(METHODS)}")
    seeds = (1 if quick else SEEDS) if seeds is None else seeds
    steps = (QUICK_STEPS if quick else STEPS[data]) if steps is None else steps
    base = dict(VARIANTS[data], steps=steps, device=device, threads=threads)
    population = []
    for label in methods:
        name, prune_at = METHODS[label]
        targets = [0.0] if name == "dense" else SPARSITIES
        population += [RunSpec(**base, method=name, sparsity=target, prune_at=prune_at, seed=seed)
                       for target in targets for seed in range(seeds)]
    return population


def label(spec: RunSpec) -> str:
    for name, (method, prune_at) in METHODS.items():
        if spec.method == method and spec.prune_at == prune_at:
            return name
    return spec.method


def _flip_summary(flip_rates: Sequence) -> tuple[float, float, float] | None:
    """Mean flip rate per update after the initial mask, and over the first and last quarter
    of those updates (is the mask settling?); None without such updates."""
    rates = [rate for _, rate in flip_rates[1:]]
    if not rates:
        return None
    quarter = max(1, len(rates) // 4)
    return statistics.fmean(rates), statistics.fmean(rates[:quarter]), statistics.fmean(rates[-quarter:])


def summarize(records) -> list[dict]:
    """One row per (method, target sparsity): accuracy over the seeds, final sparsity, mask
    flips, re-activated weights, training time."""
    groups: dict[tuple[str, float], list] = {}
    for record in records:
        groups.setdefault((label(record.spec), record.spec.sparsity), []).append(record)
    rows = []
    for (method, target), group in groups.items():
        accuracy, accuracy_std = reports.mean_std([r.metrics["accuracy"] for r in group])
        flips = [_flip_summary(r.metrics["flip_rates"]) for r in group]
        flips = None if None in flips else [statistics.fmean(f[i] for f in flips) for i in range(3)]
        rows.append({"method": method, "target": target, "seeds": len(group), "accuracy": accuracy,
                     "accuracy_std": accuracy_std, "sparsity": statistics.fmean(r.metrics["sparsity"] for r in group),
                     "flip_rate": flips and flips[0], "flip_rate_early": flips and flips[1],
                     "flip_rate_late": flips and flips[2],
                     "reactivated": statistics.fmean(r.metrics["reactivated"] for r in group),
                     "seconds": statistics.fmean(r.metrics["seconds"] for r in group)})
    return rows


def format_table(rows: list[dict]) -> str:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    header = ("method", "target", "test acc (mean ± std)", "sparsity", "flips/update", "early -> late",
              "re-activated", "time/run s")
    return reports.text_table([(row["method"], f"{row['target']:.2f}",
                                f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f} %",
                                f"{row['sparsity']:.4f}", number(row["flip_rate"], ".4f"),
                                f"{number(row['flip_rate_early'], '.4f')} -> {number(row['flip_rate_late'], '.4f')}",
                                f"{row['reactivated']:.4f}", f"{row['seconds']:.2f}") for row in rows], header)


def _accuracies(records, method: str, target: float) -> dict[int, float]:
    return {r.spec.seed: r.metrics["accuracy"] for r in records
            if label(r.spec) == method and r.spec.sparsity == target}


def claims(records) -> list[reports.Claim]:
    """The DPF paper's claims that this population can test (those whose methods are in it)."""
    def accuracies(method, target):
        return list(_accuracies(records, method, target).values())

    def present(*methods):
        return all(_accuracies(records, m, 0.0 if m == "dense" else SPARSITIES[-1]) for m in methods)

    top, low = SPARSITIES[-1], SPARSITIES[0]
    found = []
    options = dict(scale=100, unit="%")
    if present("dpf", "gradual"):
        found.append(reports.claim_greater(f"DPF is more accurate than gradual magnitude pruning at {top:.0%}",
                                           accuracies("dpf", top), accuracies("gradual", top), a_name="DPF",
                                           b_name="gradual", **options))
    if present("gradual", "one-shot"):
        found.append(reports.claim_greater(f"gradual pruning is more accurate than one-shot pruning + fine-tuning at "
                                           f"{top:.0%}", accuracies("gradual", top), accuracies("one-shot", top),
                                           a_name="gradual", b_name="one-shot", **options))
    if present("dpf", "gradual"):
        # Paired by seed: each seed's DPF - gradual difference, at the highest and lowest sparsity.
        def gaps(target):
            dpf, gradual = _accuracies(records, "dpf", target), _accuracies(records, "gradual", target)
            return [dpf[seed] - gradual[seed] for seed in sorted(set(dpf) & set(gradual))]

        found.append(reports.claim_greater(f"DPF's advantage over gradual pruning is larger at {top:.0%} than at "
                                           f"{low:.0%}", gaps(top), gaps(low), a_name=f"gap at {top:.0%}",
                                           b_name=f"gap at {low:.0%}", **options))
    if present("dpf", "dense"):
        found.append(reports.claim_equivalent(f"DPF at {low:.0%} is within 1 point of dense", accuracies("dpf", low),
                                              accuracies("dense", 0.0), 0.01, a_name="DPF", b_name="dense",
                                              **options))
    return found


def plot(rows: list[dict], title: str):
    series = {}
    baselines = {}
    for row in rows:
        if row["method"] == "dense":
            baselines["dense"] = 100 * row["accuracy"]
        else:
            series.setdefault(row["method"], []).append((100 * row["sparsity"], 100 * row["accuracy"],
                                                         100 * row["accuracy_std"]))
    return reports.plot_lines(series, xlabel="sparsity of the pruned layers (%)", ylabel="test accuracy (%)",
                              title=title, baselines=baselines)


def analyze(records, store, quick: bool) -> reports.Report:
    spec = records[0].spec
    rows = summarize(records)
    seeds = max(row["seeds"] for row in rows)
    report = reports.Report(f"DPF demo: {spec.model} on {spec.data}")
    report.text(f"{len(records)} runs: {spec.steps} SGD steps each (batch {spec.batch_size}, lr {spec.lr}, cosine), "
                f"{seeds} seed(s); the first weight layer and the classifier stay dense. "
                + ("A quick run: too few steps and seeds to decide any claim." if quick else ""))
    report.table("summary", [{"method": row["method"], "target": f"{row['target']:.2f}",
                              "accuracy %": f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f}",
                              "sparsity": f"{row['sparsity']:.4f}", "seeds": row["seeds"],
                              "re-activated": f"{row['reactivated']:.4f}", "s/run": f"{row['seconds']:.1f}"}
                             for row in rows])
    for claim in claims(records):
        report.claim(claim)
    report.figure("accuracy", plot(rows, f"{spec.model} on {spec.data}: accuracy against sparsity"),
                  "test accuracy against the sparsity of the pruned layers (mean ± std over seeds)")
    report.numbers.update(summary=rows, runs=[{"run_id": r.run_id, "method": label(r.spec), "target": r.spec.sparsity,
                                               "seed": r.spec.seed,
                                               **{k: r.metrics[k] for k in ("accuracy", "loss", "sparsity",
                                                                            "reactivated", "seconds", "flip_rates")}}
                                              for r in records])
    return report


register(Experiment("demo", "DPF vs one-shot, gradual magnitude pruning and RigL on MNIST-1D at 90/95/98% sparsity "
                    "(the demo's training)", specs, analyze))
