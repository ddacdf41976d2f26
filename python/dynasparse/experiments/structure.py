"""The structure of sparse networks (Van Gelder, Wortsman, Ehsani, "Deconstructing the Structure
of Sparse Neural Networks", 2020): the library part of `dynasparse reproduce structure`.

- Structure alone (experiment 1): `reinitialize(parent, init, variant)` keeps a trained sparse
  model's masks and replaces every weight of it, registered as the transforms
  "structure-original", "structure-random", "structure-shuffle" and "structure-signed" for
  child runs (`RunSpec(parent=..., transform=..., method="dense")`: the masks stay fixed and
  the sparse layers train masked). Every weight layer (`weight_layers`: linear and conv, the
  dense ones too) gets:
  - "original": the weights the parent's seed initialized (the lottery-ticket reset);
  - "random": a new initialization (another draw of the same model's initializer);
  - "shuffle": the original initial values permuted at random among the layer's kept
    positions (all positions of a dense layer), so each layer keeps the multiset of its kept
    initial values;
  - "signed": the layer's standard deviation of the original initialization (over all its
    positions, the population std) times the sign of its original initial value (torch.sign:
    0 stays 0).
  The other parameters (biases) are the original initialization's in every variant but
  "random", where they are the new one's. Pruned positions are zero.
- Further pruning (experiment 2): `analysis.further_pruning_curve` on a stored model and
  `curve_auc`, the robustness number.
- Structure emergence (experiment 3): `MaskTrace`, a trainer hook keeping the masks after every
  update of the first epoch and at every epoch's end, which stores their IoU with the final
  mask (`analysis.mask_iou`) in the run's metrics; `first_passing` reads the epoch where it
  passes a level.
- The early-frozen algorithm (experiment 4): the pruning registry's "rigl_frozen" and
  "dnw_frozen"; `PrunerCounts` stores the pruner report's dense-gradient steps in the metrics.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import models, transforms
from .analysis import mask_iou, masks, sparse_layers
from .trainer import Hook, TrainState

_OWNER = "dynasparse.experiments.structure"
VARIANTS = ("original", "random", "shuffle", "signed")
TRANSFORMS = {variant: f"structure-{variant}" for variant in VARIANTS}


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The weight layers of `model` by name: the modules whose own `weight` parameter is a
    matrix or a kernel (linear and conv layers, dense or sparse; not norm layers' scales)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() >= 2}


def _check_same_architecture(parent: nn.Module, init: nn.Module) -> None:
    theirs = {name: tuple(p.shape) for name, p in parent.named_parameters()}
    ours = {name: tuple(p.shape) for name, p in init.named_parameters()}
    if theirs != ours:
        different = sorted(name for name in set(theirs) | set(ours) if theirs.get(name) != ours.get(name))
        raise ValueError(f"{_OWNER}: init must have the parent's parameters (names and shapes); they differ at "
                         f"{', '.join(different)}")


@torch.no_grad()
def reinitialize(parent: nn.Module, init: nn.Module, variant: str, *,
                 generator: torch.Generator | None = None) -> nn.Module:
    """A copy of the trained sparse model `parent` with its masks and new weights from `init`
    (a model of the same architecture holding an initialization) by `variant` (see the module
    docstring; "original" and "random" both take `init`'s values: which initialization it holds
    decides the variant). `generator` draws the permutations of "shuffle" (required there).
    The copy's sparse layers train masked (the mask stays fixed, pruned weights stay zero)."""
    if variant not in VARIANTS:
        raise ValueError(f"{_OWNER}: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    for name, model in (("parent", parent), ("init", init)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{_OWNER}: {name} must be an nn.Module, got {type(model).__name__}")
    if variant == "shuffle" and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_OWNER}: variant 'shuffle' needs a torch.Generator (generator=), got "
                        f"{type(generator).__name__}")
    if not sparse_layers(parent):
        raise ValueError(f"{_OWNER}: parent has no sparse layers: there is no structure to keep")
    _check_same_architecture(parent, init)
    result = copy.deepcopy(parent)
    initial = dict(init.named_parameters())
    for name, parameter in result.named_parameters():
        parameter.copy_(initial[name])
    sparse = sparse_layers(result)
    for name, layer in weight_layers(result).items():
        start = initial[f"{name}.weight"].detach()
        kept = sparse[name].mask if name in sparse else torch.ones_like(start, dtype=torch.bool)
        if variant == "shuffle":
            values = start.clone()
            chosen = values[kept]
            order = torch.randperm(chosen.numel(), generator=generator).to(chosen.device)
            values[kept] = chosen[order]
        elif variant == "signed":
            spread = start.std(correction=0) if start.numel() else start.new_zeros(())
            values = spread * torch.sign(start)
        else:
            values = start
        layer.weight.copy_(torch.where(kept, values, 0.0))
    for layer in sparse.values():
        layer.grad_mode = "masked"
    return result


def _transform_seed(ctx: transforms.TransformContext) -> int:
    """The seed of a new initialization: drawn from the run's own generator (so another than
    the parent's, and the same every time the run is computed)."""
    return int(torch.randint(0, 2**62, (1,), generator=ctx.generator))


def _fresh_model(ctx: transforms.TransformContext, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build(ctx.spec.model, input_shape=ctx.dataset.input_shape, classes=ctx.dataset.classes,
                            **ctx.spec.model_options).to(next(ctx.model.parameters()).device)


def _variant_transform(variant: str):
    def transform(ctx: transforms.TransformContext) -> nn.Module:
        if ctx.parent is None:
            raise ValueError(f"{_OWNER}: transform {TRANSFORMS[variant]!r} keeps a parent's masks: the run needs a "
                             "parent (RunSpec.parent)")
        if ctx.options:
            raise ValueError(f"{_OWNER}: transform {TRANSFORMS[variant]!r} takes no options, got "
                             f"{sorted(ctx.options)}")
        init = _fresh_model(ctx, _transform_seed(ctx)) if variant == "random" else ctx.model
        return reinitialize(ctx.parent, init, variant, generator=ctx.generator)

    transform.__name__ = transform.__qualname__ = f"reinit_{variant}"
    return transform


_DESCRIPTIONS = {
    "original": "the parent's masks, every weight back to its original initialization (the seed's)",
    "random": "the parent's masks, every weight from a new random initialization",
    "shuffle": "the parent's masks, each layer's original initial values shuffled among its kept positions",
    "signed": "the parent's masks, each weight the layer's initial std times the sign of its original init"}
for _variant in VARIANTS:
    transforms.register(TRANSFORMS[_variant], _DESCRIPTIONS[_variant])(_variant_transform(_variant))


# -- further pruning ---------------------------------------------------------------------------

def curve_auc(curve: Sequence[Mapping], *, relative: bool = False) -> float:
    """The area under a further-pruning curve (`analysis.further_pruning_curve`: accuracy
    against the fraction q pruned further), by the trapezoid rule over its q range divided by
    that range: the mean accuracy over q, in [0, 1]. `relative`: divided by the accuracy at
    the smallest q (the trained model's at q = 0), so 1 is a model that loses nothing."""
    points = sorted((float(point["fraction"]), float(point["accuracy"])) for point in curve)
    if len(points) < 2:
        raise ValueError(f"{_OWNER}: an area needs a curve of at least 2 points, got {len(points)}")
    if len({q for q, _ in points}) != len(points):
        raise ValueError(f"{_OWNER}: the curve has a fraction twice: {[q for q, _ in points]}")
    span = points[-1][0] - points[0][0]
    area = sum((q1 - q0) * (a0 + a1) / 2 for (q0, a0), (q1, a1) in zip(points[:-1], points[1:])) / span
    if not relative:
        return area
    if points[0][1] <= 0:
        raise ValueError(f"{_OWNER}: a relative area needs an accuracy above 0 at q = {points[0][0]}")
    return area / points[0][1]


# -- structure emergence -----------------------------------------------------------------------

def iou_with_final(snapshots: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
                   final: Mapping[str, torch.Tensor]) -> list[list[float]]:
    """[[x, IoU(masks, final)], ...] for snapshots [(x, masks), ...] (x: a step or an epoch)."""
    return [[x, mask_iou(dict(snapshot), dict(final))] for x, snapshot in snapshots]


def first_passing(curve: Sequence[Sequence[float]], level: float = 0.9) -> float | None:
    """The first x of [[x, IoU], ...] (in x order) whose IoU is at least `level`; None when
    none is."""
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 <= level <= 1.0:
        raise ValueError(f"{_OWNER}: level must be a number in [0, 1], got {level!r}")
    for x, iou in sorted(curve):
        if iou >= level:
            return x
    return None


def steps_per_epoch(state: TrainState) -> int:
    """Optimizer steps per epoch (the trainer drops the last partial batch)."""
    return len(state.dataset.train[1]) // state.spec.batch_size


class MaskTrace(Hook):
    """Keeps the sparse layers' masks after every mask update of the first epoch (the initial
    masks included, step 0) and at every epoch's end (epoch 0: the initial masks), and at the
    end writes their IoU with the final masks into the run's metrics:

        metrics["mask_iou"] = {"steps_per_epoch": E, "updates": [[step, IoU], ...],
                               "epochs": [[epoch, IoU], ...]}

    A run without a pruner (no updates) traces its epochs only."""

    def __init__(self):
        self.updates: list[tuple[int, dict]] = []
        self.epochs: list[tuple[int, dict]] = []
        self.period: int | None = None

    def _start(self, state: TrainState) -> None:
        if self.period is None:
            self.period = steps_per_epoch(state)

    def on_update(self, state: TrainState) -> None:
        self._start(state)
        current = masks(state.model)
        if state.step <= self.period:
            self.updates.append((state.step, current))
        if state.step == 0 and not self.epochs:
            self.epochs.append((0, current))

    def on_step(self, state: TrainState) -> None:
        self._start(state)
        if not self.epochs:
            self.epochs.append((0, masks(state.model)))  # no initial update: the masks the run started from
        if state.step % self.period == 0:
            self.epochs.append((state.step // self.period, masks(state.model)))

    def on_end(self, state: TrainState) -> None:
        self._start(state)
        final = masks(state.model)
        state.metrics["mask_iou"] = {"steps_per_epoch": self.period, "updates": iou_with_final(self.updates, final),
                                     "epochs": iou_with_final(self.epochs, final)}


class PrunerCounts(Hook):
    """Stores the pruner report's dense-gradient steps (`metrics["dense_gradient_steps"]`) and
    its notes (`metrics["pruner_notes"]`, e.g. the early-frozen algorithms' saved steps)."""

    def on_end(self, state: TrainState) -> None:
        if state.pruner is None:
            state.metrics["dense_gradient_steps"] = 0
            state.metrics["pruner_notes"] = {}
            return
        report = state.pruner.report()
        state.metrics["dense_gradient_steps"] = report.dense_gradient_steps
        state.metrics["pruner_notes"] = {key: value for key, value in report.notes.items()
                                         if value is None or isinstance(value, (bool, int, float, str))}
