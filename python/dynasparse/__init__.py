"""dynasparse: dynamic sparse training and pruning with real sparse kernels."""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers the C++ ops with the dispatcher)
