"""Ahead-of-time compile check for every Triton kernel in dynasparse.kernels, without a GPU.

Each kernel module lists its kernels and launch configs in a module-level `AOT_SPECS`:

    {"kernel": <@triton.jit function>,
     "signature": {runtime arg name: Triton type, e.g. "*i32", "*u8", "i64", "fp32"},
     "constexprs": {constexpr arg name: value},
     "options": {compile options, e.g. "num_warps": 4},
     "divisible_by_16": [runtime arg names]}   # "constexprs", "options", "divisible_by_16" optional

"divisible_by_16" names the pointers (16-byte aligned) and integers (multiples of 16) that Triton
marks as such when it specializes a launch; without it a spec compiles the variant for
unaligned arguments, whose loads may not vectorize or pipeline like the launched ones.

This module compiles every spec to a cubin for sm_80 and sm_90 with Triton's bundled ptxas,
which catches kernels that run under TRITON_INTERPRET=1 but do not compile for a real GPU.
Modules are discovered, not listed, and a @triton.jit function that no spec reaches (neither
a spec's kernel nor called from one) fails the check, so a new kernel cannot skip it.

    python -m dynasparse.kernels.aot [--arch 80 --arch 90]

prints a table and exits non-zero on any failure.
"""

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
import types

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelInterface

ARCHS = (80, 90)
_WARP_SIZE = 32
# __name__ is "__main__" under `python -m`; the spec keeps the importable name.
_MODULE_NAME = __spec__.name


@dataclasses.dataclass(frozen=True)
class CompileResult:
    kernel: str  # "module.function"
    arch: int | None  # None for failures that are not about one architecture (import, coverage)
    config: str
    ok: bool
    error: str
    cubin_bytes: int


def kernel_modules() -> tuple[list[types.ModuleType], list[CompileResult]]:
    """Every module of this package but this one, imported; import failures as failed results."""
    package = importlib.import_module(__package__)
    modules, failures = [], []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        name = f"{__package__}.{info.name}"
        if name == _MODULE_NAME:
            continue
        try:
            modules.append(importlib.import_module(name))
        except Exception as error:
            failures.append(CompileResult(name, None, "-", False, f"import failed: {error!r}", 0))
    return modules, failures


def _python_function(kernel):
    # Autotuner, Heuristics, JITFunction and InterpretedFunction all keep what they wrap in .fn.
    while isinstance(kernel, (KernelInterface, InterpretedFunction)):
        kernel = kernel.fn
    return kernel


def _jit_function(kernel) -> JITFunction | InterpretedFunction:
    while not isinstance(kernel, (JITFunction, InterpretedFunction)):
        if not isinstance(kernel, KernelInterface):
            raise TypeError(f"{kernel!r} is not a @triton.jit function")
        kernel = kernel.fn
    return kernel


def jit_functions(module: types.ModuleType) -> dict[str, object]:
    """The @triton.jit objects (kernels and device functions) defined in `module`, by name."""
    return {
        name: value for name, value in vars(module).items()
        if isinstance(value, (KernelInterface, InterpretedFunction))
        and getattr(_python_function(value), "__module__", None) == module.__name__
    }


def _referenced_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _referenced_names(constant)
    return names


def uncovered_kernels(module: types.ModuleType) -> list[str]:
    """Names of @triton.jit objects in `module` that no AOT spec compiles.

    A device function counts as covered when a covered function names it, since it is
    compiled into its callers.
    """
    jitted = jit_functions(module)
    by_function = {_python_function(value): name for name, value in jitted.items()}
    pending = [by_function[_python_function(spec["kernel"])] for spec in getattr(module, "AOT_SPECS", ())
               if _python_function(spec["kernel"]) in by_function]
    covered = set()
    while pending:
        name = pending.pop()
        if name in covered:
            continue
        covered.add(name)
        pending.extend(_referenced_names(_python_function(jitted[name]).__code__) & jitted.keys())
    return sorted(jitted.keys() - covered)


def spec_name(module: types.ModuleType, spec: dict) -> str:
    """How results name a spec's kernel: "module.function"."""
    return f"{module.__name__}.{_jit_function(spec['kernel']).__name__}"


def describe_config(spec: dict) -> str:
    parts = [f"{name}={value}" for name, value in spec.get("constexprs", {}).items()]
    parts += [f"{name}={value}" for name, value in spec.get("options", {}).items()]
    parts += [f"{name}:{ty}" for name, ty in spec["signature"].items() if not ty.startswith("*")]
    return " ".join(parts)


def compile_spec(spec: dict, arch: int, *, qualname: str | None = None) -> CompileResult:
    """Compile one spec for sm_<arch>; never raises for a kernel that does not compile.

    The spec's kernel must be a JITFunction (see compile_all for interpreted modules).
    """
    kernel = _jit_function(spec["kernel"])
    name = qualname or kernel.__name__
    config = describe_config(spec)
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{name} is an interpreted function (TRITON_INTERPRET=1 at import): "
                        "compile it in a process without the variable, as compile_all does")
    constexprs = spec.get("constexprs", {})
    declared = spec["signature"].keys() | constexprs.keys()
    if declared != set(kernel.arg_names) or spec["signature"].keys() & constexprs.keys():
        return CompileResult(name, arch, config, False,
                             f"spec names {sorted(declared)}, kernel takes {kernel.arg_names}: every "
                             "argument must appear once, in signature or in constexprs", 0)
    # In the kernel's argument order, constexprs typed "constexpr": Triton 3.2 and later expect
    # constexprs in the signature, and some releases read its order as the argument order.
    signature = {arg: "constexpr" if arg in constexprs else spec["signature"][arg] for arg in kernel.arg_names}
    try:
        attrs = {(kernel.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in spec.get("divisible_by_16", ())}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, _WARP_SIZE), options=spec.get("options", {}))
    except Exception as error:
        return CompileResult(name, arch, config, False, f"{type(error).__name__}: {error}", 0)
    cubin = compiled.asm.get("cubin", b"")
    if not cubin:
        return CompileResult(name, arch, config, False, "compiled, but no cubin was produced", 0)
    return CompileResult(name, arch, config, True, "", len(cubin))


def _compile_here(archs) -> list[CompileResult]:
    modules, results = kernel_modules()
    for module in modules:
        results += [CompileResult(f"{module.__name__}.{name}", None, "-", False,
                                  "no AOT_SPECS entry compiles this @triton.jit function", 0)
                    for name in uncovered_kernels(module)]
        for spec in getattr(module, "AOT_SPECS", ()):
            results += [compile_spec(spec, arch, qualname=spec_name(module, spec)) for arch in archs]
    return results


def _interpreting() -> bool:
    modules, _ = kernel_modules()
    return any(isinstance(value, InterpretedFunction)
               for module in modules for value in jit_functions(module).values())


def compile_all(archs=ARCHS) -> list[CompileResult]:
    """Compile every spec of every kernel module for each arch; one result per spec and arch."""
    if not _interpreting():
        return _compile_here(archs)
    # Kernels imported under TRITON_INTERPRET=1 are InterpretedFunctions. Rebuilding a JITFunction
    # from a kernel's .fn is not enough: the device functions it calls are still interpreted in
    # the module's globals, and Triton refuses them ("Unsupported function referenced"). A fresh
    # process without the variable imports every module as genuine JITFunctions, at the cost of
    # a few seconds of start-up.
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", _MODULE_NAME, "--json"] + [f"--arch={arch}" for arch in archs]
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed ({child.returncode}):\n{child.stderr}")
    # The last line: anything a compiler stage printed comes before it.
    return [CompileResult(**row) for row in json.loads(child.stdout.splitlines()[-1])]


def format_table(results: list[CompileResult]) -> str:
    header = ("kernel", "arch", "config", "result", "cubin bytes")
    rows = [header] + [(r.kernel, "-" if r.arch is None else f"sm_{r.arch}", r.config,
                        "ok" if r.ok else "FAILED", str(r.cubin_bytes)) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    for r in results:
        if not r.ok:
            where = "" if r.arch is None else f" sm_{r.arch} [{r.config}]"
            lines += ["", f"{r.kernel}{where}:", r.error]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynasparse.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version, e.g. 90 (repeatable; default 80 and 90)")
    # compile_all's subprocess: compiles in this process, exits 0 whenever the JSON was written.
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = tuple(args.arch or ARCHS)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in _compile_here(archs)]))
        return 0
    start = time.perf_counter()
    results = compile_all(archs)
    failed = sum(not r.ok for r in results)
    print(format_table(results))
    print(f"\n{len(results) - failed} compiled, {failed} failed in {time.perf_counter() - start:.1f} s "
          f"(triton {triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
