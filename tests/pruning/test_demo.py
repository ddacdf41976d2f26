"""The demo: deterministic per seed, and the command writes its table, JSON and plot."""

import json

import pytest
import torch

from dynasparse import demo
from dynasparse.cli import main as cli_main


@pytest.fixture(scope="module")
def digits():
    return demo.load_digits_split(torch.device("cpu"))


def test_split_is_stratified_80_20(digits):
    (train_x, train_y), (test_x, test_y) = digits
    assert len(train_y) + len(test_y) == 1797 and len(test_y) == 360
    assert train_x.shape[1:] == (1, 8, 8) and float(train_x.max()) == 1.0
    assert torch.bincount(test_y).min() >= 35  # every digit present in proportion


@pytest.mark.parametrize("method", ["dpf", "one-shot"])
def test_run_is_deterministic_per_seed(digits, method):
    runs = [demo.train_run(method, 0.9, seed, *digits, steps=32) for seed in (0, 0, 1)]
    for key in ("accuracy", "sparsity", "flip_rates", "reactivated"):
        assert runs[0][key] == runs[1][key]
    assert runs[0]["flip_rates"] != runs[2]["flip_rates"] or runs[0]["accuracy"] != runs[2]["accuracy"]
    assert runs[0]["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_demo_command_writes_table_json_and_plot(tmp_path, capsys):
    assert cli_main(["demo", "--quick", "--steps", "20", "--no-speed", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for method in demo.METHODS:
        assert method in printed
    results = json.loads((tmp_path / "demo.json").read_text())
    assert len(results["runs"]) == 1 + 3 * 3
    assert {(row["method"], row["target"]) for row in results["summary"]} == (
        {("dense", 0.0)} | {(m, s) for m in demo.METHODS[1:] for s in demo.SPARSITIES})
    for row in results["summary"]:
        assert row["sparsity"] == pytest.approx(row["target"], abs=1e-4)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_section_reports_ratios():
    # The demo times 4096 features; the same code on a small layer keeps the test fast.
    for entry in demo.speed_section(torch.device("cpu"), quick=True, features=256):
        assert entry["ratio"] == pytest.approx(entry["dense_ms"] / entry["sparse_ms"])
