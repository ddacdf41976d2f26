"""How an op of dynasparse.ops is put together from its backends.

Each op's schema is written once, in csrc/ops.cpp. The C++ library registers the CPU and
CUDA kernels under it. The dispatcher can only choose by device, so the Triton kernels,
which also run on CUDA tensors, get a sibling op `<name>_triton` whose schema is copied
here from the native one (never retyped). Both carry the same fake implementation and
autograd formula, so `opcheck` and `torch.compile(fullgraph=True)` see a custom op
whichever backend a call picks. The reference is plain PyTorch and needs no op: compile
traces straight through it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from .. import dispatch

_TRITON_LIBRARY = torch.library.Library("dynasparse", "FRAGMENT")


def has_triton_kernels(family: str) -> bool:
    """Whether dynasparse.kernels.<family> ships here. The kernels need triton, so a family
    module imports them at its first Triton call, not before; where they are absent, no
    Triton variant is registered."""
    try:
        return importlib.util.find_spec(f"dynasparse.kernels.{family}") is not None
    except ModuleNotFoundError:  # no dynasparse.kernels package at all
        return False


def _native(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.dynasparse, name).default


def _define_triton_variant(name: str, kernel: Callable) -> torch._ops.OpOverload:
    schema = str(_native(name)._schema)
    signature = schema.split(name, 1)[1]  # "(Tensor mask) -> Tensor"
    _TRITON_LIBRARY.define(f"{name}_triton{signature}")
    # CPU runs only under TRITON_INTERPRET=1; backends.select_backend enforces that.
    _TRITON_LIBRARY.impl(f"{name}_triton", kernel, "CPU")
    _TRITON_LIBRARY.impl(f"{name}_triton", kernel, "CUDA")
    return getattr(torch.ops.dynasparse, f"{name}_triton").default


def _device_of(first_argument: torch.Tensor | list[torch.Tensor]) -> torch.device:
    """Where a call runs: its first argument's device; for a tensor list (all on one
    device, which the op checks), its first tensor's, and CPU for an empty list."""
    if isinstance(first_argument, (list, tuple)):
        return first_argument[0].device if first_argument else torch.device("cpu")
    return first_argument.device


class Op:
    """A dynasparse op: one schema, its implementations, and per-call backend choice.

    `fake(*args)` returns outputs of the right shape, dtype and device and runs the
    argument checks, so bad input fails at trace time too. `triton(*args)` checks its
    arguments and launches the kernels; it imports dynasparse.kernels only when first
    called, so that the triton package stays optional.
    """

    def __init__(self, name: str, *, fake: Callable, reference: Callable, triton: Callable | None,
                 preference: dict[str, tuple[str, ...]] | None = None):
        self.name = name
        self.native = _native(name)
        self.reference = reference
        self.preference = preference
        # Attributed to the family module that builds this Op, which csrc/ops.cpp names
        # in set_python_module so torch can import it on demand.
        torch.library.register_fake(f"dynasparse::{name}", _stacklevel=2)(fake)
        self.triton = None
        if triton is not None and dispatch.status("triton").built:
            self.triton = _define_triton_variant(name, triton)
            torch.library.register_fake(f"dynasparse::{name}_triton")(fake)
            dispatch.register_triton_op(name)

    def overloads(self) -> list[torch._ops.OpOverload]:
        """The custom ops behind this op (for opcheck)."""
        return [self.native] + ([self.triton] if self.triton is not None else [])

    def __call__(self, *args, backend: str | None = None, device: torch.device | None = None):
        device = device if device is not None else _device_of(args[0])
        chosen = dispatch.select_backend(self.name, device, backend, self.preference)
        if chosen == "reference":
            return self.reference(*args)
        if chosen == "triton":
            return self.triton(*args)
        return self.native(*args)
