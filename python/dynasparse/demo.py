"""`dynasparse demo`: sparse training where the methods separate, then sparse vs dense speed.

The demo experiment (`dynasparse.experiments.catalog.demo`, also `dynasparse reproduce demo`):
MNIST-1D (generated offline) and a small 1-D CNN; dense, one-shot magnitude pruning +
fine-tuning, gradual magnitude pruning, DPF and RigL, each at 90%, 95% and 98% sparsity of the
middle convolutions (the first convolution and the classifier stay dense), over several seeds,
all with the same SGD steps and cosine learning rate. The runs go through the population
runner: worker processes over the cores, one thread each, stored in --out (a rerun trains only
what is missing). It prints a table (test accuracy mean and std, final sparsity, mask flips per
update early and late, weights ever re-activated, time per run) and the DPF paper's claims with
their verdicts, writes demo.md (the claims table), demo.json (every number) and
demo-accuracy.png to --out, and ends with the speed of a 4096-wide sparse linear layer at 90%
against dense (the `nn` benchmark cases' workloads, timed by the benchmark harness), and of the
demo's own 1-D CNN at 90% (training step and inference; kernels pinned and backend="auto").
Deterministic per seed on the CPU. `--data digits`: the digits CNN on scikit-learn's digits.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

from .experiments import Store, run_population
from .experiments.runner import default_workers
from .experiments.catalog import demo as experiment
from .experiments.reports import text_table

METHODS = tuple(experiment.METHODS)
SPARSITIES = experiment.SPARSITIES


def speed_section(device: torch.device, *, quick: bool, features: int = 4096) -> list[dict]:
    """One training step (feedback and masked) and one inference step of a 4096-wide linear
    layer at 90% sparsity against nn.Linear: the `nn` benchmark cases' workloads and timing."""
    from dynasparse.bench.harness import measure, synchronizer
    from dynasparse.bench.nn_cases import linear_workload

    sync = synchronizer(device)
    target_s = 0.2 if quick else 1.0
    results = []
    for mode in ("train-feedback", "train-masked", "inference"):
        baseline, variants = linear_workload(device, features=features, batch=128, mode=mode, sparsity=0.9)
        dense = measure(baseline, sync=sync, target_s=target_s)
        sparse = measure(variants["dynasparse"], sync=sync, target_s=target_s)
        results.append({"mode": mode, "dense_ms": dense.median_ms, "sparse_ms": sparse.median_ms,
                        "ratio": dense.median_ms / sparse.median_ms})
    return results


def model_speed(device: torch.device, *, quick: bool) -> list[dict]:
    """The demo's own 1-D CNN at 90%: one training step (batch 64) and inference, dense against
    the kernels and against backend="auto" (the `models` benchmark cases' workloads)."""
    from dynasparse.bench.harness import measure, synchronizer
    from dynasparse.bench.model_cases import model_workload

    sync = synchronizer(device)
    target_s = 0.2 if quick else 1.0
    results = []
    for mode in ("train", "inference"):
        baseline, variants = model_workload(device, model="cnn1d", mode=mode, sparsity=0.9, layout="unstructured")
        dense = measure(baseline, sync=sync, target_s=target_s).median_ms
        sparse = measure(variants["dynasparse"], sync=sync, target_s=target_s).median_ms
        auto = measure(variants["dynasparse-auto"], sync=sync, target_s=target_s).median_ms
        results.append({"mode": mode, "dense_ms": dense, "sparse_ms": sparse, "auto_ms": auto,
                        "ratio": dense / sparse, "auto_ratio": dense / auto})
    return results


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def _device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """The device to train on, refused before any training when this torch cannot use it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name}: not a device; choose cpu or cuda")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: the demo runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: this torch ({torch.__version__}) sees no CUDA device "
                         "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynasparse demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, few steps: a smoke test in seconds")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"number of seeds (default {experiment.SEEDS}, 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"SGD steps per run (default {experiment.STEPS['mnist1d']} on mnist1d, "
                        f"{experiment.STEPS['digits']} on digits, {experiment.QUICK_STEPS} with --quick)")
    parser.add_argument("--data", default="mnist1d", choices=sorted(experiment.VARIANTS),
                        help="mnist1d (default: the 1-D CNN) or digits (the digits CNN)")
    parser.add_argument("--out", default="demo-results",
                        help="folder for the runs (resumable), demo.md, demo.json and demo-accuracy.png")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes for the training runs (default: the CPU cores at hand; 0: in this "
                        "process; on cuda the runs go in this process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per training run (default 1: the small CNN's operations are too small to "
                        "gain from more, and lose much when cores are shared); the speed section uses torch's default")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed section")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    if (args.seeds is not None and args.seeds < 1) or (args.steps is not None and args.steps < 1):
        parser.error("--seeds and --steps must be >= 1")
    device = _device(parser, args.device)
    try:
        Store(args.out)  # results are written after all the training: a bad --out must fail now
    except (OSError, ValueError) as error:
        parser.error(f"--out {args.out}: cannot write the results there ({error})")

    import dynasparse

    specs = experiment.specs(args.quick, data=args.data, seeds=args.seeds, steps=args.steps, device=str(device),
                             threads=args.threads)
    spec = specs[0]
    seeds = len({s.seed for s in specs})
    inline = args.workers == 0 or device.type == "cuda"
    workers = 1 if inline else (args.workers or None)
    default_threads = torch.get_num_threads()
    print(f"dynasparse {dynasparse.__version__} demo on {device} (torch {torch.__version__}, python "
          f"{platform.python_version()}, {'this process' if inline else f'{workers or default_workers()} worker(s)'} "
          f"x {args.threads} CPU thread(s) for training, {default_threads} for the speed section, load average "
          f"{_load_average()})")
    print(f"{spec.model} on {spec.data}, {spec.steps} SGD steps per run, {seeds} seed(s), methods "
          f"{', '.join(METHODS)} at sparsity {', '.join(f'{s:.0%}' for s in SPARSITIES)} of the hidden layers "
          f"(the first layer and the classifier dense); runs stored in {args.out}")
    start = time.perf_counter()
    population = run_population(specs, args.out, executor="inline" if inline else None, workers=workers,
                                description="training")
    training_s = time.perf_counter() - start
    if not population.complete:
        print(f"\n{len(population.failed)} run(s) failed (rerun the command to retry them):")
        for record in population.failed:
            print(f"  {record.run_id} {record.spec.label}: {record.error.strip().splitlines()[-1]}")
        return 1
    records = population.records
    report = experiment.analyze(records, Store(args.out), args.quick)
    rows = experiment.summarize(records)
    print()
    print(experiment.format_table(rows))
    print(f"\ntraining: {len(records)} runs, {population.computed} trained now in {training_s:.1f} s, "
          f"{population.reused} already stored")
    if population.stale_note():
        print(population.stale_note())
    print("flips/update: fraction of prunable weights whose mask bit changed per update (after the initial mask); "
          "early -> late: first vs last quarter of the updates; re-activated: pruned at an update, active at a later")
    if report.claims:
        print("\nclaims (one-sided Welch t-test over the seeds at 5%; see demo.md):")
        print(text_table([(claim.claim, claim.verdict) for claim in report.claims], ("claim", "verdict")))
    speed = []
    if not args.no_speed:
        print("\nspeed: 4096 x 4096 linear layer at 90% sparsity, batch 128, vs nn.Linear (ratio > 1: sparse is "
              f"faster; load average {_load_average()})")
        speed = speed_section(device, quick=args.quick)
        for entry in speed:
            print(f"  {entry['mode']:<15} dense {entry['dense_ms']:8.2f} ms  sparse {entry['sparse_ms']:8.2f} ms  "
                  f"ratio {entry['ratio']:.2f}x")
        print("speed: the demo's 1-D CNN at 90% (batch 64), vs the dense CNN; kernels pinned, and backend='auto' "
              "(each layer call the faster of the kernels and dense on w * m)")
        cnn_speed = model_speed(device, quick=args.quick)
        for entry in cnn_speed:
            print(f"  {entry['mode']:<15} dense {entry['dense_ms']:8.2f} ms  sparse {entry['sparse_ms']:8.2f} ms  "
                  f"ratio {entry['ratio']:.2f}x  auto {entry['auto_ms']:8.2f} ms  ratio {entry['auto_ratio']:.2f}x")
        speed = speed + [{**entry, "mode": f"cnn1d-{entry['mode']}"} for entry in cnn_speed]
    report.numbers.update(device=str(device), torch=torch.__version__, training_threads=args.threads,
                          speed_threads=default_threads, steps=spec.steps, seeds=seeds, training_seconds=training_s,
                          trained_now=population.computed, load_average=_load_average(),
                          backends=dynasparse.format_backends(), speed=speed)
    paths = report.write(args.out, "demo")
    print(f"\nwrote {', '.join(str(path) for path in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
