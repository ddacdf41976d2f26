"""dynasparse.advise: every convertible layer timed sparse against dense on the inputs it gets,
counted by its calls, the whole-model estimate from them, the report files, the command line."""

import importlib
import json

import pytest
import torch
from torch import nn

import dynasparse
from dynasparse.cli import main

advise_module = importlib.import_module("dynasparse.advise")  # the attribute dynasparse.advise is the function


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)  # not convertible: reported
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.twice = nn.Linear(16, 16)  # called twice per forward
        self.same_shape = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y = self.conv(x).mean(1).flatten(1)[:, :16]
        y = self.twice(torch.relu(self.twice(y)))
        return self.head(self.same_shape(y))


@pytest.fixture
def fake_timer(monkeypatch):
    """A timer returning (sparse_s, dense_s) by call: of every four calls the first two report
    the kernels faster, the next two slower, so both verdicts occur; the calls are recorded."""
    calls = []

    def fake(sparse, dense, device):
        sparse(), dense()
        calls.append(torch.is_grad_enabled())
        # Times far below the model's real dense time, so the estimate stays above its floor.
        return (1e-7, 4e-7) if len(calls) % 4 in (1, 2) else (3e-7, 2e-7)

    monkeypatch.setattr(advise_module, "time_both", fake)
    return calls


def test_each_convertible_layer_is_timed_on_its_inputs_and_counted(fake_timer):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(5, 1, 4, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    advice = dynasparse.advise(model, (x,), sparsity=(0.5, 0.9), training=True, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the model changed"
    assert type(model.twice) is nn.Linear
    rows = {(row.name, row.sparsity): row for row in advice.layers}
    assert set(rows) == {(name, s) for name in ("conv", "twice", "same_shape", "head") for s in (0.5, 0.9)}
    assert rows[("twice", 0.9)].calls == 2 and rows[("head", 0.9)].calls == 1
    assert rows[("conv", 0.5)].input_shape == [5, 1, 4, 4] and rows[("head", 0.5)].input_shape == [5, 16]
    # Layers of one shape on inputs of one shape are timed once: twice and same_shape share.
    assert (rows[("twice", 0.9)].sparse_ms, rows[("twice", 0.9)].dense_ms) == (
        rows[("same_shape", 0.9)].sparse_ms, rows[("same_shape", 0.9)].dense_ms)
    assert len(fake_timer) == 2 * 2 * 3, "inference and training, per distinct layer, per sparsity"
    assert "embed" in advice.skipped
    for model_advice in advice.models:
        layers = [row for row in advice.layers if row.sparsity == model_advice.sparsity]
        saved = sum(row.calls * (row.dense_ms - min(row.dense_ms, row.sparse_ms)) for row in layers)
        assert model_advice.estimated_ms == pytest.approx(model_advice.dense_ms - saved)
        saved_train = sum(row.calls * (row.dense_train_ms - min(row.dense_train_ms, row.sparse_train_ms))
                          for row in layers)
        assert model_advice.estimated_train_ms == pytest.approx(model_advice.dense_train_ms - saved_train)
    verdicts = {row.verdict() for row in advice.layers}
    assert verdicts == {"sparse", "dense"}


def test_the_report_files_and_the_table(fake_timer, tmp_path):
    model, x = Net(), torch.randn(2, 1, 4, 4)
    advice = dynasparse.advise(model, x, sparsity=0.9, layouts=["unstructured", "block16"], training=False,
                               progress=False)
    paths = advice.save(tmp_path)
    content = json.loads(paths["json"].read_text())
    converted = {(row["name"], row["layout"]) for row in content["layers"]}
    assert {("twice", "block16"), ("same_shape", "block16"), ("conv", "unstructured")} <= converted
    assert ("head", "block16") not in converted and "multiples of 16" in content["skipped"]["head"]
    assert paths["png"].stat().st_size > 1000 and "whole model" in paths["txt"].read_text()
    table = advice.table()
    assert "train" not in table.splitlines()[0], "an inference-only advice has no training columns"
    assert all(row["train_ratio"] is None for row in content["layers"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity must be in"), (dict(layouts="block7"), "unknown layout 'block7'"),
    (dict(layouts="2:4", sparsity=0.9), "sparsity 0.5 only"), (dict(threads=0), "threads must be"),
    (dict(sparsity=()), "at least one sparsity")])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dynasparse.advise(Net(), torch.randn(1, 1, 4, 4), **kwargs)
    with pytest.raises(TypeError, match="example_inputs must be"):
        dynasparse.advise(Net(), "x")


def test_the_command_line_takes_a_factory(fake_timer, tmp_path, capsys):
    code = main(["advise", "dynasparse.experiments.models:mlp", "--kwargs",
                 '{"input_shape": [12], "classes": 3, "hidden": [8]}', "--input-shape", "12", "--batch", "4",
                 "--sparsity", "0.8", "--out", str(tmp_path), "--inference-only"])
    out = capsys.readouterr().out
    assert code == 0 and "whole model" in out and (tmp_path / "advice.json").exists()
    with pytest.raises(SystemExit):
        main(["advise", "NoSuchConfig"])
    assert "not a transformers config class" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["advise", "dynasparse.experiments.models:mlp", "--kwargs", '{"input_shape": [12], "classes": 3}'])
    assert "give --input-shape" in capsys.readouterr().err
