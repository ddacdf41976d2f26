"""Crossover sparsities of the masked matmul benchmarks: for each (product, layout, batch,
dtype), the lowest measured sparsity from which a variant is at least as fast as dense at
every higher sparsity measured too, and the ratios at each sparsity.

    python -m dynasparse.bench.matmul_summary benchmarks/results/<machine>-<date>.json [--variant dynasparse]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def ratios_by_group(results: list[dict], variant: str) -> dict[tuple, dict[float, float]]:
    groups: dict[tuple, dict[float, float]] = defaultdict(dict)
    for result in results:
        params = result.get("params", {})
        if result.get("family") != "matmul" or "product" not in params:
            continue
        measured = result.get("variants", {}).get(variant)
        if measured is None or measured.get("ratio") is None:
            continue
        key = (params["product"], params["layout"], params["batch"], params["dtype"])
        groups[key][params["sparsity"]] = measured["ratio"]
    return groups


def crossover(ratios: dict[float, float]) -> float | None:
    """The lowest sparsity s such that the ratio is >= 1 at s and at every sparsity above it."""
    found = None
    for sparsity in sorted(ratios, reverse=True):
        if ratios[sparsity] < 1.0:
            break
        found = sparsity
    return found


def format_summary(results: list[dict], variant: str) -> str:
    groups = ratios_by_group(results, variant)
    sparsities = sorted({s for ratios in groups.values() for s in ratios})
    header = ["product", "layout", "batch", "dtype", "crossover"] + [f"s={s}" for s in sparsities]
    rows = [header]
    for (product, layout, batch, dtype), ratios in sorted(groups.items()):
        cross = crossover(ratios)
        rows.append([product, layout, str(batch), dtype, "none" if cross is None else str(cross)]
                    + [f"{ratios[s]:.2f}x" if s in ratios else "-" for s in sparsities])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return f"variant {variant!r}: ratio = dense time / variant time\n" + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynasparse.bench.matmul_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a JSON file written by `dynasparse bench`")
    parser.add_argument("--variant", default="dynasparse", help="which variant's ratios (default: dynasparse)")
    args = parser.parse_args(argv)
    print(format_summary(json.loads(args.results.read_text())["results"], args.variant))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
