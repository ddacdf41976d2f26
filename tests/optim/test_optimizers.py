"""dynasparse.optim.SGD / AdamW as drop-ins for torch.optim, with masks, statistics and error norms.

Trajectories are compared with torch.optim (foreach=False) on the same model and data: our
distance to a float64 torch.optim run is at most twice torch's own fp32 distance (see
tests/ops/test_optim.py); the kernels' hyperparameter coverage lives there.
"""

import copy
import io

import pytest
import torch

from dynasparse.optim import SGD, AdamW

OPTIMIZERS = [
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.0, maximize=False)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True)),
    (AdamW, torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)),
]
IDS = ["sgd-nesterov", "sgd-plain", "adamw-amsgrad", "adamw-betas"]


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5)).to(dtype)


def data(steps, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 13, generator=generator, dtype=dtype), torch.randn(16, 5, generator=generator,
                                                                              dtype=dtype)) for _ in range(steps)]


def masks_for(model, density=0.5, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return {p: torch.rand(p.shape, generator=generator) < density for p in model.parameters() if p.dim() == 2}


def train(model, optimizer, batches, masks=None, mode=None):
    """Train; with our masks the loss is taken at m * w (what a sparse module does); the
    masked-mode reference starts from m * w and gets grad * m (what masked mode must equal)."""
    for x, y in batches:
        optimizer.zero_grad()
        if mode in ("feedback", "masked"):
            effective = {p: p * masks[p] for p in masks}
            w1 = effective.get(model[0].weight, model[0].weight)
            w2 = effective.get(model[2].weight, model[2].weight)
            out = torch.tanh(x @ w1.T + model[0].bias) @ w2.T + model[2].bias
        else:
            out = model(x)
        torch.nn.functional.mse_loss(out, y).backward()
        if mode == "masked-reference":
            for p, mask in masks.items():
                p.grad.mul_(mask)
        optimizer.step()
    return model


def flat(model):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def assert_within_twice_torch_error(ours, torch32, torch64):
    our_error = (flat(ours) - flat(torch64)).norm().item()
    torch_error = (flat(torch32) - flat(torch64)).norm().item()
    assert our_error <= 2 * torch_error + 1e-6 * flat(torch64).norm().item(), (our_error, torch_error)


def reference_runs(torch_cls, kwargs, batches, mode=None, masks_of=None):
    runs = []
    for dtype in (torch.float32, torch.float64):
        model = make_model(torch.float32).to(dtype)
        masks = masks_of(model) if masks_of else None
        if mode == "masked-reference":
            with torch.no_grad():
                for p, mask in masks.items():
                    p.mul_(mask)
        batches_in_dtype = [(x.to(dtype), y.to(dtype)) for x, y in batches]
        runs.append(train(model, torch_cls(model.parameters(), foreach=False, **kwargs), batches_in_dtype, masks,
                          mode))
    return runs


@pytest.mark.parametrize("cls,torch_cls,kwargs", OPTIMIZERS, ids=IDS)
def test_dense_trajectory_matches_torch(cls, torch_cls, kwargs):
    batches = data(100)
    model = make_model()
    ours = train(model, cls(model.parameters(), **kwargs), batches)
    torch32, torch64 = reference_runs(torch_cls, kwargs, batches)
    assert_within_twice_torch_error(ours, torch32, torch64)


@pytest.mark.parametrize("cls,torch_cls,kwargs", OPTIMIZERS, ids=IDS)
@pytest.mark.parametrize("mode", ["masked", "feedback"])
def test_sparse_trajectory_matches_torch(cls, torch_cls, kwargs, mode):
    batches = data(100)
    model = make_model()
    masks = masks_for(model)
    optimizer = cls(model.parameters(), masks={p: (m, mode) for p, m in masks.items()}, **kwargs)
    ours = train(model, optimizer, batches, masks, mode)
    torch32, torch64 = reference_runs(torch_cls, kwargs, batches,
                                      "masked-reference" if mode == "masked" else "feedback", masks_for)
    assert_within_twice_torch_error(ours, torch32, torch64)
    for p, mask in masks.items():
        pruned_norm = (p.detach().double() * ~mask).norm().item()
        assert optimizer.error_norms()[p].item() == pytest.approx(pruned_norm, rel=1e-6, abs=1e-30)
        if mode == "masked":
            assert (p[~mask] == 0).all()
            for value in optimizer.state[p].values():
                if value.shape == p.shape:
                    assert (value[~mask] == 0).all()
    assert set(optimizer.error_norms()) == set(masks)


@pytest.mark.parametrize("cls,torch_cls,kwargs", OPTIMIZERS, ids=IDS)
def test_state_dict_round_trip_resumes_bit_identically(cls, torch_cls, kwargs):
    batches = data(20)
    model = make_model()
    masks = masks_for(model)
    optimizer = cls(model.parameters(), masks={p: (m, "masked") for p, m in masks.items()}, **kwargs)
    train(model, optimizer, batches[:10])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, batches[10:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model(seed=7)
    resumed_model.load_state_dict(saved["model"])
    resumed = cls(resumed_model.parameters(), **kwargs)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        if p in masks:
            resumed.set_mask(q, masks[p], "masked")
    resumed.load_state_dict(saved["optimizer"])
    train(resumed_model, resumed, batches[10:])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, resumed.state[q][key])


@pytest.mark.parametrize("cls,torch_cls,kwargs", OPTIMIZERS, ids=IDS)
def test_state_dicts_load_both_ways_with_torch_optim(cls, torch_cls, kwargs):
    batches = data(30)
    theirs_model, ours_model = make_model(), make_model()
    theirs = torch_cls(theirs_model.parameters(), foreach=False, **kwargs)
    train(theirs_model, theirs, batches[:10])
    ours_model.load_state_dict(theirs_model.state_dict())
    ours = cls(ours_model.parameters(), **kwargs)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    train(theirs_model, theirs, batches[10:20])
    train(ours_model, ours, batches[10:20])
    torch.testing.assert_close(flat(ours_model), flat(theirs_model), rtol=1e-5, atol=1e-6)

    back_model = make_model()
    back_model.load_state_dict(ours_model.state_dict())
    back = torch_cls(back_model.parameters(), foreach=False, **kwargs)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    state_keys = lambda optimizer: {k: set(v) for k, v in optimizer.state_dict()["state"].items()}  # noqa: E731
    assert state_keys(back) == state_keys(theirs) == state_keys(ours)
    train(back_model, back, batches[20:])
    train(ours_model, ours, batches[20:])
    torch.testing.assert_close(flat(ours_model), flat(back_model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [SGD, AdamW])
@pytest.mark.parametrize("statistic", ["abs", "square"])
@pytest.mark.parametrize("ema", [None, 0.5])
def test_statistics_gathered_against_float64(cls, statistic, ema):
    model = make_model()
    masks = masks_for(model)
    optimizer = cls(model.parameters(), lr=1e-2, masks={p: (m, "feedback") for p, m in masks.items()},
                    statistic=statistic, statistic_ema=ema)
    expected = {p: torch.zeros(p.shape, dtype=torch.float64) for p in model.parameters()}
    for x, y in data(15):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            value = p.grad.double().abs() if statistic == "abs" else p.grad.double().square()
            expected[p] = expected[p] + value if ema is None else ema * expected[p] + (1 - ema) * value
        optimizer.step()
    for p in model.parameters():
        torch.testing.assert_close(optimizer.statistics(p).double(), expected[p], rtol=1e-5, atol=1e-12)
    optimizer.reset_statistics()
    assert all((optimizer.statistics(p) == 0).all() for p in model.parameters())


def test_set_mask_later_switches_a_dense_parameter_to_masked_and_zeroes_its_state():
    model = make_model()
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    train(model, optimizer, data(5))
    weight = model[0].weight
    assert (optimizer.state[weight]["momentum_buffer"] != 0).all()
    mask = masks_for(model)[weight]
    optimizer.set_mask(weight, mask, "masked")
    train(model, optimizer, data(3, seed=5))
    assert (weight[~mask] == 0).all() and (optimizer.state[weight]["momentum_buffer"][~mask] == 0).all()
    assert (weight[mask] != 0).all()
    optimizer.clear_mask(weight)
    train(model, optimizer, data(1, seed=6))
    assert (weight[~mask] != 0).any()


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_reset_state_zeroes_state_where_weights_regrow(cls):
    model = make_model()
    optimizer = cls(model.parameters(), lr=1e-2, momentum=0.9) if cls is SGD else cls(model.parameters(), lr=1e-2)
    train(model, optimizer, data(3))
    weight = model[0].weight
    grown = masks_for(model, density=0.2, seed=9)[weight]
    before = {k: v.clone() for k, v in optimizer.state[weight].items()}
    optimizer.reset_state(weight, grown)
    for key, value in optimizer.state[weight].items():
        if value.shape == weight.shape:
            assert (value[grown] == 0).all() and torch.equal(value[~grown], before[key][~grown])
        else:
            assert torch.equal(value, before[key])  # the step count stays


def test_non_fp32_parameters_take_torch_functional_path():
    model = make_model(torch.float64)
    reference = make_model(torch.float64)
    ours = AdamW(model.parameters(), lr=1e-2)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    train(model, ours, data(5, dtype=torch.float64))
    train(reference, theirs, data(5, dtype=torch.float64))
    assert torch.equal(flat(model), flat(reference))


def test_bad_input_raises_clear_errors():
    model = make_model()
    weight = model[0].weight
    optimizer = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"mask has shape \[5, 31\] but the parameter has shape \[31, 13\]"):
        optimizer.set_mask(weight, torch.ones(5, 31, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a torch.bool tensor, got torch.float32"):
        optimizer.set_mask(weight, torch.ones(31, 13))
    with pytest.raises(ValueError, match="is not in this optimizer"):
        optimizer.set_mask(torch.nn.Parameter(torch.zeros(31, 13)), torch.ones(31, 13, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode must be 'masked' or 'feedback', got 'dense'"):
        optimizer.set_mask(weight, torch.ones(31, 13, dtype=torch.bool), "dense")
    with pytest.raises(TypeError, match="packing_plan must be a callable returning a MaskPlan or None"):
        optimizer.set_mask(weight, torch.ones(31, 13, dtype=torch.bool), "masked", "not a plan")
    with pytest.raises(ValueError, match="is not in this optimizer"):
        SGD([weight], lr=0.1, masks={model[2].weight: (torch.ones(5, 31, dtype=torch.bool), "masked")})
    double_model = make_model(torch.float64)
    with pytest.raises(TypeError, match="sparse parameters must be torch.float32, got torch.float64"):
        AdamW(double_model.parameters(), masks={double_model[0].weight: (torch.ones(31, 13, dtype=torch.bool),
                                                                         "masked")})
    with pytest.raises(ValueError, match="statistic must be None, 'abs' or 'square', got 'fisher'"):
        SGD(model.parameters(), lr=0.1, statistic="fisher")
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        SGD(model.parameters(), lr=0.1, differentiable=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # torch's own constructor checks still run
        AdamW(model.parameters(), lr=-1.0)
