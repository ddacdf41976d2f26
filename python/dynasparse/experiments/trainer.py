"""The trainer: `train(spec) -> TrainResult`, one run of a RunSpec.

The run is a pure function of its spec on the CPU (sparse layers pinned to their kernels): the model's initialization and the batch
order come from `spec.seed` (torch's global generator is seeded inside a forked RNG state, so
the caller's is left as it was), and the thread count is `spec.threads` for the run.

A staged run (`spec.parent`) starts from its parent's trained model, given as `parent=`
(the runner passes it), through `spec.transform` when set (`experiments.transforms`); else
from a fresh model. `steps=0` only evaluates that starting model. A pruner's `regularizer()`
term, when it returns one, is added to the loss before every backward.

The method is built by name through `dynasparse.pruning.create` when `prune_at` of the
steps are done (at the start by default); the optimizer is built after it (the pruner makes
the layers sparse) and attached; a method that scores by data (`needs_data`, e.g. SNIP) is
then calibrated on `spec.calibration_batches` training batches. After the last step the
pruner is finalized (hard-pruned: the stored model is m * w).

Hooks (`Hook` subclasses, any of their methods) see a `TrainState` after every optimizer
step (`on_step`), after every mask update (`on_update`, the initial mask included) and at the
end (`on_end`); what they write into `state.metrics` (JSON values) is stored with the run's
metrics.

Metrics: `accuracy` and `loss` on the test split (`validation_accuracy`, `validation_loss`
with a validation split), `train_loss` (mean over the last tenth of the steps), `steps` done,
`stopped_early`, `seconds` (the training loop, evaluations excluded), `sparsity` (of the
pruned layers) and `model_sparsity` (of all weights), `layer_sparsity`, `parameters`,
`nonzero_parameters`, `input_shape` and `classes` (to rebuild the model), the pruner's
`flip_rates` ([step, rate] per update) and `reactivated` fraction, and `curve` (the
evaluations every `eval_every` steps).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .. import optim, pruning
from ..nn import backend_default
from . import data as data_sets
from . import models, transforms
from .analysis import accuracy, layer_sparsity, logits, sparse_layers
from .spec import RunSpec

_OWNER = "dynasparse.experiments.train"
DENSE = "dense"


@dataclasses.dataclass
class TrainState:
    """What a hook sees. `step`: optimizer steps done; `loss`: the last batch's loss."""

    spec: RunSpec
    dataset: data_sets.Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    pruner: pruning.Pruner | None
    step: int = 0
    loss: float = math.nan
    metrics: dict = dataclasses.field(default_factory=dict)


class Hook:
    """Base class of the training hooks; override any of the three."""

    def on_step(self, state: TrainState) -> None:
        pass

    def on_update(self, state: TrainState) -> None:
        pass

    def on_end(self, state: TrainState) -> None:
        pass


@dataclasses.dataclass
class TrainResult:
    spec: RunSpec
    model: nn.Module
    pruner: pruning.Pruner | None
    metrics: dict


def evaluate(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Accuracy and mean cross-entropy of `model` on (inputs, labels)."""
    inputs, labels = split
    outputs = logits(model, inputs)
    return {"accuracy": accuracy(outputs, labels),
            "loss": float(nn.functional.cross_entropy(outputs, labels)) if len(labels) else math.nan}


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{_OWNER}: spec.device {name!r} is not a device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{_OWNER}: spec.device is {name!r} but this torch ({torch.__version__}) sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{_OWNER}: spec.device must be cpu or cuda, got {name!r}")
    return device


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(spec: RunSpec, labels: torch.Tensor) -> Iterator[torch.Tensor]:
    """Index batches of spec.batch_size, without replacement within an epoch, reshuffled per
    epoch by a generator seeded from spec.seed (the last partial batch of an epoch is dropped)."""
    order = torch.Generator().manual_seed(spec.seed)
    while True:
        permutation = torch.randperm(len(labels), generator=order)
        for start in range(0, len(labels) - spec.batch_size + 1, spec.batch_size):
            yield permutation[start:start + spec.batch_size]


def calibration_batches(spec: RunSpec, dataset: data_sets.Dataset, count: int | None = None
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (default spec.calibration_batches) training batches for the methods that
    score by data (SNIP, OBD) and for transforms, drawn by their own generator so that the
    training batch order is the same for every method."""
    count = spec.calibration_batches if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{_OWNER}: the number of calibration batches must be an int >= 1, got {count!r}")
    inputs, labels = dataset.train
    seed = int.from_bytes(hashlib.sha256(f"calibration:{spec.seed}".encode()).digest()[:8], "little")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(labels.device)
    chunks = order[:count * spec.batch_size].split(spec.batch_size)
    return [(inputs[index], labels[index]) for index in chunks]


def _optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    cls = {"sgd": optim.SGD, "adamw": optim.AdamW}[spec.optimizer]
    return cls(model.parameters(), lr=spec.lr, **spec.optimizer_options)


def _pruner(spec: RunSpec, model: models.Model, total_steps: int) -> pruning.Pruner:
    options = dict(spec.method_options)
    dense = getattr(model, "dense_layers", ())
    if "include" not in options and "exclude" not in options and dense:
        options["exclude"] = list(dense)
    return pruning.create(spec.method, model, sparsity=spec.sparsity, total_steps=total_steps, **options)


def _pruning_metrics(pruner: pruning.Pruner | None, model: nn.Module) -> dict:
    layers = sparse_layers(model)
    weights = sum(p.numel() for p in model.parameters())
    nonzero = weights - sum(int((~layer.mask).sum()) for layer in layers.values())
    metrics = {"parameters": weights, "nonzero_parameters": nonzero,
               "layer_sparsity": layer_sparsity({name: layer.mask for name, layer in layers.items()})}
    if pruner is None:
        # A staged run's model can be sparse without a method of its own (a parent's masks).
        masked = sum(layer.mask.numel() for layer in layers.values())
        return {**metrics, "sparsity": (weights - nonzero) / masked if masked else 0.0,
                "model_sparsity": (weights - nonzero) / weights if weights else 0.0, "flip_rates": [],
                "reactivated": 0.0}
    report = pruner.report()
    return {**metrics, "sparsity": report.sparsity, "model_sparsity": report.model_sparsity,
            "flip_rates": [[step, rate] for step, rate in report.flip_rates],
            "reactivated": report.reactivated_fraction}


def train(spec: RunSpec, *, dataset: data_sets.Dataset | None = None, hooks: Sequence[Hook] = (),
          progress: Callable[[int], None] | None = None, parent: nn.Module | None = None) -> TrainResult:
    """Run `spec` (see the module docstring). `dataset`: the spec's data set, when the caller
    has it loaded (else it is loaded here); `progress(n)` is called after every step with n = 1;
    `parent`: the trained model of `spec.parent` (e.g. `Store.load_model(spec.parent.run_id)`),
    required for a staged run and not modified (the run starts from a copy)."""
    if not isinstance(spec, RunSpec):
        raise TypeError(f"{_OWNER}: spec must be a RunSpec, got {type(spec).__name__}")
    if (spec.parent is None) != (parent is None):
        raise ValueError(f"{_OWNER}: parent must be given exactly when spec.parent is set (the parent run's trained "
                         f"model); spec.parent is {'set' if spec.parent is not None else 'None'}, parent is "
                         f"{'given' if parent is not None else 'None'}")
    if parent is not None and not isinstance(parent, nn.Module):
        raise TypeError(f"{_OWNER}: parent must be an nn.Module, got {type(parent).__name__}")
    for hook in hooks:
        if not isinstance(hook, Hook):
            raise TypeError(f"{_OWNER}: hooks must be experiments.Hook instances, got {type(hook).__name__}")
    device = _check_device(spec.device)
    if dataset is None:
        dataset = data_sets.load(spec.data, device=device, **spec.data_options)
    elif dataset.name != spec.data or dataset.options != spec.data_options:
        raise ValueError(f"{_OWNER}: dataset is {dataset.name!r} with options {dataset.options}, the spec asks for "
                         f"{spec.data!r} with {spec.data_options}")
    else:
        dataset = dataset.to(device)
    train_x, train_y = dataset.train
    if spec.batch_size > len(train_y):
        raise ValueError(f"{_OWNER}: spec.batch_size {spec.batch_size} is larger than the {len(train_y)} training "
                         "examples")
    if spec.patience is not None and dataset.validation is None:
        raise ValueError(f"{_OWNER}: spec.patience (early stopping) needs a validation split: set "
                         "data_options['validation'] to a fraction")
    fork_devices = [device] if device.type == "cuda" else []
    # Sparse layers run their kernels: with backend "auto" the result would depend on which way
    # this machine's timings chose (the same math, rounded differently).
    with _threads(spec.threads), torch.random.fork_rng(devices=fork_devices), backend_default("sparse"):
        torch.manual_seed(spec.seed)
        model = models.build(spec.model, input_shape=dataset.input_shape, classes=dataset.classes,
                             **spec.model_options).to(device)
        if parent is not None:
            parent = copy.deepcopy(parent).to(device)
        model = transforms.apply(spec, model, parent, dataset)
        torch.manual_seed(spec.seed)  # the batch order does not depend on what a transform drew
        return _train(spec, dataset, device, model, list(hooks), progress)


def _train(spec, dataset, device, model, hooks, progress) -> TrainResult:
    prune_step = round(spec.prune_at * spec.steps) if spec.method != DENSE else None
    # A run of steps=0 (prune, then evaluate) still gives the method a schedule of one step.
    pruner = _pruner(spec, model, max(spec.steps, 1)) if prune_step == 0 else None
    optimizer = _optimizer(spec, model)
    state = TrainState(spec, dataset, model, optimizer, pruner)

    def attach(pruner):
        pruner.on_update(lambda step, masks: [hook.on_update(state) for hook in hooks])
        pruner.attach(optimizer)
        if pruner.needs_data:
            pruner.calibrate(calibration_batches(spec, dataset))  # the default loss: cross-entropy

    if pruner is not None:
        attach(pruner)
    loss_fn = nn.CrossEntropyLoss()
    train_x, train_y = dataset.train
    batches = _batches(spec, train_y)
    losses, curve = [], []
    best, since_best, stopped_early = -math.inf, 0, False
    start = time.perf_counter()
    eval_seconds = 0.0
    for step in range(spec.steps):
        if step == prune_step and pruner is None:
            pruner = _pruner(spec, model, spec.steps - prune_step)
            optimizer = state.optimizer = _optimizer(spec, model)  # the layers were replaced
            state.pruner = pruner
            attach(pruner)
        index = next(batches).to(device)
        if spec.schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / spec.steps))
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(train_x[index]), train_y[index])
        penalty = pruner.regularizer() if pruner is not None else None
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
        state.step, state.loss = step + 1, loss.item()
        losses.append(state.loss)
        if pruner is not None:
            pruner.step()
        for hook in hooks:
            hook.on_step(state)
        if progress is not None:
            progress(1)
        if spec.eval_every is not None and state.step % spec.eval_every == 0 and state.step < spec.steps:
            began = time.perf_counter()
            point = {"step": state.step, **evaluate(model, dataset.test)}
            if dataset.validation is not None:
                point.update({f"validation_{k}": v for k, v in evaluate(model, dataset.validation).items()})
            curve.append(point)
            eval_seconds += time.perf_counter() - began
            if spec.patience is not None:
                if point["validation_accuracy"] > best:
                    best, since_best = point["validation_accuracy"], 0
                else:
                    since_best += 1
                if since_best >= spec.patience:
                    stopped_early = True
                    break
    if pruner is not None and not pruner.finalized:
        pruner.finalize()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start - eval_seconds
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {**evaluate(model, dataset.test), "train_loss": sum(tail) / len(tail) if tail else None,
               "steps": state.step,
               "stopped_early": stopped_early, "seconds": seconds, "input_shape": list(dataset.input_shape),
               "classes": dataset.classes, **_pruning_metrics(pruner, model)}
    if dataset.validation is not None:
        metrics.update({f"validation_{k}": v for k, v in evaluate(model, dataset.validation).items()})
    if curve:
        metrics["curve"] = curve
    state.metrics.update(metrics)
    for hook in hooks:
        hook.on_end(state)
    return TrainResult(spec, model, pruner, state.metrics)
