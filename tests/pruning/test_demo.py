"""The demo: deterministic per seed, and the command writes its table, claims, JSON and plot."""

import json

import pytest
import torch
from torch import nn

from dynasparse import demo, experiments
from dynasparse.cli import main as cli_main


@pytest.mark.parametrize("method", ["dpf", "one-shot"])
def test_run_is_deterministic_per_seed(method):
    spec = next(s for s in demo.experiment.specs(True, steps=32) if demo.experiment.label(s) == method
                and s.sparsity == 0.9)
    runs = [experiments.train(s) for s in (spec, spec, spec.replace(seed=1))]
    for key in ("accuracy", "sparsity", "flip_rates", "reactivated"):
        assert runs[0].metrics[key] == runs[1].metrics[key]
    assert runs[0].metrics["flip_rates"] != runs[2].metrics["flip_rates"] or \
        runs[0].metrics["accuracy"] != runs[2].metrics["accuracy"]
    assert runs[0].metrics["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_demo_command_writes_table_claims_json_and_plot(tmp_path, capsys):
    argv = ["demo", "--quick", "--steps", "20", "--seeds", "2", "--no-speed", "--workers", "0", "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    for method in demo.METHODS:
        assert method in printed
    assert "claims (one-sided Welch t-test" in printed and "DPF is more accurate than gradual" in printed
    results = json.loads((tmp_path / "demo.json").read_text())
    runs = results["numbers"]["runs"]
    assert len(runs) == 2 * (1 + 4 * 3) and results["numbers"]["trained_now"] == len(runs)
    assert {(row["method"], row["target"]) for row in results["numbers"]["summary"]} == (
        {("dense", 0.0)} | {(m, s) for m in demo.METHODS[1:] for s in demo.SPARSITIES})
    for row in results["numbers"]["summary"]:
        assert row["sparsity"] == pytest.approx(row["target"], abs=1e-4)
    assert len(results["claims"]) == 4
    assert all(claim["verdict"] in ("holds", "does not hold", "inconclusive") for claim in results["claims"])
    assert all(len(claim["details"]["a"]) == 2 for claim in results["claims"])  # the two seeds
    assert "## Claims" in (tmp_path / "demo.md").read_text()
    assert (tmp_path / "demo-accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Rerun: everything is stored, nothing is trained again.
    assert cli_main(argv) == 0
    assert json.loads((tmp_path / "demo.json").read_text())["numbers"]["trained_now"] == 0


def test_digits_variant_is_the_digits_cnn():
    specs = demo.experiment.specs(False, data="digits")
    assert {(s.data, s.model, s.steps) for s in specs} == {("digits", "digits-cnn", 480)}
    assert len(specs) == 3 * (1 + 4 * 3) and {s.seed for s in specs} == {0, 1, 2}


def test_speed_section_times_dense_against_the_sparse_layer(monkeypatch):
    """Each mode times nn.Linear as the baseline and the 90% SparseLinear, in that mode, as the
    variant, and reports dense / sparse: a fake `harness.measure` records which layer each timed
    call ran and returns known medians for each."""
    from dynasparse.bench import harness
    from dynasparse.nn import SparseLinear

    ran = []
    for cls in (nn.Linear, SparseLinear):
        original = cls.forward

        def forward(self, x, original=original):
            ran.append((type(self), getattr(self, "grad_mode", None), getattr(self, "sparsity", 0.0),
                        torch.is_grad_enabled()))
            return original(self, x)

        monkeypatch.setattr(cls, "forward", forward)
    timed = []

    def fake_measure(fn, *, sync, target_s):
        ran.clear()
        fn()
        timed.append(list(ran))
        median = {nn.Linear: 6.0, SparseLinear: 1.5}[ran[0][0]]
        return harness.Timing(median, median, 0.0, 1, 1)

    monkeypatch.setattr(harness, "measure", fake_measure)
    results = demo.speed_section(torch.device("cpu"), quick=True, features=64)
    assert [entry["mode"] for entry in results] == ["train-feedback", "train-masked", "inference"]
    for entry in results:
        assert (entry["dense_ms"], entry["sparse_ms"], entry["ratio"]) == (6.0, 1.5, 4.0)
    expected = [("feedback", True), ("masked", True), ("feedback", False)]
    assert len(timed) == 6
    for (grad_mode, training), dense, sparse in zip(expected, timed[0::2], timed[1::2]):
        assert [(call[0], call[3]) for call in dense] == [(nn.Linear, training)]
        assert len(sparse) == 1 and sparse[0][0] is SparseLinear and sparse[0][3] == training
        assert sparse[0][1] == grad_mode and sparse[0][2] == pytest.approx(0.9, abs=1e-3)


def test_speed_section_measures_real_times():
    for entry in demo.speed_section(torch.device("cpu"), quick=True, features=128):
        assert 0 < entry["dense_ms"] < 1e3 and 0 < entry["sparse_ms"] < 1e3


def _refuses_before_training(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(demo, "run_population", lambda *args, **kwargs: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--quick", "--no-speed", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_refuses_cuda_without_a_cuda_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refuses_before_training(monkeypatch, capsys, ["--device", "cuda"], "sees no CUDA device")


@pytest.mark.parametrize("device,message", [("tpu", "not a device"), ("meta", "runs on cpu or cuda")])
def test_demo_refuses_unknown_devices(monkeypatch, capsys, device, message):
    _refuses_before_training(monkeypatch, capsys, ["--device", device], message)


@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_demo_refuses_an_unwritable_out_before_training(monkeypatch, capsys, tmp_path, where):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    out = blocker if where == "file" else blocker / "demo"
    _refuses_before_training(monkeypatch, capsys, ["--out", str(out)], "cannot write the results there")


def test_model_speed_times_the_demos_cnn_dense_sparse_and_auto(monkeypatch):
    """Both modes time the dense CNN, the kernels-pinned copy and the auto copy: a fake
    `harness.measure` records the backends of the sparse layers each timed call ran."""
    from dynasparse.bench import harness
    from dynasparse.nn.modules import SPARSE_MODULES

    ran = []
    original = nn.Module.__call__

    def call(self, *args, **kwargs):
        if isinstance(self, SPARSE_MODULES):
            ran.append(self.backend)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__call__", call)
    medians = iter([8.0, 4.0, 2.0, 6.0, 3.0, 1.0])

    def fake_measure(fn, *, sync, target_s):
        ran.clear()
        fn()
        median = next(medians)
        timed.append((set(ran), median))
        return harness.Timing(median, median, 0.0, 1, 1)

    timed = []
    monkeypatch.setattr(harness, "measure", fake_measure)
    results = demo.model_speed(torch.device("cpu"), quick=True)
    assert [entry["mode"] for entry in results] == ["train", "inference"]
    assert [backends for backends, _ in timed] == [set(), {"sparse"}, {"auto"}] * 2
    assert (results[0]["ratio"], results[0]["auto_ratio"]) == (2.0, 4.0)
    assert (results[1]["ratio"], results[1]["auto_ratio"]) == (2.0, 6.0)
