"""The trainer: deterministic per seed, methods by registry name, hooks, evaluation, early stopping."""

import inspect
import math

import pytest
import torch

from dynasparse import pruning
from dynasparse.experiments import Hook, RunSpec, analysis, data, evaluate, train

TINY = dict(data="teacher-student", data_options={"features": 6, "classes": 3, "train": 96, "test": 48},
            model="mlp", model_options={"hidden": [12, 12]}, steps=24, batch_size=16, lr=0.1)


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("method", ["dpf", "gradual"])
def test_a_run_is_a_function_of_its_seed(method):
    spec = RunSpec(**TINY, method=method, sparsity=0.75)
    runs = [train(spec), train(spec), train(spec.replace(seed=1))]
    first, second, other = (_state(run.model) for run in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    assert runs[0].metrics == {**runs[1].metrics, "seconds": runs[0].metrics["seconds"]}
    assert runs[0].metrics["sparsity"] == pytest.approx(0.75, abs=0.01)


def test_the_callers_rng_and_thread_count_are_left_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    train(RunSpec(**TINY, threads=1))
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


def test_metrics_match_an_independent_evaluation_of_the_model():
    run = train(RunSpec(**TINY, method="gradual", sparsity=0.5))
    dataset = data.load(TINY["data"], **run.spec.data_options)
    inputs, labels = dataset.test
    with torch.no_grad():
        outputs = run.model.eval()(inputs)
    assert run.metrics["accuracy"] == float((outputs.argmax(1) == labels).double().mean())
    assert run.metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(outputs, labels)), rel=1e-6)
    masks = analysis.masks(run.model)
    assert set(masks) == {"fc1", "fc2"}  # an MLP keeps only its classifier dense
    pruned = {name: int((~mask).sum()) for name, mask in masks.items()}
    assert sum(pruned.values()) == round(0.5 * (72 + 144))
    assert run.metrics["nonzero_parameters"] == sum(p.numel() for p in run.model.parameters()) - sum(pruned.values())
    assert run.metrics["layer_sparsity"] == {"fc1": pruned["fc1"] / 72, "fc2": pruned["fc2"] / 144}
    assert run.metrics["sparsity"] == pytest.approx(0.5)


class Recorder(Hook):
    def __init__(self):
        self.steps, self.updates, self.pruners, self.ended = [], [], [], 0

    def on_step(self, state):
        self.steps.append(state.step)
        self.pruners.append(state.pruner is not None)
        assert math.isfinite(state.loss)

    def on_update(self, state):
        self.updates.append(state.step)

    def on_end(self, state):
        self.ended += 1
        state.metrics["recorded_updates"] = len(self.updates)


def test_hooks_see_every_step_and_mask_update():
    recorder, progress = Recorder(), []
    spec = RunSpec(**TINY, method="dpf", sparsity=0.5, method_options={"update_every": 4})
    run = train(spec, hooks=[recorder], progress=progress.append)
    assert recorder.steps == list(range(1, 25)) and progress == [1] * 24 and recorder.ended == 1
    assert recorder.updates == [step for step, _ in run.metrics["flip_rates"]]
    assert recorder.updates[:3] == [0, 4, 8]
    assert run.metrics["recorded_updates"] == len(recorder.updates)


def test_prune_at_creates_the_method_after_dense_training():
    recorder = Recorder()
    run = train(RunSpec(**TINY, method="oneshot", sparsity=0.5, prune_at=0.75), hooks=[recorder])
    assert recorder.pruners == [False] * 18 + [True] * 6
    assert recorder.updates == [18]
    assert run.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    layer = run.model.fc2
    assert torch.all(layer.weight[~layer.mask] == 0)  # finalized: the stored model is m * w


def test_dense_runs_and_evaluation_curve():
    run = train(RunSpec(**TINY, eval_every=8))
    assert run.pruner is None and run.metrics["sparsity"] == 0.0 and not analysis.masks(run.model)
    assert [point["step"] for point in run.metrics["curve"]] == [8, 16]
    assert run.metrics["steps"] == 24 and not run.metrics["stopped_early"]
    assert evaluate(run.model, data.load(TINY["data"], **run.spec.data_options).test)["accuracy"] == \
        run.metrics["accuracy"]


def test_early_stopping_on_validation_accuracy():
    spec = RunSpec(**{**TINY, "data_options": {**TINY["data_options"], "validation": 0.25}, "lr": 0.0,
                      "steps": 40}, eval_every=2, patience=3)
    run = train(spec)
    # lr 0: validation accuracy never improves after the first evaluation.
    assert run.metrics["stopped_early"] and run.metrics["steps"] == 8
    assert "validation_accuracy" in run.metrics
    with pytest.raises(ValueError, match="needs a validation split"):
        train(RunSpec(**TINY, eval_every=2, patience=3))


def test_unknown_method_and_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown algorithm 'magic'"):
        train(RunSpec(**TINY, method="magic", sparsity=0.5))
    with pytest.raises(ValueError, match="batch_size 200 is larger than the 96 training examples"):
        train(RunSpec(**{**TINY, "batch_size": 200}))
    with pytest.raises(TypeError, match="spec must be a RunSpec"):
        train({"steps": 1})
    with pytest.raises(TypeError, match="hooks must be experiments.Hook"):
        train(RunSpec(**TINY), hooks=[print])
    with pytest.raises(ValueError, match="spec.device 'tpu' is not a device"):
        train(RunSpec(**TINY, device="tpu"))
    other = data.load("teacher-student", train=50)
    with pytest.raises(ValueError, match="the spec asks for"):
        train(RunSpec(**TINY), dataset=other)


# Values for the options some methods require (no default).
REQUIRED = {"freeze_after": 8}
OWN_SPARSITY = {"vd"}  # methods whose sparsity is their own outcome, not a target (create with 0)


def test_every_registered_method_trains_by_name():
    for name in pruning.available():
        required = [option for option, (default, _) in pruning.describe(name).items()
                    if default is inspect.Parameter.empty]
        assert set(required) <= set(REQUIRED), f"{name} requires {required}: add a value to REQUIRED"
        options = {option: REQUIRED[option] for option in required}
        if "update_every" in pruning.describe(name):
            options["update_every"] = 4  # some updates within the 24 steps
        if name in OWN_SPARSITY:
            run = train(RunSpec(**TINY, method=name, sparsity=0.0, method_options=options))
            assert 0.0 <= run.metrics["sparsity"] < 1.0 and run.metrics["steps"] == TINY["steps"], name
            continue
        # Two calibration batches: OBD-SD's mean - std needs at least two per-batch saliencies.
        run = train(RunSpec(**TINY, method=name, sparsity=0.5, method_options=options, calibration_batches=2))
        # Whole-row methods meet the target to within one row (12 of the 216 prunable weights).
        assert abs(run.metrics["sparsity"] - 0.5) <= 12 / 216, name
        assert run.metrics["nonzero_parameters"] < run.metrics["parameters"], name
