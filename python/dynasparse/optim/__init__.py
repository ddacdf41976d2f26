"""Sparse-aware optimizers: drop-in torch.optim.SGD / AdamW running dynasparse's fused steps."""

from .adamw import AdamW
from .sgd import SGD

__all__ = ["AdamW", "SGD"]
