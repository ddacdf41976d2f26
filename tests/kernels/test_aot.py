"""The ahead-of-time compile check: every kernel compiles for sm_80 and sm_90, and the check can fail.

Every compilation runs in a fresh interpreter (`_in_a_fresh_process`): Triton's interpreter
patches triton.language while it launches a kernel and does not undo all of it, so after
any interpreted launch in the same process (another test file's, or
test_list_comprehension_kernel_runs_interpreted here) a compile can fail for reasons that
are not the kernel's ("'value' object has no attribute 'dtype'"), and the tests would pass
or fail by test order.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    # Triton fixes interpret mode when a @triton.jit decorator runs, so before the imports below.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from dynasparse.kernels import aot, bitmask  # noqa: E402


ARCHS = (80, 90)


def _in_a_fresh_process(code, *args):
    """Runs `code` in a new interpreter with Triton's interpreter off; returns the JSON it printed last."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, f"compile process failed ({child.returncode}):\n{child.stderr[-4000:]}"
    # The last line: anything a compiler stage printed comes before it.
    return json.loads(child.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    rows = _in_a_fresh_process("import dataclasses, json\n"
                               "from dynasparse.kernels import aot\n"
                               "print(json.dumps([dataclasses.asdict(r) for r in aot.compile_all()]))")
    return [aot.CompileResult(**row) for row in rows]


def test_every_spec_compiles(results):
    failures = [result for result in results if not result.ok]
    assert not failures, aot.format_table(failures)
    assert all(result.cubin_bytes > 0 for result in results)


def test_every_spec_of_every_module_is_compiled_for_each_arch(results):
    modules, import_failures = aot.kernel_modules()
    assert not import_failures
    assert bitmask in modules
    compiled = {(result.kernel, result.arch, result.config) for result in results if result.ok}
    for module in modules:
        for spec in getattr(module, "AOT_SPECS", ()):
            for arch in ARCHS:
                assert (aot.spec_name(module, spec), arch, aot.describe_config(spec)) in compiled


def test_every_jit_function_is_covered_by_a_spec():
    modules, _ = aot.kernel_modules()
    for module in modules:
        assert aot.uncovered_kernels(module) == [], f"{module.__name__}: add these kernels to AOT_SPECS"
    assert set(aot.jit_functions(bitmask)) == {"_pack_mask_kernel", "_unpack_mask_kernel", "_word_tile"}


def test_a_kernel_without_a_spec_is_reported(tmp_path):
    # A real file: Triton reads a kernel's source through inspect.
    source = textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x):
            return x + 1

        @triton.jit
        def covered_kernel(ptr):
            tl.store(ptr, add_one(tl.load(ptr)))

        @triton.jit
        def forgotten_kernel(ptr):
            tl.store(ptr, 0)

        AOT_SPECS = [{"kernel": covered_kernel, "signature": {"ptr": "*i32"}}]
    """)
    path = tmp_path / "fake_kernels.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fake_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_kernels"] = module
    try:
        spec.loader.exec_module(module)
        assert aot.uncovered_kernels(module) == ["forgotten_kernel"]
    finally:
        del sys.modules["fake_kernels"]


# Kernels for the failure tests, wrapped by hand so they are JITFunctions whatever
# TRITON_INTERPRET says.
def _copy_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets))


def _mismatched_dot_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + rows[:, None] * BLOCK + rows[None, :])
    wide = tl.arange(0, 2 * BLOCK)
    b = tl.load(a_ptr + wide[:, None] * BLOCK + rows[None, :])
    # [BLOCK, BLOCK] @ [2 * BLOCK, BLOCK]: the inner dimensions differ.
    tl.store(out_ptr + rows[:, None] * BLOCK + rows[None, :], tl.dot(a, b))


def _list_comprehension_kernel(src_ptr, dst_ptr):
    # Plain Python to the interpreter; the Triton compiler has no list comprehensions.
    values = [tl.load(src_ptr + i) for i in range(2)]
    tl.store(dst_ptr, values[0] + values[1])


def _spec(python_function, signature, constexprs):
    return {"kernel": JITFunction(python_function), "signature": signature, "constexprs": constexprs}


# name -> _spec's arguments
SPECS = {
    "copy": (_copy_kernel, {"src_ptr": "*fp32", "dst_ptr": "*fp32"}, {"BLOCK": 128}),
    "mismatched-dot": (_mismatched_dot_kernel, {"a_ptr": "*fp16", "out_ptr": "*fp32"}, {"BLOCK": 32}),
    "list-comprehension": (_list_comprehension_kernel, {"src_ptr": "*fp32", "dst_ptr": "*fp32"}, {}),
    "copy-without-dst_ptr": (_copy_kernel, {"src_ptr": "*fp32"}, {"BLOCK": 128}),
}

# Loads this file as a module in the fresh process, for its kernels and SPECS.
_COMPILE_SPECS = """
import dataclasses, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("aot_test_kernels", sys.argv[1])
tests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tests)
print(json.dumps([[name, arch, dataclasses.asdict(tests.aot.compile_spec(tests._spec(*tests.SPECS[name]), arch))]
                  for name in tests.SPECS for arch in tests.ARCHS]))
"""


@pytest.fixture(scope="module")
def compiled():
    """aot.compile_spec of every SPECS entry for each arch: {(name, arch): CompileResult}."""
    return {(name, arch): aot.CompileResult(**row) for name, arch, row in _in_a_fresh_process(_COMPILE_SPECS, __file__)}


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_spec_compiles_a_good_kernel(compiled, arch):
    result = compiled["copy", arch]
    assert result.ok, result.error
    assert result.cubin_bytes > 0
    assert (result.kernel, result.arch) == ("_copy_kernel", arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name, offending_source", [
    ("mismatched-dot", "tl.dot(a, b)"),
    ("list-comprehension", "for i in range(2)"),
], ids=["mismatched-dot", "list-comprehension"])
def test_compile_spec_reports_a_kernel_that_does_not_compile(compiled, name, offending_source, arch):
    result = compiled[name, arch]
    assert not result.ok
    assert result.cubin_bytes == 0
    # Triton's own wording changes between releases; its error always quotes the source it stopped at.
    assert result.error.startswith("CompilationError")
    assert offending_source in result.error


def test_list_comprehension_kernel_runs_interpreted():
    # Why the compile check exists: the interpreter-only test suite would pass this kernel.
    src = torch.tensor([1.0, 2.0])
    dst = torch.zeros(1)
    InterpretedFunction(_list_comprehension_kernel)[(1,)](src, dst)
    assert dst.item() == 3.0


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_spec_reports_a_spec_that_does_not_match_the_kernel(compiled, arch):
    result = compiled["copy-without-dst_ptr", arch]
    assert not result.ok
    assert "dst_ptr" in result.error
