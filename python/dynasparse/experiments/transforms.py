"""Transforms: what a staged run does to its starting model before it trains.

A run with `spec.transform = NAME` calls the transform registered as NAME with a
`TransformContext` and trains (with `spec.method`) and stores the model it returns:

    @transforms.register("reinit-shuffle", "the parent's masks, its layer's initial values reshuffled")
    def reinit_shuffle(ctx: transforms.TransformContext) -> nn.Module: ...

`ctx.model` is a fresh model built from the run's own spec under `torch.manual_seed(spec.seed)`
(the initialization that seed gives: a child with its parent's seed gets the parent's
initialization); `ctx.parent` is the parent run's trained model (None without a parent).
The returned model must have the architecture `models.build(spec.model, **spec.model_options)`
gives, some of its layers possibly sparsified: that is how the store rebuilds it to load the
checkpoint. A transform that changes widths (shrinking neurons) belongs to a child spec whose
model_options name the smaller widths, and copies the shrunk weights into `ctx.model`.

Transforms register when their module is imported; `get` imports the experiment catalog
first, so one defined in a catalog module (or a module it imports) is found in worker
processes too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable

import torch
from torch import nn

from . import data as data_sets
from .spec import RunSpec

_OWNER = "dynasparse.experiments.transforms"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclasses.dataclass
class TransformContext:
    """What a transform gets: see the module docstring. `options` is `spec.transform_options`;
    `generator` a CPU generator seeded from the spec (its own stream: drawing from it does not
    move the training's batch order)."""

    model: nn.Module
    parent: nn.Module | None
    spec: RunSpec
    dataset: data_sets.Dataset
    options: dict
    generator: torch.Generator

    def calibration_batches(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`count` training batches of `spec.batch_size`, drawn by their own generator (the
        same ones the methods that score by data get for this seed)."""
        from .trainer import calibration_batches

        return calibration_batches(self.spec, self.dataset, count)


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    description: str
    function: Callable[[TransformContext], nn.Module]


_REGISTRY: dict[str, Transform] = {}


def register(name: str, description: str) -> Callable:
    """Decorator: register `function(ctx) -> nn.Module` as the transform `name`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{_OWNER}: a transform name is lowercase letters, digits, '-' and '_', got {name!r}")
    if not isinstance(description, str) or not description:
        raise TypeError(f"{_OWNER}: transform {name!r} needs a one-line description (a non-empty str)")

    def decorate(function: Callable[[TransformContext], nn.Module]) -> Callable[[TransformContext], nn.Module]:
        if not callable(function):
            raise TypeError(f"{_OWNER}: transform {name!r} must be a function of a TransformContext")
        known = _REGISTRY.get(name)
        if known is not None and (known.function.__module__, known.function.__qualname__) != (
                function.__module__, function.__qualname__):
            raise ValueError(f"{_OWNER}: transform {name!r} is already registered by {known.function.__module__}")
        _REGISTRY[name] = Transform(name, description, function)
        return function

    return decorate


def _load_catalog() -> None:
    from .registry import available as experiments

    experiments()


def get(name: str) -> Transform:
    if name not in _REGISTRY:
        _load_catalog()
    if name not in _REGISTRY:
        raise ValueError(f"{_OWNER}: unknown transform {name!r}; available: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name]


def available() -> dict[str, str]:
    """Transform name -> description, sorted by name (the catalog's included)."""
    _load_catalog()
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}


def apply(spec: RunSpec, model: nn.Module, parent: nn.Module | None, dataset: data_sets.Dataset) -> nn.Module:
    """The model run `spec` starts from: `model` (fresh, from the spec) and `parent` (the
    parent's trained model, or None) through the spec's transform; without a transform, the
    parent itself (or the fresh model)."""
    if spec.transform is None:
        return parent if parent is not None else model
    seed = int.from_bytes(hashlib.sha256(f"transform:{spec.run_id}".encode()).digest()[:8], "little")
    context = TransformContext(model=model, parent=parent, spec=spec, dataset=dataset,
                               options=dict(spec.transform_options), generator=torch.Generator().manual_seed(seed))
    result = get(spec.transform).function(context)
    if not isinstance(result, nn.Module):
        raise TypeError(f"{_OWNER}: transform {spec.transform!r} must return an nn.Module, got {type(result).__name__}")
    return result
