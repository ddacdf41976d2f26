"""Reports: a claims table decided by a stated statistical rule, tables, PNG plots, and the
files `Report.write(directory)` leaves: NAME.md (the summary), NAME.json (every number) and
NAME-<figure>.png.

The rule (`VERDICT_RULE`): a claim "A > B" (e.g. DPF's accuracy above gradual pruning's at
98%) is decided by Welch's t-test over the seeds (scipy.stats.ttest_ind, equal_var=False),
one-sided at `alpha` (0.05): it *holds* when A > B is significant, *does not hold* when A < B
is, and is *inconclusive* otherwise, or with fewer than 2 seeds on a side. Claims of
equivalence ("A within m of B") take two one-sided Welch tests (TOST) against the margin;
claims on one sample ("agreement above 0.9") a one-sided one-sample t-test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE)
_OWNER = "dynasparse.experiments.reports"

VERDICT_RULE = (
    "A claim \"A > B\" holds when a one-sided Welch t-test over the seeds gives p < {alpha} for A > B, does not "
    "hold when it gives p < {alpha} for A < B, and is inconclusive otherwise (also with fewer than 2 seeds on a "
    "side). A claim \"A within m of B\" holds when two one-sided Welch tests (TOST) put the difference inside "
    "(-m, m) at p < {alpha}, does not hold when a one-sided test puts it outside at p < {alpha}. A claim on one "
    "sample (\"X > c\") takes a one-sided one-sample t-test.")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row of the claims table: the paper's claim, what was measured, the verdict, and
    the test's numbers."""

    claim: str
    measured: str
    verdict: str
    p_value: float | None = None
    details: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"{_OWNER}: verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _values(name: str, values: Iterable[float]) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{_OWNER}: {name} is empty")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{_OWNER}: {name} must be finite numbers, got {values}")
    return values


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"{_OWNER}: alpha must be in (0, 1), got {alpha!r}")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    values = _values("values", values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def welch(a: Sequence[float], b: Sequence[float]) -> dict:
    """Welch's t-test of mean(a) against mean(b): t, and the one-sided p-values of a > b
    and of a < b (NaN for fewer than 2 values a side). With no spread on either side the
    difference is exact: p is 0 for the direction of the difference, 1 against it."""
    from scipy import stats

    a, b = _values("a", a), _values("b", b)
    if len(a) < 2 or len(b) < 2:
        return {"t": math.nan, "p_greater": math.nan, "p_less": math.nan, "df": math.nan}
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        difference = statistics.fmean(a) - statistics.fmean(b)
        sign = (difference > 0) - (difference < 0)
        return {"t": sign * math.inf if sign else 0.0, "p_greater": 0.0 if sign > 0 else 1.0,
                "p_less": 0.0 if sign < 0 else 1.0, "df": math.nan}
    with warnings.catch_warnings():
        # scipy warns of cancellation for a side with no spread, where the variance is exactly 0.
        warnings.simplefilter("ignore", RuntimeWarning)
        greater = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
        less = stats.ttest_ind(a, b, equal_var=False, alternative="less")
    return {"t": float(greater.statistic), "p_greater": float(greater.pvalue), "p_less": float(less.pvalue),
            "df": float(getattr(greater, "df", math.nan))}


def _describe(name: str, values: Sequence[float], scale: float, unit: str) -> str:
    mean, std = mean_std(values)
    return f"{name} {scale * mean:.2f} ± {scale * std:.2f}{unit} (n={len(values)})"


def claim_greater(claim: str, a: Sequence[float], b: Sequence[float], *, a_name: str = "A", b_name: str = "B",
                  alpha: float = 0.05, scale: float = 1.0, unit: str = "") -> Claim:
    """The claim that the mean of `a` exceeds the mean of `b` (e.g. accuracies over seeds),
    decided by the one-sided Welch test (VERDICT_RULE). `scale`, `unit`: how the measured
    values are printed (100, "%" for accuracies as fractions)."""
    _check_alpha(alpha)
    test = welch(a, b)
    if math.isnan(test["p_greater"]):
        verdict, p = INCONCLUSIVE, None
    elif test["p_greater"] < alpha:
        verdict, p = HOLDS, test["p_greater"]
    elif test["p_less"] < alpha:
        verdict, p = FAILS, test["p_less"]
    else:
        verdict, p = INCONCLUSIVE, test["p_greater"]
    shown = "n/a" if p is None else f"{p:.3g}"
    measured = (f"{_describe(a_name, a, scale, unit)} vs {_describe(b_name, b, scale, unit)}; Welch t = "
                f"{test['t']:.2f}, one-sided p = {shown}")
    return Claim(claim, measured, verdict, p, {"test": "welch", "alpha": alpha, **test, "a": list(a), "b": list(b)})


def claim_equivalent(claim: str, a: Sequence[float], b: Sequence[float], margin: float, *, a_name: str = "A",
                     b_name: str = "B", alpha: float = 0.05, scale: float = 1.0, unit: str = "") -> Claim:
    """The claim that mean(a) and mean(b) differ by less than `margin`: TOST, two one-sided
    Welch tests of a - b > -margin and a - b < margin (VERDICT_RULE)."""
    _check_alpha(alpha)
    if not margin > 0:
        raise ValueError(f"{_OWNER}: margin must be > 0, got {margin!r}")
    a, b = _values("a", a), _values("b", b)
    above, below = welch(a, [v - margin for v in b]), welch(a, [v + margin for v in b])
    if math.isnan(above["p_greater"]):
        verdict, p = INCONCLUSIVE, None
    else:
        p = max(above["p_greater"], below["p_less"])
        outside = min(above["p_less"], below["p_greater"])
        verdict = HOLDS if p < alpha else FAILS if outside < alpha else INCONCLUSIVE
    shown = "n/a" if p is None else f"{p:.3g}"
    measured = (f"{_describe(a_name, a, scale, unit)} vs {_describe(b_name, b, scale, unit)}; margin "
                f"{scale * margin:.2f}{unit}, TOST p = {shown}")
    return Claim(claim, measured, verdict, p, {"test": "tost-welch", "alpha": alpha, "margin": margin,
                                               "a": a, "b": b})


def claim_above(claim: str, values: Sequence[float], bound: float, *, name: str = "X", alpha: float = 0.05,
                scale: float = 1.0, unit: str = "") -> Claim:
    """The claim that the mean of `values` exceeds `bound`: one-sided one-sample t-test; it
    does not hold when the mean is significantly below."""
    from scipy import stats

    _check_alpha(alpha)
    values = _values("values", values)
    if len(values) < 2:
        verdict, p, t = INCONCLUSIVE, None, math.nan
    elif statistics.variance(values) == 0:
        mean = values[0]
        verdict, p, t = (HOLDS, 0.0, math.inf) if mean > bound else (FAILS, 0.0, -math.inf) if mean < bound else (
            INCONCLUSIVE, 1.0, 0.0)
    else:
        greater = stats.ttest_1samp(values, bound, alternative="greater")
        less = stats.ttest_1samp(values, bound, alternative="less")
        t = float(greater.statistic)
        verdict, p = ((HOLDS, float(greater.pvalue)) if greater.pvalue < alpha else
                      (FAILS, float(less.pvalue)) if less.pvalue < alpha else (INCONCLUSIVE, float(greater.pvalue)))
    shown = "n/a" if p is None else f"{p:.3g}"
    measured = f"{_describe(name, values, scale, unit)} vs {scale * bound:.2f}{unit}; t = {t:.2f}, p = {shown}"
    return Claim(claim, measured, verdict, p, {"test": "t-1samp", "alpha": alpha, "bound": bound, "t": t,
                                               "values": values})


# -- grouping records ----------------------------------------------------------------------

def aggregate(records: Iterable, key: Callable, metric: str = "accuracy") -> dict:
    """Group done records by `key(record)` and summarize `record.metrics[metric]`:
    {key: {"values", "mean", "std", "n"}}, in first-seen order."""
    groups: dict = {}
    for record in records:
        if record.status != "done":
            continue
        groups.setdefault(key(record), []).append(float(record.metrics[metric]))
    result = {}
    for group, values in groups.items():
        mean, std = mean_std(values)
        result[group] = {"values": values, "mean": mean, "std": std, "n": len(values)}
    return result


# -- plots and the report ------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(series: dict[str, Sequence[tuple[float, float, float]]], *, xlabel: str, ylabel: str, title: str,
               baselines: dict[str, float] | None = None):
    """A figure of lines with error bars: series label -> [(x, mean, std)], and horizontal
    baselines label -> y."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, value in (baselines or {}).items():
        axes.axhline(value, color="black", linestyle="--", label=f"{label} ({value:.1f})")
    for label, points in series.items():
        points = sorted(points)
        axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                      capsize=3, label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_scatter(x: Sequence[float], y: Sequence[float], *, xlabel: str, ylabel: str, title: str):
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.scatter(x, y, s=12)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    figure.tight_layout()
    return figure


def _finite(value):
    """`value` with NaN and infinities as None: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0] if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A fixed-width table for the terminal: the first column left-aligned, the others right."""
    lines = [list(header)] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


class Report:
    """A report assembled in order: text, tables, claims and figures; `numbers` holds
    whatever else goes into the JSON."""

    def __init__(self, title: str, *, alpha: float = 0.05):
        _check_alpha(alpha)
        self.title, self.alpha = title, alpha
        self.parts: list[tuple[str, object]] = []
        self.claims: list[Claim] = []
        self.tables: dict[str, list[dict]] = {}
        self.figures: dict[str, object] = {}
        self.numbers: dict = {}

    def text(self, markdown: str) -> None:
        self.parts.append(("text", markdown))

    def table(self, name: str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
        self.tables[name] = [dict(row) for row in rows]
        self.parts.append(("table", (name, columns)))

    def claim(self, claim: Claim) -> None:
        if not isinstance(claim, Claim):
            raise TypeError(f"{_OWNER}: claim must be a Claim, got {type(claim).__name__}")
        if not self.claims:
            self.parts.append(("claims", None))
        self.claims.append(claim)

    def figure(self, name: str, figure, caption: str = "") -> None:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"{_OWNER}: a figure name is letters, digits, '-' and '_', got {name!r}")
        self.figures[name] = figure
        self.parts.append(("figure", (name, caption)))

    def markdown(self, name: str = "report") -> str:
        lines = [f"# {self.title}", ""]
        for kind, content in self.parts:
            if kind == "text":
                lines += [content, ""]
            elif kind == "table":
                table, columns = content
                lines += [markdown_table(self.tables[table], columns), ""]
            elif kind == "claims":
                rows = [{"claim": c.claim, "measured": c.measured, "verdict": f"**{c.verdict}**"} for c in self.claims]
                lines += ["## Claims", "", markdown_table(rows, ["claim", "measured", "verdict"]), "",
                          "Rule: " + VERDICT_RULE.format(alpha=self.alpha), ""]
            else:
                figure, caption = content
                lines += [f"![{caption or figure}]({name}-{figure}.png)", ""]
                if caption:
                    lines += [f"*{caption}*", ""]
        return "\n".join(lines).rstrip() + "\n"

    def to_dict(self) -> dict:
        return {"title": self.title, "alpha": self.alpha, "rule": VERDICT_RULE.format(alpha=self.alpha),
                "claims": [claim.to_dict() for claim in self.claims], "tables": self.tables, "numbers": self.numbers}

    def write(self, directory: str | os.PathLike, name: str = "report") -> dict[str, Path]:
        """Write NAME.md, NAME.json and the figures' PNGs to `directory`; returns the paths."""
        directory = Path(os.fspath(directory))
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": directory / f"{name}.md", "json": directory / f"{name}.json"}
        for figure_name, figure in self.figures.items():
            path = directory / f"{name}-{figure_name}.png"
            figure.savefig(path, dpi=120)
            _pyplot().close(figure)
            paths[figure_name] = path
        paths["json"].write_text(json.dumps(_finite(self.to_dict()), indent=1, allow_nan=False) + "\n")
        paths["markdown"].write_text(self.markdown(name))
        return paths
