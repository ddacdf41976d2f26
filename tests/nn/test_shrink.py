"""shrink: the smaller model computes what the original computes with the removed units'
contributions gone (the input columns / channels they feed zeroed in every consumer weight
layer), against that masked model in float64; what it cannot narrow it refuses, naming the layer."""

import copy

import pytest
import torch
from torch import nn

import dynasparse
from dynasparse.experiments import models
from dynasparse.nn import SparseConv2d, SparseLinear
from dynasparse.nn.shrink import NotShrinkable, ShrinkReport, shrink, shrink_report

from ..helpers import assert_close_to_float64


def _removed(count: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(count, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def _masked(model: nn.Module, columns: dict[str, torch.Tensor], dtype=None) -> nn.Module:
    """The reference: a copy whose consumer layers read nothing at `columns` (input positions)."""
    masked = copy.deepcopy(model)
    if dtype is not None:
        masked = masked.to(dtype)
    with torch.no_grad():
        for name, positions in columns.items():
            masked.get_submodule(name).weight[:, positions] = 0
    return masked


def _check(model, shrunk, columns, x):
    masked32, masked64 = _masked(model, columns), _masked(model, columns, torch.float64)
    with torch.no_grad():
        assert_close_to_float64(shrunk(x), masked32(x), masked64(x.double()))


def _random_keep(count: int, kept: int, generator) -> torch.Tensor:
    return torch.randperm(count, generator=generator)[:kept]


def _state(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


def test_mlp_equals_masked_model_and_leaves_the_input_untouched():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    model = models.build("mlp", input_shape=[3, 7], classes=5, hidden=[19, 13])
    before = _state(model)
    keep = {"fc1": _random_keep(19, 9, generator), "fc2": _random_keep(13, 6, generator)}
    shrunk = shrink(model, keep)
    _unchanged(model, before)
    assert (shrunk.fc1.out_features, shrunk.fc2.in_features, shrunk.fc2.out_features,
            shrunk.classifier.in_features) == (9, 9, 6, 6)
    assert isinstance(shrunk, models.Model) and shrunk.dense_layers == model.dense_layers
    assert shrunk.fc1.weight.data_ptr() != model.fc1.weight.data_ptr()
    x = torch.randn(11, 3, 7)
    _check(model, shrunk, {"fc2": _removed(19, keep["fc1"]), "classifier": _removed(13, keep["fc2"])}, x)
    # The kept units keep their own weights, in index order.
    order = torch.sort(keep["fc1"]).values
    torch.testing.assert_close(shrunk.fc1.weight, model.fc1.weight[order], rtol=0, atol=0)


@pytest.mark.parametrize("kept", ["all", "one"])
def test_keep_all_and_keep_one(kept):
    torch.manual_seed(2)
    model = models.build("mlp", input_shape=[10], classes=4, hidden=[8])
    indices = torch.arange(8) if kept == "all" else torch.tensor([5])
    shrunk = shrink(model, {"fc1": indices})
    x = torch.randn(6, 10)
    if kept == "all":
        torch.testing.assert_close(shrunk(x), model(x), rtol=0, atol=0)
    else:
        assert shrunk.fc1.out_features == 1 and shrunk.classifier.in_features == 1
    _check(model, shrunk, {"classifier": _removed(8, indices)}, x)


@pytest.mark.parametrize("name,options", [("cnn1d", {"channels": [6, 7, 5]}),
                                          ("zoo-cnn", {}), ("digits-cnn", {"channels": [5, 6], "hidden": 9})])
def test_cnn_through_flatten_equals_masked_model(name, options):
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(4)
    shape = {"cnn1d": [1, 23], "zoo-cnn": [1, 28, 28], "digits-cnn": [1, 8, 8]}[name]
    model = models.build(name, input_shape=shape, classes=3, **options)
    convs = [layer for layer, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    linear = [layer for layer, module in model.named_modules() if isinstance(module, nn.Linear)]
    x = torch.randn(4, *shape)
    keep, columns = {}, {}
    for first, second in zip(convs, convs[1:]):
        count = model.get_submodule(first).out_channels
        keep[first] = _random_keep(count, max(count // 2, 1), generator)
        columns[second] = _removed(count, keep[first])
    last = convs[-1]
    count = model.get_submodule(last).out_channels
    keep[last] = _random_keep(count, count - 2, generator)
    fc = model.get_submodule(linear[0])
    per_channel = fc.in_features // count  # flattened features of one channel (channel-major)
    columns[linear[0]] = (_removed(count, keep[last])[:, None] * per_channel + torch.arange(per_channel)).flatten()
    before = _state(model)
    shrunk = shrink(model, keep, example_input=x[:1])
    _unchanged(model, before)
    assert shrunk.get_submodule(linear[0]).in_features == (count - 2) * per_channel
    _check(model, shrunk, columns, torch.randn(5, *shape))


class _Functional(nn.Module):
    """The units' path through torch functions and tensor methods rather than modules."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 6, 2), nn.Linear(6 * 3 * 2, 4)

    def forward(self, x):
        h = torch.nn.functional.relu(self.conv(x)) * 2
        return self.fc(torch.flatten(h.sigmoid() - h.tanh(), 1))


def test_functions_and_methods_on_the_path():
    torch.manual_seed(12)
    model = _Functional()
    x = torch.randn(4, 3, 4, 3)
    keep = torch.tensor([0, 2, 3])
    shrunk = shrink(model, {"conv": keep}, example_input=x)
    _check(model, shrunk, {"fc": (_removed(6, keep)[:, None] * 6 + torch.arange(6)).flatten()}, x)


def test_flatten_without_example_input_asks_for_it():
    model = models.build("cnn1d", input_shape=[1, 12], classes=3, channels=[4, 4], kernels=[3, 3], strides=[1, 2])
    with pytest.raises(ValueError, match="example_input"):
        shrink(model, {"conv2": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="BatchNorm1d.*example_input"):
        shrink(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), {"0": torch.tensor([0, 1])})


def _batchnorm_net():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 2 * 2, 7),
                         nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batchnorm_channels_follow_and_the_removed_shift_is_gone(mode):
    """After a BatchNorm a removed unit's output would be the BatchNorm's shift: the reference
    zeroes what the consumers read, and the shrunk BatchNorms keep their statistics."""
    torch.manual_seed(5)
    model = _batchnorm_net()
    with torch.no_grad():
        for _ in range(3):  # running statistics away from their initial 0 / 1
            model(torch.randn(8, 2, 8, 8) * 3 + 1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    model.train(mode == "train")
    keep = {"0": torch.tensor([0, 2, 3, 5]), "4": torch.tensor([1, 4]), "7": torch.tensor([0, 3, 4, 6])}
    x = torch.randn(6, 2, 8, 8)
    shrunk = shrink(model, keep, example_input=x)
    assert shrunk[1].num_features == 4 and shrunk[5].num_features == 2 and shrunk[8].num_features == 4
    torch.testing.assert_close(shrunk[1].running_mean, model[1].running_mean[keep["0"]], rtol=0, atol=0)
    features = (_removed(5, keep["4"])[:, None] * 4 + torch.arange(4)).flatten()
    columns = {"4": _removed(6, keep["0"]), "7": features, "10": _removed(7, keep["7"])}
    _check(model, shrunk, columns, x)


def test_conv1d_with_batchnorm1d_on_three_dimensional_values():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv1d(3, 7, 3), nn.BatchNorm1d(7), nn.ReLU(), nn.Conv1d(7, 4, 2, stride=2), nn.Flatten(),
                          nn.Linear(4 * 4, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].bias.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(5, 3, 10)
    keep = {"0": torch.tensor([1, 2, 6]), "3": torch.tensor([0, 3])}
    shrunk = shrink(model, keep, example_input=x)
    assert shrunk[1].num_features == 3 and shrunk[5].in_features == 2 * 4
    features = (_removed(4, keep["3"])[:, None] * 4 + torch.arange(4)).flatten()
    _check(model, shrunk, {"3": _removed(7, keep["0"]), "5": features}, x)


def test_resnet_inner_convolutions_shrink():
    torch.manual_seed(6)
    model = models.build("resnet", input_shape=[3, 8, 8], classes=4, depth=14, width=4)
    model.eval()
    generator = torch.Generator().manual_seed(7)
    keep, columns = {}, {}
    for name, module in model.named_modules():
        if name.endswith(".conv1"):
            keep[name] = _random_keep(module.out_channels, module.out_channels // 2 + 1, generator)
            columns[name[:-1] + "2"] = _removed(module.out_channels, keep[name])
    shrunk = shrink(model, keep)
    assert shrunk.stage3[1].conv2.in_channels == 16 // 2 + 1
    _check(model, shrunk, columns, torch.randn(3, 3, 8, 8))


def test_resnet_residual_branches_narrowed_alike_shrink_and_alone_are_refused():
    torch.manual_seed(8)
    model = models.build("resnet", input_shape=[3, 8, 8], classes=4, depth=8, width=4).eval()
    keep = torch.tensor([0, 3, 4, 7])
    both = {"stage2.0.conv2": keep, "stage2.0.shortcut.0": keep}
    shrunk = shrink(model, both)
    assert shrunk.stage2[0].bn2.num_features == 4 and shrunk.stage2[0].shortcut[1].num_features == 4
    removed = _removed(8, keep)
    _check(model, shrunk, {"stage3.0.conv1": removed, "stage3.0.shortcut.0": removed}, torch.randn(2, 3, 8, 8))
    with pytest.raises(NotShrinkable, match=r"'stage2\.0\.conv2'.*residual"):
        shrink(model, {"stage2.0.conv2": keep})
    with pytest.raises(NotShrinkable, match="narrowed differently"):
        shrink(model, {"stage2.0.conv2": keep, "stage2.0.shortcut.0": torch.tensor([0, 1, 2, 3])})
    # The stem feeds an identity shortcut: its other operand is the unnarrowed stage output.
    with pytest.raises(NotShrinkable, match="'stem'"):
        shrink(model, {"stem": torch.tensor([0, 3])})
    with pytest.raises(NotShrinkable, match="model's output"):
        shrink(model, {"fc": torch.tensor([0, 1])})


def test_sparse_layers_shrink_with_their_masks():
    torch.manual_seed(9)
    model = models.build("mlp", input_shape=[12], classes=3, hidden=[10, 9])
    dynasparse.sparsify(model, 0.5, exclude="classifier")
    keep = {"fc1": torch.tensor([1, 2, 5, 8]), "fc2": torch.tensor([0, 4, 6])}
    before = _state(model)
    shrunk = shrink(model, keep)
    _unchanged(model, before)
    assert isinstance(shrunk.fc1, SparseLinear) and isinstance(shrunk.fc2, SparseLinear)
    assert torch.equal(shrunk.fc2.mask, model.fc2.mask[keep["fc2"]][:, keep["fc1"]])
    assert torch.equal(shrunk.fc1.weight, model.fc1.weight[keep["fc1"]])  # pruned values kept, for regrowth
    assert shrunk.fc1.grad_mode == model.fc1.grad_mode
    dense = copy.deepcopy(model)
    dynasparse.densify(dense)
    x = torch.randn(7, 12)
    with torch.no_grad():
        reference = _masked(dense, {"fc2": _removed(10, keep["fc1"]), "classifier": _removed(9, keep["fc2"])},
                            torch.float64)(x.double())
        torch.testing.assert_close(shrunk(x).double(), reference, rtol=1e-5, atol=1e-5)

    conv = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    dynasparse.sparsify(conv, 0.5)
    x = torch.randn(3, 2, 6, 6)
    shrunk = shrink(conv, {"0": torch.tensor([1, 2, 6])}, example_input=x)
    assert isinstance(shrunk[0], SparseConv2d) and shrunk[2].in_channels == 3
    dense = copy.deepcopy(conv)
    dynasparse.densify(dense)
    with torch.no_grad():
        reference = _masked(dense, {"2": _removed(8, torch.tensor([1, 2, 6]))}, torch.float64)(x.double())
        torch.testing.assert_close(shrunk(x).double(), reference, rtol=1e-5, atol=1e-5)

    blocked = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    dynasparse.sparsify(blocked, 0.5, layout="block16", exclude="2")
    with pytest.raises(NotShrinkable, match="layout 'block16'"):
        shrink(blocked, {"0": torch.arange(8)})


class _TwoCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(x))))


class _Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.out(self.fc(x))
        return self.out(x)


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.cat([self.fc(x), x], 1))


@pytest.mark.parametrize("model,layer,shape,message", [
    (_TwoCalls(), "fc", [4], "called 2 times"),
    (_Branching(), "fc", [4], "torch.fx cannot trace"),
    (_Concat(), "fc", [4], "cat"),
    (nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)), "0", [4], "LayerNorm '1'"),
    (nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2)), "0", [2, 1, 1],
     "GroupNorm"),
    (nn.Sequential(nn.Linear(4, 6), nn.MaxPool1d(2), nn.Linear(3, 2)), "0", [4], "pooling '1'"),
    (nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(), nn.Linear(4, 2)), "0",
     [4, 1, 1], "grouped"),
    (nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3)), nn.Flatten(), nn.Linear(6, 2)), "0", [4], "Unflatten"),
])
def test_what_shrink_cannot_narrow_is_refused(model, layer, shape, message):
    before = _state(model)
    with pytest.raises(NotShrinkable, match=message):
        shrink(model, {layer: torch.tensor([0, 1])}, example_input=torch.randn(2, *shape))
    _unchanged(model, before)


@pytest.mark.parametrize("keep,error,message", [
    ([("fc1", torch.tensor([0]))], TypeError, "must be a dict"),
    ({"nope": torch.tensor([0])}, ValueError, "does not have.*fc1"),
    ({"act1": torch.tensor([0])}, ValueError, "a ReLU"),
    ({1: torch.tensor([0])}, TypeError, "layer names"),
    ({"fc1": [0, 1]}, TypeError, "integer tensor"),
    ({"fc1": torch.tensor([0.0, 1.0])}, TypeError, "integer tensor"),
    ({"fc1": torch.ones(8, dtype=torch.bool)}, TypeError, "integer tensor"),
    ({"fc1": torch.tensor([[0, 1]])}, ValueError, "1-D"),
    ({"fc1": torch.tensor([], dtype=torch.long)}, ValueError, "keeps no unit"),
    ({"fc1": torch.tensor([0, 8])}, ValueError, r"outside \[0, 8\)"),
    ({"fc1": torch.tensor([-1, 2])}, ValueError, "outside"),
    ({"fc1": torch.tensor([2, 3, 2])}, ValueError, "repeated"),
])
def test_bad_keep_dicts_raise(keep, error, message):
    model = models.build("mlp", input_shape=[5], classes=2, hidden=[8])
    before = _state(model)
    with pytest.raises(error, match=message):
        shrink(model, keep)
    _unchanged(model, before)


def test_keep_order_does_not_matter_and_example_input_is_checked():
    torch.manual_seed(10)
    model = models.build("mlp", input_shape=[5], classes=2, hidden=[8])
    x = torch.randn(3, 5)
    a = shrink(model, {"fc1": torch.tensor([6, 1, 3])})
    b = shrink(model, {"fc1": torch.tensor([1, 3, 6], dtype=torch.int32)})
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot run on example_input"):
        shrink(model, {"fc1": torch.tensor([1])}, example_input=torch.randn(3, 6))
    with pytest.raises(TypeError, match="example_input"):
        shrink(model, {"fc1": torch.tensor([1])}, example_input=[x])


def test_shrink_report_counts_parameters_and_times_both():
    torch.manual_seed(11)
    model = models.build("mlp", input_shape=[64], classes=10, hidden=[128, 128])
    shrunk = shrink(model, {"fc1": torch.arange(0, 128, 2), "fc2": torch.arange(0, 128, 4)})
    report = shrink_report(model, shrunk, torch.randn(32, 64), repeats=5, warmup=1)
    assert isinstance(report, ShrinkReport)
    assert report.parameters == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    assert report.shrunk_parameters == 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    assert report.latency_s > 0 and report.shrunk_latency_s > 0
    assert report.speedup == report.latency_s / report.shrunk_latency_s
    assert "parameters" in str(report)
    with pytest.raises(ValueError, match="repeats"):
        shrink_report(model, shrunk, torch.randn(2, 64), repeats=0)
