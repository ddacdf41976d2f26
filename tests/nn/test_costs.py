"""backend="auto": each call runs as the faster of the kernels and dense on w * m, measured per
call key and kept; the same values and gradients either way; pinned backends; the cost file."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from dynasparse import nn as dsnn
from dynasparse.layout import MaskPlan
from dynasparse.nn import SparseConv2d, SparseLinear, SparseTransposedLinear, costs


def _count_kernel_calls(monkeypatch):
    calls = {"kernel": 0}
    real = MaskPlan.product

    def counted(self, *args, **kwargs):
        calls["kernel"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MaskPlan, "product", counted)
    return calls


def _layers():
    torch.manual_seed(0)
    return [SparseLinear(37, 19, sparsity=0.7), SparseTransposedLinear(37, 19, sparsity=0.7),
            SparseConv2d(5, 7, 3, padding=1, sparsity=0.7)]


def _input(layer, batch=3):
    return torch.randn(batch, 5, 9, 9) if isinstance(layer, SparseConv2d) else torch.randn(batch, 37)


def _reference(layer, x):
    """float64 output and gradients (input, weight, bias) of the layer's math at w * m, with the
    feedback rule: the weight gradient is the dense one, taken at w * m."""
    weight = (layer.weight.detach().double() * layer.mask).requires_grad_()
    bias = layer.bias.detach().double().requires_grad_()
    x = x.detach().double().requires_grad_()
    if isinstance(layer, SparseConv2d):
        out = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    elif isinstance(layer, SparseTransposedLinear):
        out = x @ weight + bias
    else:
        out = torch.nn.functional.linear(x, weight, bias)
    out.square().sum().backward()
    return out.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize("index", range(3), ids=["linear", "transposed", "conv"])
@pytest.mark.parametrize("timings", [(1.0, 2.0), (2.0, 1.0)], ids=["sparse-wins", "dense-wins"])
def test_auto_gives_the_layers_values_and_gradients_whichever_way_runs(cost_model, monkeypatch, index, timings):
    _, state = cost_model
    state["timings"] = timings
    layer = _layers()[index]
    layer.backend = "auto"
    x = _input(layer).requires_grad_()
    expected = _reference(layer, x)
    out = layer(x)
    out.square().sum().backward()
    got = (out, x.grad, layer.weight.grad, layer.bias.grad)
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), got, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)
    assert state["measured"] == 1
    [row] = layer.backend_report()
    assert row["choice"] == ("sparse" if timings[0] < timings[1] else "dense")
    assert row["sparse_s"] == timings[0] and row["dense_s"] == timings[1]


@pytest.mark.parametrize("timings,kernel_runs", [((1.0, 2.0), True), ((2.0, 1.0), False)])
def test_the_measured_choice_decides_the_path_and_is_kept(cost_model, monkeypatch, timings, kernel_runs):
    _, state = cost_model
    state["timings"] = timings
    layer = SparseLinear(40, 24, sparsity=0.8, backend="auto")
    with torch.no_grad():
        layer(torch.randn(5, 40))  # measures
        calls = _count_kernel_calls(monkeypatch)
        for _ in range(3):
            layer(torch.randn(6, 40))  # the same rows bucket (8)
    assert state["measured"] == 1
    assert (calls["kernel"] == 3) == kernel_runs and (calls["kernel"] == 0) != kernel_runs
    assert f"dense at {0 if kernel_runs else 1} of 1 call shapes" in repr(layer)


@pytest.mark.parametrize("timings,choice", [((0.94, 1.0), "sparse"), ((0.96, 1.0), "dense"), ((1.0, 1.0), "dense")])
def test_the_kernels_must_win_by_the_margin(cost_model, timings, choice):
    """Within the timing noise the layer runs dense: a wrong dense choice loses at most the
    margin, a wrong sparse one would be slower than the dense layer."""
    assert costs.SPARSE_MARGIN == 0.05
    _, state = cost_model
    state["timings"] = timings
    layer = SparseLinear(40, 24, sparsity=0.8, backend="auto")
    with torch.no_grad():
        layer(torch.randn(5, 40))
    assert [row["choice"] for row in layer.backend_report()] == [choice]


def test_each_call_key_is_measured_once(cost_model):
    _, state = cost_model
    layer = SparseLinear(16, 8, sparsity=0.5, backend="auto")
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer(x), layer(x), layer(torch.randn(4, 16))  # bucket 4 twice
        layer(torch.randn(5, 16))  # bucket 8
        layer(x.double().float())
    assert state["measured"] == 2
    layer(x.requires_grad_())  # training: another key
    assert state["measured"] == 3
    layer.set_mask(torch.ones_like(layer.mask))  # another density
    with torch.no_grad():
        layer(torch.randn(3, 16))
    assert state["measured"] == 4
    keys = [row["key"] for row in layer.backend_report()]
    assert len(set(keys)) == 4 and {key[-1] for key in keys} == {"inference", "training"}


def test_measuring_leaves_the_gradients_alone(cost_model):
    layer = SparseLinear(12, 6, sparsity=0.5, backend="auto")
    x = torch.randn(4, 12, requires_grad=True)
    out = layer(x)
    assert layer.weight.grad is None and x.grad is None, "the measurement accumulated gradients"
    out.sum().backward()
    pinned = SparseLinear(12, 6, backend="sparse")
    pinned.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    pinned(x2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, pinned.weight.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_choices_persist_per_machine_in_the_file(cost_model, tmp_path):
    _, state = cost_model
    layer = SparseLinear(16, 8, sparsity=0.5, backend="auto")
    with torch.no_grad():
        layer(torch.randn(2, 16))
    content = json.loads((tmp_path / "costs.json").read_text())
    assert content["format"] == costs.FORMAT
    [entries] = content["machines"].values()
    assert list(content["machines"]) == [costs.machine()]
    [(name, entry)] = entries.items()
    assert name.startswith("SparseLinear|(8, 16)|2|unstructured|feedback|None|0.5|float32|cpu|")
    assert entry == {"sparse_s": 1.0, "dense_s": 2.0, "choice": "sparse", "load": costs.machine_load()}
    # Another process (a fresh model on the same file) reuses it without measuring.
    costs.use_cost_file(tmp_path / "costs.json")
    again = SparseLinear(16, 8, sparsity=0.5, backend="auto")
    with torch.no_grad():
        again(torch.randn(2, 16))
    assert state["measured"] == 1
    costs.COSTS.clear()
    assert costs.COSTS.entries() == {}
    assert json.loads((tmp_path / "costs.json").read_text())["machines"] == {}


def test_a_rebuilt_library_measures_again_and_drops_the_old_builds_choices(cost_model, tmp_path, monkeypatch):
    _, state = cost_model
    with torch.no_grad():
        SparseLinear(16, 8, sparsity=0.5, backend="auto")(torch.randn(2, 16))
    assert " | kernels " in costs.machine() and state["measured"] == 1
    other = {"SparseLinear|elsewhere": {"sparse_s": 1.0, "dense_s": 2.0, "choice": "sparse", "load": 0.0}}
    content = json.loads((tmp_path / "costs.json").read_text())
    content["machines"]["Another CPU | 64 cores | torch 9 | kernels 1-2"] = other
    (tmp_path / "costs.json").write_text(json.dumps(content))
    old_build = costs.machine()
    monkeypatch.setattr(costs, "_kernels_build", lambda: "rebuilt")
    costs.use_cost_file(tmp_path / "costs.json")
    with torch.no_grad():
        SparseLinear(16, 8, sparsity=0.5, backend="auto")(torch.randn(2, 16))
    assert state["measured"] == 2, "the choice of another build of the kernels was reused"
    machines = json.loads((tmp_path / "costs.json").read_text())["machines"]
    assert costs.machine() in machines and old_build not in machines
    assert machines["Another CPU | 64 cores | torch 9 | kernels 1-2"] == other  # other machines stay


@pytest.mark.parametrize("measured_at, now, measures_again", [
    (2.5, 1.25, True), (2.5, 1.3, False), (0.9, 0.1, False), (None, 0.5, True), (3.0, None, False),
], ids=["busy-then-quiet", "busy-then-busy", "quiet-then", "unrecorded-load", "load-unknown-now"])
def test_choices_measured_on_a_busy_machine_are_measured_again_once_it_is_quieter(
        cost_model, tmp_path, monkeypatch, measured_at, now, measures_again):
    _, state = cost_model
    monkeypatch.setattr(costs, "machine_load", lambda: measured_at)
    with torch.no_grad():
        SparseLinear(16, 8, sparsity=0.5, backend="auto")(torch.randn(2, 16))
    if measured_at is None:  # a file written before the load was recorded
        path = tmp_path / "costs.json"
        content = json.loads(path.read_text())
        for entry in content["machines"][costs.machine()].values():
            del entry["load"]
        path.write_text(json.dumps(content))
    monkeypatch.setattr(costs, "machine_load", lambda: now)
    costs.use_cost_file(tmp_path / "costs.json")  # a later process
    state["timings"] = (2.0, 1.0)
    layer = SparseLinear(16, 8, sparsity=0.5, backend="auto")
    with torch.no_grad():
        layer(torch.randn(2, 16))
    assert state["measured"] == (2 if measures_again else 1)
    assert [row["choice"] for row in layer.backend_report()] == ["dense" if measures_again else "sparse"]
    [entry] = json.loads((tmp_path / "costs.json").read_text())["machines"][costs.machine()].values()
    assert entry["load"] == (now if measures_again else measured_at)


def test_an_unusable_cost_file_warns_and_measures_in_memory(cost_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    costs.use_cost_file(bad)
    layer = SparseLinear(8, 4, sparsity=0.5, backend="auto")
    with pytest.warns(RuntimeWarning, match="cannot be used"), torch.no_grad():
        layer(torch.randn(2, 8))
    assert bad.read_text() == "{not json", "a file it cannot read is left as it was"
    assert len(costs.COSTS.entries()) == 1


def test_pinned_backends_never_measure(cost_model, monkeypatch):
    _, state = cost_model
    sparse, dense = SparseLinear(20, 10, sparsity=0.6, backend="sparse"), SparseLinear(20, 10, backend="dense")
    dense.load_state_dict(sparse.state_dict())
    calls = _count_kernel_calls(monkeypatch)
    x = torch.randn(3, 20)
    torch.testing.assert_close(sparse(x), dense(x))
    assert calls["kernel"] == 1 and state["measured"] == 0
    assert sparse.backend_report() == [{"backend": "sparse", "choice": "sparse"}]
    assert "backend=dense" in repr(dense)


def test_bad_backends_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'sparse', 'dense', got 'fast'"):
        SparseLinear(4, 4, backend="fast")
    layer = SparseLinear(4, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "gpu"
    assert layer.backend == "sparse"  # the tests' default (conftest)
    with pytest.raises(ValueError, match="backend must be one of"):
        dsnn.set_default_backend("dense ")
    with pytest.raises(ValueError, match="backend must be one of"):
        dsnn.sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, backend="x")
    code = "import dynasparse"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**__import__("os").environ, "DYNASPARSE_BACKEND": "fastest"})
    assert result.returncode != 0 and "DYNASPARSE_BACKEND must be one of auto, sparse, dense" in result.stderr


def test_defaults_and_sparsify_set_the_backend():
    with dsnn.backend_default("auto"):
        assert SparseLinear(4, 4).backend == "auto"
        model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(3, 3, 1))
        dsnn.sparsify(model, 0.5, backend="dense")
        assert [module.backend for module in model] == ["dense", "dense"]
        model = nn.Sequential(nn.Linear(8, 8))
        dsnn.sparsify(model, 0.5)
        assert model[0].backend == "auto"
        assert SparseLinear.from_dense(nn.Linear(4, 4), backend="dense").backend == "dense"
    assert dsnn.default_backend() == "sparse"


def test_compiled_layers_run_their_last_eager_choice(cost_model, monkeypatch):
    _, state = cost_model
    state["timings"] = (2.0, 1.0)
    layer = SparseLinear(32, 16, sparsity=0.75, backend="auto")
    x = torch.randn(4, 32)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager)
    assert state["measured"] == 1 and layer._dense_last


@pytest.mark.parametrize("make", [lambda: SparseLinear(24, 12, sparsity=0.5, backend="dense"),
                                  lambda: SparseTransposedLinear(24, 12, sparsity=0.5, backend="dense"),
                                  lambda: SparseConv2d(3, 4, 3, sparsity=0.5, backend="dense")],
                         ids=["linear", "transposed", "conv"])
def test_the_dense_ways_kept_weight_follows_every_write(make):
    """Inference calls of the dense way reuse w * m until the weight or the mask changes, by any
    path: in place, through .data, a new mask in place or by set_mask."""
    torch.manual_seed(1)
    layer = make()
    x = torch.randn(2, 3, 6, 6) if isinstance(layer, SparseConv2d) else torch.randn(2, 24)

    def expected():
        with torch.no_grad():
            weight = layer.weight.double() * layer.mask
            if isinstance(layer, SparseConv2d):
                out = torch.nn.functional.conv2d(x.double(), weight, layer.bias.double())
            elif isinstance(layer, SparseTransposedLinear):
                out = x.double() @ weight + layer.bias.double()
            else:
                out = torch.nn.functional.linear(x.double(), weight, layer.bias.double())
            return out.float()

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected())

    check()
    with torch.no_grad():
        layer.weight.mul_(2)
    check()
    layer.weight.data.add_(1)
    check()
    with torch.no_grad():
        layer.mask.logical_not_()
    check()
    layer.set_mask(torch.ones_like(layer.mask))
    check()
    out = layer(x)  # with grad: the differentiable w * m, not the kept one
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_auto_under_torch_func_runs_dense_and_measures_nothing(cost_model):
    """torch.func wraps the input of the layers after a functional weight: auto runs them as
    torch ops on w * m (no measurement inside the transform), with the gradient of that math."""
    _, state = cost_model
    torch.manual_seed(8)
    model = nn.Sequential(SparseConv2d(2, 3, 3, sparsity=0.5, backend="auto"), nn.Tanh(),
                          SparseConv2d(3, 4, 3, sparsity=0.5, backend="auto"))
    x = torch.randn(2, 2, 7, 7)
    weight = model[0].weight.detach().clone()
    gradient = torch.func.grad(lambda w: torch.func.functional_call(model, {"0.weight": w}, (x,)).sum())(weight)
    # feedback mode: the gradient taken at w * m reaches every weight
    w0 = (weight.double() * model[0].mask).requires_grad_()
    out = torch.nn.functional.conv2d(x.double(), w0, model[0].bias.double())
    out = torch.nn.functional.conv2d(out.tanh(), model[2].weight.double() * model[2].mask, model[2].bias.double())
    (expected,) = torch.autograd.grad(out.sum(), w0)
    torch.testing.assert_close(gradient.double(), expected, rtol=1e-4, atol=1e-5)
    assert state["measured"] == 0
