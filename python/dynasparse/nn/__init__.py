"""Drop-in sparse layers and whole-model conversion (see modules.py, convert.py, io.py; costs.py: sparse or dense per call)."""

from .convert import SparsifyReport, densify, sparse_masks, sparsify
from .costs import backend_default, default_backend, set_default_backend
from .io import load, save
from .modules import LAYOUT_NAMES, SparseConv2d, SparseLinear, SparseTransposedLinear

__all__ = ["LAYOUT_NAMES", "SparseConv2d", "SparseLinear", "SparseTransposedLinear", "SparsifyReport",
           "backend_default", "default_backend", "densify", "load", "save", "set_default_backend", "sparse_masks",
           "sparsify"]
