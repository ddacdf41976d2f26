"""Drop-in sparse layers and whole-model conversion (modules.py, convert.py, io.py), sparse or
dense per call (costs.py), physical shrinking of pruned neurons (shrink.py), and sparse
variational dropout layers (variational.py)."""

from .convert import SparsifyReport, densify, sparse_masks, sparsify
from .costs import backend_default, default_backend, set_default_backend
from .io import load, save
from .modules import LAYOUT_NAMES, SparseConv1d, SparseConv2d, SparseLinear, SparseTransposedLinear
from .shrink import NotShrinkable, ShrinkReport, shrink, shrink_report
from .variational import VDConv1d, VDConv2d, VDLinear

__all__ = ["LAYOUT_NAMES", "NotShrinkable", "ShrinkReport", "SparseConv1d", "SparseConv2d", "SparseLinear",
           "SparseTransposedLinear", "SparsifyReport", "VDConv1d", "VDConv2d", "VDLinear", "backend_default",
           "default_backend", "densify", "load", "save", "set_default_backend", "shrink", "shrink_report",
           "sparse_masks", "sparsify"]
