"""`dynasparse demo`: sparse training of a small CNN on scikit-learn's handwritten digits.

Methods, each at 90%, 95% and 98% sparsity of the prunable layers (conv2, fc1; the first conv
and the classifier stay dense), over several seeds, all with the same number of SGD steps and
the same cosine learning-rate decay:
- dense: no pruning;
- one-shot: dense training for 75% of the steps, one-shot global magnitude pruning, masked
  fine-tuning for the remaining 25%;
- gradual: gradual magnitude pruning (cubic ramp from 0 to the target over the first 75%,
  updates every 16 steps), masked mode;
- dpf: DPF, the same ramp and update period, feedback mode, hard-pruned at the end.

Prints a table (test accuracy mean and std, final sparsity, mean mask flip rate per update,
early and late in training, fraction of weights ever re-activated, training time), writes
`demo.json` (every number) and `demo.png` (accuracy against sparsity) to --out, and ends with
the speed of a 4096-wide sparse linear layer at 90% against dense (the `nn` benchmark cases'
workloads, timed by the benchmark harness). Deterministic per seed on the CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import nn

METHODS = ("dense", "one-shot", "gradual", "dpf")
SPARSITIES = (0.9, 0.95, 0.98)
DENSE_LAYERS = ["conv1", "fc2"]
ONE_SHOT_AT = 0.75  # fraction of the steps trained dense before one-shot pruning
RAMP_END = 0.75     # gradual and DPF reach the target here
UPDATE_EVERY = 16


def load_digits_split(device: torch.device):
    """The 1797 8x8 digits bundled with scikit-learn (no download), scaled to [0, 1], split
    80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(list(range(len(labels))), test_size=0.2, random_state=0,
                                   stratify=digits.target)
    train, test = torch.tensor(train), torch.tensor(test)
    return ((images[train].to(device), labels[train].to(device)), (images[test].to(device), labels[test].to(device)))


def make_model() -> nn.Sequential:
    return nn.Sequential(collections.OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(512, 128)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(128, 10))]))


def _accuracy(model: nn.Module, data) -> float:
    images, labels = data
    model.eval()
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).sum().item()
    model.train()
    return correct / len(labels)


def train_run(method: str, sparsity: float, seed: int, train, test, *, steps: int, batch: int = 64,
              lr: float = 0.05, device: torch.device = torch.device("cpu"), progress=None) -> dict:
    """One training run; returns its numbers. The same seed gives the same initial weights and
    minibatch order for every method."""
    from dynasparse import optim, pruning

    torch.manual_seed(seed)
    model = make_model().to(device)
    order = torch.Generator().manual_seed(seed)
    images, labels = train

    def new_optimizer():
        return optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    pruner = None
    dense_steps = steps
    if method == "gradual":
        pruner = pruning.GradualMagnitude(model, sparsity, steps, end=RAMP_END, update_every=UPDATE_EVERY,
                                          exclude=DENSE_LAYERS)
    elif method == "dpf":
        pruner = pruning.DPF(model, sparsity, steps, ramp_end=RAMP_END, update_every=UPDATE_EVERY,
                             exclude=DENSE_LAYERS)
    elif method == "one-shot":
        dense_steps = round(ONE_SHOT_AT * steps)
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}")
    optimizer = new_optimizer()
    if pruner is not None:
        pruner.attach(optimizer)

    loss_fn = nn.CrossEntropyLoss()
    permutation, position = torch.randperm(len(labels), generator=order), 0
    start = time.perf_counter()
    for step in range(steps):
        if method == "one-shot" and step == dense_steps:
            pruner = pruning.OneShotMagnitude(model, sparsity, exclude=DENSE_LAYERS)
            optimizer = new_optimizer()  # layers were replaced: momentum restarts with fine-tuning
            pruner.attach(optimizer)
        if position + batch > len(labels):
            permutation, position = torch.randperm(len(labels), generator=order), 0
        index = permutation[position:position + batch].to(device)
        position += batch
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images[index]), labels[index]).backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
        if progress is not None:
            progress.update(1)
    if method == "dpf":
        pruner.finalize()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    result = {"method": method, "target": 0.0 if method == "dense" else sparsity, "seed": seed,
              "accuracy": _accuracy(model, test), "seconds": seconds}
    if pruner is None:
        result.update(sparsity=0.0, flip_rates=[], reactivated=0.0)
    else:
        report = pruner.report()
        result.update(sparsity=report.sparsity, flip_rates=[rate for _, rate in report.flip_rates],
                      flip_steps=[s for s, _ in report.flip_rates], reactivated=report.reactivated_fraction,
                      report=str(report))
    return result


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _flip_summary(flip_rates: Sequence[float]) -> tuple[float, float, float] | None:
    """Mean flip rate per update after the initial mask, and over the first and last quarter
    of those updates (is the mask settling?); None without such updates (one-shot, dense)."""
    rates = list(flip_rates[1:])
    if not rates:
        return None
    quarter = max(1, len(rates) // 4)
    return statistics.fmean(rates), statistics.fmean(rates[:quarter]), statistics.fmean(rates[-quarter:])


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, float], list[dict]] = collections.defaultdict(list)
    for run in runs:
        groups[(run["method"], run["target"])].append(run)
    rows = []
    for (method, target), group in groups.items():
        accuracy, accuracy_std = _mean_std([run["accuracy"] for run in group])
        flips = [_flip_summary(run["flip_rates"]) for run in group]
        flips = None if None in flips else [statistics.fmean(f[i] for f in flips) for i in range(3)]
        rows.append({"method": method, "target": target, "seeds": len(group), "accuracy": accuracy,
                     "accuracy_std": accuracy_std, "sparsity": statistics.fmean(run["sparsity"] for run in group),
                     "flip_rate": flips and flips[0], "flip_rate_early": flips and flips[1],
                     "flip_rate_late": flips and flips[2],
                     "reactivated": statistics.fmean(run["reactivated"] for run in group),
                     "seconds": statistics.fmean(run["seconds"] for run in group)})
    return rows


def format_table(rows: list[dict]) -> str:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    header = ("method", "target", "test acc (mean ± std)", "sparsity", "flips/update", "early -> late",
              "re-activated", "time/run s")
    lines = [header]
    for row in rows:
        lines.append((row["method"], f"{row['target']:.2f}",
                      f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f} %",
                      f"{row['sparsity']:.4f}", number(row["flip_rate"], ".4f"),
                      f"{number(row['flip_rate_early'], '.4f')} -> {number(row['flip_rate_late'], '.4f')}",
                      f"{row['reactivated']:.4f}", f"{row['seconds']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = sorted((row for row in rows if row["method"] == method), key=lambda row: row["target"])
        if not points:
            continue
        if method == "dense":
            mean = points[0]["accuracy"] * 100
            axes.axhline(mean, color="black", linestyle="--", label=f"dense ({mean:.1f}%)")
            continue
        axes.errorbar([100 * row["sparsity"] for row in points], [100 * row["accuracy"] for row in points],
                      yerr=[100 * row["accuracy_std"] for row in points], marker="o", capsize=3, label=method)
    axes.set_xlabel("sparsity of the pruned layers (%)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("digits CNN: accuracy against sparsity")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """Create --out and write a probe file in it now: the results are written after all the
    training, too late to learn that they cannot be."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        parser.error(f"--out {out}: cannot write the results there ({error.strerror or error})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynasparse demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, few steps: a smoke test in seconds")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="SGD steps per run (default 480, 96 with --quick)")
    parser.add_argument("--out", default="demo-results", help="folder for demo.json and demo.png")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for the training runs (default 1: the small CNN's operations are too "
                        "small to gain from more, and lose much when cores are shared); the speed section uses "
                        "torch's default")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed section")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (96 if args.quick else 480)
    if seeds < 1 or steps < UPDATE_EVERY:
        parser.error(f"--seeds must be >= 1 and --steps >= {UPDATE_EVERY}")
    device = _device(parser, args.device)
    _check_out(parser, args.out)

    from tqdm import tqdm

    import dynasparse

    default_threads = torch.get_num_threads()
    print(f"dynasparse {dynasparse.__version__} demo on {device} (torch {torch.__version__}, python "
          f"{platform.python_version()}, {args.threads} CPU thread(s) for training, {default_threads} for the "
          f"speed section, load average {_load_average()})")
    print(f"digits CNN, {steps} SGD steps per run, {seeds} seed(s), methods {', '.join(METHODS)} at sparsity "
          f"{', '.join(f'{s:.0%}' for s in SPARSITIES)} of conv2 + fc1 (conv1 and fc2 dense)")
    train, test = load_digits_split(device)
    plan = [("dense", 0.0, seed) for seed in range(seeds)]
    plan += [(method, sparsity, seed) for method in METHODS[1:] for sparsity in SPARSITIES for seed in range(seeds)]
    runs = []
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tqdm(total=len(plan) * steps, desc="training", unit="step", file=sys.stderr,
              disable=not sys.stderr.isatty()) as progress:
        for method, sparsity, seed in plan:
            progress.set_postfix_str(f"{method} {sparsity:.0%} seed {seed}")
            runs.append(train_run(method, sparsity, seed, train, test, steps=steps, device=device, progress=progress))
    training_s = time.perf_counter() - start
    torch.set_num_threads(default_threads)
    rows = summarize(runs)
    print()
    print(format_table(rows))
    print(f"\ntraining: {len(runs)} runs in {training_s:.1f} s")
    print("flips/update: fraction of prunable weights whose mask bit changed per update (after the initial mask); "
          "early -> late: first vs last quarter of the updates; re-activated: pruned at an update, active at a later")
    speed = []
    if not args.no_speed:
        print("\nspeed: 4096 x 4096 linear layer at 90% sparsity, batch 128, vs nn.Linear (ratio > 1: sparse is "
              f"faster; load average {_load_average()})")
        speed = speed_section(device, quick=args.quick)
        for entry in speed:
            print(f"  {entry['mode']:<15} dense {entry['dense_ms']:8.2f} ms  sparse {entry['sparse_ms']:8.2f} ms  "
                  f"ratio {entry['ratio']:.2f}x")
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "demo.json"), os.path.join(args.out, "demo.png")
    with open(json_path, "w") as handle:
        json.dump({"device": str(device), "torch": torch.__version__, "training_threads": args.threads, "speed_threads": default_threads,
                   "steps": steps, "seeds": seeds, "training_seconds": training_s, "load_average": _load_average(),
                   "backends": dynasparse.format_backends(), "summary": rows,
                   "runs": [{key: value for key, value in run.items() if key != "report"} for run in runs],
                   "speed": speed}, handle, indent=1)
    plot(rows, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
