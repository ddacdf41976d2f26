"""The Pruner: one API for every pruning and dynamic sparse training algorithm.

Lifecycle (every algorithm, built directly or by `pruning.create(name, ...)`):

    pruner = pruning.create("rigl", model, sparsity=0.9, total_steps=T)  # sparse layers, no mask change yet
    pruner.initialize()              # the first masks (or calibrate(batches) for SNIP; attach does it too)
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)     # after the layers were replaced
    pruner.attach(optimizer)         # registers the masks (and initializes, if not done and no data is needed)
    for x, y in batches:
        optimizer.zero_grad(); loss(model(x), y).backward(); optimizer.step()
        pruner.step()                # counts the step; mask update when due (before the next zero_grad)
    pruner.finalize()                # m * w; training on fine-tunes with the mask fixed

Two settings decide how a pruned layer trains, both changeable at every step:
- the update rule (`pruner.update_rule`, `set_update_rule`): "feedback" (the gradient at m * w
  updates every weight: DPF, DNW) or "masked" (pruned weights and their optimizer state stay
  exactly zero; weights that grow back start at zero with zeroed state);
- the layers' weight gradient (`weight_grad_at(step)`, `set_weight_grad`): None (the update
  rule's: dense for feedback, at the nonzeros for masked), "dense", "nonzeros" or "none". RigL
  asks for "dense" on its update steps only; `report().dense_gradient_steps` counts the steps
  trained with a dense weight gradient.

`update()` is one template, the same for every algorithm (subclasses cannot override it, nor
`apply_masks`, `step`, `initialize`, `state_dict`, `load_state_dict`):

1. target: `target_at(step)` (the schedule's sparsity by default);
2. scores: `scores(name, layer)` per layer, shaped like the weight, larger is kept (|w| by default);
3. selection: `select(scores, target)` -> {name: mask} (by default `select_masks(scores,
   sparsity=target)`); selection is layout-aware (see `selection`) and takes a target through a
   distribution, per-layer counts, or a threshold, each optionally among candidates;
4. apply: `apply_masks(masks)` broadcasts the masks from rank 0 under torch.distributed (so all
   ranks agree even if scores differ in the last bit), installs them (`layer.set_mask`), zeroes
   in masked mode what must be zero, and keeps the statistics (flip rates, re-activations);
5. `after_update(masks)` (e.g. IMP's rewinding), then the observers `on_update(fn)` registered:
   `fn(step, masks)`.

Other hooks: `due(step)` (when to update), `weight_grad_at(step)`, `after_step(step)` (after
every counted step, e.g. to keep IMP's rewind point), `calibrate(batches)` (algorithms with
`needs_data = True` gather saliencies there, then initialize), `report_notes()` (extra report
lines), `before_recollect(removed, added)` (see below), and `state_attributes` (names of
subclass attributes saved in `state_dict()`: tensors, numbers, strings, None and lists /
tuples / dicts of them).

Drop-and-grow algorithms select with `drop_and_grow(name, k, growth)` (one pass over an
unstructured layer); `apply_masks` then installs those masks touching only the changed
weights. `active_weights(name)` counts a layer's active weights once per mask change.

Replacing modules (neuron merging, `nn.shrink`'s narrower layers put back in place):
`pruner.recollect(optimizer)` finds the layers again, keeps the state of those still there,
drops that of the removed ones and starts the new ones fresh (see its docstring).

A run stopped at any step and resumed from the model's, the optimizer's and the pruner's
`state_dict()` follows the identical trajectory on the CPU (the pruner saves its step, its
random generator, its rules, its statistics and the subclass state; the masks are in the
model's state_dict).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import ops
from ..layout import GRAD_MODES, WEIGHT_GRADS, weight_grad_of, write_generation
from ..nn import sparsify
from ..nn.convert import Selector, _matches, check_selector
from ..nn.modules import SPARSE_MODULES, SparseTransposedLinear
from ..ops.topk import rigl_masks
from .distributions import Distribution, as_distribution
from .schedules import Schedule, as_schedule, check_int, sparsity_at
from .selection import LayerUnits

GRANULARITIES = ("weight", "row")
_FINAL = ("update", "apply_masks", "step", "initialize", "state_dict", "load_state_dict", "_synchronize", "recollect",
          "drop_and_grow")
_STATE_FORMAT = 2


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
    later one. `dense_weights`: weights of the model outside the pruned layers (kept dense).
    `dense_gradient_steps`: training steps whose backward computed a dense weight gradient of
    the pruned layers. `notes`: the algorithm's own figures (`Pruner.report_notes`)."""

    step: int
    target: float | None
    layers: list[LayerReport]
    flip_rates: list[tuple[int, float]]
    dense_weights: int
    skipped: dict[str, str]
    dense_gradient_steps: int = 0
    notes: dict[str, object] = dataclasses.field(default_factory=dict)

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
        lines.append(f"step {self.step}, target {target}, {len(self.flip_rates)} mask update(s), "
                     f"{self.dense_gradient_steps} dense-gradient step(s); whole model {self.model_sparsity:.4f} "
                     f"sparse ({self.dense_weights} weights kept dense)")
        capped = [layer.name for layer in self.layers if layer.layout == "2:4"]
        if capped and self.target is not None and self.target < 0.5:
            lines.append(f"2:4 layers keep at most 2 of every 4 weights: {', '.join(capped)} stay at sparsity 0.5 or "
                         f"more where the target is {self.target:.4f}")
        lines += [f"{key}: {value}" for key, value in self.notes.items()]
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _stamp(mask: torch.Tensor) -> tuple:
    """What identifies a mask buffer's current contents: any write to it changes this."""
    return id(mask), mask.data_ptr(), mask._version, write_generation(mask)


@dataclasses.dataclass(frozen=True)
class _Change:
    """A mask made by `drop_and_grow`: where it differs from the mask it was made from."""

    mask: torch.Tensor
    dropped: torch.Tensor  # flat indices, int64
    grown: torch.Tensor
    pruned_nonzeros: int  # inactive weights that were not zero
    base: tuple  # _stamp of the mask it was made from


def _holds(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def _copied(value, what: str):
    """A copy of subclass state for state_dict / load_state_dict: tensors cloned, containers
    copied; anything else is refused (it would not survive torch.save / weights_only loads)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item, what) for item in value)
    if isinstance(value, dict):
        return {key: _copied(item, what) for key, item in value.items()}
    if value is None or isinstance(value, (bool, numbers.Number, str)):
        return value
    raise TypeError(f"dynasparse.pruning: state attribute {what} holds a {type(value).__name__}; state attributes "
                    "hold tensors, numbers, strings, None and lists / tuples / dicts of them")


class Pruner:
    """Base pruner: magnitude scores, a schedule, a distribution, an update rule (see the
    module docstring for the lifecycle and the hooks).

    model: the model (or its DistributedDataParallel wrapper, sparsified before wrapping);
        matching nn.Linear / nn.Conv1d / nn.Conv2d are replaced by unstructured sparse layers with all
        weights active (so build the optimizer afterwards and `attach` it), matching sparse
        layers are taken as they are, with their layout and mask
        (`sparsify(model, 0.0, layout="block32")` first for block pruning).
    schedule: target sparsity per step: a number, a `schedules` object or any callable.
    optimizer: a dynasparse optimizer owning the sparse weights (or call `attach` later).
    distribution: "global", "uniform", "erk" or a `distributions.Distribution`.
    include / exclude: fnmatch patterns on module names or a callable (as `sparsify`), e.g.
        exclude=["conv1", "fc"] keeps the first conv and the classifier dense.
    update_every: the mask is recomputed when the step count is a multiple of it (None: only
        at initialization, step 0); update_until: the last update, made even when it falls
        between two periods (None: never stop).
    granularity: "weight" or "row" (whole output neurons / filters; unstructured layers only).
    seed: seeds the pruner's own torch.Generator (random scores), an int in [0, 2**64); the same
        on every rank.
    """

    #: The algorithm's update rule; the instance attribute of the same name is the current one.
    update_rule = "masked"
    #: True where the first masks need data: `calibrate(batches)` initializes.
    needs_data = False
    #: Switches to the masked rule during training (needs a dynasparse optimizer from the start).
    masks_later = False
    #: Names of subclass attributes saved in state_dict() and restored by load_state_dict().
    state_attributes: tuple[str, ...] = ()
    #: Set by `registry.register`.
    registered_name: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        overridden = [name for name in _FINAL if name in cls.__dict__]
        if overridden:
            raise TypeError(f"{cls.__qualname__} overrides Pruner.{', Pruner.'.join(overridden)}: the update template, "
                            "the rank synchronization and the state are shared by every algorithm; override the hooks "
                            "(target_at, scores, select, due, weight_grad_at, after_update, after_step, "
                            "state_attributes)")

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
        self._include, self._exclude, self._wrapped = include, exclude, wrapped
        self.skipped: dict[str, str] = {}
        self.layers: dict[str, nn.Module] = self._collect()
        self.optimizer: torch.optim.Optimizer | None = None
        # Layers whose weights the attached optimizer does not hold (after recollect).
        self._unattached: list[str] = []
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.target: float | None = None
        self.initialized = False
        self.finalized = False
        self.history: list[dict] = []
        self.dense_gradient_steps = 0
        self.weight_grad: str | None = None
        self._update_hooks: OrderedDict[int, Callable] = OrderedDict()
        # Pruned at some update so far / pruned at an update and active at a later one.
        self._pruned_seen = {name: torch.zeros_like(m.mask) for name, m in self.layers.items()}
        self._reactivated = {name: torch.zeros_like(m.mask) for name, m in self.layers.items()}
        # Where masks made by drop_and_grow differ from the installed ones, until apply_masks;
        # the stamp of each mask this pruner installed last; cached active counts.
        self._changes: dict[str, _Change] = {}
        self._installed: dict[str, tuple] = {}
        self._active_counts: dict[str, tuple[tuple, int]] = {}
        self.set_update_rule(type(self).update_rule)
        if optimizer is not None:
            self.attach(optimizer)

    @classmethod
    def from_spec(cls, model: nn.Module, *, sparsity: float, total_steps: int | None, optimizer, **options):
        """Build from `pruning.create`'s arguments (registered algorithms override this)."""
        raise NotImplementedError(f"{cls.__qualname__} is not built by pruning.create; construct it directly")

    def _collect(self) -> dict[str, nn.Module]:
        """The model's prunable layers now (include / exclude of construction): matching dense
        layers become all-active sparse ones (not under DDP), sparse ones are taken as they are."""
        include, exclude = self._include, self._exclude
        if not self._wrapped:
            # Sparse layers are taken as they are: sparsify would re-prune them.
            def dense_only_excluded(name: str, module: nn.Module) -> bool:
                return isinstance(module, SPARSE_MODULES) or _matches(exclude, name, module, False)

            self.skipped = dict(sparsify(self.model, 0.0, include=include, exclude=dense_only_excluded,
                                         grad_mode=self.update_rule).skipped)
        layers = {name: module for name, module in self.model.named_modules()
                  if isinstance(module, SPARSE_MODULES) and _matches(include, name, module, True)
                  and not _matches(exclude, name, module, False)}
        if not layers:
            raise ValueError("dynasparse.pruning: no prunable layer (nn.Linear / nn.Conv1d / nn.Conv2d matching "
                             "include/exclude)"
                             + (" in the DDP-wrapped model: sparsify the model before wrapping it"
                                if self._wrapped else ""))
        if self.granularity == "row" and any(isinstance(m, SparseTransposedLinear) for m in layers.values()):
            raise ValueError("dynasparse.pruning: granularity='row' does not support transposed-weight layers (GPT-2 "
                             "Conv1D) yet; exclude them")
        structured = [f"{name} ({m.layout})" for name, m in layers.items() if m._layout_kind != "unstructured"]
        if self.granularity == "row" and structured:
            raise ValueError(f"dynasparse.pruning: granularity='row' needs unstructured layers (whole rows are not "
                             f"whole blocks or 2:4 groups), got {', '.join(structured)}; exclude them")
        return layers

    def recollect(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, list[str]]:
        """Find the prunable layers again after modules of the model were replaced (a layer
        narrowed by `nn.shrink` or with merged neurons put back in place of the original, a
        new head), with the include / exclude of construction; returns {"kept": [...],
        "removed": [...], "added": [...]} (layer names).

        A layer still there (the same module under the same name) keeps its mask and its
        statistics; a layer gone takes its statistics with it; a new one is taken as it is (a
        dense nn.Linear / nn.Conv becomes an all-active sparse layer, as at construction) with
        fresh statistics and the current update rule and weight gradient (masked: its pruned
        weights are zeroed). Later mask updates treat new layers like the others; RigL keeps
        every layer's count, so sparsify a new dense layer first where it must be sparse.

        `optimizer`: the optimizer from now on, holding every layer's weight (build it from
        `model.parameters()` after this call where dense layers were converted); without it
        the attached one stays if it holds them all, else `step()` and `update()` raise until
        `attach(optimizer)`: an optimizer still holding the old parameters would not train the
        new ones. An algorithm whose own state cannot follow refuses (`before_recollect`)
        before the pruner changes (dense layers may have been converted by then)."""
        if optimizer is not None:
            self._check_optimizer(optimizer)
        layers = self._collect()
        kept = [name for name, module in layers.items() if self.layers.get(name) is module]
        removed = [name for name in self.layers if name not in kept]
        added = [name for name in layers if name not in kept]
        if optimizer is not None:
            self._check_owned(optimizer, layers, "the modules were replaced and recollect() converted dense ones")
        self.before_recollect(removed, added)
        self.layers = layers
        self._pruned_seen = {name: self._pruned_seen[name] if name in kept else torch.zeros_like(layers[name].mask)
                             for name in layers}
        self._reactivated = {name: self._reactivated[name] if name in kept else torch.zeros_like(layers[name].mask)
                             for name in layers}
        self._changes.clear()
        for cache in (self._installed, self._active_counts):
            for name in [name for name in cache if name not in kept]:
                del cache[name]
        for name in added:
            layers[name].grad_mode = self.update_rule
        if self.initialized and self.update_rule == "masked":
            with torch.no_grad():
                for name in added:
                    layers[name].weight.masked_fill_(~layers[name].mask, 0.0)
        if optimizer is not None:
            self.optimizer = optimizer
        if self.optimizer is not None:
            self._unattached = [name for name, layer in layers.items() if not _holds(self.optimizer, layer.weight)]
        if self.optimizer is not None and not self._unattached:
            self._register_masks()
            if self.initialized and self.update_rule == "masked":
                with torch.no_grad():
                    for name in added:
                        self.optimizer.reset_state(layers[name].weight, ~layers[name].mask)
        if self.initialized:
            self._prepare(self.step_count + 1)
        return {"kept": kept, "removed": removed, "added": added}

    # -- lifecycle ---------------------------------------------------------------------------

    def initialize(self) -> None:
        """The first mask update (step 0). Algorithms with `needs_data` call it from
        `calibrate(batches)`; `attach` calls it for the others when it has not run."""
        if self.initialized:
            raise RuntimeError(f"dynasparse.pruning.{type(self).__name__}: already initialized")
        if self.needs_data and not self._calibrated():
            raise RuntimeError(f"dynasparse.pruning.{type(self).__name__}: needs data for its first masks: call "
                               "calibrate(batches) (which initializes)")
        self._update()
        self.initialized = True
        self._prepare(self.step_count + 1)

    def calibrate(self, batches: Iterable, loss: Callable | None = None) -> None:
        """Gather the data an algorithm with `needs_data` scores by, then `initialize()`."""
        raise TypeError(f"dynasparse.pruning.{type(self).__name__} takes no calibration data; call initialize()")

    def _calibrated(self) -> bool:
        return True

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the layers' mask buffers with `optimizer` (a dynasparse optimizer; a
        torch.optim one is accepted in feedback mode, where nothing must be masked), then
        initialize the masks if that has not happened and needs no data."""
        self._check_optimizer(optimizer)
        self._check_owned(optimizer, self.layers)
        self.optimizer = optimizer
        self._unattached = []
        self._register_masks()
        if not self.initialized and not self.needs_data:
            self.initialize()

    def step(self) -> None:
        """Call after every optimizer.step() (before the next zero_grad: RigL reads this
        step's gradient): counts the step and updates the masks when due."""
        self._require_initialized("step")
        self._require_optimizer("step")
        if any(weight_grad_of(layer.grad_mode, layer.weight_grad) == "dense" for layer in self.layers.values()):
            self.dense_gradient_steps += 1
        self.step_count += 1
        if self.due(self.step_count):
            self._update()
        self.after_step(self.step_count)
        self._prepare(self.step_count + 1)

    def update(self) -> None:
        """Recompute the masks now, at the target of the current step (see the module docstring)."""
        self._require_initialized("update")
        self._require_optimizer("update")
        self._update()

    @torch.no_grad()
    def _update(self) -> None:
        self._changes.clear()
        self.target = self.target_at(self.step_count)
        scores = {name: self.scores(name, layer) for name, layer in self.layers.items()}
        masks = self.apply_masks(self.select(scores, self.target))
        self.after_update(masks)
        for hook in list(self._update_hooks.values()):
            hook(self.step_count, masks)

    def finalize(self) -> PruningReport:
        """Hard-prune (weights become m * w), stop mask updates and switch to masked mode, so
        that further training fine-tunes with the mask fixed."""
        self._require_initialized("finalize")
        with torch.no_grad():
            for layer in self.layers.values():
                layer.weight.masked_fill_(~layer.mask, 0.0)
        self.finalized = True
        self.set_update_rule("masked")
        self._prepare(self.step_count + 1)
        return self.report()

    def on_update(self, hook: Callable[[int, dict[str, torch.Tensor]], None]) -> RemovableHandle:
        """Call `hook(step, masks)` after every mask update (the initial one included), masks
        being {layer name: the new bool mask} (read them, do not modify them); returns a
        handle whose `remove()` unregisters it. For analyses: flip rates, mask IoU over time."""
        if not callable(hook):
            raise TypeError(f"dynasparse.pruning.on_update: hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._update_hooks)
        self._update_hooks[handle.id] = hook
        return handle

    # -- the two training settings -------------------------------------------------------------

    def set_update_rule(self, rule: str) -> None:
        """"masked" or "feedback" from now on. Switching an initialized pruner to masked zeroes
        the pruned weights and their optimizer state at once."""
        if rule not in GRAD_MODES:
            raise ValueError(f"dynasparse.pruning: update rule must be one of {', '.join(GRAD_MODES)}, got {rule!r}")
        if rule == "masked" and self.optimizer is not None and not hasattr(self.optimizer, "set_mask"):
            raise TypeError("dynasparse.pruning: masked mode needs dynasparse.optim.SGD / AdamW, got "
                            f"{type(self.optimizer).__name__}")
        self.update_rule = rule
        for layer in self.layers.values():
            layer.grad_mode = rule
        if rule == "masked" and self.initialized:
            with torch.no_grad():
                for layer in self.layers.values():
                    layer.weight.masked_fill_(~layer.mask, 0.0)
                    if self.optimizer is not None:
                        self.optimizer.reset_state(layer.weight, ~layer.mask)
        self._register_masks()

    def set_weight_grad(self, weight_grad: str | None) -> None:
        """The weight gradient of the pruned layers from the next step on, where the algorithm's
        `weight_grad_at` does not ask for another: "dense", "nonzeros", "none", or None (the
        update rule's: dense for feedback, at the nonzeros for masked)."""
        if weight_grad is not None and weight_grad not in WEIGHT_GRADS:
            raise ValueError(f"dynasparse.pruning: weight_grad must be one of {', '.join(WEIGHT_GRADS)} or None, got "
                             f"{weight_grad!r}")
        self.weight_grad = weight_grad
        if self.initialized:
            self._prepare(self.step_count + 1)

    # -- hooks -----------------------------------------------------------------------------------

    def target_at(self, step: int) -> float:
        """The target sparsity at `step` (the schedule's, checked)."""
        return sparsity_at(self.schedule, step)

    def due(self, step: int) -> bool:
        """Whether `step()` updates the masks after counting `step` (step 0 is `initialize`)."""
        if self.finalized:
            return False
        if step == self.update_until:
            return True  # the schedule's end even between update periods
        if self.update_every is None or step % self.update_every:
            return False
        return self.update_until is None or step <= self.update_until

    def weight_grad_at(self, step: int) -> str | None:
        """The weight gradient the layers compute during training step `step` (the one that
        `step()` then counts as `step`): None for the update rule's. `set_weight_grad` by default."""
        return self.weight_grad

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        """Importance of each weight (shaped like it, larger is kept): |w|."""
        return layer.weight.detach().abs()

    def select(self, scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        """The kept masks of every layer from its scores: by default the target through the
        distribution, in each layer's layout (`select_masks`)."""
        return self.select_masks(scores, sparsity=target)

    def after_update(self, masks: dict[str, torch.Tensor]) -> None:
        """Runs after every mask update, once the masks are installed (IMP rewinds here)."""

    def after_step(self, step: int) -> None:
        """Runs at the end of every `step()`, after any mask update."""

    def report_notes(self) -> dict[str, object]:
        """The algorithm's own figures for `report().notes`."""
        return {}

    def regularizer(self) -> torch.Tensor | None:
        """A term the training loop adds to the loss before every backward (sparse variational
        dropout's `beta * KL`), or None (the default: the loss is the task's own)."""
        return None

    def before_recollect(self, removed: list[str], added: list[str]) -> None:
        """Runs in `recollect` before the pruner changes (`self.layers` is still the old set;
        the new modules are in `self.model`): raise to refuse, or adapt the algorithm's own
        state to the layers `removed` and `added` (a layer replaced under its name is in both).
        By default an algorithm with `state_attributes` refuses any change of its layers:
        that state may describe them (IMP's rewind point holds their weights)."""
        if self.state_attributes and (removed or added):
            raise RuntimeError(f"dynasparse.pruning.{type(self).__name__}: cannot recollect layers (removed "
                               f"{removed}, added {added}): its state ({', '.join(self.state_attributes)}) may "
                               "describe the old ones, and it does not say how to carry it over (before_recollect)")

    # -- selection -------------------------------------------------------------------------------

    def active_weights(self, name: str) -> int:
        """How many weights of layer `name` are active (counted once per mask change)."""
        mask = self.layers[name].mask
        stamp = _stamp(mask)
        cached = self._active_counts.get(name)
        if cached is None or cached[0] != stamp:
            cached = self._active_counts[name] = (stamp, int(torch.count_nonzero(mask)))
        return cached[1]

    def drop_and_grow(self, name: str, k: int, growth: torch.Tensor) -> torch.Tensor:
        """The new mask of layer `name` (unstructured, weight granularity): its k active
        weights of smallest |w| dropped and the k inactive ones of largest |growth| (a tensor
        of the weight's shape and dtype) grown, ties to the lower flat index, no weight both
        dropped and grown (`ops.topk.rigl_masks`: one pass over the layer). `apply_masks`
        installs a mask made here in O(k): the pruner knows where it differs from the layer's."""
        layer = self.layers[name]
        kind = LayerUnits(layer, self.granularity).kind
        if kind != "weight":
            units = "whole rows" if kind == "row" else f"{layer.layout} units"
            raise ValueError(f"dynasparse.pruning.drop_and_grow: {name} is selected by {units}; drop_and_grow takes "
                             "unstructured layers at granularity 'weight' (select_masks with candidates takes the "
                             "others)")
        mask = layer.mask
        new, dropped, grown, pruned_nonzeros = rigl_masks(layer.weight.detach(), mask, growth, k)
        self._changes[name] = _Change(new, dropped, grown, int(pruned_nonzeros), _stamp(mask))
        return new

    def unit_size(self, name: str) -> int:
        """Weights per selection unit of layer `name` (1, a block, or a row)."""
        return LayerUnits(self.layers[name], self.granularity).size

    def select_masks(self, scores: Mapping[str, torch.Tensor], *, sparsity: float | None = None,
                     counts: Mapping[str, int] | None = None, threshold: float | None = None,
                     candidates: Mapping[str, torch.Tensor] | None = None,
                     distribution: Distribution | str | None = None) -> dict[str, torch.Tensor]:
        """Kept masks from `scores` ({layer name: weight-shaped scores}, larger kept), in each
        layer's units and layout (see `selection`), by exactly one of:

        - `sparsity`: a target shared among the given layers by `distribution` (the pruner's
          by default): one global threshold, uniform, ERK or any `Distribution`;
        - `counts`: {name: weights to keep}, rounded to whole units (blocks, rows);
        - `threshold`: keep the units whose score is above it (strictly).

        `candidates` ({name: bool mask}) restricts a layer's choice to the units wholly inside
        its mask (RigL grows among the inactive weights); asking for more than the candidates
        is a ValueError. A 2:4 layer chooses among the 2 largest candidates of every group of 4
        and is capped there (it holds at most half its weights)."""
        chosen_modes = [mode for mode, value in (("sparsity", sparsity), ("counts", counts), ("threshold", threshold))
                        if value is not None]
        if len(chosen_modes) != 1:
            raise TypeError("dynasparse.pruning.select_masks: give exactly one of sparsity, counts, threshold, got "
                            f"{chosen_modes or 'none'}")
        candidates = dict(candidates or {})
        unknown = sorted((set(scores) | set(candidates) | set(counts or {})) - set(self.layers))
        if unknown:
            raise ValueError(f"dynasparse.pruning.select_masks: {unknown} are not prunable layers of this pruner")
        prepared = []
        for name, raw in scores.items():
            layer = self.layers[name]
            if not isinstance(raw, torch.Tensor) or raw.shape != layer.weight.shape:
                raise ValueError(f"dynasparse.pruning: the scores of {name} must be a tensor shaped like its weight "
                                 f"{list(layer.weight.shape)}, got {getattr(raw, 'shape', type(raw).__name__)}")
            units = LayerUnits(layer, self.granularity)
            unit_scores = units.scores(raw.detach().float())
            user = None
            if name in candidates:
                given = candidates[name]
                if not (isinstance(given, torch.Tensor) and given.dtype == torch.bool
                        and given.shape == layer.weight.shape):
                    raise ValueError(f"dynasparse.pruning: the candidates of {name} must be a bool tensor shaped like "
                                     f"its weight {list(layer.weight.shape)}")
                user = units.candidates(given.to(unit_scores.device))
            allowed = user
            layout = units.layout_candidates(unit_scores if user is None else
                                             torch.where(user, unit_scores, -torch.inf))
            if layout is not None:
                allowed = layout if allowed is None else allowed & layout
            prepared.append((name, units, unit_scores, user, allowed))
        if threshold is not None:
            chosen = {}
            for name, units, unit_scores, _, allowed in prepared:
                if bool(torch.isnan(unit_scores).any()):
                    raise ValueError(f"dynasparse.pruning: the scores of {name} contain NaN")
                kept = unit_scores > threshold
                chosen[name] = units.expand(kept if allowed is None else kept & allowed)
            return chosen
        if counts is not None:
            missing = [name for name in scores if name not in counts]
            if missing:
                raise ValueError(f"dynasparse.pruning.select_masks: counts has no entry for {missing}")
            for name, units, *_ in prepared:
                check_int("dynasparse.pruning.select_masks", f"counts[{name!r}]", counts[name], 0,
                          units.count * units.size)
            wanted = {name: round(counts[name] / units.size) for name, units, *_ in prepared}
        else:
            spread = [units.spread(unit_scores if allowed is None else torch.where(allowed, unit_scores, -torch.inf))
                      for _, units, unit_scores, _, allowed in prepared]
            kept = as_distribution(distribution if distribution is not None else self.distribution).select(
                spread, [self.layers[name].weight.shape for name, *_ in prepared], sparsity)
            wanted, direct = {}, {}
            for (name, units, _, user, _), mask in zip(prepared, kept):
                if units.kind == "weight":
                    if user is not None and bool((mask & ~user).any()):
                        raise ValueError(f"dynasparse.pruning: sparsity {sparsity} keeps "
                                         f"{int(torch.count_nonzero(mask))} weights of {name}, more than its "
                                         f"{int(torch.count_nonzero(user))} candidates")
                    direct[name] = mask
                else:
                    spread_size = units.size if units.kind == "block" else 1
                    wanted[name] = round(int(torch.count_nonzero(mask)) / spread_size)
        chosen = {}
        for name, units, unit_scores, user, allowed in prepared:
            if counts is None and name in direct:
                chosen[name] = direct[name]
                continue
            limit = units.count if user is None else int(torch.count_nonzero(user))
            if wanted[name] > limit:
                raise ValueError(f"dynasparse.pruning: cannot keep {wanted[name] * units.size} weights of {name}: it "
                                 f"has {limit * units.size} candidates")
            number = wanted[name] if allowed is None else min(wanted[name], int(torch.count_nonzero(allowed)))
            kept, _ = ops.topk_mask(unit_scores, number, allowed)
            chosen[name] = units.expand(kept)
        return chosen

    # -- masks -------------------------------------------------------------------------------------

    @torch.no_grad()
    def apply_masks(self, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Install new masks ({name: bool mask} for every layer), synchronized across ranks
        (rank 0's), and keep the statistics; returns the installed masks. In masked mode the
        pruned weights are zeroed, and after initialization the weights that grow back start
        at zero too; their optimizer state is zeroed wherever a weight is not kept from before.
        A mask from `drop_and_grow` on the mask this pruner installed last is installed in
        O(changes): statistics and zeroing touch the dropped and grown weights only (masked
        training keeps the other pruned weights and their state at zero; should a pruned weight
        be nonzero anyway, all of them are zeroed)."""
        if not isinstance(masks, Mapping) or set(masks) != set(self.layers):
            got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
            raise ValueError(f"dynasparse.pruning: masks must be given for exactly the layers {sorted(self.layers)}, "
                             f"got {got}")
        for name, layer in self.layers.items():
            layer._check_mask(masks[name], f"the new mask of {name}")
        changes, self._changes = self._changes, {}
        masks = self._synchronize({name: masks[name].to(layer.mask.device).contiguous()
                                   for name, layer in self.layers.items()})
        total_flips = total = 0
        layer_flips = {}
        for name, layer in self.layers.items():
            new, change = masks[name], changes.get(name)
            if (change is not None and change.mask is new and change.base == _stamp(layer.mask)
                    and self._installed.get(name) == change.base and layer.weight.is_contiguous()):
                flips = self._install_change(name, layer, change)
            else:
                flips = self._install_mask(name, layer, new)
            self._installed[name] = _stamp(layer.mask)
            layer_flips[name] = flips / max(new.numel(), 1)
            total_flips, total = total_flips + flips, total + new.numel()
        self.history.append({"step": self.step_count, "target": self.target,
                             "flip_rate": total_flips / max(total, 1), "layers": layer_flips})
        return masks

    def _install_mask(self, name: str, layer: nn.Module, new: torch.Tensor) -> int:
        """Install `new` by comparing it with the installed mask; returns the flips."""
        old = layer.mask.clone()
        layer.set_mask(new)
        flips = int(torch.count_nonzero(old != new))
        self._reactivated[name] |= new & self._pruned_seen[name]
        self._pruned_seen[name] |= ~new
        if layer.grad_mode == "masked":
            fresh = ~(new & old)
            layer.weight.masked_fill_(fresh if self.initialized else ~new, 0.0)
            if self.optimizer is not None and hasattr(self.optimizer, "reset_state"):
                self.optimizer.reset_state(layer.weight, fresh)
        return flips

    def _install_change(self, name: str, layer: nn.Module, change: _Change) -> int:
        """Install a drop-and-grow mask from the changed positions alone; returns the flips.
        The pruned positions before it were pruned at an update of this pruner (the mask is
        the one it installed last), so they are marked seen already, and the active ones that
        were seen pruned are marked re-activated already."""
        active = self._active_counts.get(name)
        resets = (layer.grad_mode == "masked" and self.optimizer is not None
                  and hasattr(self.optimizer, "reset_state"))
        # Where the mask changes: one pass over the two masks, cheaper than scattering 2k bits.
        positions = torch.logical_xor(change.mask, layer.mask) if resets else None
        layer.set_mask(change.mask)
        dropped, grown = change.dropped, change.grown
        seen, reactivated = self._pruned_seen[name].view(-1), self._reactivated[name].view(-1)
        # Re-activated is never set where seen is not: "|= seen" at the grown is "= seen" there.
        reactivated.index_copy_(0, grown, seen.index_select(0, grown))
        seen.index_fill_(0, dropped, True)
        if layer.grad_mode == "masked":
            weight = layer.weight.view(-1)
            if change.pruned_nonzeros:
                # Pruned weights were written behind the optimizer's back: zero them all, and
                # the grown ones (pruned until now).
                layer.weight.masked_fill_(~change.mask, 0.0)
                weight.index_fill_(0, grown, 0.0)
            else:
                # The grown weights were pruned, so they are zero: only the dropped ones change.
                weight.index_fill_(0, dropped, 0.0)
            if resets:
                self.optimizer.reset_state(layer.weight, positions)
        if active is not None and active[0] == change.base:
            # Drop and grow keep the count.
            self._active_counts[name] = (_stamp(layer.mask), active[1])
        return dropped.numel() + grown.numel()

    def _synchronize(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return masks
        synced = {}
        for name, mask in masks.items():
            as_bytes = mask.to(torch.uint8)
            dist.broadcast(as_bytes, src=0)
            synced[name] = as_bytes.bool()
        return synced

    # -- reporting and state -----------------------------------------------------------------

    def report(self) -> PruningReport:
        last = self.history[-1]["layers"] if self.history else {}
        layers = [LayerReport(name, tuple(layer.weight.shape), layer.mask.numel(),
                              int(torch.count_nonzero(layer.mask)), last.get(name),
                              int(torch.count_nonzero(self._reactivated[name])), layer.layout)
                  for name, layer in self.layers.items()]
        pruned = {id(layer.weight) for layer in self.layers.values()}
        dense = sum(p.numel() for p in self.model.parameters() if p.dim() >= 2 and id(p) not in pruned)
        return PruningReport(self.step_count, self.target, layers,
                             [(entry["step"], entry["flip_rate"]) for entry in self.history], dense, dict(self.skipped),
                             self.dense_gradient_steps, dict(self.report_notes()))

    def state_dict(self) -> dict:
        return {"format": _STATE_FORMAT, "algorithm": type(self).__name__, "step": self.step_count,
                "target": self.target, "initialized": self.initialized, "finalized": self.finalized,
                "update_rule": self.update_rule, "weight_grad": self.weight_grad,
                "generator": self.generator.get_state(), "dense_gradient_steps": self.dense_gradient_steps,
                "history": [dict(entry, layers=dict(entry["layers"])) for entry in self.history],
                "pruned_seen": {name: t.clone() for name, t in self._pruned_seen.items()},
                "reactivated": {name: t.clone() for name, t in self._reactivated.items()},
                "extra": {name: _copied(getattr(self, name), name) for name in self.state_attributes}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a pruner's state (after loading the model's state_dict, which holds the masks)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"dynasparse.pruning: this state has format {state.get('format')!r}, this version "
                             f"reads format {_STATE_FORMAT} (saved by {type(self).__name__}.state_dict())")
        if state["algorithm"] != type(self).__name__:
            raise ValueError(f"dynasparse.pruning: the state is of a {state['algorithm']}, this pruner is a "
                             f"{type(self).__name__}")
        if set(state["pruned_seen"]) != set(self.layers):
            raise ValueError(f"dynasparse.pruning: the state is for layers {sorted(state['pruned_seen'])}, this pruner "
                             f"has {sorted(self.layers)}")
        if set(state["extra"]) != set(self.state_attributes):
            raise ValueError(f"dynasparse.pruning: the state holds {sorted(state['extra'])}, {type(self).__name__} "
                             f"keeps {sorted(self.state_attributes)}")
        self.step_count, self.target = state["step"], state["target"]
        self.initialized, self.finalized = state["initialized"], state["finalized"]
        self.generator.set_state(state["generator"])
        self.dense_gradient_steps = state["dense_gradient_steps"]
        self.history = [dict(entry, layers=dict(entry["layers"])) for entry in state["history"]]
        for name in self.layers:
            self._pruned_seen[name].copy_(state["pruned_seen"][name])
            self._reactivated[name].copy_(state["reactivated"][name])
        for name, value in state["extra"].items():
            setattr(self, name, _copied(value, name))
        self.weight_grad = state["weight_grad"]
        # The masks came with the model's state, as this pruner had installed them.
        self._changes.clear()
        self._installed = {name: _stamp(layer.mask) for name, layer in self.layers.items()}
        # No zeroing, only the layers' and the optimizer's modes.
        initialized, self.initialized = self.initialized, False
        self.set_update_rule(state["update_rule"])
        self.initialized = initialized
        if self.initialized:
            self._prepare(self.step_count + 1)

    # -- internals ---------------------------------------------------------------------------

    def _require_initialized(self, what: str) -> None:
        if not self.initialized:
            how = "calibrate(batches)" if self.needs_data else "initialize() or attach(optimizer)"
            raise RuntimeError(f"dynasparse.pruning.{type(self).__name__}: call {how} before {what}()")

    def _require_optimizer(self, what: str) -> None:
        if self._unattached:
            raise RuntimeError(f"dynasparse.pruning.{type(self).__name__}: the attached optimizer does not hold the "
                               f"weights of {self._unattached} (modules were replaced); attach(optimizer) one built "
                               f"from model.parameters() after recollect() before {what}()")

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not hasattr(optimizer, "set_mask") and (self.update_rule == "masked" or self.masks_later):
            raise TypeError("dynasparse.pruning: masked mode needs dynasparse.optim.SGD / AdamW (they keep pruned "
                            f"weights and their state at zero), got {type(optimizer).__name__}")

    def _check_owned(self, optimizer: torch.optim.Optimizer, layers: Mapping[str, nn.Module],
                     after: str = "the pruner (which replaces dense layers by sparse ones)") -> None:
        if not hasattr(optimizer, "set_mask"):
            return  # a torch.optim optimizer in feedback mode: nothing to register
        for name, layer in layers.items():
            if not optimizer.owns(layer.weight):
                raise ValueError(f"dynasparse.pruning: the optimizer does not hold {name}.weight; build it after "
                                 f"{after} from model.parameters()")

    def _prepare(self, step: int) -> None:
        """The layers' weight gradient for training step `step`."""
        kind = None if self.finalized else self.weight_grad_at(step)
        if kind is not None and kind not in WEIGHT_GRADS:
            raise ValueError(f"dynasparse.pruning.{type(self).__name__}.weight_grad_at({step}) returned {kind!r}, not "
                             f"one of {', '.join(WEIGHT_GRADS)} or None")
        for layer in self.layers.values():
            layer.weight_grad = kind

    def _register_masks(self) -> None:
        if self.optimizer is not None and hasattr(self.optimizer, "set_mask"):
            for layer in self.layers.values():
                self.optimizer.set_mask(layer.weight, layer.mask, layer.grad_mode, layer.packing_plan)
