"""The minified experiment: the quick population builds with every protocol, the smaller
widths follow neurons.removed_count, and a tiny end-to-end reproduction (a few steps, one
model, a subset of the methods) stores what each protocol promises and writes its report."""

import json

import pytest
import torch

from dynasparse.experiments import Store, registry, run_population
from dynasparse.experiments.analysis import masks
from dynasparse.experiments.catalog import minified
from dynasparse.nn import quantize
from dynasparse.pruning import neurons


def test_quick_population_builds_with_every_protocol():
    population = minified.specs(quick=True)
    assert len({spec.run_id for spec in population}) == len(population)
    kinds = [minified.classify(spec) for spec in population]
    assert None not in kinds
    found = {(k["kind"], k["model"], k.get("method"), k.get("level"), k.get("protocol", k.get("bits")))
             for k in kinds}
    for model in ("mlp", "cnn1d"):
        assert ("dense", model, None, None, None) in found
        for method in minified.QUICK["weight_methods"]:
            for level in minified.QUICK["weight_levels"]:
                for protocol in ("pruned", "fine-tuned", "scratch"):
                    assert ("weight", model, method, level, protocol) in found
        for level in minified.QUICK["neuron_levels"]:
            assert ("neuron", model, None, level, "scratch") in found
            for method in minified.NEURON_METHODS:
                for protocol in ("pruned", "fine-tuned"):
                    assert ("neuron", model, method, level, protocol) in found
        for bits in minified.QUICK["bits"]:
            assert ("quantized", model, None, None, bits) in found
    ids = {spec.run_id for spec in population}
    assert all(spec.parent is None or spec.parent.run_id in ids for spec in population)
    assert {spec.seed for spec in population} == {0, 1}
    full = minified.specs()
    assert len(full) > len(population) and {spec.seed for spec in full} == {0, 1, 2}
    assert registry.get("minified").specs is minified.specs
    digits = registry.get("minified-digits").specs(True)
    assert [spec.run_id for spec in digits] == [spec.run_id for spec in minified.specs(True, data="digits")]
    assert {spec.data for spec in digits} == {"digits"} and {spec.model for spec in digits} == {"mlp", "digits-cnn"}


@pytest.mark.parametrize("model, options", [("mlp", {"hidden": [128, 128]}), ("cnn1d", {"channels": [32, 30, 7]}),
                                            ("digits-cnn", {"channels": [16, 32], "hidden": 128})])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_smaller_widths_follow_the_removed_count(model, options, fraction):
    smaller = minified.smaller_options(model, options, fraction)
    before, after = minified.hidden_widths(model, options), minified.hidden_widths(model, smaller)
    assert set(before) == set(after)
    for name, units in before.items():
        assert after[name] == units - neurons.removed_count(fraction, units) >= 1
    assert options == minified.smaller_options(model, options, 0.0)


def test_population_refusals():
    with pytest.raises(ValueError, match="data must be one of"):
        minified.specs(data="cifar")
    with pytest.raises(ValueError, match="models must be some of"):
        minified.specs(models=["resnet"])
    with pytest.raises(ValueError, match="unknown weight_methods"):
        minified.specs(weight_methods=["snip"])
    with pytest.raises(ValueError, match="neuron levels are some of"):
        minified.specs(neuron_levels=[0.3])
    with pytest.raises(ValueError, match=r"bits must be an int in \[2, 16\]"):
        minified.specs(bits=[1])


def test_tiny_reproduction_stores_every_protocol(tmp_path):
    population = minified.specs(True, models=["mlp"], seeds=1, steps=4, weight_methods=["OBD-SD", "magnitude"],
                                weight_levels=[0.9], neuron_methods=["damage", "merging"], neuron_levels=[0.5],
                                bits=[3])
    result = run_population(population, tmp_path, executor="inline", hooks=minified.hooks, progress=False)
    assert result.complete, [r.error for r in result.failed]
    store = Store(tmp_path)
    by_id = {record.run_id: record for record in result.records}
    for record in result.records:
        info = minified.classify(record.spec)
        model = store.load_model(record.run_id)
        assert record.metrics["model_bits"] == quantize.model_bits(model, bits=minified.quantized_bits(record.spec))
        if info["kind"] == "weight":
            kept = masks(model)
            assert set(kept) == {"fc1", "fc2"}  # the classifier stays dense
            total = sum(m.numel() for m in kept.values())
            assert sum(int(m.sum()) for m in kept.values()) == round(total * 0.1)
            if info["protocol"] != "pruned":
                parent = store.load_model(record.spec.parent.run_id)
                assert all(torch.equal(kept[n], m) for n, m in masks(parent).items())  # the same mask
                assert record.metrics["steps"] == 4
                changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), parent.parameters())]
                assert any(changed)
            else:
                assert record.metrics["steps"] == 0
        elif info["kind"] == "neuron":
            assert model.fc1.out_features == 64 and model.fc2.out_features == 64 and not masks(model)
            if info["protocol"] == "pruned":
                dense = by_id[record.spec.parent.run_id]
                assert record.metrics["parameters"] < dense.metrics["parameters"]
        elif info["kind"] == "quantized":
            for layer in quantize.weight_layers(model).values():
                rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
                assert all(len(torch.unique(row)) <= 7 for row in rows)  # 3 bits: -3..3
    report = minified.analyze(result.records, store, True)
    paths = report.write(tmp_path, "minified")
    written = json.loads(paths["json"].read_text())
    claims = [claim["claim"] for claim in written["claims"]]
    assert any("OBD-SD is more accurate than magnitude at 90%" in claim for claim in claims)
    assert any("fine-tuning beats training the same mask" in claim for claim in claims)
    assert any("from scratch is much better" in claim for claim in claims)
    assert {"mlp-weights", "mlp-neurons", "mlp-quantization"} <= set(written["tables"])
    for figure in ("mlp-weights", "mlp-neurons", "mlp-bits"):
        assert paths[figure].stat().st_size > 0
    assert "## Claims" in paths["markdown"].read_text()
