"""The registry and factory, the lifecycle, the update template's guarantees, the hooks, the
selection API against float64 references, and bit-identical resume for every algorithm."""

import inspect

import pytest
import torch

import dynasparse
from dynasparse import optim, pruning
from dynasparse.nn import SparseConv2d, SparseLinear
from tests.pruning.tiny import build, checkpoint, masks_of, tiny_model, topk_reference, train

NAMES = ["dpf", "oneshot", "gradual", "random", "rigl", "set", "snip", "dnw", "imp", "rigl_frozen", "dnw_frozen",
         "dpf_structured", "vd", "obd", "obd_sd"]
# The target sparsity each algorithm is created with (VD takes none: its threshold decides).
SPARSITY = {"vd": 0.0}
# Options small enough for 16 steps; the resume point 11 falls between updates, before a RigL
# dense-gradient step (12), an IMP round (12) and the DNW freeze (13).
RUN_OPTIONS = {"dpf": {"update_every": 4}, "gradual": {"update_every": 4}, "rigl": {"update_every": 4},
               "set": {"update_every": 4}, "imp": {"rewind_step": 1, "round_steps": 3},
               "rigl_frozen": {"update_every": 3, "freeze_after": 12}, "dnw_frozen": {"freeze_after": 13},
               "dpf_structured": {"update_every": 4}, "vd": {"update_every": 4},
               "obd": {"rounds": 2, "round_steps": 12},
               "obd_sd": {"rounds": 2, "round_steps": 12, "aggregator": "median"}}


def test_available_lists_every_algorithm_with_one_line():
    found = pruning.available()
    assert list(found) == NAMES
    for name, description in found.items():
        assert description and "\n" not in description, name
        assert pruning.registry.entry(name).cls.registered_name == name


@pytest.mark.parametrize("name", NAMES)
def test_every_documented_option_is_accepted_with_its_default(name):
    options = pruning.describe(name)
    assert all(isinstance(doc, str) and doc for _, doc in options.values())
    given = {option: default for option, (default, _) in options.items() if default is not inspect.Parameter.empty}
    required = {option for option, (default, _) in options.items() if default is inspect.Parameter.empty}
    assert required == ({"freeze_after"} if name.endswith("_frozen") else set())
    given.update({option: 10 for option in required})
    if name.startswith("rigl"):
        given["update_every"] = 5  # the default period (100) is longer than this freeze
    model = tiny_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    pruner = pruning.create(name, model, sparsity=SPARSITY.get(name, 0.5), total_steps=100, **given)
    assert isinstance(pruner, pruning.registry.entry(name).cls) and not pruner.initialized
    # construction replaces the layers but changes no mask and no weight
    assert all(bool(layer.mask.all()) for layer in pruner.layers.values())
    after = model.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())


def test_create_refuses_unknown_names_and_options_before_changing_the_model():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"unknown algorithm 'rigl2'; available: dpf, oneshot"):
        pruning.create("rigl2", model, sparsity=0.5)
    with pytest.raises(TypeError, match=r"create\('rigl'\): unknown options 'alpha', 'beta'; its options are .*"
                                        r"drop_fraction"):
        pruning.create("rigl", model, sparsity=0.5, total_steps=10, alpha=0.3, beta=1)
    with pytest.raises(ValueError, match=r"create\('dpf'\): total_steps is required"):
        pruning.create("dpf", model, sparsity=0.5)
    with pytest.raises(ValueError, match=r"create\('oneshot'\): total_steps must be >= 1, got 0"):
        pruning.create("oneshot", model, sparsity=0.5, total_steps=0)
    with pytest.raises(ValueError, match=r"RigL: drop_fraction must be a number in \[0, 1\], got 2"):
        pruning.create("rigl", model, sparsity=0.5, total_steps=10, drop_fraction=2)
    with pytest.raises(TypeError, match=r"SNIP: sparsity must be a number"):
        pruning.create("snip", model, sparsity="high")
    with pytest.raises(ValueError, match=r"update_every must be >= 1"):
        pruning.create("set", model, sparsity=0.5, total_steps=10, update_every=0)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules())


def test_register_checks_its_arguments():
    with pytest.raises(ValueError, match="a name is lowercase"):
        pruning.register("RigL", "x")
    with pytest.raises(ValueError, match="are not common options"):
        pruning.register("mine", "x", common=("lr",))
    with pytest.raises(ValueError, match="'dpf' is already DPF"):
        pruning.register("dpf", "again")(type("Other", (pruning.Pruner,), {}))


def test_subclasses_cannot_skip_the_template():
    with pytest.raises(TypeError, match=r"overrides Pruner.update, Pruner._synchronize: .*override the hooks"):
        type("Unsynchronized", (pruning.Pruner,), {"update": lambda self: None, "_synchronize": lambda self, m: m})


def test_lifecycle_errors():
    model = tiny_model()
    pruner = pruning.create("oneshot", model, sparsity=0.5)
    for call in (pruner.step, pruner.update, pruner.finalize):
        with pytest.raises(RuntimeError, match=r"call initialize\(\) or attach\(optimizer\) before"):
            call()
    with pytest.raises(TypeError, match="takes no calibration data"):
        pruner.calibrate([])
    pruner.initialize()
    with pytest.raises(RuntimeError, match="already initialized"):
        pruner.initialize()
    optimizer = optim.SGD(model.parameters(), lr=0.1)
    masks = masks_of(pruner)
    pruner.attach(optimizer)  # already initialized: no second initial update
    assert len(pruner.history) == 1 and all(torch.equal(masks[n], l.mask) for n, l in pruner.layers.items())


def test_on_update_observes_every_update_and_can_be_removed():
    model = tiny_model(1)
    pruner = pruning.create("dpf", model, sparsity=0.8, total_steps=16, update_every=4)
    seen = []
    handle = pruner.on_update(lambda step, masks: seen.append((step, {n: m.clone() for n, m in masks.items()})))
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    pruner.attach(optimizer)
    train(model, optimizer, pruner, 8)
    assert [step for step, _ in seen] == [0, 4, 8]
    assert all(torch.equal(seen[-1][1][name], layer.mask) for name, layer in pruner.layers.items())
    handle.remove()
    train(model, optimizer, pruner, 4, start=8)
    assert len(seen) == 3 and len(pruner.history) == 4
    with pytest.raises(TypeError, match="hook must be callable"):
        pruner.on_update("print")


class _Counting(pruning.Pruner):
    state_attributes = ("seen", "scale")

    def __init__(self, model):
        self.seen, self.scale = [], {"value": torch.tensor(1.0)}
        super().__init__(model, 0.5, update_every=2)

    def after_update(self, masks):
        self.seen.append(self.step_count)
        self.scale["value"] = self.scale["value"] * 2


def test_subclass_state_round_trips_and_bad_state_is_refused():
    model = tiny_model(2)
    pruner = _Counting(model)
    optimizer = optim.SGD(model.parameters(), lr=0.05)
    pruner.attach(optimizer)
    train(model, optimizer, pruner, 4)
    state = checkpoint(model, optimizer, pruner)["pruner"]
    assert state["extra"] == {"seen": [0, 2, 4], "scale": {"value": torch.tensor(8.0)}}
    fresh = _Counting(tiny_model(2))
    fresh.load_state_dict(state)
    assert fresh.seen == [0, 2, 4] and fresh.scale["value"] == 8 and fresh.step_count == 4
    pruner.seen = object()
    with pytest.raises(TypeError, match="state attribute seen holds a object"):
        pruner.state_dict()
    with pytest.raises(ValueError, match="the state is of a _Counting, this pruner is a DPF"):
        pruning.create("dpf", tiny_model(), sparsity=0.5, total_steps=10).load_state_dict(state)
    with pytest.raises(ValueError, match="this state has format None"):
        fresh.load_state_dict({"step": 3})


def test_select_masks_by_counts_threshold_and_candidates_against_references():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    dynasparse.sparsify(model, 0.0, layout="block16", include=["0"])
    dynasparse.sparsify(model, 0.5, layout="2:4", include=["1"])
    pruner = pruning.Pruner(model, 0.5)
    scores = {name: torch.randn(layer.weight.shape) for name, layer in pruner.layers.items()}
    candidates = {name: torch.rand(layer.weight.shape) < 0.6 for name, layer in pruner.layers.items()}
    candidates["0"] = torch.zeros(32, 32, dtype=torch.bool)
    candidates["0"][:16] = True  # the top two blocks
    chosen = pruner.select_masks(scores, counts={"0": 256, "1": 100, "2": 30}, candidates=candidates)
    # unstructured: the top 30 candidates
    assert torch.equal(chosen["2"], topk_reference(scores["2"], 30, candidates["2"]))
    # blocks: the one of the two candidate blocks with the larger L2 norm
    norms = scores["0"].double().reshape(2, 16, 2, 16).clamp(min=0).square().sum((1, 3)).sqrt() - \
        scores["0"].double().reshape(2, 16, 2, 16).clamp(max=0).square().sum((1, 3)).sqrt()
    best = int(norms[0].argmax())
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[:16, best * 16:(best + 1) * 16] = True
    assert torch.equal(chosen["0"], expected)
    # 2:4: among the 2 largest candidates of every group of 4, the top 100 (capped at what they allow)
    groups = torch.where(candidates["1"], scores["1"].double(), -torch.inf).reshape(16, 8, 4)
    top2 = torch.zeros_like(groups, dtype=torch.bool)
    top2.scatter_(-1, torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :2], True)
    allowed = (top2 & candidates["1"].reshape(16, 8, 4)).reshape(16, 32)
    assert torch.equal(chosen["1"], topk_reference(scores["1"], min(100, int(allowed.sum())), allowed))
    above = pruner.select_masks(scores, threshold=0.5)
    assert torch.equal(above["2"], scores["2"] > 0.5)
    assert int(above["1"].reshape(16, 8, 4).sum(-1).max()) <= 2
    with pytest.raises(ValueError, match=f"cannot keep 120 weights of 2: it has {int(candidates['2'].sum())} "
                                         "candidates"):
        pruner.select_masks(scores, counts={"0": 0, "1": 0, "2": 120}, candidates=candidates)
    with pytest.raises(ValueError, match=r"counts\['2'\] must be in \[0, 128\], got 300"):
        pruner.select_masks(scores, counts={"0": 0, "1": 0, "2": 300})
    with pytest.raises(TypeError, match="exactly one of sparsity, counts, threshold"):
        pruner.select_masks(scores, sparsity=0.5, threshold=0.0)
    with pytest.raises(ValueError, match=r"\['3'\] are not prunable layers"):
        pruner.select_masks({"3": torch.zeros(1)}, sparsity=0.5)
    with pytest.raises(ValueError, match="contain NaN"):
        pruner.select_masks({"2": torch.full((8, 16), float("nan"))}, threshold=0.0)


def test_weight_grad_and_update_rule_settings():
    model, optimizer, pruner = build("oneshot", 4, sparsity=0.6)
    layer = pruner.layers["fc1"]
    pruner.set_weight_grad("none")
    train(model, optimizer, pruner, 1)
    assert layer.weight.grad is None and layer.bias.grad is not None
    pruner.set_weight_grad("dense")
    train(model, optimizer, pruner, 1, start=1)
    assert bool((layer.weight.grad[~layer.mask] != 0).any())  # dense gradient, masked update:
    assert bool((layer.weight[~layer.mask] == 0).all())  # the pruned weights stay zero
    assert pruner.report().dense_gradient_steps == 1
    with pytest.raises(ValueError, match="weight_grad must be one of dense, nonzeros, none or None"):
        pruner.set_weight_grad("half")
    with pytest.raises(ValueError, match="update rule must be one of feedback, masked"):
        pruner.set_update_rule("straight-through")
    pruner.set_update_rule("feedback")
    assert optimizer.mask(layer.weight)[1] == "feedback" and layer.grad_mode == "feedback"


@pytest.mark.parametrize("name", NAMES)
def test_resume_at_an_arbitrary_step_is_bit_identical(name):
    steps, stop = 16, 11
    options = {"sparsity": SPARSITY.get(name, 0.8), **RUN_OPTIONS.get(name, {})}
    model, optimizer, pruner = build(name, 5, total_steps=steps, **options)
    train(model, optimizer, pruner, steps)
    expected_model, expected_pruner = model.state_dict(), pruner.state_dict()

    model, optimizer, pruner = build(name, 5, total_steps=steps, **options)
    train(model, optimizer, pruner, stop)
    saved = checkpoint(model, optimizer, pruner)
    rng = torch.get_rng_state()  # a stochastic forward (VD's noise) resumes from the same draws
    # a fresh run: another initial model, restored from the checkpoint
    model, optimizer, pruner = build(name, 6, total_steps=steps, calibration_seed=7, **options)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    pruner.load_state_dict(saved["pruner"])
    torch.set_rng_state(rng)
    train(model, optimizer, pruner, steps - stop, start=stop)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected_model[key]), key
    state = pruner.state_dict()
    for key in ("step", "target", "history", "dense_gradient_steps", "update_rule", "finalized"):
        assert state[key] == expected_pruner[key], key
    assert torch.equal(state["generator"], expected_pruner["generator"])
    for key in ("pruned_seen", "reactivated"):
        assert all(torch.equal(state[key][n], expected_pruner[key][n]) for n in state[key])
    assert len(state["history"]) > 1 or name in ("oneshot", "random", "snip")
