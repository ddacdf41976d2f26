"""RunSpec: everything that decides one training run, as a JSON-serializable dataclass with
a stable id (`spec.run_id`, the first 16 hex digits of the sha256 of its canonical JSON).

Two specs with equal fields have the same id on every machine and Python version; any field
that differs (including `device` and `threads`, which can change the arithmetic's order)
gives another id. The id covers every field, so a RunSpec gaining a field in a later version
gives new ids: runs stored under the old ones are then recomputed, never taken for runs of
different settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from typing import Any

from . import data, models

_OWNER = "dynasparse.experiments.RunSpec"
SCHEDULES = ("cosine", "constant")
# name: (the arguments a spec may set, the defaults it gets)
OPTIMIZERS = {"sgd": (("momentum", "dampening", "weight_decay", "nesterov"), {"momentum": 0.9, "weight_decay": 1e-4}),
              "adamw": (("betas", "eps", "weight_decay", "amsgrad"), {})}
SPEC_VERSION = 1
_STAGE_FIELDS = ("parent", "transform", "transform_options")


def _json_value(field: str, value: Any) -> Any:
    """`value` in its JSON form (tuples as lists), refusing what JSON cannot hold exactly."""
    try:
        text = json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{_OWNER}: {field} must hold only JSON values (str, finite numbers, bool, None, lists, "
                        f"dicts with str keys), got {value!r} ({error})") from None
    return json.loads(text)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run.

    data, data_options: a data set of `experiments.data` and its options.
    model, model_options: a model of `experiments.models` and its options.
    method, method_options: a pruning method by its `dynasparse.pruning` registry name (or
        "dense": no pruning) and the options passed to `pruning.create`. Without `include` or
        `exclude` the model's `dense_layers` are excluded.
    sparsity: the method's target sparsity (0 for "dense").
    prune_at: fraction of the steps trained dense before the method is created (0: from the
        start; one-shot pruning with fine-tuning: e.g. 0.75); the optimizer is rebuilt then
        (the layers become sparse), so momentum restarts.
    optimizer, optimizer_options: "sgd" or "adamw" (dynasparse.optim) with its arguments
        (default for sgd: momentum 0.9, weight_decay 1e-4).
    The data and optimizer options are stored with their defaults filled in, and the model's
    option names are checked, when the spec is made.
    lr, schedule: the learning rate and its decay over the steps, "cosine" or "constant".
    steps, batch_size: optimizer steps; examples per step (batches drawn without replacement
        from a reshuffled training set, per epoch).
    seed: the model's initialization and the batch order (the same for every method).
    calibration_batches: training batches given to a method that scores by data (SNIP, OBD)
        before its first mask.
    device, threads: where it runs; CPU threads (torch.set_num_threads) during the run.
    parent: a staged run: this run starts from the parent run's trained model (masks included)
        instead of a fresh initialization; the runner trains the parent first. The parent
        must use the same data set.
    transform, transform_options: a transform of `experiments.transforms` applied to the
        starting model before training (re-initialize keeping the masks, prune by saliency,
        shrink neurons, ...), with its options.
    steps: 0 evaluates the starting model (a parent's, a transform's) without training.
    eval_every: also evaluate every this many steps (a learning curve; None: at the end only).
    patience: early stopping (off when None): stop when validation accuracy (the data set
        needs a `validation` fraction, and eval_every must be set) has not improved for this
        many evaluations.
    """

    data: str = "mnist1d"
    data_options: dict = dataclasses.field(default_factory=dict)
    model: str = "cnn1d"
    model_options: dict = dataclasses.field(default_factory=dict)
    method: str = "dense"
    method_options: dict = dataclasses.field(default_factory=dict)
    sparsity: float = 0.0
    prune_at: float = 0.0
    optimizer: str = "sgd"
    optimizer_options: dict = dataclasses.field(default_factory=dict)
    lr: float = 0.05
    schedule: str = "cosine"
    steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    calibration_batches: int = 1
    eval_every: int | None = None
    patience: int | None = None
    parent: RunSpec | None = None
    transform: str | None = None
    transform_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("data", "model", "method"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"{_OWNER}: {name} must be a non-empty str, got {getattr(self, name)!r}")
        for name in ("data_options", "model_options", "method_options", "optimizer_options"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
                raise TypeError(f"{_OWNER}: {name} must be a dict with str keys, got {value!r}")
            object.__setattr__(self, name, _json_value(name, value))
        for name, low, high, closed_high in (("sparsity", 0.0, 1.0, False), ("prune_at", 0.0, 1.0, False),
                                             ("lr", 0.0, math.inf, False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value < high:
                raise ValueError(f"{_OWNER}: {name} must be a number in [{low}, {high}), got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.method == "dense" and self.sparsity != 0.0:
            raise ValueError(f"{_OWNER}: method 'dense' has sparsity 0, got sparsity={self.sparsity}")
        for name, minimum in (("steps", 0), ("batch_size", 1), ("seed", 0), ("threads", 1),
                              ("calibration_batches", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise ValueError(f"{_OWNER}: {name} must be an int >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.seed >= 2**63:
            raise ValueError(f"{_OWNER}: seed must be below 2**63, got {self.seed}")
        for name in ("eval_every", "patience"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                    raise ValueError(f"{_OWNER}: {name} must be None or an int >= 1, got {value!r}")
                object.__setattr__(self, name, int(value))
        if self.patience is not None and self.eval_every is None:
            raise ValueError(f"{_OWNER}: patience (early stopping) needs eval_every (how often validation accuracy "
                             "is measured)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{_OWNER}: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{_OWNER}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        allowed, defaults = OPTIMIZERS[self.optimizer]
        unknown = sorted(set(self.optimizer_options) - set(allowed))
        if unknown:
            raise ValueError(f"{_OWNER}: optimizer_options {', '.join(unknown)} are not arguments of "
                             f"{self.optimizer}; it takes {', '.join(allowed)}")
        object.__setattr__(self, "optimizer_options", {**defaults, **self.optimizer_options})
        # Defaults filled in and checked now: a typo fails when the spec is made, and the id
        # covers the values the run uses.
        object.__setattr__(self, "data_options", data.resolve(self.data, **self.data_options))
        models.check_options(self.model, self.model_options)
        if not isinstance(self.device, str):
            raise TypeError(f"{_OWNER}: device must be a str such as 'cpu' or 'cuda', got {self.device!r}")
        self._check_stage()

    def _check_stage(self) -> None:
        parent = self.parent
        if isinstance(parent, dict):
            parent = RunSpec.from_dict(parent)
            object.__setattr__(self, "parent", parent)
        if parent is not None:
            if not isinstance(parent, RunSpec):
                raise TypeError(f"{_OWNER}: parent must be a RunSpec or None, got {type(parent).__name__}")
            if (parent.data, parent.data_options) != (self.data, self.data_options):
                raise ValueError(f"{_OWNER}: a staged run uses its parent's data set; the parent has {parent.data!r} "
                                 f"with {parent.data_options}, this spec {self.data!r} with {self.data_options}")
        if not isinstance(self.transform_options, dict) or not all(isinstance(k, str) for k in self.transform_options):
            raise TypeError(f"{_OWNER}: transform_options must be a dict with str keys, got {self.transform_options!r}")
        object.__setattr__(self, "transform_options", _json_value("transform_options", self.transform_options))
        if self.transform is None:
            if self.transform_options:
                raise ValueError(f"{_OWNER}: transform_options are given without a transform")
            if parent is None and self.steps == 0:
                raise ValueError(f"{_OWNER}: steps=0 evaluates the starting model: give a parent or a transform "
                                 "(a fresh model, untrained, is not a run)")
            return
        if not isinstance(self.transform, str) or not self.transform:
            raise TypeError(f"{_OWNER}: transform must be None or a transform's name, got {self.transform!r}")
        from .transforms import get

        get(self.transform)

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_dict(self) -> dict:
        """The fields as JSON values (the parent as its own dict). The staging fields are left
        out while unset, so that the runs of specs made before they existed keep their ids."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in _STAGE_FIELDS:
            if not fields[name]:
                del fields[name]
        if self.parent is not None:
            fields["parent"] = self.parent.to_dict()
        return fields

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace (what the run id hashes)."""
        return json.dumps({"version": SPEC_VERSION, **self.to_dict()}, sort_keys=True, separators=(",", ":"),
                          allow_nan=False)

    @classmethod
    def from_dict(cls, fields: dict) -> RunSpec:
        if not isinstance(fields, dict):
            raise TypeError(f"{_OWNER}: a spec must be a JSON object, got {type(fields).__name__}")
        fields = dict(fields)
        version = fields.pop("version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ValueError(f"{_OWNER}: spec version {version!r} is not this version ({SPEC_VERSION})")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{_OWNER}: unknown spec field(s) {', '.join(unknown)}")
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        try:
            fields = json.loads(text)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{_OWNER}: not a JSON spec ({error})") from None
        return cls.from_dict(fields)

    @property
    def run_id(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace(self, **changes) -> RunSpec:
        return dataclasses.replace(self, **changes)

    @property
    def label(self) -> str:
        """A short human-readable name: method, sparsity, seed (and the transform and parent)."""
        target = "" if self.method == "dense" else f" {self.sparsity:.0%}"
        stage = f" {self.transform}" if self.transform else ""
        start = f" from {self.parent.run_id}" if self.parent is not None else ""
        return f"{self.method}{target}{stage} seed {self.seed}{start}"

    def lineage(self) -> list[RunSpec]:
        """The ancestors of this run, the first trained first, then this run."""
        chain, spec = [], self
        while spec is not None:
            chain.append(spec)
            spec = spec.parent
        return chain[::-1]
