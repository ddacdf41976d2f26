"""OBD and OBD-SD: weight pruning by second-order saliency (LeCun, Denker, Solla, "Optimal Brain
Damage", NIPS 1990), and our variance-aware variant for the Magnificent Minified Models study.

    pruner = pruning.create("obd", model, sparsity=0.9)              # one-shot, empirical Fisher
    pruner.calibrate(batches)                                        # estimates, prunes (step 0)
    pruner = pruning.create("obd", model, sparsity=0.9, total_steps=3000, rounds=3)   # prune -> retrain x 3
    pruner = pruning.create("obd_sd", model, sparsity=0.95, kappa=1.0)   # rank by mean - std over batches

Importing this module registers both names (`dynasparse.experiments.catalog.minified` does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import saliency
from .pruner import Pruner
from .registry import register
from .schedules import check_int, check_real

Aggregator = Callable[[torch.Tensor], torch.Tensor]


def _mean_minus_std(samples: torch.Tensor, kappa: float) -> torch.Tensor:
    return samples.mean(0) - kappa * samples.std(0, correction=1)


# name -> (function of the per-batch samples [B, *shape] and kappa, the fewest batches it takes)
AGGREGATORS: dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], int]] = {
    "mean": (lambda samples, kappa: samples.mean(0), 1),
    "mean-std": (_mean_minus_std, 2),
    "median": (lambda samples, kappa: samples.median(0).values, 1),
    "min": (lambda samples, kappa: samples.min(0).values, 1),
}


def aggregate(samples: torch.Tensor, aggregator: str | Aggregator = "mean-std", *, kappa: float = 1.0) -> torch.Tensor:
    """One score per weight from its per-batch saliencies `samples` [B, *shape]: by name,
    "mean", "mean-std" (mean - kappa * sample standard deviation (n - 1) over the batches: a
    saliency that varies from batch to batch is trusted less; kappa < 0 ranks by an upper
    bound instead, keeping the weights salient on some batches), "median" or "min"; or any
    callable samples -> scores shaped like samples[0]. The batches weigh equally."""
    owner = "dynasparse.pruning.obd.aggregate"
    if not isinstance(samples, torch.Tensor) or samples.dim() < 1 or samples.shape[0] == 0:
        raise ValueError(f"{owner}: samples must be a tensor [B, *shape] with B >= 1 batches, got "
                         f"{getattr(samples, 'shape', type(samples).__name__)}")
    check_real(owner, "kappa", kappa, "(-inf, inf)")
    if callable(aggregator):
        scores = aggregator(samples)
        if not isinstance(scores, torch.Tensor) or scores.shape != samples.shape[1:]:
            raise ValueError(f"{owner}: the aggregator must return a tensor shaped like one batch's saliencies "
                             f"{list(samples.shape[1:])}, got {getattr(scores, 'shape', type(scores).__name__)}")
        return scores
    if aggregator not in AGGREGATORS:
        raise ValueError(f"{owner}: aggregator must be a callable or one of {', '.join(AGGREGATORS)}, got "
                         f"{aggregator!r}")
    function, fewest = AGGREGATORS[aggregator]
    if samples.shape[0] < fewest:
        raise ValueError(f"{owner}: aggregator {aggregator!r} needs at least {fewest} batches (a spread over "
                         f"batches), got {samples.shape[0]}")
    return function(samples, kappa)


# The options OBD and OBD-SD share.
_OBD_OPTIONS = {"estimator": "Hessian-diagonal estimator: 'fisher' (default), 'hutchinson' or 'exact' "
                             "(pruning.saliency)",
                "rounds": "prune -> retrain rounds reaching the target (1: one-shot at calibration)",
                "round_steps": "training steps per round (default: total_steps // rounds)",
                "probes": "Hutchinson probes per calibration batch (32)",
                "chunk_size": "examples per vmapped per-example-gradient call of the Fisher (256)",
                "loss": "loss(outputs, targets) -> the batch's mean loss (default: cross-entropy)"}


@register("obd", "OBD (LeCun et al. 1990): saliency h_kk * w_k**2 / 2, h the Hessian diagonal on calibration "
          "batches (empirical Fisher; or Hutchinson, exact), prune the lowest (global), masked; optionally rounds of "
          "prune -> retrain",
          options=_OBD_OPTIONS,
          common=("distribution", "include", "exclude", "granularity", "seed"), total_steps="optional")
class OBD(Pruner):
    """Optimal Brain Damage (LeCun, Denker, Solla 1990). The saliency of weight k is
    h_kk * w_k**2 / 2, h_kk the diagonal of the loss's Hessian estimated on the calibration
    batches (`pruning.saliency`: the empirical Fisher by default; sparse layers at their
    effective weights w * m); the weights of lowest saliency among the active ones are pruned
    under one global threshold (`distribution`), masked training after.

    Rounds (our definition of the paper's "prune, retrain, iterate"): round r = 1..R keeps
    (1 - sparsity)**(r / R) of the weights. Round 1 prunes at calibration (step 0); round r at
    step (r - 1) * round_steps, re-estimating the saliencies at the current weights on the same
    calibration batches (kept by the pruner, and in its state_dict, until the last round); the
    last round reaches `sparsity` and training then runs to the end. A pruned weight never
    returns (selection is among the active weights).
    """

    update_rule = "masked"
    needs_data = True
    state_attributes = ("calibration",)

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int | None = None, *,
                 estimator: str = "fisher", rounds: int = 1, round_steps: int | None = None, probes: int = 32,
                 chunk_size: int = 256, loss: saliency.Loss | None = None, **kwargs):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        check_real(owner, "sparsity", sparsity, "[0, 1)")
        if estimator not in saliency.ESTIMATORS:
            raise ValueError(f"{owner}: estimator must be one of {', '.join(saliency.ESTIMATORS)}, got {estimator!r}")
        check_int(owner, "rounds", rounds, 1)
        check_int(owner, "probes", probes, 2)
        check_int(owner, "chunk_size", chunk_size, 1)
        if loss is not None and not callable(loss):
            raise TypeError(f"{owner}: loss must be callable (outputs, targets) -> scalar, got {type(loss).__name__}")
        if total_steps is not None:
            check_int(owner, "total_steps", total_steps, 1)
        if rounds > 1:
            if round_steps is None:
                if total_steps is None:
                    raise ValueError(f"{owner}: rounds={rounds} needs total_steps (the rounds share it) or round_steps")
                round_steps = total_steps // rounds
                if round_steps < 1:
                    raise ValueError(f"{owner}: total_steps={total_steps} is shorter than its {rounds} rounds")
            check_int(owner, "round_steps", round_steps, 1)
            if total_steps is not None and (rounds - 1) * round_steps >= total_steps:
                raise ValueError(f"{owner}: the last of {rounds} rounds would prune at step {(rounds - 1) * round_steps}"
                                 f", not before the end of training (total_steps={total_steps}): the target would "
                                 "never be reached")
        elif round_steps is not None:
            check_int(owner, "round_steps", round_steps, 1)
        self.final, self.estimator, self.rounds, self.round_steps = sparsity, estimator, rounds, round_steps
        self.probes, self.chunk_size, self.loss = probes, chunk_size, loss
        self.calibration: list[list[torch.Tensor]] | None = None
        self._saliency: dict[str, torch.Tensor] | None = None
        self._estimated_at: int | None = None
        super().__init__(model, sparsity, update_every=None, **kwargs)

    @classmethod
    def from_spec(cls, model, *, sparsity, total_steps, optimizer, **options):
        return cls(model, sparsity, total_steps, optimizer=optimizer, **options)

    # -- rounds ----------------------------------------------------------------------------------

    def round_at(self, step: int) -> int:
        """Rounds pruned by step `step` (1 from the calibration on)."""
        if self.rounds == 1:
            return 1
        return min(step // self.round_steps + 1, self.rounds)

    def target_at(self, step: int) -> float:
        done = self.round_at(step)
        return self.final if done >= self.rounds else 1.0 - (1.0 - self.final) ** (done / self.rounds)

    def due(self, step: int) -> bool:
        return (not self.finalized and self.rounds > 1 and step % self.round_steps == 0
                and 1 <= step // self.round_steps <= self.rounds - 1)

    # -- data and scores ---------------------------------------------------------------------

    def calibrate(self, batches: Iterable, loss=None) -> None:
        """Keep the calibration batches ((inputs, targets) pairs), estimate the saliencies and
        prune the first round (initialize). The loss is the constructor's `loss` option (later
        rounds and a resumed pruner estimate with it too)."""
        owner = f"dynasparse.pruning.{type(self).__name__}.calibrate"
        if self.initialized:
            raise RuntimeError(f"{owner}: the pruner is already initialized")
        if loss is not None:
            raise TypeError(f"{owner}: give the loss to the constructor (option 'loss'): later rounds and a resumed "
                            "pruner estimate with it")
        checked = [[inputs, targets] for inputs, targets in saliency.check_batches(owner, batches)]
        self.check_calibration(owner, len(checked))
        self.calibration = checked
        try:
            self.initialize()
        except BaseException:
            self.calibration = None  # not calibrated: a failed estimate leaves no half state
            raise

    def check_calibration(self, owner: str, batches: int) -> None:
        """Refuse calibration data too small for the ranking (OBD-SD's spread needs 2 batches)."""

    def _calibrated(self) -> bool:
        return self.calibration is not None

    def saliency_samples(self) -> dict[str, torch.Tensor]:
        """The per-batch OBD saliencies [B, *shape] of every layer's weight, at the current
        weights, on the calibration batches."""
        if self.calibration is None:
            raise RuntimeError(f"dynasparse.pruning.{type(self).__name__}: no calibration batches (call "
                               "calibrate(batches); they are dropped after the last round)")
        names = {name: f"{name}.weight" if name else "weight" for name in self.layers}
        options = {"params": list(names.values()), "loss": self.loss}
        if self.estimator == "fisher":
            options["chunk_size"] = self.chunk_size
        elif self.estimator == "hutchinson":
            options.update(probes=self.probes, generator=self.generator)
        estimate = saliency.hessian_diagonal(self.model, [tuple(batch) for batch in self.calibration], self.estimator,
                                             **options)
        per_batch = saliency.obd_saliency(self.model, estimate, per_batch=True)
        return {name: per_batch[parameter] for name, parameter in names.items()}

    def rank(self, samples: torch.Tensor) -> torch.Tensor:
        """Scores (larger kept) of one layer's weights from their per-batch saliencies: OBD
        takes their mean weighted by the batch sizes (the saliency of the mean loss)."""
        counts = torch.tensor([len(batch[1]) for batch in self.calibration], dtype=samples.dtype,
                              device=samples.device)
        return torch.tensordot(counts / counts.sum(), samples, dims=1)

    def scores(self, name: str, layer: nn.Module) -> torch.Tensor:
        if self._estimated_at != self.step_count:
            self._saliency = {key: self.rank(value) for key, value in self.saliency_samples().items()}
            self._estimated_at = self.step_count
        return self._saliency[name]

    def select(self, scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        # Among the active weights only: a saliency can be negative (Hutchinson, exact), so no
        # sentinel score could keep a pruned weight below every live one.
        return self.select_masks(scores, sparsity=target,
                                 candidates={name: layer.mask.clone() for name, layer in self.layers.items()})

    def after_update(self, masks) -> None:
        self._saliency = self._estimated_at = None  # the weights change from here on
        if self.round_at(self.step_count) >= self.rounds:
            self.calibration = None  # no later round estimates

    def report_notes(self) -> dict[str, object]:
        return {"estimator": self.estimator, "round": self.round_at(self.step_count), "rounds": self.rounds}


@register("obd_sd", "OBD-SD (our definition): OBD saliencies per calibration batch ranked by mean - kappa * std over "
          "the batches (aggregator pluggable), prune the lowest (global), masked; rounds as OBD",
          options={"aggregator": "'mean-std' (default), 'mean', 'median', 'min' or a callable [B, *shape] -> shape",
                   "kappa": "the weight of the spread in 'mean-std' (1.0; negative: mean + |kappa| std)",
                   **_OBD_OPTIONS},
          common=("distribution", "include", "exclude", "granularity", "seed"), total_steps="optional")
class OBDSD(OBD):
    """OBD-SD. Our definition (the paper's is not available, see ALGORITHMS.md): the OBD
    saliency estimated on each of the B calibration batches separately, ranked by
    `aggregate(samples, aggregator, kappa=kappa)`, by default mean - kappa * std over the
    batches (kappa = 1), so that a weight whose saliency is high on average but varies from
    batch to batch is not trusted as much. Needs B >= 2 calibration batches for 'mean-std'."""

    def __init__(self, model: nn.Module, sparsity: float, total_steps: int | None = None, *,
                 aggregator: str | Aggregator = "mean-std", kappa: float = 1.0, **kwargs):
        owner = f"dynasparse.pruning.{type(self).__name__}"
        if not callable(aggregator) and aggregator not in AGGREGATORS:
            raise ValueError(f"{owner}: aggregator must be a callable or one of {', '.join(AGGREGATORS)}, got "
                             f"{aggregator!r}")
        check_real(owner, "kappa", kappa, "(-inf, inf)")
        self.aggregator, self.kappa = aggregator, kappa
        super().__init__(model, sparsity, total_steps, **kwargs)

    def check_calibration(self, owner: str, batches: int) -> None:
        fewest = 1 if callable(self.aggregator) else AGGREGATORS[self.aggregator][1]
        if batches < fewest:
            raise ValueError(f"{owner}: aggregator {self.aggregator!r} needs at least {fewest} calibration batches "
                             f"(a spread over batches), got {batches}")

    def rank(self, samples: torch.Tensor) -> torch.Tensor:
        return aggregate(samples, self.aggregator, kappa=self.kappa)

    def report_notes(self) -> dict[str, object]:
        name = self.aggregator if isinstance(self.aggregator, str) else getattr(self.aggregator, "__name__", "callable")
        return {**super().report_notes(), "aggregator": name, "kappa": self.kappa}
