"""Van Gelder et al.'s structure experiments: the re-initialization variants, further pruning,
mask IoU and its trace, the early-frozen algorithms, and the `structure` experiment end to end."""

import copy
import json
import math

import pytest
import torch

import dynasparse
from dynasparse.experiments import RunSpec, Store, data, models, registry, run_population, train, transforms
from dynasparse.experiments.analysis import further_pruning_curve, mask_iou, masks, sparse_layers
from dynasparse.experiments.catalog import structure as experiment
from dynasparse.experiments.structure import (TRANSFORMS, VARIANTS, MaskTrace, PrunerCounts, curve_auc,
                                              first_passing, reinitialize, weight_layers)
from dynasparse.experiments.trainer import Hook

# 256 training examples at batch 32: epochs of 8 steps.
TINY = dict(data="teacher-student", data_options={"features": 8, "classes": 3, "train": 256, "test": 128},
            model="mlp", model_options={"hidden": [24, 20]}, batch_size=32, lr=0.1)
EPOCH = 8


@pytest.fixture(scope="module")
def dataset():
    return data.load(TINY["data"], **TINY["data_options"])


@pytest.fixture(scope="module")
def parent(dataset):
    """A trained sparse model (RigL at 70%, so both pruned layers keep some hundred weights)."""
    spec = RunSpec(**TINY, method="rigl", sparsity=0.7, steps=24, method_options={"update_every": 4}, seed=3)
    return spec, train(spec, dataset=dataset).model


def _init(seed, dataset):
    """The initialization of seed `seed`, built here independently of the trainer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build(TINY["model"], input_shape=dataset.input_shape, classes=dataset.classes,
                            **TINY["model_options"])


def _child(parent_spec, variant, **changes):
    return RunSpec(**{**TINY, "steps": 0, "seed": parent_spec.seed, "parent": parent_spec,
                      "transform": TRANSFORMS[variant], **changes})


def _started(parent, variant, dataset, **changes):
    """The model a child run of `variant` starts from (steps=0: the transform's output, evaluated)."""
    spec, model = parent
    return train(_child(spec, variant, **changes), dataset=dataset, parent=model).model


def _kept(model):
    """name -> the kept positions of every weight layer (all of them in a dense layer)."""
    sparse = sparse_layers(model)
    return {name: sparse[name].mask if name in sparse else torch.ones_like(layer.weight, dtype=torch.bool)
            for name, layer in weight_layers(model).items()}


def _check_structure(out, parent_model):
    """The masks of the parent, zeros at the pruned positions, masked training."""
    assert masks(out).keys() == masks(parent_model).keys() == {"fc1", "fc2"}
    for name, mask in masks(parent_model).items():
        layer = sparse_layers(out)[name]
        assert torch.equal(layer.mask, mask)
        assert 0 < int(mask.sum()) < mask.numel()
        assert not bool(layer.weight[~mask].any())
        assert layer.grad_mode == "masked"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_keeps_the_parents_masks_and_the_transform_is_deterministic(parent, dataset, variant):
    first, second = _started(parent, variant, dataset), _started(parent, variant, dataset)
    _check_structure(first, parent[1])
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_original_init_is_the_parents_own_initialization(parent, dataset):
    out, init = _started(parent, "original", dataset), _init(parent[0].seed, dataset)
    kept = _kept(out)
    assert set(kept) == {"fc1", "fc2", "classifier"}
    for name, layer in weight_layers(out).items():
        reference = dict(init.named_modules())[name]
        assert torch.equal(layer.weight[kept[name]], reference.weight[kept[name]])
        assert torch.equal(layer.bias, reference.bias)
    # It is not the trained model.
    assert not torch.equal(out.classifier.weight, parent[1].classifier.weight)


def test_new_random_init_differs_from_the_original_and_draws_from_the_same_initializer(parent, dataset):
    out, init = _started(parent, "random", dataset), _init(parent[0].seed, dataset)
    other = _started(parent, "random", dataset, lr=0.2)  # another run: another draw
    kept = _kept(out)
    for name, layer in weight_layers(out).items():
        reference = dict(init.named_modules())[name]
        values = layer.weight.detach()[kept[name]]
        assert not torch.equal(values, reference.weight[kept[name]])
        assert not torch.equal(values, dict(other.named_modules())[name].weight[kept[name]])
        assert not torch.equal(layer.bias, reference.bias)
        # torch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(layer.weight.shape[1])
        assert float(values.abs().max()) <= bound and float(values.abs().max()) > bound / 2


def test_reshuffle_keeps_each_layers_multiset_of_kept_initial_values(parent, dataset):
    out, init = _started(parent, "shuffle", dataset), _init(parent[0].seed, dataset)
    kept = _kept(out)
    for name, layer in weight_layers(out).items():
        reference = dict(init.named_modules())[name]
        values, original = layer.weight[kept[name]], reference.weight[kept[name]]
        assert torch.equal(values.sort().values, original.sort().values)
        assert not torch.equal(values, original)
        assert torch.equal(layer.bias, reference.bias)


def test_signed_constant_is_the_layer_std_times_the_sign_of_the_original_init(parent, dataset):
    out, init = _started(parent, "signed", dataset), _init(parent[0].seed, dataset)
    kept = _kept(out)
    for name, layer in weight_layers(out).items():
        reference = dict(init.named_modules())[name].weight.double()
        std = torch.sqrt(((reference - reference.mean()) ** 2).mean())  # population std over the whole layer
        expected = std * torch.sign(reference)
        assert torch.equal(torch.sign(layer.weight[kept[name]]), torch.sign(reference[kept[name]]).float())
        torch.testing.assert_close(layer.weight[kept[name]].double(), expected[kept[name]], rtol=1e-6, atol=0)
        assert len(torch.unique(layer.weight[kept[name]].abs())) == 1


def test_reinitialize_refuses_bad_arguments(parent, dataset):
    model, init = parent[1], _init(0, dataset)
    with pytest.raises(ValueError, match="variant must be one of original, random, shuffle, signed"):
        reinitialize(model, init, "lottery")
    with pytest.raises(TypeError, match="variant 'shuffle' needs a torch.Generator"):
        reinitialize(model, init, "shuffle")
    with pytest.raises(TypeError, match="init must be an nn.Module"):
        reinitialize(model, "init", "original")
    with pytest.raises(ValueError, match="parent has no sparse layers"):
        reinitialize(init, init, "original")
    other = models.build("mlp", input_shape=dataset.input_shape, classes=dataset.classes, hidden=[24, 21])
    with pytest.raises(ValueError, match="differ at classifier.weight, fc2.bias, fc2.weight"):
        reinitialize(model, other, "original")


def test_a_variant_transform_needs_a_parent_and_takes_no_options(parent, dataset):
    with pytest.raises(ValueError, match="keeps a parent's masks: the run needs a parent"):
        train(RunSpec(**TINY, steps=1, transform=TRANSFORMS["random"]), dataset=dataset)
    with pytest.raises(ValueError, match=r"takes no options, got \['scale'\]"):
        _started(parent, "signed", dataset, transform_options={"scale": 2})
    assert {TRANSFORMS[v] for v in VARIANTS} <= set(transforms.available())


# -- further pruning -----------------------------------------------------------------------------

def _reference_accuracy(model, split, fraction):
    """float64: prune round(fraction * active) of the smallest |w| among all active weights of
    the sparse layers, then a dense forward."""
    reference = copy.deepcopy(model)
    layers = sparse_layers(reference)
    active = torch.cat([layer.weight.detach()[layer.mask].double().abs() for layer in layers.values()])
    drop = round(fraction * len(active))
    threshold = active.sort().values[drop - 1] if drop else -1.0
    removed = 0
    for layer in layers.values():
        keep = layer.mask & (layer.weight.detach().double().abs() > threshold)
        removed += int(layer.mask.sum() - keep.sum())
        layer.set_mask(keep)
    dynasparse.densify(reference)  # in place: nn.Linear layers holding w * m
    dense = reference.double()
    inputs, labels = split
    with torch.no_grad():
        predicted = dense(inputs.double()).argmax(1)
    return float((predicted == labels).double().mean()), removed, drop


def test_further_pruning_at_zero_is_the_trained_accuracy_and_removes_the_right_count(tmp_path, dataset):
    spec = RunSpec(**TINY, method="dnw", sparsity=0.6, steps=20, seed=1)
    record = run_population([spec], tmp_path, executor="inline", progress=False).records[0]
    model = Store(tmp_path).load_model(record.run_id)
    fractions = [0.0, 0.3, 0.75, 1.0]
    curve = further_pruning_curve(model, dataset.test, fractions)
    assert curve[0]["accuracy"] == record.metrics["accuracy"]
    layers = sparse_layers(model)
    numel = sum(layer.mask.numel() for layer in layers.values())
    active = sum(int(layer.mask.sum()) for layer in layers.values())
    for point, q in zip(curve, fractions):
        expected, removed, drop = _reference_accuracy(model, dataset.test, q)
        assert removed == drop == round(q * active)  # no ties among the trained weights
        assert point["sparsity"] == pytest.approx(1 - (active - removed) / numel, abs=1e-12)
        # float32 kernels against float64: at most one of the 128 test examples may flip.
        assert abs(point["accuracy"] - expected) <= 1 / len(dataset.test[1])
    assert curve[-1]["sparsity"] == 1.0
    # The model itself is not pruned.
    assert all(torch.equal(layer.mask, masks(Store(tmp_path).load_model(record.run_id))[name])
               for name, layer in sparse_layers(model).items())


def test_curve_auc_is_the_trapezoid_mean_over_q():
    linear = [{"fraction": q / 10, "accuracy": 0.8 - 0.8 * q / 9} for q in range(10)]
    assert curve_auc(linear) == pytest.approx(0.4, abs=1e-12)
    assert curve_auc(linear, relative=True) == pytest.approx(0.5, abs=1e-12)
    flat = [{"fraction": 0.0, "accuracy": 0.7}, {"fraction": 0.9, "accuracy": 0.7}]
    assert curve_auc(flat) == pytest.approx(0.7) and curve_auc(flat, relative=True) == pytest.approx(1.0)
    uneven = [{"fraction": 0.5, "accuracy": 0.2}, {"fraction": 0.0, "accuracy": 1.0},
              {"fraction": 0.9, "accuracy": 0.0}]
    assert curve_auc(uneven) == pytest.approx((0.5 * 0.6 + 0.4 * 0.1) / 0.9, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 points, got 1"):
        curve_auc(flat[:1])
    with pytest.raises(ValueError, match="has a fraction twice"):
        curve_auc([flat[0], flat[0]])
    with pytest.raises(ValueError, match="needs an accuracy above 0"):
        curve_auc([{"fraction": 0.0, "accuracy": 0.0}, {"fraction": 0.9, "accuracy": 0.0}], relative=True)


# -- IoU ------------------------------------------------------------------------------------------

def test_mask_iou_against_a_float64_reference_and_its_edge_cases():
    generator = torch.Generator().manual_seed(7)
    for shape in [(5, 7), (3, 1, 1, 9), (1,), (64, 33)]:
        a, b = torch.rand(shape, generator=generator) < 0.4, torch.rand(shape, generator=generator) < 0.6
        expected = (a & b).double().sum() / (a | b).double().sum()
        assert mask_iou(a, b) == pytest.approx(float(expected), abs=1e-15)
        assert mask_iou(a, a.clone()) == 1.0
        if a.any() or (~a).any():
            assert mask_iou(a, ~a) == 0.0
    full, empty = torch.ones(4, 6, dtype=torch.bool), torch.zeros(4, 6, dtype=torch.bool)
    assert mask_iou(full, empty) == 0.0  # complementary
    assert mask_iou(empty, empty) == 1.0  # both keep nothing: the same (empty) set
    assert mask_iou(torch.zeros(0, 3, dtype=torch.bool), torch.zeros(0, 3, dtype=torch.bool)) == 1.0
    # Over several layers: intersections and unions summed.
    x = {"a": torch.tensor([True, True, False]), "b": torch.tensor([True, False])}
    y = {"a": torch.tensor([True, False, True]), "b": torch.tensor([True, False])}
    assert mask_iou(x, y) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="different layers"):
        mask_iou(x, {"a": y["a"]})


def test_first_passing():
    curve = [[3, 0.95], [0, 0.2], [1, 0.89], [2, 0.9]]
    assert first_passing(curve) == 2
    assert first_passing(curve, 0.95) == 3
    assert first_passing(curve, 0.0) == 0
    assert first_passing(curve, 0.99) is None
    assert first_passing([]) is None
    with pytest.raises(ValueError, match=r"level must be a number in \[0, 1\]"):
        first_passing(curve, 1.5)


# -- the mask trace and the early-frozen algorithms --------------------------------------------------

class Recorder(Hook):
    """The masks after every step (index 0: before the first)."""

    def __init__(self):
        self.masks = []

    def on_update(self, state):
        if state.step == 0:
            self.masks.append(masks(state.model))

    def on_step(self, state):
        self.masks.append(masks(state.model))


def _traced(method, options, steps=5 * EPOCH):
    spec = RunSpec(**TINY, method=method, sparsity=0.8, steps=steps, method_options=options, seed=2)
    trace, recorder = MaskTrace(), Recorder()
    result = train(spec, hooks=[trace, PrunerCounts(), recorder])
    return result, recorder.masks


def _same(a, b):
    return all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("method, options, dense_steps", [
    ("rigl_frozen", {"update_every": 2, "freeze_after": EPOCH}, EPOCH // 2),  # the update steps 2, 4, 6, 8
    ("dnw_frozen", {"freeze_after": EPOCH}, EPOCH)])  # feedback (dense gradients) until the freeze
def test_an_early_frozen_runs_masks_are_constant_after_the_freeze(method, options, dense_steps):
    result, recorded = _traced(method, options)
    final = masks(result.model)
    assert not _same(recorded[0], recorded[EPOCH])  # the masks did move before the freeze
    assert all(_same(recorded[step], final) for step in range(EPOCH, len(recorded)))
    trace = result.metrics["mask_iou"]
    assert trace["steps_per_epoch"] == EPOCH
    assert [epoch for epoch, _ in trace["epochs"]] == [0, 1, 2, 3, 4, 5]
    assert all(iou == 1.0 for epoch, iou in trace["epochs"] if epoch >= 1)
    assert trace["epochs"][0][1] < 1.0
    assert result.metrics["dense_gradient_steps"] == dense_steps
    assert result.metrics["pruner_notes"]["frozen"] is True


@pytest.mark.parametrize("method, options, updates", [
    ("dnw", {}, list(range(EPOCH + 1))), ("rigl", {"update_every": 3}, [0, 3, 6]), ("dpf", {"update_every": 4},
                                                                                 [0, 4, 8])])
def test_the_mask_trace_is_the_iou_of_the_snapshots_with_the_final_mask(method, options, updates):
    result, recorded = _traced(method, options)
    final = masks(result.model)
    trace = result.metrics["mask_iou"]
    assert [step for step, _ in trace["updates"]] == updates
    for step, iou in trace["updates"]:
        assert iou == mask_iou(recorded[step], final)
    for epoch, iou in trace["epochs"]:
        assert iou == mask_iou(recorded[epoch * EPOCH], final)
    assert trace["epochs"][-1] == [5, 1.0]
    json.dumps(result.metrics, allow_nan=False)  # stored with the metrics as strict JSON


# -- the experiment ------------------------------------------------------------------------------

def test_the_quick_population_builds():
    population = experiment.specs(quick=True)
    parents = [s for s in population if s.parent is None]
    children = [s for s in population if s.parent is not None]
    assert len(parents) == 3 * (1 + 6) and len(children) == 3 * 4 * 4
    assert {s.model for s in population} == {"cnn1d"} and {s.sparsity for s in parents} == {0.0, 0.9}
    assert all(s.parent in parents and s.method == "dense" and s.steps == s.parent.steps for s in children)
    assert {(s.parent.method, s.transform) for s in children} == {(m, TRANSFORMS[v]) for m in experiment.ALGORITHMS
                                                                  for v in VARIANTS}
    epoch = len(data.load("mnist1d").train[1]) // 64
    frozen = [s for s in parents if s.method in experiment.FROZEN]
    assert all(s.method_options["freeze_after"] == epoch for s in frozen)
    assert experiment.hooks(parents[1]) and not experiment.hooks(children[0])
    assert not experiment.hooks(next(s for s in parents if s.method == "dense"))
    full = experiment.specs(quick=False)
    assert len(full) == 2 * 3 * (1 + 3 * (6 + 4 * 4))  # re-initializations at every sparsity
    assert {s.parent.sparsity for s in full if s.parent is not None} == {0.8, 0.9, 0.95}
    middle = experiment.specs(quick=False, models=["mlp"], seeds=1, reinit_sparsities=[0.9])
    assert len(middle) == 1 + 3 * 6 + 4 * 4
    assert registry.get("structure").hooks is experiment.hooks
    with pytest.raises(ValueError, match="models must be some of digits-cnn, mlp"):
        experiment.specs(data="digits", models=["cnn1d"])
    with pytest.raises(ValueError, match="data must be one of mnist1d, digits"):
        experiment.specs(data="cifar")
    with pytest.raises(ValueError, match="more than one epoch"):
        experiment.specs(data="digits", models=["mlp"], steps=10)


def test_a_tiny_reproduction_writes_the_report_with_the_claims(tmp_path):
    # The digits MLP: epochs of 11 steps at batch 128.
    specs = experiment.specs(True, data="digits", models=["mlp"], seeds=1, steps=16, batch_size=128)
    population = run_population(specs, tmp_path, executor="inline", hooks=experiment.hooks, progress=False)
    assert population.complete
    store = Store(tmp_path)
    for record in population.records:
        if record.spec.parent is not None:  # the children trained with the parent's masks fixed
            assert _same(masks(store.load_model(record.run_id)), masks(store.load_model(record.spec.parent.run_id)))
    report = experiment.analyze(population.records, store, True)
    paths = report.write(tmp_path, "structure")
    assert {"structure", "robustness", "emergence", "frozen"} <= set(paths)
    assert all(paths[name].stat().st_size > 0 for name in ("structure", "robustness", "emergence", "frozen"))
    written = json.loads(paths["json"].read_text())
    claims = [claim["claim"] for claim in written["claims"]]
    assert len(claims) == 6 + 1 + 3 + 4
    assert any("at least 1.5x faster" in claim for claim in claims)
    markdown = paths["markdown"].read_text()
    assert "## Claims" in markdown and "## 4. The early-frozen algorithm" in markdown
    curves = written["numbers"]["robustness"]["curves"]
    accuracy = {r.run_id: r.metrics["accuracy"] for r in population.records}
    runs = {(r.spec.method, r.spec.seed): r.run_id for r in population.records if r.spec.parent is None}
    for entry in curves:
        assert entry["curve"][0]["accuracy"] == accuracy[runs[(entry["algorithm"], entry["seed"])]]
