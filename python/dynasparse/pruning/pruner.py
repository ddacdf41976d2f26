"""The Pruner: one API for every pruning and dynamic sparse training algorithm.

A pruner wraps a model (sparsifying its matching nn.Linear / nn.Conv2d first) and is driven by
`pruner.step()` after every `optimizer.step()`. At each mask update it goes through four
pluggable stages:

1. scores: `scores(layer)` per prunable layer, a tensor shaped like the weight; larger is kept.
   |w| by default (magnitude, DPF); random for the control; an algorithm needing gradients
   (RigL) reads `optimizer.statistics(layer.weight)`; one needing data (SNIP, OBD, OBD-SD,
   dropout damage) gathers saliencies in its own `calibrate(batches)` method, called by the
   user before `update()`, and returns them here.
2. target: the schedule's sparsity at this step (`schedules`: constant, cubic, linear, or any
   callable `step -> float`).
3. granularity and layout: weights, or rows (output neurons / conv filters, whole rows kept
   or pruned); a layer's layout decides its units too. A block layer selects whole blocks
   (a block's score is the L2 norm of its scores, as `magnitude_mask` scores it); a 2:4 layer
   selects among the 2 largest scores of every group of 4, so it holds at most half its
   weights: a target above 0.5 is met in 2:4 groups, a target below leaves it at 0.5.
4. selection: the distribution turns the global target and the scores into kept masks
   (`distributions`: one global threshold via `ops.topk_mask_global`, or per-layer counts,
   uniform or ERK, via `ops.topk_mask`). It sees one score per weight: a block's weights
   carry their block's score divided by the block size (its root mean square, for |w|, so
   one global threshold compares it with single weights), a 2:4 layer's weights outside
   the 2-of-4 candidates -inf; each layer's count is then rounded to whole blocks (or capped
   at the candidates) and its units chosen by that score.

The new masks are written into the layers' `mask` buffers (`set_mask`, which the optimizer
registered with `attach` sees in place). The pruner's `grad_mode` decides the training rule:
"feedback" (DPF: the gradient at m * w updates every weight, pruned ones come back) or
"masked" (pruned weights and their optimizer state are zeroed at the update, through
`optimizer.reset_state`, and dynasparse's optimizers keep them exactly zero; weights that grow
back start at zero with zeroed state). `finalize()` hard-prunes: weights become m * w and training
continues masked (fine-tuning with a fixed mask).

Where the algorithms not built yet plug in:
- RigL / SET: override `compute_masks` to drop by |w| and grow by |g| (or at random) per layer
  with `ops.rigl_update`, the drop fraction from `schedules.CosineDecay`, masked mode.
- SNIP / OBD / OBD-SD / dropout damage: a `calibrate(batches)` method storing saliencies,
  `scores` returning them; neuron variants use `granularity="row"`.
- Variational dropout: its `log_sigma2` parameters live in a layer wrapper the pruner installs
  (as it installs sparse layers now) and registers with the optimizer; `scores` is
  `-log_alpha`, the schedule a threshold rather than a count (override `compute_masks`).
- Neuron merging: layers shrink physically, so it replaces modules (as `sparsify` does) after
  `compute_masks` chose the rows; the pruner re-collects its layers afterwards.
- IMP / lottery tickets: rewinding is outside the mask logic: keep a copy of the weights at
  step k, and after each round's `update()` copy the survivors back.

A run stopped at any step and resumed from the model's, the optimizer's and the pruner's
`state_dict()` follows the identical trajectory (the pruner saves its step, its random
generator, its grad mode and its mask statistics; the masks are in the model's state_dict).
Under DistributedDataParallel the masks computed on rank 0 are broadcast, so every rank holds
the same masks even if scores differ in the last bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..nn import sparsify
from ..nn.convert import Selector, _matches, check_selector
from ..nn.modules import SPARSE_MODULES, SparseTransposedLinear
from .distributions import Distribution, as_distribution
from .schedules import Schedule, as_schedule, check_int, sparsity_at

GRANULARITIES = ("weight", "row")


@dataclasses.dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    numel: int
    active: int
    last_flip_rate: float | None
    reactivated: int
    layout: str = "unstructured"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.active / self.numel if self.numel else 0.0


@dataclasses.dataclass
class PruningReport:
    """Per-layer and global sparsity of the prunable layers, with the mask statistics.

    `flip_rates`: (step, fraction of all prunable weights whose mask bit changed) per update.
    `reactivated_fraction`: fraction of prunable weights pruned at some update and active at a
    later one. `dense_weights`: weights of the model outside the pruned layers (kept dense)."""

    step: int
    target: float | None
    layers: list[LayerReport]
    flip_rates: list[tuple[int, float]]
    dense_weights: int
    skipped: dict[str, str]

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def sparsity(self) -> float:
        total = self.numel
        return 1.0 - sum(layer.active for layer in self.layers) / total if total else 0.0

    @property
    def model_sparsity(self) -> float:
        """Pruned weights over all weights of the model, dense layers included."""
        total = self.numel + self.dense_weights
        return (self.numel - sum(layer.active for layer in self.layers)) / total if total else 0.0

    @property
    def reactivated_fraction(self) -> float:
        return sum(layer.reactivated for layer in self.layers) / self.numel if self.numel else 0.0

    def __str__(self) -> str:
        rows = [("layer", "shape", "layout", "weights", "active", "sparsity", "last flips", "re-activated")]
        for layer in self.layers:
            flips = "-" if layer.last_flip_rate is None else f"{layer.last_flip_rate:.4f}"
            rows.append((layer.name, "x".join(map(str, layer.shape)), layer.layout, str(layer.numel),
                         str(layer.active), f"{layer.sparsity:.4f}", flips,
                         f"{layer.reactivated / max(layer.numel, 1):.4f}"))
        last = f"{self.flip_rates[-1][1]:.4f}" if self.flip_rates else "-"
        rows.append(("total (prunable)", "", "", str(self.numel), str(sum(layer.active for layer in self.layers)),
                     f"{self.sparsity:.4f}", last, f"{self.reactivated_fraction:.4f}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                           for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        target = "-" if self.target is None else f"{self.target:.4f}"
        lines.append(f"step {self.step}, target {target}, {len(self.flip_rates)} mask update(s); "
                     f"whole model {self.model_sparsity:.4f} sparse ({self.dense_weights} weights kept dense)")
        capped = [layer.name for layer in self.layers if layer.layout == "2:4"]
        if capped and self.target is not None and self.target < 0.5:
            lines.append(f"2:4 layers keep at most 2 of every 4 weights: {', '.join(capped)} stay at sparsity 0.5 or "
                         f"more where the target is {self.target:.4f}")
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _signed_norm(norm: Callable[[torch.Tensor], torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """A unit's score (a row, a block): the L2 `norm` of its nonnegative scores minus that of
    its negative ones. For |w| that is the unit's L2 norm; units the masked algorithms mark as
    pruned (scores -1, see magnitude.active_magnitude) stay below every live one, where a
    plain norm would rank them among the largest and revive them."""
    return norm(scores.clamp(min=0)) - norm(scores.clamp(max=0))


class Pruner:
    """Base pruner: magnitude scores, a schedule, a distribution, a grad mode.

    model: the model (or its DistributedDataParallel wrapper, sparsified before wrapping);
        matching nn.Linear / nn.Conv2d are replaced by unstructured sparse layers (so build the
        optimizer afterwards and `attach` it), matching sparse layers are taken as they are,
        with their layout (`sparsify(model, 0.0, layout="block32")` first for block pruning).
    schedule: target sparsity per step: a number, a `schedules` object or any callable.
    optimizer: a dynasparse optimizer owning the sparse weights (or call `attach` later).
    distribution: "global", "uniform", "erk" or a `distributions.Distribution`.
    include / exclude: fnmatch patterns on module names or a callable (as `sparsify`), e.g.
        exclude=["conv1", "fc"] keeps the first conv and the classifier dense.
    update_every: the mask is recomputed when the step count is a multiple of it (None: only
        at construction, step 0); update_until: the last update, made even when it falls between
        two periods (None: never stop).
    granularity: "weight" or "row" (whole output neurons / filters; unstructured layers only).
    seed: seeds the pruner's own torch.Generator (random scores), an int in [0, 2**64); the same
        on every rank.
    """

    grad_mode = "masked"

    def __init__(self, model: nn.Module, schedule: Schedule | float, *, optimizer: torch.optim.Optimizer | None = None,
                 distribution: Distribution | str = "global", include: Selector = None, exclude: Selector = None,
                 update_every: int | None = 16, update_until: int | None = None, granularity: str = "weight",
                 seed: int = 0):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        if update_every is not None:
            check_int(owner, "update_every", update_every, 1)
        if update_until is not None:
            check_int(owner, "update_until", update_until, 0)
        if granularity not in GRANULARITIES:
            raise ValueError(f"{owner}: granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        check_int(owner, "seed", seed, 0, 2**64 - 1)
        check_selector("include", include)
        check_selector("exclude", exclude)
        wrapped = isinstance(model, nn.parallel.DistributedDataParallel)
        self.model = model.module if wrapped else model
        self.schedule = as_schedule(schedule)
        sparsity_at(self.schedule, 0)  # a bad schedule fails before the model is changed
        self.distribution = as_distribution(distribution)
        self.update_every, self.update_until, self.granularity = update_every, update_until, granularity
        self.skipped: dict[str, str] = {}
        if not wrapped:
            # Sparse layers are taken as they are: sparsify would re-prune them.
            def dense_only_excluded(name: str, module: nn.Module) -> bool:
                return isinstance(module, SPARSE_MODULES) or _matches(exclude, name, module, False)

            self.skipped = dict(sparsify(self.model, 0.0, include=include, exclude=dense_only_excluded,
                                         grad_mode=self.grad_mode).skipped)
        self.layers: dict[str, nn.Module] = {
            name: module for name, module in self.model.named_modules()
            if isinstance(module, SPARSE_MODULES) and _matches(include, name, module, True)
            and not _matches(exclude, name, module, False)}
        if not self.layers:
            raise ValueError("dynasparse.pruning: no prunable layer (nn.Linear / nn.Conv2d matching include/exclude)"
                             + (" in the DDP-wrapped model: sparsify the model before wrapping it" if wrapped else ""))
        if granularity == "row" and any(isinstance(m, SparseTransposedLinear) for m in self.layers.values()):
            raise ValueError("dynasparse.pruning: granularity='row' does not support transposed-weight layers (GPT-2 "
                             "Conv1D) yet; exclude them")
        structured = [f"{name} ({m.layout})" for name, m in self.layers.items() if m._layout_kind != "unstructured"]
        if granularity == "row" and structured:
            raise ValueError(f"dynasparse.pruning: granularity='row' needs unstructured layers (whole rows are not "
                             f"whole blocks or 2:4 groups), got {', '.join(structured)}; exclude them")
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.target: float | None = None
        self.finalized = False
        self.history: list[dict] = []
        # Pruned at some update so far / pruned at an update and active at a later one.
        self._pruned_seen = {name: torch.zeros_like(m.mask) for name, m in self.layers.items()}
        self._reactivated = {name: torch.zeros_like(m.mask) for name, m in self.layers.items()}
        self._set_grad_mode(self.grad_mode)
        self.update()
        if optimizer is not None:
            self.attach(optimizer)

    # -- driving ---------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the layers' mask buffers with `optimizer` (a dynasparse optimizer; a
        torch.optim one is accepted in feedback mode, where nothing must be masked)."""
        if not hasattr(optimizer, "set_mask"):
            if self.grad_mode == "masked":
                raise TypeError("dynasparse.pruning: masked mode needs dynasparse.optim.SGD / AdamW (they keep pruned "
                                f"weights and their state at zero), got {type(optimizer).__name__}")
            self.optimizer = optimizer
            return
        for name, layer in self.layers.items():
            if not optimizer._owns(layer.weight):
                raise ValueError(f"dynasparse.pruning: the optimizer does not hold {name}.weight; build it after the "
                                 "pruner (which replaces dense layers by sparse ones) from model.parameters()")
        self.optimizer = optimizer
        self._register_masks()

    def step(self) -> None:
        """Call after every optimizer.step(): counts the step and updates the masks when due."""
        self.step_count += 1
        if self.due(self.step_count):
            self.update()

    def due(self, step: int) -> bool:
        if self.finalized:
            return False
        if step == 0 or step == self.update_until:
            return True  # the initial mask, and the schedule's end even between update periods
        if self.update_every is None or step % self.update_every:
            return False
        return self.update_until is None or step <= self.update_until

    @torch.no_grad()
    def update(self) -> None:
        """Recompute the masks now, at the schedule's target for the current step."""
        self.target = sparsity_at(self.schedule, self.step_count)
        self.apply_masks(self.compute_masks(self.target))

    def finalize(self) -> PruningReport:
        """Hard-prune (weights become m * w), stop mask updates and switch to masked mode, so
        that further training fine-tunes with the mask fixed."""
        with torch.no_grad():
            for layer in self.layers.values():
                layer.weight.masked_fill_(~layer.mask, 0.0)
        self.finalized = True
        self._set_grad_mode("masked")
        return self.report()

    # -- the pluggable stages ----------------------------------------------------------------

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        """Importance of each weight (shaped like it, larger is kept): |w|."""
        return layer.weight.detach().abs()

    def compute_masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """The kept masks at `sparsity`: scores, granularity and layout, distribution
        (synchronized across ranks)."""
        names = list(self.layers)
        units = [self._units(self.layers[name], self.scores(name, self.layers[name]).float()) for name in names]
        kept = self.distribution.select([scores for scores, _ in units],
                                        [self.layers[name].weight.shape for name in names], sparsity)
        masks = {name: to_mask(chosen) for name, (_, to_mask), chosen in zip(names, units, kept)}
        return self._synchronize(masks)

    def apply_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Install new masks and keep the statistics; in masked mode pruned weights are zeroed
        and weights that grow back start with zeroed optimizer state."""
        total_flips = total = 0
        layer_flips = {}
        for name, layer in self.layers.items():
            old, new = layer.mask.clone(), masks[name].to(layer.mask.device)
            layer.set_mask(new)
            flips = int((old != new).sum())
            layer_flips[name] = flips / max(new.numel(), 1)
            total_flips, total = total_flips + flips, total + new.numel()
            self._reactivated[name] |= new & self._pruned_seen[name]
            self._pruned_seen[name] |= ~new
            if layer.grad_mode == "masked":
                layer.weight.masked_fill_(~new, 0.0)
                # Pruned weights' state is zero from now on, not from the next step; grown
                # weights start afresh (RigL's rule), their weight already zero.
                if self.optimizer is not None and hasattr(self.optimizer, "reset_state"):
                    self.optimizer.reset_state(layer.weight, ~(new & old))
        self.history.append({"step": self.step_count, "target": self.target,
                             "flip_rate": total_flips / max(total, 1), "layers": layer_flips})

    # -- reporting and state -----------------------------------------------------------------

    def report(self) -> PruningReport:
        last = self.history[-1]["layers"] if self.history else {}
        layers = [LayerReport(name, tuple(layer.weight.shape), layer.mask.numel(), int(layer.mask.sum()),
                              last.get(name), int(self._reactivated[name].sum()), layer.layout)
                  for name, layer in self.layers.items()]
        pruned = {id(layer.weight) for layer in self.layers.values()}
        dense = sum(p.numel() for p in self.model.parameters() if p.dim() >= 2 and id(p) not in pruned)
        return PruningReport(self.step_count, self.target, layers,
                             [(entry["step"], entry["flip_rate"]) for entry in self.history], dense, dict(self.skipped))

    def state_dict(self) -> dict:
        return {"step": self.step_count, "target": self.target, "finalized": self.finalized,
                "grad_mode": self._current_grad_mode, "generator": self.generator.get_state(),
                "history": [dict(entry, layers=dict(entry["layers"])) for entry in self.history],
                "pruned_seen": {name: t.clone() for name, t in self._pruned_seen.items()},
                "reactivated": {name: t.clone() for name, t in self._reactivated.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a pruner's state (after loading the model's state_dict, which holds the masks)."""
        if set(state["pruned_seen"]) != set(self.layers):
            raise ValueError(f"dynasparse.pruning: the state is for layers {sorted(state['pruned_seen'])}, this pruner "
                             f"has {sorted(self.layers)}")
        self.step_count, self.target, self.finalized = state["step"], state["target"], state["finalized"]
        self.generator.set_state(state["generator"])
        self.history = [dict(entry, layers=dict(entry["layers"])) for entry in state["history"]]
        for name in self.layers:
            self._pruned_seen[name].copy_(state["pruned_seen"][name])
            self._reactivated[name].copy_(state["reactivated"][name])
        self._set_grad_mode(state["grad_mode"])

    # -- internals ---------------------------------------------------------------------------

    def _set_grad_mode(self, mode: str) -> None:
        self._current_grad_mode = mode
        for layer in self.layers.values():
            layer.grad_mode = mode
        self._register_masks()

    def _register_masks(self) -> None:
        if self.optimizer is not None and hasattr(self.optimizer, "set_mask"):
            for layer in self.layers.values():
                self.optimizer.set_mask(layer.weight, layer.mask, layer.grad_mode, layer.packing_plan)

    def _units(self, layer: nn.Module, scores: torch.Tensor
               ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """What the distribution selects from (rows, or one score per weight) and how its
        choice becomes the layer's mask in the layer's layout."""
        if self.granularity == "row":
            return (_signed_norm(ops.row_scores, scores),
                    lambda rows: ops.expand_row_mask(rows, layer.weight.shape).contiguous())
        kind, block = layer._layout_kind, layer._block
        if kind == "block":
            blocks = _signed_norm(lambda part: ops.block_scores(part, block), layer.as_matrix(scores))

            def whole_blocks(kept: torch.Tensor) -> torch.Tensor:
                chosen, _ = ops.topk_mask(blocks, round(int(kept.sum()) / block ** 2))
                return layer._from_2d(ops.expand_block_mask(chosen, block))

            return layer._from_2d(ops.expand_block_mask(blocks / block, block)), whole_blocks
        if kind == "2:4":
            scores_2d = layer.as_matrix(scores)
            candidates = ops.nm_mask(scores_2d, 2, 4)

            def in_groups(kept: torch.Tensor) -> torch.Tensor:
                chosen, _ = ops.topk_mask(scores_2d, min(int(kept.sum()), scores_2d.numel() // 2), candidates)
                return layer._from_2d(chosen)

            return layer._from_2d(torch.where(candidates, scores_2d, -torch.inf)), in_groups
        return scores, lambda kept: kept

    def _synchronize(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return masks
        synced = {}
        for name, mask in masks.items():
            as_bytes = mask.to(torch.uint8)
            dist.broadcast(as_bytes, src=0)
            synced[name] = as_bytes.bool()
        return synced

