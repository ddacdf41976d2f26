"""The bench harness on synthetic cases in a local registry (the global one stays untouched)."""

import functools
import json

import pytest
import torch

import dynasparse
from dynasparse.bench import harness

CPU = torch.device("cpu")
NO_SYNC = lambda: None  # noqa: E731


class FakeClock:
    """A clock that only the timed function moves, so timings are exact and instant."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# The clock of the "clock" family's cases: its calls take exactly the time they advance it by.
CASE_CLOCK = FakeClock()


def ticker(seconds):
    def call():
        CASE_CLOCK.now += seconds

    return call


def clock_setup(device, baseline_ms, variant_ms):
    return ticker(baseline_ms / 1e3), {"half": ticker(variant_ms / 1e3)}


def tensor_setup(device, n):
    x = torch.arange(n, device=device)

    def raises():
        raise RuntimeError("kernel exploded")

    return (lambda: x * 2), {"same": lambda: x + x, "wrong": lambda: x * 3, "raises": raises}


def failing_setup(device):
    raise ValueError("no inputs for you")


@pytest.fixture
def registry():
    registry = harness.Registry()
    registry.add(harness.Case("clock", "two-vs-one", {"baseline_ms": 2, "variant_ms": 1}, clock_setup, quick=True))
    registry.add(harness.Case("tensor", "small", {"n": 64}, tensor_setup, quick=True))
    registry.add(harness.Case("tensor", "large", {"n": 4096}, tensor_setup, devices=("cuda",)))
    registry.add(harness.Case("broken", "setup", {}, failing_setup, quick=True))
    return registry


def test_median_is_taken_over_the_repeats():
    clock = FakeClock()
    calls = 0

    def mostly_one_ms():
        nonlocal calls
        calls += 1
        clock.now += 0.050 if calls % 7 == 0 else 0.0005 if calls % 5 == 0 else 0.001

    timing = harness.measure(mostly_one_ms, sync=NO_SYNC, target_s=0.1, clock=clock)
    assert timing.repeats >= harness.MIN_REPEATS
    assert timing.median_ms == pytest.approx(1.0)
    assert timing.min_ms == pytest.approx(0.5)
    assert timing.iqr_ms >= 0


def test_repeats_fill_the_target_time_within_bounds():
    for per_call_s, target_s in ((1e-3, 0.1), (1e-6, 0.1), (0.2, 0.1)):
        clock = FakeClock()

        def call():
            clock.now += per_call_s

        timing = harness.measure(call, sync=NO_SYNC, target_s=target_s, clock=clock)
        assert harness.MIN_REPEATS <= timing.repeats <= harness.MAX_REPEATS
        assert timing.median_ms == pytest.approx(per_call_s * 1e3)
        timed_s = timing.repeats * timing.calls_per_repeat * per_call_s
        if timing.repeats > harness.MIN_REPEATS:  # a slow call can only be repeated the minimum
            assert target_s / 2 <= timed_s <= target_s * 2
        # Calls too fast for one clock reading are batched.
        assert timing.calls_per_repeat * per_call_s >= harness.MIN_REPEAT_S or timing.calls_per_repeat == 1


def test_explicit_repeats_are_used():
    clock = FakeClock()

    def call():
        clock.now += 1e-3

    assert harness.measure(call, sync=NO_SYNC, target_s=0.1, repeats=7, clock=clock).repeats == 7


def test_two_ms_baseline_vs_one_ms_variant_is_twice_as_fast(registry, monkeypatch):
    # run() times every measurement on the fake clock, so the times are exact whatever the
    # machine's load: a timer that mixes up calls, repeats or units shows.
    monkeypatch.setattr(harness, "measure", functools.partial(harness.measure, clock=CASE_CLOCK))
    report = harness.run(registry.select(families=["clock"]), device=CPU, target_s=0.05)
    (result,) = report.results
    assert result.errors == {}
    assert result.baseline.median_ms == pytest.approx(2.0)
    assert result.variants["half"].median_ms == pytest.approx(1.0)
    assert result.ratio("half") == pytest.approx(2.0)
    assert result.to_json()["variants"]["half"]["ratio"] == pytest.approx(2.0)


def test_failures_are_recorded_and_the_run_goes_on(registry):
    cases = registry.select(families=["broken", "tensor"], device_type="cpu")
    report = harness.run(cases, device=CPU, target_s=0.01)
    small, broken = report.results  # registration order
    assert "ValueError: no inputs for you" in broken.errors["setup"]
    assert broken.baseline is None and broken.variants == {}
    assert set(small.variants) == {"same"}
    assert "RuntimeError: kernel exploded" in small.errors["raises"]
    assert "differs from the baseline" in small.errors["wrong"]
    assert small.ratio("same") > 0
    assert report.failed


def test_metrics_are_measured_for_the_baseline_and_each_variant_and_reported(registry):
    seen = []

    def output_bytes(fn, device):
        seen.append(fn)
        return {"output_bytes": float(fn().numel() * 8), "device_is_cpu": float(device.type == "cpu")}

    registry.add(harness.Case("metric", "tensor", {"n": 32}, tensor_setup, metrics=output_bytes))
    report = harness.run(registry.select(families=["metric"]), device=CPU, target_s=0.01)
    (result,) = report.results
    # "raises" and "wrong" fail before their metrics; only what ran gets measured.
    assert result.metrics == {"baseline": {"output_bytes": 256.0, "device_is_cpu": 1.0},
                              "same": {"output_bytes": 256.0, "device_is_cpu": 1.0}}
    assert len(seen) == 2
    assert result.to_json()["metrics"] == result.metrics
    assert "metric/tensor [same]: output_bytes=256 device_is_cpu=1" in harness.format_table(report)


def test_selection(registry):
    def ids(**selection):
        return [case.id for case in registry.select(**selection)]

    assert ids(families=["tensor"]) == ["tensor/small", "tensor/large"]
    assert ids(pattern="sm") == ["tensor/small"]
    assert ids(pattern="^(clock|broken)/") == ["clock/two-vs-one", "broken/setup"]
    assert ids(device_type="cpu", families=["tensor"]) == ["tensor/small"]
    assert "tensor/large" not in ids(quick=True)
    with pytest.raises(ValueError, match="unknown benchmark family 'nope'"):
        registry.select(families=["nope"])


def test_duplicate_case_and_unserializable_params_are_rejected(registry):
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(harness.Case("tensor", "small", {"n": 1}, tensor_setup))
    with pytest.raises(TypeError):
        harness.Case("tensor", "dtype", {"dtype": torch.float32}, tensor_setup)


def test_main_writes_table_json_and_plot(registry, tmp_path, capsys):
    out = tmp_path / "results" / "run.json"
    code = harness.main(["--device", "cpu", "--family", "tensor", "--family", "broken", "--target-s", "0.01",
                         "--out", str(out), "--no-progress"], registry=registry)
    assert code == 1  # the broken setup and the failing variants

    printed = capsys.readouterr().out
    assert "tensor/small" in printed and "same" in printed and "kernel exploded" in printed

    data = json.loads(out.read_text())
    assert data["schema_version"] == harness.SCHEMA_VERSION
    assert set(data) == {"schema_version", "environment", "settings", "results"}
    assert {"date", "device", "device_name", "threads", "cpu_isa", "load_average_1min", "torch", "triton", "git_commit"} <= set(data["environment"])
    assert data["environment"]["device"] == "cpu"
    assert data["environment"]["cpu_isa"] in dynasparse.dispatch.CPU_ISAS
    assert data["settings"]["families"] == ["tensor", "broken"]
    assert [result["case"] for result in data["results"]] == ["tensor/small", "broken/setup"]
    small = data["results"][0]
    assert small["params"] == {"n": 64}
    assert set(small["baseline"]) == {"median_ms", "min_ms", "iqr_ms", "repeats", "calls_per_repeat"}
    assert small["variants"]["same"]["ratio"] == pytest.approx(
        small["baseline"]["median_ms"] / small["variants"]["same"]["median_ms"])
    assert set(small["errors"]) == {"wrong", "raises"}

    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_list_and_clear_errors(registry, capsys):
    assert harness.main(["--list", "--quick"], registry=registry) == 0
    listed = capsys.readouterr().out
    assert "tensor/small" in listed and "tensor/large" not in listed

    with pytest.raises(SystemExit) as exit_info:
        harness.main(["--family", "nope"], registry=registry)
    assert exit_info.value.code == 2
    assert "unknown benchmark family 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no CUDA device")
def test_cuda_without_a_device_is_a_clear_error(registry, capsys):
    with pytest.raises(SystemExit):
        harness.main(["--device", "cuda"], registry=registry)
    assert "no CUDA device is available" in capsys.readouterr().err


def test_default_output_path_inside_and_outside_a_checkout(tmp_path, monkeypatch):
    environment = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "date": "2026-05-10T12:00:00+00:00"}
    monkeypatch.chdir(tmp_path)
    assert harness.default_output_path(environment, quick=False) == tmp_path / "nvidia-h100-80gb-hbm3-2026-05-10.json"
    (tmp_path / "benchmarks").mkdir()
    assert harness.default_output_path(environment, quick=True) == (
        tmp_path / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3-2026-05-10-quick.json")
