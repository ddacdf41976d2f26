"""dynasparse: dynamic sparse training and pruning with real sparse kernels."""

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # noqa: F401  (its static initializers register the C++ ops)
except ImportError as error:
    raise ImportError(
        "dynasparse._C, the native library, is missing or does not load. Build it against the "
        "installed torch with `pip install --no-build-isolation -e .` from a checkout "
        f"(cause: {error})") from error

from . import ops  # noqa: E402  (needs the ops registered by _C)
from .dispatch import backends, cpu_isa, cpu_isa_cap, format_backends, usable_backends  # noqa: E402
from .layout import MaskPlan  # noqa: E402
from . import nn, optim, pruning  # noqa: E402  (the layers above ops, reachable as attributes)
from .nn import densify, load, save, sparsify  # noqa: E402
from .nn.modules import SparseConv1d, SparseConv2d, SparseLinear, SparseTransposedLinear  # noqa: E402
from .advise import advise  # noqa: E402

__version__ = "0.1.0"
__all__ = ["MaskPlan", "SparseConv1d", "SparseConv2d", "SparseLinear", "SparseTransposedLinear", "advise", "backends",
           "cpu_isa", "cpu_isa_cap", "densify", "format_backends", "load", "nn", "ops", "optim", "pruning", "save", "sparsify", "usable_backends",
           "__version__"]
