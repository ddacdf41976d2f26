"""dynasparse.backends() tells the truth, and automatic selection falls back loudly."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import dynasparse
from dynasparse import dispatch, ops


def registered(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dynasparse::{op}", key)


def test_backends_table_matches_the_dispatcher_and_the_machine():
    status = {s.name: s for s in dynasparse.backends()}
    assert list(status) == ["cpu", "cuda", "triton", "reference"]
    assert status["cpu"].built and status["cpu"].devices == ("cpu",)
    assert status["cuda"].built == registered("pack_mask", "CUDA")
    assert status["cuda"].usable == (status["cuda"].built and torch.cuda.is_available())
    if status["cuda"].built and not torch.cuda.is_available():
        assert "not runnable" in status["cuda"].detail
    # The build's own record of what it did agrees with what the dispatcher has.
    assert dynasparse._C.cuda_build.startswith("built for ") == status["cuda"].built
    assert dynasparse._C.cuda_build in status["cuda"].detail
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    assert ("cpu" in status["triton"].devices) == (status["triton"].built and interpreting)
    assert ("cuda" in status["triton"].devices) == (status["triton"].built and torch.cuda.is_available())
    assert status["reference"].usable
    table = dynasparse.format_backends()
    for s in status.values():
        assert s.name in table and s.detail in table


def test_cuda_kernels_are_built_wherever_nvcc_is():
    """CI has nvcc but no GPU: the CUDA path must still be compiled and registered there."""
    if shutil.which("nvcc") is None or os.environ.get("DYNASPARSE_CUDA") == "0":
        pytest.skip("no nvcc on PATH (or DYNASPARSE_CUDA=0): the build skips the CUDA kernels")
    for op in ("pack_mask", "unpack_mask"):
        assert registered(op, "CUDA"), f"{op} has no CUDA kernel although nvcc is on PATH"


def test_auto_selection_prefers_the_native_kernel():
    assert dispatch.select_backend("pack_mask", torch.device("cpu"), None) == "cpu"
    assert dispatch.usable_backends("cpu", "pack_mask")[0] == "cpu"
    assert dispatch.usable_backends("cpu", "pack_mask")[-1] == "reference"


def test_fallback_warns_once_and_stays_correct(monkeypatch):
    monkeypatch.setitem(dispatch._NATIVE_KERNELS, "pack_mask", set())
    monkeypatch.setattr(dispatch, "_warned", set())
    mask = torch.rand(4, 50) > 0.5
    with pytest.warns(RuntimeWarning, match="no CPU kernel for pack_mask.*using the reference backend"):
        first = ops.pack_mask(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = ops.pack_mask(mask)
    expected = ops.pack_mask(mask, backend="reference")
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_cli_info_prints_the_backends_table():
    out = subprocess.run([sys.executable, "-m", "dynasparse", "info"], capture_output=True, text=True, check=True)
    assert "dynasparse " + dynasparse.__version__ in out.stdout
    for name in dispatch.BACKENDS:
        assert f"\n{name} " in out.stdout


def test_cli_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "dynasparse", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_cpu_isa_cap_lowers_the_kernels_for_a_block_and_restores_them():
    detected = dynasparse._C.detected_cpu_isa()
    assert dispatch.cpu_isa() == detected in dispatch.CPU_ISAS
    with dispatch.cpu_isa_cap("portable") as level:
        assert level == dispatch.cpu_isa() == "portable"
    assert dispatch.cpu_isa() == detected
    with dispatch.cpu_isa_cap("avx512") as level:  # a level above the CPU's runs the CPU's best
        assert level == detected
    with pytest.raises(ValueError, match="level must be one of portable, avx2, avx512, got 'sse4'"):
        with dispatch.cpu_isa_cap("sse4"):
            pass
    assert dispatch.cpu_isa() == detected


def test_cpu_isa_environment_variable_caps_the_process_and_is_checked():
    def run(value):
        environment = dict(os.environ, DYNASPARSE_CPU_ISA=value)
        return subprocess.run([sys.executable, "-c", "import dynasparse; print(dynasparse.cpu_isa())"],
                              capture_output=True, text=True, env=environment)
    assert run("portable").stdout.strip() == "portable"
    bad = run("avx9000")
    assert bad.returncode != 0 and "DYNASPARSE_CPU_ISA must be one of portable, avx2, avx512, got 'avx9000'" in bad.stderr
