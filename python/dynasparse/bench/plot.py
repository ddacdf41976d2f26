"""The PNG beside a bench JSON: each variant's ratio to the plain-PyTorch baseline, per case."""

from __future__ import annotations

import math
from pathlib import Path

# Figure and the Agg canvas directly, not pyplot: no global backend switch, no display needed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .harness import Report


def _format_ratio(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.3g}x"


def _label_twos_and_fives(value: float, _position) -> str:
    # Every minor tick labelled would crowd a log axis spanning several decades.
    return f"{value:g}x" if round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""


def plot_ratios(report: Report, path: Path) -> None:
    results = report.results
    variants = list(dict.fromkeys(name for result in results for name in result.variants))
    figure = Figure(figsize=(max(6.0, 1.0 + 0.5 * len(results) * max(1, len(variants))), 5.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()

    width = 0.8 / max(1, len(variants))
    all_ratios = [1.0]
    for index, variant in enumerate(variants):
        offset = (index - (len(variants) - 1) / 2) * width
        placed = [(position + offset, result.ratio(variant)) for position, result in enumerate(results)
                  if result.ratio(variant) is not None]
        if not placed:
            continue
        xs, ratios = zip(*placed)
        all_ratios += ratios
        # Bars grow from the baseline line, up when faster and down when slower; a log
        # scale makes 2x faster and 2x slower the same length.
        bars = axes.bar(xs, [ratio - 1.0 for ratio in ratios], width, bottom=1.0, label=variant)
        axes.bar_label(bars, labels=[_format_ratio(ratio) for ratio in ratios], fontsize=7)

    axes.axhline(1.0, color="black", linestyle="--", linewidth=1, label="baseline (plain PyTorch)")
    axes.set_yscale("log")
    # Room below the baseline line and above the tallest label.
    axes.set_ylim(min(all_ratios) / 2, max(all_ratios) * 2)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.yaxis.set_minor_formatter(FuncFormatter(_label_twos_and_fives))
    axes.tick_params(axis="y", which="both", labelsize=8)
    axes.set_xticks(range(len(results)), [result.case.id for result in results], rotation=30, ha="right",
                  fontsize=8)
    axes.set_ylabel("baseline time / variant time")
    environment = report.environment
    threads = f", {environment['threads']} threads" if environment["device"] == "cpu" else ""
    axes.set_title(f"{environment['device_name']}{threads}, torch {environment['torch']}, "
                   f"{environment['date'][:10]}", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
