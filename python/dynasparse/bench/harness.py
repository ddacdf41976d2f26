"""The benchmark harness behind `dynasparse bench`.

Speed is only ever reported as a ratio against a plain-PyTorch baseline timed in the same
run, on the same inputs: ratio = baseline time / variant time, so > 1 means faster than
what a user without dynasparse would write. Absolute times depend on the machine, clocks
and load; a ratio taken seconds apart on the same inputs mostly does not.

A benchmark is a `Case`: a family ("bitmask", later "matmul", "topk", ...), a name, JSON
parameters, and a `setup(device, **params)` that builds the inputs once and returns
`(baseline_fn, {variant_name: fn})` of argument-free callables. Each variant's first
output is checked against the baseline's, so a fast wrong kernel shows up as an error,
not as a speed-up. Cases register on import of the modules in `CASE_MODULES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .. import dispatch

# Importing these registers their cases; a new family appends its module here.
CASE_MODULES = ("dynasparse.bench.cases", "dynasparse.bench.topk_cases", "dynasparse.bench.optim_cases",
                "dynasparse.bench.matmul_cases", "dynasparse.bench.nn_cases", "dynasparse.bench.shrink_cases",
                "dynasparse.bench.model_cases", "dynasparse.bench.vd_cases", "dynasparse.bench.pruning_cases")

SCHEMA_VERSION = 1
QUICK_TARGET_S = 0.2
FULL_TARGET_S = 1.0
WARMUP_FRACTION = 0.2
# Shorter repeats would mostly time the clock and the device synchronization, so fast
# ops are called several times per repeat.
MIN_REPEAT_S = 2e-3
MIN_REPEATS = 5
MAX_REPEATS = 200

Workload = tuple[Callable[[], Any], dict[str, Callable[[], Any]]]


# Compared and hashed by identity (ids are unique in a registry), so cases can key caches.
@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One benchmark: `setup(device, **params)` returns `(baseline_fn, {variant: fn})`.

    `devices` are the device types the case runs on. Quick cases are the ones a `--quick`
    run takes, so they should be small. `check(variant_output, baseline_output)` raises
    AssertionError when a variant computes something else (None skips the check, e.g.
    for in-place updates that return nothing comparable). `metrics(fn, device)`, when
    given, measures more than time (e.g. peak extra memory) once for the baseline and each
    variant, returning {metric name: number}.
    """

    family: str
    name: str
    params: dict[str, Any]
    setup: Callable[..., Workload]
    devices: tuple[str, ...] = ("cpu", "cuda")
    quick: bool = False
    check: Callable[[Any, Any], None] | None = torch.testing.assert_close
    metrics: Callable[[Callable[[], Any], torch.device], dict[str, float]] | None = None

    def __post_init__(self):
        # Fail at registration, not after a long run when the results are written.
        json.dumps(self.params)

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"

    def build(self, device: torch.device) -> Workload:
        return self.setup(device, **self.params)


class Registry:
    """Cases by id, in registration order."""

    def __init__(self):
        self._cases: dict[str, Case] = {}

    def add(self, case: Case) -> Case:
        if case.id in self._cases:
            raise ValueError(f"benchmark case {case.id!r} is registered twice")
        self._cases[case.id] = case
        return case

    def families(self) -> list[str]:
        return sorted({case.family for case in self._cases.values()})

    def select(self, *, families: Sequence[str] = (), pattern: str | None = None,
               device_type: str | None = None, quick: bool = False) -> list[Case]:
        """Cases in any of `families` (all if empty) whose id ("family/name") matches the
        regular expression `pattern` anywhere, that run on `device_type`, and, when
        `quick`, only the quick ones."""
        unknown = sorted(set(families) - set(self.families()))
        if unknown:
            raise ValueError(f"unknown benchmark family {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(self.families()) or 'none'}")
        regex = re.compile(pattern) if pattern else None
        return [case for case in self._cases.values()
                if (not families or case.family in families)
                and (regex is None or regex.search(case.id))
                and (device_type is None or device_type in case.devices)
                and (case.quick or not quick)]


REGISTRY = Registry()
register = REGISTRY.add


def load_cases() -> Registry:
    for module in CASE_MODULES:
        importlib.import_module(module)
    return REGISTRY


# ---------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call times over the repeats of one measurement, in milliseconds."""

    median_ms: float
    min_ms: float
    iqr_ms: float
    repeats: int
    calls_per_repeat: int

    @classmethod
    def from_seconds(cls, per_call_s: Sequence[float], calls_per_repeat: int) -> Timing:
        q1, median, q3 = np.percentile(np.asarray(per_call_s) * 1e3, [25, 50, 75])
        return cls(float(median), min(per_call_s) * 1e3, float(q3 - q1), len(per_call_s), calls_per_repeat)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work, so a timer sees kernels finish, not launch."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_calls(fn: Callable[[], Any], calls: int, sync: Callable[[], None],
                clock: Callable[[], float]) -> float:
    sync()
    start = clock()
    for _ in range(calls):
        fn()
    sync()
    return clock() - start


def measure(fn: Callable[[], Any], *, sync: Callable[[], None], target_s: float,
            repeats: int | None = None, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Warm up, then time `repeats` repeats (chosen so the whole takes about `target_s`
    when None) of a calibrated number of calls each."""
    # Warm-up in doubling batches until its budget is spent; the last batch, timed in one
    # piece, estimates the per-call time for calibration.
    calls, spent = 1, 0.0
    while True:
        elapsed = _time_calls(fn, calls, sync, clock)
        spent += elapsed
        if spent >= WARMUP_FRACTION * target_s:
            break
        calls *= 2
    per_call_s = max(elapsed / calls, 1e-9)

    repeat_s = max(MIN_REPEAT_S, target_s / MAX_REPEATS)
    calls_per_repeat = max(1, math.ceil(repeat_s / per_call_s))
    if repeats is None:
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, round(target_s / (calls_per_repeat * per_call_s))))
    per_call = [_time_calls(fn, calls_per_repeat, sync, clock) / calls_per_repeat for _ in range(repeats)]
    return Timing.from_seconds(per_call, calls_per_repeat)


# ---------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class CaseResult:
    case: Case
    baseline: Timing | None = None
    variants: dict[str, Timing] = dataclasses.field(default_factory=dict)
    # Keyed by "setup", "baseline" or a variant name.
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    # Keyed by "baseline" or a variant name: Case.metrics' results.
    metrics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def ratio(self, variant: str) -> float | None:
        """Baseline time / variant time (> 1: the variant is faster)."""
        if self.baseline is None or variant not in self.variants:
            return None
        return self.baseline.median_ms / self.variants[variant].median_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case.id,
            "family": self.case.family,
            "name": self.case.name,
            "params": self.case.params,
            "baseline": dataclasses.asdict(self.baseline) if self.baseline else None,
            "variants": {name: {**dataclasses.asdict(timing), "ratio": self.ratio(name)}
                         for name, timing in self.variants.items()},
            "errors": self.errors,
            "metrics": self.metrics,
        }


@dataclasses.dataclass
class Report:
    environment: dict[str, Any]
    settings: dict[str, Any]
    results: list[CaseResult]

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "environment": self.environment,
                "settings": self.settings, "results": [result.to_json() for result in self.results]}

    @property
    def failed(self) -> bool:
        return any(result.errors for result in self.results)


def check_variant(case: Case, output: Any, expected: Any) -> None:
    """Raises AssertionError when a variant's output is not the baseline's."""
    if case.check is None:
        return
    try:
        case.check(output, expected)
    except AssertionError as error:
        raise AssertionError(f"output differs from the baseline's: {error}") from error


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _run_case(case: Case, device: torch.device, sync: Callable[[], None], target_s: float,
              repeats: int | None, bar: tqdm) -> CaseResult:
    result = CaseResult(case)
    try:
        baseline, variants = case.build(device)
    except Exception as error:
        result.errors["setup"] = _describe(error)
        return result

    bar.set_postfix_str("baseline")
    try:
        # The first call stays out of the timing: it may compile or allocate caches.
        expected = baseline()
        result.baseline = measure(baseline, sync=sync, target_s=target_s, repeats=repeats)
        if case.metrics is not None:
            result.metrics["baseline"] = case.metrics(baseline, device)
    except Exception as error:
        result.errors["baseline"] = _describe(error)

    for name, fn in variants.items():
        bar.set_postfix_str(name)
        try:
            output = fn()
            if "baseline" not in result.errors:
                check_variant(case, output, expected)
            del output
            result.variants[name] = measure(fn, sync=sync, target_s=target_s, repeats=repeats)
            if case.metrics is not None:
                result.metrics[name] = case.metrics(fn, device)
        except Exception as error:
            result.errors[name] = _describe(error)
    return result


def run(cases: Iterable[Case], *, device: torch.device, target_s: float, repeats: int | None = None,
        progress: bool = False) -> Report:
    """Time every case's baseline and variants; a failing setup, baseline or variant is
    recorded in `CaseResult.errors` and the run goes on."""
    cases = list(cases)
    sync = synchronizer(device)
    results = []
    with tqdm(cases, unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for case in bar:
            bar.set_description(case.id)
            results.append(_run_case(case, device, sync, target_s, repeats, bar))
    return Report(environment(device), {"target_s": target_s, "repeats": repeats}, results)


# ---------------------------------------------------------------------------------------
# Environment and output


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when available, else CPU; "cuda" without a CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"no CUDA device is available (torch {torch.__version__}, {built}); "
                         "use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose cpu, cuda or auto")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _git(*args: str) -> str | None:
    # Ask the checkout the package was imported from: that is the code being measured.
    package_dir = Path(__file__).resolve().parent
    try:
        completed = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True,
                                   text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        # The same CPU name covers AVX-512 and AVX2-only machines, whose kernels differ.
        "cpu_isa": dispatch.cpu_isa(),
        # Other work on the machine skews CPU timings most: keep the evidence beside them.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_output_path(environment: dict[str, Any], quick: bool) -> Path:
    """benchmarks/results/<device>-<date>.json inside a checkout, else in the current
    directory; quick runs get a -quick suffix so they never overwrite a full run."""
    cwd = Path.cwd()
    folder = cwd / "benchmarks" / "results" if (cwd / "benchmarks").is_dir() else cwd
    stem = f"{_slug(environment['device_name']) or environment['device']}-{environment['date'][:10]}"
    return folder / f"{stem}{'-quick' if quick else ''}.json"


def format_params(params: dict[str, Any]) -> str:
    def value(v):
        if isinstance(v, (list, tuple)) and all(isinstance(item, int) for item in v):
            return "x".join(map(str, v))
        return str(v)

    return " ".join(f"{key}={value(v)}" for key, v in params.items())


def format_table(report: Report) -> str:
    def ms(timing):
        # '#' keeps trailing zeros, so every time shows four significant digits.
        return f"{timing.median_ms:#.4g}".rstrip(".") if timing else "error"

    rows = [("case", "params", "baseline ms", "variant", "ms", "ratio")]
    for result in report.results:
        lead = (result.case.id, format_params(result.case.params), ms(result.baseline))
        entries = [(name, ms(timing), f"{result.ratio(name):.2f}x" if result.baseline else "-")
                   for name, timing in result.variants.items()]
        entries += [(name, "error", "-") for name in result.errors if name not in ("setup", "baseline")]
        for index, entry in enumerate(entries or [("-", "-", "-")]):
            rows.append((lead if index == 0 else ("", "", "")) + entry)

    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    numeric = {2, 4, 5}
    lines = ["  ".join(cell.rjust(width) if column in numeric else cell.ljust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("ratio = baseline time / variant time (median of repeats); > 1: faster than "
                 "the plain-PyTorch baseline")
    metrics = [f"  {result.case.id} [{name}]: " + " ".join(f"{key}={value:.4g}" for key, value in values.items())
               for result in report.results for name, values in result.metrics.items()]
    if metrics:
        lines += ["", "metrics:", *metrics]
    errors = [f"  {result.case.id} [{where}]: {message}"
              for result in report.results for where, message in result.errors.items()]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynasparse bench",
        description="Time dynasparse kernels against the plain-PyTorch way, in the same run. "
                    "Reports ratio = baseline time / variant time (> 1: faster), and writes "
                    "a JSON file and a PNG plot of the ratios.")
    parser.add_argument("--family", action="append", default=[],
                        help="only this case family (repeatable; default: all)")
    parser.add_argument("--filter", metavar="REGEX",
                        help="only cases whose id (family/name) matches this regular expression")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small cases only, about {QUICK_TARGET_S} s per measurement: a smoke run in seconds")
    parser.add_argument("--repeats", type=int,
                        help="timed repeats per measurement (default: chosen to fill the target time)")
    parser.add_argument("--target-s", type=float,
                        help=f"seconds per measurement (default {QUICK_TARGET_S} with --quick, else {FULL_TARGET_S})")
    parser.add_argument("--out", type=Path,
                        help="JSON results path; the plot goes beside it as .png (default: "
                             "benchmarks/results/<device>-<date>.json in a checkout, else ./<device>-<date>.json)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    return parser


def main(argv: Sequence[str] | None = None, *, registry: Registry | None = None) -> int:
    """`dynasparse bench`. Returns 0, or 1 when any setup, baseline or variant failed (the
    results, errors included, are written either way)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.target_s is not None and args.target_s <= 0:
        parser.error("--target-s must be positive")
    registry = registry if registry is not None else load_cases()

    try:
        if args.list:
            cases = registry.select(families=args.family, pattern=args.filter, quick=args.quick)
        else:
            device = resolve_device(args.device)
            cases = registry.select(families=args.family, pattern=args.filter,
                                    device_type=device.type, quick=args.quick)
    except (ValueError, re.error) as error:
        parser.error(str(error))

    if args.list:
        for case in cases:
            print(f"{case.id}  {format_params(case.params)}  [{', '.join(case.devices)}]"
                  f"{'  quick' if case.quick else ''}")
        return 0
    if not cases:
        parser.error(f"no case matches the selection on {device.type}; see --list")

    target_s = args.target_s or (QUICK_TARGET_S if args.quick else FULL_TARGET_S)
    progress = not args.no_progress and sys.stderr.isatty()
    report = run(cases, device=device, target_s=target_s, repeats=args.repeats, progress=progress)
    report.settings.update(quick=args.quick, families=args.family, filter=args.filter)

    print(format_table(report))
    out = args.out or default_output_path(report.environment, args.quick)
    write_json(report, out)
    print(f"\nresults: {out}")
    if not args.no_plot:
        from .plot import plot_ratios  # matplotlib takes a while to import; skip it when not plotting

        plot_path = out.with_suffix(".png")
        plot_ratios(report, plot_path)
        print(f"plot:    {plot_path}")
    return 1 if report.failed else 0
