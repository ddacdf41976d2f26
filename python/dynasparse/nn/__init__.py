"""Drop-in sparse layers and whole-model conversion (see modules.py, convert.py, io.py)."""

from .convert import SparsifyReport, densify, sparse_masks, sparsify
from .io import load, save
from .modules import LAYOUT_NAMES, SparseConv2d, SparseLinear, SparseTransposedLinear

__all__ = ["LAYOUT_NAMES", "SparseConv2d", "SparseLinear", "SparseTransposedLinear", "SparsifyReport", "densify",
           "load", "save", "sparse_masks", "sparsify"]
