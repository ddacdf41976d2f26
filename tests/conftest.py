"""Test-wide setup: interpreted Triton where there is no GPU, GPU markers, backend lists."""

import os

import torch

# Triton decides when @triton.jit runs (import of dynasparse.kernels) whether kernels are
# interpreted, so this must precede any dynasparse import. On a GPU machine the kernels
# compile and run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The sparse-or-dense cost model measures in memory only: a test run neither reads choices
# another run stored nor leaves any behind. Layers run their kernels unless a test asks for
# backend="auto" (tests/nn/test_costs.py): a test of a layer's kernel path must not pass
# through the dense computation instead; subprocesses inherit both.
os.environ["DYNASPARSE_COST_CACHE"] = ""
os.environ["DYNASPARSE_BACKEND"] = "sparse"

import pytest  # noqa: E402

import dynasparse  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


def pytest_report_header(config):
    return ["dynasparse backends:"] + ["  " + line for line in dynasparse.format_backends().splitlines()]


@pytest.fixture(params=dynasparse.dispatch.CPU_ISAS)
def cpu_isa(request):
    """Each vector instruction set of the CPU kernels in turn, capped for the test (one this
    CPU lacks skips): an AVX-512 machine tests the AVX2 and portable kernels too."""
    levels = dynasparse.dispatch.CPU_ISAS
    detected = dynasparse._C.detected_cpu_isa()
    if levels.index(request.param) > levels.index(detected):
        pytest.skip(f"this CPU runs at most the {detected} kernels")
    with dynasparse.cpu_isa_cap(request.param) as level:
        yield level


# As a bool byte it is neither False (0) nor True (1).
POISON_BYTE = 0x5A


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty filled with POISON_BYTE, so an output element a kernel skips shows up."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        tensor.untyped_storage().fill_(POISON_BYTE)
        return tensor

    monkeypatch.setattr(torch, "empty", poisoned)
