"""The registry of reproducible experiments: `dynasparse reproduce NAME`.

An experiment is a name, a one-line description, `specs(quick)` (the population: a list of
RunSpecs; `quick=True`: a small version that runs in seconds, for the tests) and
`analyze(records, store, quick) -> reports.Report` (claims, tables, figures from the stored
runs). Each module of `dynasparse.experiments.catalog` registers its experiments with
`register(Experiment(...))` when imported; `available()` imports them all.

    reproduce("demo", out="results/demo", quick=True)   # train what is missing, then the report
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path

from .reports import Report
from .runner import HooksFactory, PopulationResult, run_population
from .spec import RunSpec
from .store import RunRecord, Store

_OWNER = "dynasparse.experiments.registry"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    specs: Callable[[bool], list[RunSpec]]
    analyze: Callable[[list[RunRecord], Store, bool], Report]
    hooks: HooksFactory | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"{_OWNER}: an experiment name is lowercase letters, digits and '-', got {self.name!r}")
        for field in ("specs", "analyze"):
            if not callable(getattr(self, field)):
                raise TypeError(f"{_OWNER}: {field} of experiment {self.name!r} must be callable")


_REGISTRY: dict[str, Experiment] = {}
_LOADED = False


def register(experiment: Experiment) -> Experiment:
    if not isinstance(experiment, Experiment):
        raise TypeError(f"{_OWNER}: register takes an Experiment, got {type(experiment).__name__}")
    known = _REGISTRY.get(experiment.name)
    if known is not None and known.specs.__module__ != experiment.specs.__module__:
        raise ValueError(f"{_OWNER}: experiment {experiment.name!r} is already registered by {known.specs.__module__}")
    _REGISTRY[experiment.name] = experiment
    return experiment


def _load_catalog() -> None:
    global _LOADED
    if _LOADED:
        return
    from . import catalog

    for module in pkgutil.iter_modules(catalog.__path__):
        importlib.import_module(f"{catalog.__name__}.{module.name}")
    _LOADED = True


def available() -> dict[str, str]:
    """Experiment name -> description, sorted by name."""
    _load_catalog()
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}


def get(name: str) -> Experiment:
    _load_catalog()
    if name not in _REGISTRY:
        raise ValueError(f"{_OWNER}: unknown experiment {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


@dataclasses.dataclass
class Reproduction:
    experiment: Experiment
    population: PopulationResult
    report: Report | None
    paths: dict[str, Path]


def default_out(name: str, quick: bool) -> Path:
    return Path("experiment-results") / (name + ("-quick" if quick else ""))


def reproduce(name: str, *, out: str | os.PathLike | None = None, quick: bool = False, workers: int | None = None,
              executor=None, progress: bool | None = None) -> Reproduction:
    """Train the runs of experiment `name` that `out` (default experiment-results/NAME, with
    -quick appended for quick runs) does not hold yet, then write its report there
    (NAME.md, NAME.json, PNGs). `workers`: processes (default: the cores at hand; 0: run
    in this process). No report is written while runs are missing (failed ones named)."""
    experiment = get(name)
    out = Path(out if out is not None else default_out(name, quick))
    if workers == 0 and executor is None:
        executor = "inline"
    specs = experiment.specs(quick)
    population = run_population(specs, out, workers=workers or None, executor=executor, hooks=experiment.hooks,
                                progress=progress, description=name)
    if not population.complete:
        return Reproduction(experiment, population, None, {})
    report = experiment.analyze(population.records, Store(out), quick)
    return Reproduction(experiment, population, report, report.write(out, name))
