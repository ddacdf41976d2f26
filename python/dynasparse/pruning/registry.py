"""The registry of pruning algorithms and the factory that builds one by name from a spec.

    pruner = dynasparse.pruning.create("rigl", model, sparsity=0.9, total_steps=10_000, update_every=100)
    dynasparse.pruning.available()        # {"dpf": "DPF (Lin et al. 2020): ...", ...}
    dynasparse.pruning.describe("rigl")   # {option: (default, one-line doc)}

Every algorithm is one module of this package whose class registers itself with `@register`:
its name (lowercase, stable: experiment specs store it), a one-line description, its own
options with a one-line doc each, and which of the common options of `Pruner` it takes.
`create` refuses an unknown name or option before anything changes (TypeError for an option,
as a Python call would, ValueError for a name); option values are checked by the algorithm's
constructor, also before the model is changed, with errors naming the option.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping

from torch import nn

from .schedules import check_int

# The options of Pruner.__init__ an algorithm may pass through (see Pruner's docstring).
COMMON_OPTIONS = {
    "distribution": "how the target is shared among layers: 'global', 'uniform', 'erk' or a Distribution",
    "include": "fnmatch patterns (or a callable) of the module names to prune",
    "exclude": "fnmatch patterns (or a callable) of the module names to keep dense",
    "update_every": "steps between two mask updates",
    "update_until": "the step of the last mask update (None: never stop)",
    "granularity": "'weight', or 'row' for whole output neurons / filters",
    "seed": "seed of the pruner's own generator (random scores), the same on every rank",
}

TOTAL_STEPS = ("required", "optional", "unused")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered algorithm. `options`: option -> one-line doc; `total_steps`: whether
    its schedule needs the training length ("required"), can use it ("optional", e.g. IMP's
    rounds) or ignores it ("unused": it is still checked when given)."""

    name: str
    cls: type
    description: str
    options: Mapping[str, str]
    total_steps: str

    def defaults(self) -> dict[str, object]:
        """The default of every option, from the constructors' signatures."""
        found: dict[str, object] = {}
        for cls in self.cls.__mro__:
            init = cls.__dict__.get("__init__")
            if init is None:
                continue
            for parameter in inspect.signature(init).parameters.values():
                if parameter.name in self.options and parameter.name not in found:
                    found[parameter.name] = parameter.default
        return found


_REGISTRY: dict[str, Entry] = {}


def register(name: str, description: str, *, options: Mapping[str, str] | None = None,
             common: tuple[str, ...] = tuple(COMMON_OPTIONS), total_steps: str = "required") -> Callable[[type], type]:
    """Class decorator: register a Pruner subclass under `name` (see the module docstring).
    The class is built by `cls.from_spec(model, sparsity=, total_steps=, optimizer=, **options)`."""
    if not (isinstance(name, str) and name and name == name.lower() and name.replace("_", "").isalnum()):
        raise ValueError(f"dynasparse.pruning.register: a name is lowercase letters, digits and '_', got {name!r}")
    if total_steps not in TOTAL_STEPS:
        raise ValueError(f"dynasparse.pruning.register: total_steps must be one of {TOTAL_STEPS}, got {total_steps!r}")
    unknown = sorted(set(common) - set(COMMON_OPTIONS))
    if unknown:
        raise ValueError(f"dynasparse.pruning.register: {unknown} are not common options ({', '.join(COMMON_OPTIONS)})")

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"dynasparse.pruning.register: {name!r} is already {_REGISTRY[name].cls.__qualname__}")
        merged = {option: COMMON_OPTIONS[option] for option in common}
        merged.update(options or {})
        _REGISTRY[name] = Entry(name, cls, description, merged, total_steps)
        cls.registered_name = name
        return cls

    return decorate


def available() -> dict[str, str]:
    """Registered algorithm names -> one-line descriptions, in registration order."""
    return {name: entry.description for name, entry in _REGISTRY.items()}


def entry(name: str) -> Entry:
    if name not in _REGISTRY:
        raise ValueError(f"dynasparse.pruning: unknown algorithm {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def describe(name: str) -> dict[str, tuple[object, str]]:
    """option -> (default, one-line doc) of the registered algorithm `name`."""
    found = entry(name)
    defaults = found.defaults()
    return {option: (defaults.get(option, inspect.Parameter.empty), doc) for option, doc in found.options.items()}


def create(name: str, model: nn.Module, *, sparsity: float, total_steps: int | None = None, optimizer=None,
           **options):
    """Build the registered algorithm `name` on `model` at the target `sparsity`.

    total_steps: the training length in optimizer steps (schedules end at fractions of it;
        see `describe`/`available` for whether `name` needs it).
    optimizer: a dynasparse optimizer built from model.parameters() *after* the model was
        sparsified (i.e. usually None here, then `pruner.attach(optimizer)`).
    options: the algorithm's options (`describe(name)`); an unknown one is a TypeError.

    The pruner does not change any mask here: `initialize()` (or `calibrate(batches)` for the
    algorithms that need data) sets the first one; `attach` calls `initialize()` for those
    that need none.
    """
    found = entry(name)
    owner = f"dynasparse.pruning.create({name!r})"
    unknown = sorted(set(options) - set(found.options))
    if unknown:
        raise TypeError(f"{owner}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"its options are {', '.join(found.options) or 'none'}")
    if total_steps is None and found.total_steps == "required":
        raise ValueError(f"{owner}: total_steps is required (its schedule is laid out over the training length)")
    if total_steps is not None:
        check_int(owner, "total_steps", total_steps, 1)
    return found.cls.from_spec(model, sparsity=sparsity, total_steps=total_steps, optimizer=optimizer, **options)
