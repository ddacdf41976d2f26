"""Staged runs: a run that starts from its parent run's trained model, through a transform;
the runner trains ancestors first and fails the children of a failed parent; the pruner's
regularizer reaches the loss."""

import functools

import pytest
import torch

from dynasparse import pruning
from dynasparse.experiments import RunSpec, Store, models, run_population, train, transforms
from dynasparse.experiments import data as data_sets
from tests.experiments import workers

TINY = dict(data="teacher-student", data_options={"features": 6, "classes": 3, "train": 96, "test": 48},
            model="mlp", model_options={"hidden": [12, 12]}, batch_size=16, lr=0.1)
SEEN: dict = {}


@transforms.register("test-record", "tests: records what the transform gets, returns the fresh model")
def _record(ctx):
    SEEN.update(model={k: v.clone() for k, v in ctx.model.state_dict().items()},
                parent=None if ctx.parent is None else {k: v.clone() for k, v in ctx.parent.state_dict().items()},
                options=ctx.options, batches=ctx.calibration_batches(2), draw=torch.rand(3, generator=ctx.generator))
    return ctx.model


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_child_without_training_is_its_parent(tmp_path):
    parent = RunSpec(**TINY, steps=20, method="random", sparsity=0.5, seed=3)
    child = RunSpec(**TINY, steps=0, parent=parent, seed=3)
    result = run_population([child], tmp_path, executor="inline", progress=False)
    store = Store(tmp_path)
    assert [record.run_id for record in result.records] == [child.run_id]
    assert store.get(parent.run_id).complete, "the runner trains the ancestor it was not given"
    stored_parent, stored_child = store.get(parent.run_id), store.get(child.run_id)
    assert stored_child.metrics["accuracy"] == stored_parent.metrics["accuracy"]
    assert stored_child.metrics["train_loss"] is None and stored_child.metrics["steps"] == 0
    # A model that is sparse without a method of its own reports its masks' sparsity.
    assert stored_child.metrics["sparsity"] == pytest.approx(stored_parent.metrics["sparsity"])
    assert 0.4 < stored_child.metrics["sparsity"] < 0.6
    assert _states_equal(store.load_model(child.run_id).state_dict(), store.load_model(parent.run_id).state_dict())


def test_a_child_trains_on_from_its_parent_and_keeps_its_masks(tmp_path):
    parent = RunSpec(**TINY, steps=20, method="random", sparsity=0.5)
    child = RunSpec(**TINY, steps=15, parent=parent)
    run_population([child], tmp_path, executor="inline", progress=False)
    store = Store(tmp_path)
    before, after = store.load_model(parent.run_id), store.load_model(child.run_id)
    masks = {name: module.mask for name, module in before.named_modules() if hasattr(module, "mask")}
    assert masks
    changed = False
    for name, module in after.named_modules():
        if name in masks:
            assert torch.equal(module.mask, masks[name])
            assert not module.weight[~module.mask].any()
            changed |= not torch.equal(module.weight, dict(before.named_modules())[name].weight)
    assert changed, "the child trained"


def test_the_transform_gets_the_seeds_initialization_and_the_parent(tmp_path):
    parent = RunSpec(**TINY, steps=10, seed=5)
    child = RunSpec(**TINY, steps=0, parent=parent, seed=5, transform="test-record", transform_options={"q": 0.5})
    SEEN.clear()
    run_population([child], tmp_path, executor="inline", progress=False)
    dataset = data_sets.load(TINY["data"], **TINY["data_options"])
    torch.manual_seed(5)
    fresh = models.build("mlp", input_shape=dataset.input_shape, classes=dataset.classes, hidden=[12, 12])
    assert _states_equal(SEEN["model"], fresh.state_dict())
    assert _states_equal(SEEN["parent"], Store(tmp_path).load_model(parent.run_id).state_dict())
    assert SEEN["options"] == {"q": 0.5}
    assert len(SEEN["batches"]) == 2 and SEEN["batches"][0][0].shape == (16, 6)
    draw = SEEN["draw"]
    SEEN.clear()
    train(child, parent=Store(tmp_path).load_model(parent.run_id))
    assert torch.equal(SEEN["draw"], draw), "the transform's generator is seeded by the spec"
    # The stored child is the transform's model, not the parent.
    assert _states_equal(Store(tmp_path).load_model(child.run_id).state_dict(), fresh.state_dict())


def test_worker_processes_run_staged_runs_and_know_the_transforms(tmp_path):
    parents = [RunSpec(**TINY, steps=10, seed=seed) for seed in range(2)]
    children = [RunSpec(**TINY, steps=0, parent=parent, seed=parent.seed, transform="test-negate")
                for parent in parents]
    result = run_population(children, tmp_path, workers=2, hooks=workers.no_hooks, progress=False)
    assert result.complete, [record.error for record in result.records]
    store = Store(tmp_path)
    for parent, child in zip(parents, children):
        trained, negated = store.load_model(parent.run_id).state_dict(), store.load_model(child.run_id).state_dict()
        assert all(torch.equal(negated[k], -trained[k]) for k in trained)


def test_the_children_of_a_failed_parent_fail_naming_it(tmp_path):
    parent = RunSpec(**TINY, steps=10)
    child = RunSpec(**TINY, steps=5, parent=parent)
    grandchild = RunSpec(**TINY, steps=0, parent=child)
    hooks = functools.partial(workers.fail_run, parent.run_id)
    result = run_population([grandchild], tmp_path, executor="inline", hooks=hooks, progress=False)
    store = Store(tmp_path)
    assert store.get(parent.run_id).status == "failed"
    assert parent.run_id in store.get(child.run_id).error and "planned failure" in store.get(child.run_id).error
    assert child.run_id in result.records[0].error and result.failed
    # Once the parent can train, a rerun computes the whole lineage.
    assert run_population([grandchild], tmp_path, executor="inline", progress=False).complete


def test_train_needs_the_parent_model_exactly_for_a_staged_spec():
    parent = RunSpec(**TINY, steps=4)
    with pytest.raises(ValueError, match="parent must be given"):
        train(RunSpec(**TINY, steps=2, parent=parent))
    with pytest.raises(ValueError, match="parent must be given"):
        train(parent, parent=torch.nn.Linear(2, 2))


def test_staged_spec_validation_and_ids():
    parent = RunSpec(**TINY, steps=4)
    plain = RunSpec(**TINY, steps=4).to_json()
    assert "parent" not in plain and "transform" not in plain, "specs without stages keep their ids"
    child = RunSpec(**TINY, steps=0, parent=parent, transform="test-record", transform_options={"q": [1, 2]})
    assert RunSpec.from_json(child.to_json()) == child and child.lineage() == [parent, child]
    assert child.run_id != RunSpec(**TINY, steps=0, parent=parent.replace(seed=1), transform="test-record",
                                   transform_options={"q": [1, 2]}).run_id
    other = dict(TINY, data_options={**TINY["data_options"], "train": 48})
    with pytest.raises(ValueError, match="parent's data set"):
        RunSpec(**other, steps=1, parent=parent)
    with pytest.raises(ValueError, match="unknown transform 'no-such'"):
        RunSpec(**TINY, steps=1, transform="no-such")
    with pytest.raises(ValueError, match="without a transform"):
        RunSpec(**TINY, steps=1, transform_options={"q": 1})
    with pytest.raises(ValueError, match="steps=0"):
        RunSpec(**TINY, steps=0)
    with pytest.raises(TypeError, match="parent must be a RunSpec"):
        RunSpec(**TINY, steps=1, parent="abc")
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        RunSpec(**TINY, steps=-1)


class _Penalized(pruning.RandomPruning):
    def regularizer(self):
        return 10.0 * sum((module.weight ** 2).sum() for module in self.layers.values())


@pytest.fixture
def penalized_method():
    """Registered for one test only: the registry is global, and other tests train every entry."""
    from dynasparse.pruning import registry

    pruning.register("test_penalized", "tests: random pruning whose regularizer is a large L2 penalty",
                     common=("include", "seed"), total_steps="unused")(_Penalized)
    yield "test_penalized"
    del registry._REGISTRY["test_penalized"]


def test_the_pruners_regularizer_is_added_to_the_loss(penalized_method):
    base = dict(TINY, steps=30, sparsity=0.3, seed=1, method_options={"include": ["*"]})
    norms = {}
    for method in ("random", penalized_method):
        model = train(RunSpec(**base, method=method)).model
        norms[method] = sum(float(module.weight.detach().norm()) for module in model.modules()
                            if hasattr(module, "mask"))
    assert norms[penalized_method] < 0.5 * norms["random"]
