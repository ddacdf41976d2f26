"""Which kernel backends exist here, and which one runs a given call.

Backends: "cpu" (C++), "cuda" (CUDA C++), "triton" (Triton kernels in dynasparse.kernels)
and "reference" (pure PyTorch, the test oracle and last-resort fallback). A call names one
explicitly (`backend="triton"`) or leaves it to `select_backend`, which takes the first
usable backend in the op's preference order for the tensor's device and warns once when
that is not the first choice.

Availability is read once at import time into plain data, so selection is pure Python that
torch.compile traces without graph breaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import warnings

import torch

BACKENDS = ("cpu", "cuda", "triton", "reference")

# Auto choice per device type. Interpreted Triton on CPU is a correctness tool
# (minutes per large kernel), so it is never chosen automatically.
DEFAULT_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """One row of `dynasparse.backends()`."""

    name: str
    built: bool
    devices: tuple[str, ...]
    detail: str

    @property
    def usable(self) -> bool:
        return bool(self.devices)


def _native_ops() -> list[str]:
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dynasparse::"))


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


def _triton_interpreting() -> bool:
    # Triton decides at decoration time, from this variable, whether @triton.jit kernels
    # are interpreted; dynasparse.kernels is imported after this module, so they agree.
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _probe() -> dict[str, BackendStatus]:
    native_ops = [op for op in _native_ops() if not op.endswith("_triton")]
    cuda_device = torch.cuda.is_available()
    statuses = {}

    from . import _C

    cpu_built = any(_has_kernel(op, "CPU") for op in native_ops)
    statuses["cpu"] = BackendStatus(
        "cpu", cpu_built, ("cpu",) if cpu_built else (),
        f"C++ kernels ({_C.detected_cpu_isa()}), {torch.get_num_threads()} threads" if cpu_built
        else "dynasparse._C has no CPU kernels: the native library did not build or load")

    cuda_built = any(_has_kernel(op, "CUDA") for op in native_ops)
    if not cuda_built:
        cuda_detail = _C.cuda_build
    elif torch.version.cuda is None:
        cuda_detail = f"{_C.cuda_build}; not runnable: this torch is a CPU-only build"
    elif not cuda_device:
        cuda_detail = f"{_C.cuda_build}; not runnable: torch sees no CUDA device"
    else:
        cuda_detail = f"CUDA C++ kernels on {torch.cuda.get_device_name()} ({_C.cuda_build})"
    statuses["cuda"] = BackendStatus("cuda", cuda_built, ("cuda",) if cuda_built and cuda_device else (),
                                     cuda_detail)

    if importlib.util.find_spec("triton") is None:
        statuses["triton"] = BackendStatus("triton", False, (), "not available: the triton package is not installed")
    else:
        import triton

        devices = (("cuda",) if cuda_device else ()) + (("cpu",) if _triton_interpreting() else ())
        if cuda_device:
            detail = f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
        else:
            detail = f"triton {triton.__version__}; no CUDA device"
        if _triton_interpreting():
            detail += "; TRITON_INTERPRET=1: kernels interpreted on CPU tensors (slow, for testing)"
        elif not cuda_device:
            detail += " (set TRITON_INTERPRET=1 to interpret kernels on CPU tensors, for testing)"
        statuses["triton"] = BackendStatus("triton", True, devices, detail)

    statuses["reference"] = BackendStatus("reference", True, ("any",),
                                          "pure PyTorch: the test oracle, on any device; slow")
    return statuses


CPU_ISAS = ("portable", "avx2", "avx512")


def cpu_isa() -> str:
    """The vector kernels the CPU ops run: "avx512", "avx2" (x86 without AVX-512) or "portable"
    (scalar loops; other dtypes than fp32 / bf16 / fp16 always run those). The environment
    variable DYNASPARSE_CPU_ISA caps it for a whole process, `cpu_isa_cap` for a block."""
    from . import _C
    return _C.cpu_isa()


@contextlib.contextmanager
def cpu_isa_cap(level: str):
    """Run at most `level`'s CPU kernels inside the block (one of CPU_ISAS), e.g. to test or time
    the AVX2 or portable kernels on an AVX-512 machine. Process-wide: not for concurrent use."""
    if level not in CPU_ISAS:
        raise ValueError(f"dynasparse.cpu_isa_cap: level must be one of {', '.join(CPU_ISAS)}, got {level!r}")
    from . import _C
    previous = _C.cpu_isa()
    _C.set_cpu_isa_cap(level)
    try:
        yield _C.cpu_isa()
    finally:
        _C.set_cpu_isa_cap(previous)


def _cap_from_environment() -> None:
    level = os.environ.get("DYNASPARSE_CPU_ISA")
    if level:
        if level not in CPU_ISAS:
            raise ValueError(f"dynasparse: DYNASPARSE_CPU_ISA must be one of {', '.join(CPU_ISAS)}, got {level!r}")
        from . import _C
        _C.set_cpu_isa_cap(level)


_STATUS = _probe()
_cap_from_environment()
# Dispatch keys with a native kernel, per op: {"pack_mask": {"CPU", "CUDA"}}.
_NATIVE_KERNELS = {
    op.split("::", 1)[1]: {key for key in ("CPU", "CUDA") if _has_kernel(op, key)}
    for op in _native_ops()
}
# Ops with a Triton variant, filled in by dynasparse.ops as it defines them.
_TRITON_OPS: set[str] = set()
_warned: set[tuple[str, str, str]] = set()


def status(name: str) -> BackendStatus:
    return _STATUS[name]


def register_triton_op(op: str) -> None:
    _TRITON_OPS.add(op)


def backends() -> list[BackendStatus]:
    """What is built and usable here, and why not. Print `format_backends()` for a table."""
    return list(_STATUS.values())


def format_backends() -> str:
    rows = [("backend", "built", "runs on", "detail")]
    for status in _STATUS.values():
        rows.append((status.name, "yes" if status.built else "no",
                     ", ".join(status.devices) if status.devices else "-", status.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _runs_on(backend: str, op: str, device_type: str) -> str | None:
    """None if `backend` can run `op` on this device type, else the reason it cannot."""
    status = _STATUS[backend]
    if backend == "reference":
        return None
    if device_type not in status.devices:
        if backend in ("cpu", "cuda") and device_type != backend:
            return f"the {backend} backend runs on {backend} tensors, not {device_type} tensors"
        return status.detail
    if backend in ("cpu", "cuda") and backend.upper() not in _NATIVE_KERNELS.get(op, ()):
        return f"dynasparse._C has no {backend.upper()} kernel for {op}"
    if backend == "triton" and op not in _TRITON_OPS:
        return f"dynasparse.kernels has no Triton kernel for {op}"
    return None


def usable_backends(device: torch.device | str, op: str = "pack_mask") -> list[str]:
    """Backends that can run `op` on tensors on `device` right now."""
    device_type = torch.device(device).type
    return [name for name in BACKENDS if _runs_on(name, op, device_type) is None]


def select_backend(op: str, device: torch.device, requested: str | None,
                   preference: dict[str, tuple[str, ...]] | None = None) -> str:
    """The backend that runs this call: the requested one (or a clear error), else the
    first usable one in the op's preference for this device type, warning once per
    (op, device type, choice) when that is a fallback."""
    device_type = device.type
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"dynasparse.{op}: unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
        reason = _runs_on(requested, op, device_type)
        if reason is not None:
            raise RuntimeError(f"dynasparse.{op}: backend={requested!r} cannot run here: {reason}")
        return requested
    order = (preference or DEFAULT_PREFERENCE).get(device_type, ("reference",))
    for position, candidate in enumerate(order):
        if _runs_on(candidate, op, device_type) is None:
            if position > 0:
                _warn_fallback(op, device_type, candidate, order[0])
            return candidate
    return "reference"


def _warn_fallback(op: str, device_type: str, chosen: str, preferred: str) -> None:
    key = (op, device_type, chosen)
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(
        f"dynasparse.{op}: the {preferred} backend cannot run on {device_type} tensors here "
        f"({_runs_on(preferred, op, device_type)}); using the {chosen} backend instead. "
        "Results are correct, speed may not be. This warning is shown once.",
        RuntimeWarning, stacklevel=4)
