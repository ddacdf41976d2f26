"""`python -m dynasparse.experiments.throughput`: the population runner's scaling and overhead.

Trains the same number of small runs (the demo's 1-D CNN on MNIST-1D, DPF at 90%) with 1
worker and with N (default 2), each in a fresh directory, after one warm-up population that
starts the fork server, and prints runs per second for both and their ratio (the target is
>= 1.8x with 2 workers on 2 free cores). Then 1-step runs measure the runner's overhead per
run: the population's wall time per run less the training loops (spawn, data, model,
evaluation, checkpoint, store). Share of the machine matters: the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .runner import run_population
from .spec import RunSpec


def _population(tag: int, count: int, steps: int) -> list[RunSpec]:
    return [RunSpec(data="mnist1d", model="cnn1d", method="dpf", sparsity=0.9, steps=steps, seed=1000 * tag + seed)
            for seed in range(count)]


def _timed(specs: list[RunSpec], workers: int, directory: Path):
    shutil.rmtree(directory, ignore_errors=True)
    began = time.perf_counter()
    result = run_population(specs, directory, workers=workers, progress=False)
    wall = time.perf_counter() - began
    if not result.complete:
        raise RuntimeError(f"runs failed: {[record.error for record in result.failed]}")
    return wall, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynasparse.experiments.throughput", description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="workers to compare with 1 (default 2)")
    parser.add_argument("--runs", type=int, default=8, help="runs per population (default 8)")
    parser.add_argument("--steps", type=int, default=300, help="steps per run (default 300)")
    args = parser.parse_args(argv)
    if args.workers < 2 or args.runs < 1 or args.steps < 1:
        parser.error("--workers must be >= 2, --runs and --steps >= 1")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _timed(_population(0, args.workers, 10), args.workers, root / "warm-up")
        walls = {}
        for tag, workers in enumerate((1, args.workers), 1):
            walls[workers], result = _timed(_population(tag, args.runs, args.steps), workers, root / f"w{workers}")
            training = sum(record.metrics["seconds"] for record in result.records)
            print(f"{workers} worker(s): {args.runs} runs in {walls[workers]:.2f} s = "
                  f"{args.runs / walls[workers]:.3f} runs/s (training loops {training:.1f} s in all; load average "
                  f"{os.getloadavg()[0]:.2f})")
        print(f"throughput {args.workers} vs 1 worker: {walls[1] / walls[args.workers]:.2f}x")
        count = 20
        wall, result = _timed(_population(9, count, 1), 1, root / "overhead")
        inside = [record.wall_seconds - record.metrics["seconds"] for record in result.records]
        total = (wall - sum(record.metrics["seconds"] for record in result.records)) / count
        print(f"overhead per run: {1000 * total:.0f} ms (1-step runs, 1 worker: population wall time per run less "
              f"training), of which {1000 * statistics.median(inside):.0f} ms in the worker (median: data, model, "
              "evaluation, checkpoint)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
