"""pytest-benchmark over the cases registered for `dynasparse bench`: one test per case and
variant, the plain-PyTorch baseline included, grouped by case so the table compares them.

`pytest benchmarks/` benchmarks every case; `pytest benchmarks/ --benchmark-disable` is a
smoke run: the quick cases only, each function called once and checked against the baseline.
"""

import functools

import pytest

pytest.importorskip("pytest_benchmark")

from dynasparse.bench import harness  # noqa: E402

BASELINE = "baseline"


def bench_device(config):
    try:
        return harness.resolve_device(config.getoption("bench_device"))
    except ValueError as error:
        raise pytest.UsageError(f"--bench-device: {error}") from error


@functools.lru_cache(maxsize=1)
def workload(case, device):
    # Tests run case by case, so the one cached workload serves a case's baseline and
    # all its variants, and a case's inputs are freed when the next case starts. The dict
    # keeps the baseline's first output.
    return (*case.build(device), {})


def first_baseline_output(case, device):
    """The baseline's output of its first call: a training step changes the weights, so
    each variant's first step is compared with the baseline's first, not its latest."""
    baseline, _, first = workload(case, device)
    if "output" not in first:
        first["output"] = baseline()
    return first["output"]


def pytest_generate_tests(metafunc):
    if "variant" not in metafunc.fixturenames:
        return
    device = bench_device(metafunc.config)
    smoke = metafunc.config.getoption("benchmark_disable")
    params = []
    for case in harness.load_cases().select(device_type=device.type, quick=smoke):
        # Variants are known only after setup (they depend on what is built and usable).
        # A failing setup leaves just the baseline test, which then fails with its error.
        try:
            variants = list(workload(case, device)[1])
        except Exception:
            variants = []
        params += [pytest.param(case, variant, id=f"{case.id}:{variant}") for variant in [BASELINE, *variants]]
    metafunc.parametrize(("case", "variant"), params)


def test_case(benchmark, request, case, variant):
    device = bench_device(request.config)
    baseline, variants, _ = workload(case, device)
    expected = first_baseline_output(case, device)
    fn = baseline if variant == BASELINE else variants[variant]
    if variant != BASELINE:
        harness.check_variant(case, fn(), expected)
    sync = harness.synchronizer(device)
    benchmark.group = case.id
    benchmark.extra_info.update(case.params, device=harness.device_name(device))
    benchmark(lambda: (fn(), sync()))
