"""What SGD and AdamW share: which parameters are sparse and how, statistics, error norms.

A parameter's mask and mode come from `masks={param: (mask, mode)}` or `set_mask`; the sparse
modules register themselves through `set_mask`, also giving their `packing_plan`: where it
returns a MaskPlan that reads panel-packed values, the step writes them (no packing pass in the
next forward). Masks, statistics and error norms belong to the
pruning side and are not part of `state_dict()`, which stays exactly torch.optim's, so
checkpoints load both ways. Only fp32 parameters run the fused op (and gather statistics);
others take torch's functional implementation and cannot be sparse, except fp32 ones the fused op
cannot take (non-contiguous: channels_last convolution weights), whose masks, statistics and
error norms are applied around torch's step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from .. import checks
from ..layout import GRAD_MODES
from ..reference import optim as reference

if TYPE_CHECKING:
    from ..layout import MaskPlan


class SparseOptimizerMixin:
    """Mask bookkeeping for an optimizer subclassing a torch.optim optimizer."""

    # Every write of its steps bumps the version counters (the fused ops do, torch's
    # single-tensor fallback does): the sparse layers need no step hook to notice them.
    bumps_version_counters = True

    def _init_sparse(self, masks: Mapping[torch.Tensor, tuple] | None, statistic: str | None,
                     statistic_ema: float | None) -> None:
        statistic = "none" if statistic is None else statistic
        if statistic not in checks.STATISTICS:
            raise ValueError(f"{type(self).__name__}: statistic must be None, 'abs' or 'square', got {statistic!r}")
        if statistic_ema is not None and not 0.0 <= statistic_ema < 1.0:
            raise ValueError(f"{type(self).__name__}: statistic_ema must be in [0, 1), got {statistic_ema}")
        self.statistic = statistic
        self.statistic_ema = statistic_ema
        # Keyed by the parameter tensor itself (tensors hash by identity).
        self._masks: dict[torch.Tensor, tuple[torch.Tensor, str]] = {}
        self._packing_plans: dict[torch.Tensor, Callable[[], MaskPlan | None]] = {}
        self._statistics: dict[torch.Tensor, torch.Tensor] = {}
        self._error_norms: dict[torch.Tensor, torch.Tensor] = {}
        for param, spec in (masks or {}).items():
            self.set_mask(param, *spec)

    def owns(self, param: torch.Tensor) -> bool:
        """Whether `param` is in one of this optimizer's param groups."""
        return any(p is param for group in self.param_groups for p in group["params"])

    def set_mask(self, param: torch.Tensor, mask: torch.Tensor, mode: str = "masked",
                 packing_plan: Callable[[], MaskPlan | None] | None = None) -> None:
        """Make `param` sparse: `mask` (bool, shaped like it) marks the active weights; `mode` is
        "masked" (pruned weights and their state kept exactly zero, from the next step on) or
        "feedback" (DPF: every weight is updated by the gradient taken at m * w).
        `packing_plan`: returns the current MaskPlan of `mask` over `param` seen as
        [size(0), numel / size(0)] (a sparse layer's `packing_plan`), or None; each step then
        writes the packed values that plan's next forward reads."""
        name = type(self).__name__
        if not self.owns(param):
            raise ValueError(f"{name}.set_mask: the parameter (shape {list(param.shape)}) is not in this optimizer")
        if param.dtype != torch.float32:
            raise TypeError(f"{name}.set_mask: sparse parameters must be torch.float32, got {param.dtype}")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"{name}.set_mask: mask must be a torch.bool tensor, got {got} "
                            "(masks are explicit bool tensors; never derive one from weight == 0)")
        if mask.shape != param.shape:
            raise ValueError(f"{name}.set_mask: mask has shape {list(mask.shape)} "
                             f"but the parameter has shape {list(param.shape)}")
        if mask.device != param.device:
            raise ValueError(f"{name}.set_mask: mask is on {mask.device} but the parameter is on {param.device}")
        if mode not in GRAD_MODES:  # an optimizer's mode is the layer's grad mode
            raise ValueError(f"{name}.set_mask: mode must be 'masked' or 'feedback', got {mode!r}")
        if packing_plan is not None and not callable(packing_plan):
            raise TypeError(f"{name}.set_mask: packing_plan must be a callable returning a MaskPlan or None "
                            f"(a sparse layer's packing_plan method), got {type(packing_plan).__name__}")
        self._masks[param] = (mask, mode)
        if packing_plan is None:
            self._packing_plans.pop(param, None)
        else:
            self._packing_plans[param] = packing_plan

    def clear_mask(self, param: torch.Tensor) -> None:
        """Make `param` dense again."""
        self._masks.pop(param, None)
        self._packing_plans.pop(param, None)
        self._error_norms.pop(param, None)

    def mask(self, param: torch.Tensor) -> tuple[torch.Tensor, str] | None:
        return self._masks.get(param)

    @torch.no_grad()
    def reset_state(self, param: torch.Tensor, positions: torch.Tensor) -> None:
        """Zero the optimizer state of `param` at `positions` (bool, shaped like it), e.g. where
        RigL grows weights, so they start without the history of an earlier life. `step` is a
        per-tensor count and stays."""
        if not self.owns(param):
            raise ValueError(f"{type(self).__name__}.reset_state: the parameter is not in this optimizer")
        if positions.dtype != torch.bool or positions.shape != param.shape:
            raise ValueError(f"{type(self).__name__}.reset_state: positions must be a bool tensor shaped like the "
                             f"parameter {list(param.shape)}, got {positions.dtype} {list(positions.shape)}")
        for value in self.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.masked_fill_(positions, 0.0)

    def statistics(self, param: torch.Tensor) -> torch.Tensor | None:
        """The gradient statistic gathered for `param` since the last reset (None if none)."""
        return self._statistics.get(param)

    def reset_statistics(self, param: torch.Tensor | None = None) -> None:
        for key in [param] if param is not None else list(self._statistics):
            if key in self._statistics:
                self._statistics[key].zero_()

    def error_norms(self) -> dict[torch.Tensor, torch.Tensor]:
        """||w - m * w|| per sparse parameter after the last step (0-d fp32 tensors, no sync)."""
        return dict(self._error_norms)

    def _fused_step(self, params: list[torch.Tensor], call: Callable[..., torch.Tensor],
                    key: Callable[[torch.Tensor], object] = lambda param: None) -> None:
        """Run `call(params, grads, masks, feedback, statistics, packed, key)` once per
        (device, key(param)) batch, and keep the error norms it returns for the sparse parameters."""
        batches: dict[object, list[torch.Tensor]] = defaultdict(list)
        for param in params:
            batches[(param.device, key(param))].append(param)
        for (_, batch_key), batch in batches.items():
            masks, feedback = [], []
            for param in batch:
                mask, mode = self._masks.get(param, (None, "masked"))
                masks.append(mask)
                feedback.append(mode == "feedback")
            statistics = [] if self.statistic == "none" else [self._statistic_buffer(p) for p in batch]
            packed, written = self._packing_targets(batch, masks)
            norms = call(batch, [p.grad for p in batch], masks, feedback, statistics, packed, batch_key)
            for plan, weight in written:
                plan.packed_written(weight)
            for i, param in enumerate(batch):
                if masks[i] is not None:
                    self._error_norms[param] = norms[i]

    def _packing_targets(self, batch: list[torch.Tensor], masks: list[torch.Tensor | None]):
        """({index in batch: packed target}, [(plan, weight view) to tell once written])."""
        packed, written = {}, []
        for i, param in enumerate(batch):
            source = self._packing_plans.get(param)
            plan = source() if source is not None and masks[i] is not None else None
            if plan is None:
                continue
            weight = param.view(plan.shape)
            target = plan.packed_target(weight)
            if target is not None:
                packed[i] = target
                written.append((plan, weight))
        return packed, written

    def _before_plain_step(self, plain: list[torch.Tensor]) -> None:
        """The statistics of fp32 params the fused op cannot take (non-contiguous, e.g.
        channels_last convolution weights): they run torch's step."""
        gathered = [p for p in plain if p.dtype == torch.float32] if self.statistic != "none" else []
        reference.update_statistics([self._statistic_buffer(p) for p in gathered], [p.grad for p in gathered],
                                    self.statistic, self.statistic_ema)

    @torch.no_grad()
    def _after_plain_step(self, plain: list[torch.Tensor]) -> None:
        """Masks of params that ran torch's step: masked mode zeroes their pruned weights and
        state as the fused step does (feedback mode updates every weight, as torch's step did)."""
        sparse = [p for p in plain if p in self._masks]
        for param in sparse:
            mask, mode = self._masks[param]
            if mode == "masked":
                param.masked_fill_(~mask, 0.0)
                self.reset_state(param, ~mask)
        if sparse:
            norms = reference.error_norms(sparse, [self._masks[p][0] for p in sparse])
            self._error_norms.update(zip(sparse, norms))

    def _statistic_buffer(self, param: torch.Tensor) -> torch.Tensor:
        if param not in self._statistics:
            self._statistics[param] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        return self._statistics[param]


def split_params(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(fused, plain): params with a grad that the fused op takes, and the rest with a grad."""
    fused, plain = [], []
    for param in params:
        if param.grad is None:
            continue
        if param.grad.is_sparse:
            raise RuntimeError("dynasparse.optim: sparse (torch.sparse) gradients are not supported")
        (fused if param.dtype == torch.float32 and param.is_contiguous() else plain).append(param)
    return fused, plain


def reject_unsupported(name: str, group: dict) -> None:
    for flag in ("differentiable", "capturable"):
        if group.get(flag):
            raise ValueError(f"dynasparse.optim.{name}: {flag}=True is not supported")
