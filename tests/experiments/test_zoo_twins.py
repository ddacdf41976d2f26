"""The zoo-twins experiment: its population (the dropout grid, the digits zoo), its analyses on
hand-made populations (VD-MP differences, the crossover and its bootstrap, correlations and their
verdicts, the per-epoch VD points), and a tiny end-to-end reproduction whose agreements and masks
are recomputed from the stored models, MP at VD's sparsity included."""

import json
import math
import statistics

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from dynasparse.experiments import data, models, registry, reports
from dynasparse.experiments.catalog import zoo_twins as zt
from dynasparse.experiments.runner import run_population
from dynasparse.experiments.store import Store
from dynasparse.nn import SparseConv2d, SparseLinear, backend_default, default_backend


def test_population_sizes_and_the_hyperparameter_grid():
    quick = zt.specs(quick=True)
    zoo = [s for s in quick if s.parent is None]
    assert len(zoo) == zt.QUICK.seeds + zt.QUICK.hyper
    assert len(quick) == len(zoo) * (1 + 2 * len(zt.RATIOS) + 1)
    assert sorted(s.seed for s in zoo if s.seed < zt.HYPER_SEED) == list(range(20))
    hyper = zt.zoo(zt.QUICK)["hyper"]
    # The quick hyperparameter zoo still reaches every level of every factor of the grid.
    assert {s.model_options["activation"] for s in hyper} == set(zt.GRID["activation"])
    assert {s.model_options["init"] for s in hyper} == set(zt.GRID["init"])
    assert {(s.optimizer, s.lr) for s in hyper} == set(zt.GRID["optimizer"])
    assert {s.optimizer_options["weight_decay"] for s in hyper} == set(zt.GRID["weight_decay"])
    assert {s.model_options.get("dropout", 0.0) for s in hyper} == set(zt.GRID["dropout"])
    full = zt.zoo(zt.FULL)
    assert len(full["seed"]) == 100 and len(full["hyper"]) == len(zt.grid()) == 96
    assert len({s.run_id for s in full["seed"] + full["hyper"]}) == 196
    assert [zt.settings_of(s) for s in full["hyper"]] == zt.grid()
    # Dropout 0 leaves the option out: those models (and their run ids) are the ones without it.
    assert all(("dropout" in s.model_options) == (zt.settings_of(s)["dropout"] > 0) for s in full["hyper"])
    twins = zt.twins(zoo[0], zt.QUICK)
    assert all(t.parent == zoo[0] and t.seed == zoo[0].seed for runs in twins.values() for t in runs)
    assert [t.transform_options["sparsity"] for t in twins["mp"]] == list(zt.RATIOS)
    assert all(t.steps == 0 for t in twins["mp"]) and all(t.steps > 0 for t in twins["mp-ft"])
    assert twins["vd"][0].method == "vd" and twins["vd"][0].eval_every == zt.ZOOS["mnist1d"].epoch
    assert "zoo-twins" in registry.available()


def test_differences_interpolate_the_mp_curve():
    mp = [(0.0, 0.9), (0.5, 0.8), (0.9, 0.4)]
    vd = [(0.25, 0.9), (0.7, 0.7), (0.95, 0.5)]  # the last one is past MP's range
    got = zt.differences(vd, mp)
    assert [s for s, _ in got] == [0.25, 0.7]
    assert got[0][1] == pytest.approx(0.9 - 0.85)
    assert got[1][1] == pytest.approx(0.7 - 0.6)


def test_crossover_of_a_hand_made_population():
    # VD - MP = s - 0.7 in every model: binned means cross zero between the bins at 0.675 and 0.775.
    sparsities = (0.3, 0.5, 0.65, 0.75, 0.85)
    model = [(s, s - 0.7) for s in sparsities]
    result = zt.crossover([model, model, model])
    assert result["kind"] == "crossing"
    assert result["crossover"] == pytest.approx(0.675 + 0.1 * 0.05 / 0.1)
    assert [n for _, _, n in result["curve"]] == [3] * 5
    assert zt.crossover([[(s, 0.1) for s in sparsities]])["kind"] == "vd-ahead"
    assert zt.crossover([[(s, -0.1) for s in sparsities]])["kind"] == "mp-ahead"
    assert zt.crossover([[]])["kind"] == "no-data"
    # Two models: one crosses at 0.4, the other at 0.8; pooled, the bins average them.
    early = [(s, s - 0.4) for s in (0.2, 0.3, 0.5, 0.6)]
    late = [(s, s - 0.8) for s in (0.2, 0.3, 0.5, 0.6, 0.7, 0.9)]
    pooled = zt.crossover([early, late])
    means = {round(c, 3): d for c, d, _ in pooled["curve"]}
    assert means[0.225] == pytest.approx(((0.2 - 0.4) + (0.2 - 0.8)) / 2)
    assert means[0.725] == pytest.approx(0.7 - 0.8)


def test_bootstrap_of_the_crossover():
    model = [(s, s - 0.7) for s in (0.3, 0.5, 0.65, 0.75, 0.85)]
    same = zt.bootstrap_crossover([model] * 5, samples=50)
    assert same["low"] == pytest.approx(same["estimate"]) and same["high"] == pytest.approx(same["estimate"])
    assert same["fractions"]["crossing"] == 1.0 and same["models"] == 5
    ahead = [(s, 0.05) for s in (0.3, 0.5)]
    mixed = zt.bootstrap_crossover([model, ahead, ahead], samples=400, seed=1)
    fractions = mixed["fractions"]
    assert 0 < fractions["crossing"] < 1 and fractions["vd-ahead"] > 0
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert mixed["low"] <= mixed["high"]
    assert zt.bootstrap_crossover([model] * 5, samples=50, seed=3) == zt.bootstrap_crossover([model] * 5, samples=50,
                                                                                              seed=3)


def _pooled_crossover(per_model, bins=zt.BINS):
    """The crossover's curve by its definition: every model's points pooled, then binned."""
    edges = np.asarray(bins, dtype=float)
    pooled = [(s, d) for model in per_model for s, d in model]
    curve = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = [d for s, d in pooled if low <= s < high or (high == edges[-1] and s == high)]
        if inside:
            curve.append(((low + high) / 2, statistics.fmean(inside), len(inside)))
    return curve


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_crossover_equals_pooling_the_points(seed):
    # Models binned once (what the bootstrap resamples) give the curve of the pooled points:
    # points on bin edges, at 0 and 1 (the last bin closed), outside the range, models without
    # points, and a model drawn several times.
    rng = np.random.default_rng(seed)
    per_model = []
    for count in rng.integers(0, 30, 40):
        sparsity = np.concatenate([rng.uniform(-0.1, 1.1, count), rng.choice(zt.BINS, 3)])
        per_model.append([(float(s), float(d)) for s, d in zip(sparsity, rng.normal(0, 0.1, len(sparsity)))])
    per_model.append([])
    for sample in (per_model, [per_model[i] for i in rng.integers(0, len(per_model), len(per_model))]):
        assert zt.crossover(sample)["curve"] == _pooled_crossover(sample)  # fmean: exactly rounded, any order
    # The bootstrap's samples are those of crossover() on the resampled models.
    result = zt.bootstrap_crossover(per_model, samples=30, seed=seed)
    draws = np.random.default_rng(seed)
    crossings = [zt.crossover([per_model[i] for i in draws.integers(0, len(per_model), len(per_model))])
                 for _ in range(30)]
    found = [c["crossover"] for c in crossings if c["crossover"] is not None]
    assert result["fractions"]["crossing"] == len(found) / 30
    if found:
        assert result["low"] == float(np.percentile(found, 2.5)) and result["high"] == float(np.percentile(found, 97.5))
    assert zt.bootstrap_crossover([], samples=5) == {"estimate": None, "kind": "no-data", "curve": [], "low": None,
                                                     "high": None, "samples": 5, "fractions": {}, "models": 0}


def test_crossover_verdicts():
    def result(estimate, low, high, crossing=1.0):
        return {"estimate": estimate, "low": low, "high": high, "fractions": {"crossing": crossing}}

    assert zt.crossover_verdict(result(0.8, 0.72, 0.86)) == reports.HOLDS
    assert zt.crossover_verdict(result(0.5, 0.4, 0.6)) == reports.FAILS
    assert zt.crossover_verdict(result(0.75, 0.3, 0.95)) == reports.INCONCLUSIVE
    assert zt.crossover_verdict(result(0.8, 0.7, 0.9, crossing=0.03)) == reports.FAILS
    assert zt.crossover_verdict(result(None, None, None, crossing=0.0)) == reports.FAILS
    assert zt.crossover_verdict(result(None, 0.7, 0.8, crossing=0.4)) == reports.INCONCLUSIVE


def test_correlation_claims_of_a_hand_made_population():
    rng = np.random.default_rng(0)
    original = list(rng.uniform(0.6, 0.9, 30))
    twin = [v - 0.02 + 0.003 * e for v, e in zip(original, rng.standard_normal(30))]
    claim = zt.correlation_claim("correlated", original, twin)
    assert claim.verdict == reports.HOLDS
    assert claim.details["pearson"] == pytest.approx(np.corrcoef(original, twin)[0, 1])
    ranks = lambda values: np.argsort(np.argsort(values))  # noqa: E731  no ties here
    assert claim.details["spearman"] == pytest.approx(np.corrcoef(ranks(original), ranks(twin))[0, 1])
    low, high = claim.details["pearson_low"], claim.details["pearson_high"]
    assert low < claim.details["pearson"] < high
    unrelated = list(rng.uniform(0.6, 0.9, 30))
    assert zt.correlation_claim("unrelated", original, unrelated).verdict == reports.FAILS
    assert zt.correlation_claim("constant", original, [0.5] * 30).verdict == reports.INCONCLUSIVE
    assert zt.correlation_claim("too few for an interval", original[:3], twin[:3]).verdict == reports.INCONCLUSIVE
    # Fisher's z interval, against scipy's own for Pearson's r.
    interval = stats.pearsonr(original, twin).confidence_interval(0.95)
    assert (low, high) == pytest.approx((interval.low, interval.high), abs=1e-4)


def test_vd_points_and_population_tables():
    metrics = {"vd_trajectory": [[0, 0.0], [16, 0.1], [32, 0.2], [48, 0.3]], "steps": 48, "sparsity": 0.3,
               "accuracy": 0.8, "curve": [{"step": 16, "accuracy": 0.9}, {"step": 32, "accuracy": 0.85}]}
    assert zt.vd_points(metrics, epoch=16) == [{"epoch": 1, "sparsity": 0.1, "accuracy": 0.9},
                                               {"epoch": 2, "sparsity": 0.2, "accuracy": 0.85},
                                               {"epoch": 3, "sparsity": 0.3, "accuracy": 0.8}]

    def entry(accuracy, seed, vd_accuracy, mp_accuracy):
        layers = {"a": 0.2, "b": 0.6}
        points = [{"epoch": 1, "sparsity": 0.4, "accuracy": vd_accuracy[0]},
                  {"epoch": 2, "sparsity": 0.8, "accuracy": vd_accuracy[1], "agreement": 0.9}]
        matched = [{"epoch": p["epoch"], "sparsity": p["sparsity"], "accuracy": a, "agreement": 0.8,
                    "layer_sparsity": layers} for p, a in zip(points, mp_accuracy)]
        return {"run_id": str(seed), "zoo": "seed", "seed": seed, "accuracy": accuracy, "twins": [
            {"method": "vd", "ratio": None, "sparsity": 0.8, "accuracy": vd_accuracy[1], "agreement": 0.9,
             "layer_sparsity": layers, "points": points, "mp_matched": matched},
            {"method": "mp-ft", "ratio": 0.5, "sparsity": 0.5, "accuracy": accuracy - 0.01, "agreement": 0.95,
             "layer_sparsity": layers},
            {"method": "mp-ft", "ratio": 0.9, "sparsity": 0.9, "accuracy": accuracy - 0.3, "agreement": 0.5,
             "layer_sparsity": layers}]}

    population = [entry(0.9, 0, (0.88, 0.7), (0.89, 0.6)), entry(0.8, 1, (0.78, 0.6), (0.79, 0.5))]
    rows = {(row["method"], row["at"]): row for row in zt.accuracy_rows(population)}
    assert rows[("vd", "epoch 2")]["accuracy"] == pytest.approx(0.65)
    assert rows[("vd", "epoch 2")]["agreement"] == pytest.approx(0.9)
    assert rows[("vd", "epoch 1")]["agreement"] is None
    assert rows[("mp@vd", "epoch 1")]["accuracy"] == pytest.approx(0.84)
    assert rows[("mp-ft", "0.5")]["accuracy_std"] == pytest.approx(math.sqrt(0.005))
    matched = zt.vd_differences(population, "mp@vd")
    assert matched[0] == [(0.4, pytest.approx(-0.01)), (0.8, pytest.approx(0.1))]
    curve = zt.vd_differences(population, "mp-ft")  # MP-FT curve (0, 0.9), (0.5, 0.89), (0.9, 0.6)
    assert curve[0][0][1] == pytest.approx(0.88 - (0.9 + (0.89 - 0.9) * 0.4 / 0.5))
    assert curve[0][1][1] == pytest.approx(0.7 - (0.89 + (0.6 - 0.89) * 0.3 / 0.4))
    layers = {(row["method"], row["layer"]): row for row in zt.layer_rows(population)}
    assert layers[("vd (final)", "b")]["mean"] == pytest.approx(0.6) and layers[("vd (final)", "b")]["n"] == 2


def test_tiny_reproduction_end_to_end(tmp_path):
    # Two hyperparameter-zoo models: the grid's first setting and one with dropout.
    size = zt.Size(seeds=2, hyper=2, zoo_epochs=1, vd_epochs=2, finetune_epochs=1, ratios=(0.5, 0.9))
    specs = zt.specs(size=size)
    population = run_population(specs, tmp_path, executor="inline", hooks=zt.hooks, progress=False)
    assert population.complete
    store = Store(tmp_path)
    report = zt.analyze(population.records, store, True, size, executor="inline")
    paths = report.write(tmp_path, "zoo-twins")
    for name in ("markdown", "json", "accuracy", "trajectory", "layers", "correlation", "crossover"):
        assert paths[name].exists() and paths[name].stat().st_size > 0
    numbers = json.loads(paths["json"].read_text())["numbers"]
    assert len(numbers["models"]) == 4
    assert [row["dropout"] for row in numbers["hyperparameter_zoo"]] == [0.0, 0.2]
    assert "| dropout |" in paths["markdown"].read_text()
    claims = [c.claim for c in report.claims]
    assert any("crossover" in c or "VD wins above" in c for c in claims)
    assert any("strongly correlated" in c for c in claims) and any("agree" in c for c in claims)

    records = {r.run_id: r for r in population.records}
    zoo = [s for s in specs if s.parent is None][0]
    inputs, labels = data.load(zoo.data).test
    original = store.load_model(zoo.run_id).eval()
    twins = zt.twins(zoo, size)
    entry = next(m for m in numbers["models"] if m["run_id"] == zoo.run_id)
    with torch.no_grad():
        reference = original(inputs).argmax(1)
        vd = store.load_model(twins["vd"][0].run_id).eval()
        vd_twin = next(t for t in entry["twins"] if t["method"] == "vd")
        assert vd_twin["agreement"] == pytest.approx(float((vd(inputs).argmax(1) == reference).double().mean()))
        assert vd_twin["accuracy"] == pytest.approx(float((vd(inputs).argmax(1) == labels).double().mean()))
    vd_metrics = records[twins["vd"][0].run_id].metrics
    assert [step for step, _ in vd_metrics["vd_trajectory"]][-1] == 2 * zt.ZOOS["mnist1d"].epoch
    assert [p["epoch"] for p in vd_twin["points"]] == [1, 2]
    assert all(isinstance(m, (SparseLinear, SparseConv2d)) for m in vd.modules() if hasattr(m, "mask"))
    assert not any("log_sigma2" in key for key in vd.state_dict())
    for mp_spec, ft_spec in zip(twins["mp"], twins["mp-ft"]):
        mp, ft = store.load_model(mp_spec.run_id), store.load_model(ft_spec.run_id)
        mp_layers = [m for m in mp.modules() if hasattr(m, "mask")]
        kept = sum(int(m.mask.sum()) for m in mp_layers)
        total = sum(m.mask.numel() for m in mp_layers)
        assert 1 - kept / total == pytest.approx(mp_spec.transform_options["sparsity"], abs=1 / total)
        for a, b in zip(mp_layers, (m for m in ft.modules() if hasattr(m, "mask"))):
            assert torch.equal(a.mask, b.mask)  # fine-tuning keeps MP's mask
            assert bool((b.weight[~b.mask] == 0).all())

    # MP at VD's sparsity: stored runs pruning exactly as many weights as the VD twin did, without
    # and with the fine-tuning, which the report's comparisons at VD's sparsity take.
    def pruned(model):
        return [~m.mask for m in model.modules() if hasattr(m, "mask")]

    matched, tuned = zt.magnitude_twins(zoo, vd_metrics["sparsity"], size)
    matched_model, tuned_model = store.load_model(matched.run_id), store.load_model(tuned.run_id)
    assert sum(int(m.sum()) for m in pruned(matched_model)) == sum(int(m.sum()) for m in pruned(vd))
    assert all(torch.equal(a, b) for a, b in zip(pruned(matched_model), pruned(tuned_model)))
    at_vd = {t["method"]: t for t in entry["twins"] if t["method"].endswith("@vd")}
    with torch.no_grad():
        for method, model, spec in (("mp@vd", matched_model, matched), ("mp-ft@vd", tuned_model, tuned)):
            accuracy = float((model.eval()(inputs).argmax(1) == labels).double().mean())
            assert at_vd[method]["accuracy"] == pytest.approx(accuracy)
            assert store.get(spec.run_id).metrics["accuracy"] == pytest.approx(accuracy)
    assert vd_twin["mp_matched"][-1]["accuracy"] == at_vd["mp@vd"]["accuracy"]
    assert at_vd["mp-ft@vd"]["sparsity"] == pytest.approx(vd_twin["sparsity"])
    tuned_row = next(row for row in numbers["accuracy"] if row["method"] == "mp-ft@vd")
    assert tuned_row["n"] == 4 and tuned_row["at"] == "epoch 2"
    assert sum("at VD's own final sparsity" in c for c in claims) == 2
    # A second analysis reuses them.
    again = run_population(zt.matched_twins(population.records, size), tmp_path, executor="inline", progress=False)
    assert again.complete and again.computed == 0 and len(again.records) == 8


def test_collect_runs_the_stored_models_on_their_kernels(tmp_path, monkeypatch):
    # As in training: no layer of the analysis times sparse against dense (backend "auto"),
    # whose choice would decide the outputs' rounding.
    # Two VD epochs: the first one's MP twin is built here, from the original's dense layers.
    size = zt.Size(seeds=1, hyper=0, zoo_epochs=1, vd_epochs=2, finetune_epochs=1, ratios=(0.5,))
    population = run_population(zt.specs(size=size), tmp_path, executor="inline", hooks=zt.hooks, progress=False)
    assert population.complete
    seen = []
    logits = zt.analysis.logits

    def recording(model, inputs, **options):
        seen.extend(m.backend for m in model.modules() if isinstance(m, (SparseLinear, SparseConv2d)))
        return logits(model, inputs, **options)

    monkeypatch.setattr(zt.analysis, "logits", recording)
    with backend_default("auto"):
        population = zt.collect(population.records, Store(tmp_path), size.ratios)
        assert default_backend() == "auto"
    assert seen and set(seen) == {"sparse"}
    assert {t["method"] for t in population[0]["twins"]} >= {"vd", "mp", "mp-ft"}


def test_the_digits_zoo_is_the_papers_cnn_on_8x8_images():
    quick = zt.digits_specs(quick=True)
    assert registry.get("zoo-twins-digits").specs is zt.digits_specs
    setup = zt.ZOOS["digits"]
    assert {s.data for s in quick} == {"digits"} and {s.model for s in quick} == {"zoo-cnn"}
    assert all(s.model_options["padding"] == 2 for s in quick)
    zoo = [s for s in quick if s.parent is None]
    assert len(zoo) == zt.QUICK.seeds + zt.QUICK.hyper and len(quick) == len(zoo) * (2 + 2 * len(zt.RATIOS))
    assert all(s.steps == zt.QUICK.zoo_epochs * setup.epoch for s in zoo)
    assert [zt.settings_of(s) for s in zoo] == [zt.settings_of(s) for s in zt.zoo(zt.QUICK)["seed"] +
                                                zt.zoo(zt.QUICK)["hyper"]]
    for vd in (s for s in quick if s.method == "vd"):
        assert vd.eval_every == setup.epoch and vd.steps == zt.QUICK.vd_epochs * setup.epoch
        assert setup.epoch % vd.method_options["update_every"] == 0  # a fresh mask at every epoch's end
    ft = [s for s in quick if s.transform == zt.MAGNITUDE and s.steps]
    assert ft and all(s.steps == zt.QUICK.finetune_epochs * setup.epoch for s in ft)
    # Each setup's epoch is one pass over its training set in batches of 50, and its network the
    # stated one.
    for name, each in zt.ZOOS.items():
        dataset = data.load(name)
        assert len(dataset.train[1]) // zt.BATCH == each.epoch
        model = models.build(each.model, input_shape=dataset.input_shape, classes=dataset.classes,
                             **each.architecture)
        assert sum(p.numel() for p in model.parameters()) == each.parameters
        assert model(dataset.test[0][:3]).shape == (3, dataset.classes)
    with pytest.raises(ValueError, match="data must be one of mnist1d, digits"):
        zt.specs(quick=True, data_name="cifar")


def test_cnn1d_dropout_drops_after_every_activation_in_training_only():
    torch.manual_seed(3)
    architecture = zt.ZOOS["mnist1d"].architecture
    plain = models.build("cnn1d", input_shape=(1, 40), classes=10, **architecture)
    dropped = models.build("cnn1d", input_shape=(1, 40), classes=10, dropout=0.2, **architecture)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert [name for name, m in dropped.named_modules() if isinstance(m, nn.Dropout)] == ["drop1", "drop2", "drop3"]
    dropped.load_state_dict(plain.state_dict())  # dropout holds no parameters
    x = torch.randn(200, 1, 40)
    with torch.no_grad():
        assert torch.equal(dropped.eval()(x), plain.eval()(x))
        seen = {}
        for name in ("act1", "drop1"):
            getattr(dropped, name).register_forward_hook(lambda _, __, out, _name=name: seen.__setitem__(_name, out))
        dropped.train()(x)
    active = seen["act1"] != 0
    zeroed = (seen["drop1"] == 0) & active
    # Each active unit zeroed with probability 0.2 (about 96,000 of them), the kept ones scaled by 1 / 0.8.
    assert float(zeroed.sum() / active.sum()) == pytest.approx(0.2, abs=0.01)
    kept = active & ~zeroed
    torch.testing.assert_close(seen["drop1"][kept], seen["act1"][kept] / 0.8)
    with pytest.raises(ValueError, match="cnn1d option dropout"):
        models.build("cnn1d", input_shape=(1, 40), classes=10, dropout=1.0)
