"""Models by name: shapes, parameter counts, options, and that the pruners can take them."""

import pytest
import torch
from torch import nn

import dynasparse
from dynasparse.experiments import models


@pytest.mark.parametrize("name,shape", [("mlp", (3, 5)), ("zoo-cnn", (1, 28, 28)), ("cnn1d", (1, 37)),
                                        ("digits-cnn", (1, 8, 8)), ("resnet", (3, 9, 11))])
def test_every_model_classifies_and_sparsifies(name, shape):
    torch.manual_seed(0)
    model = models.build(name, input_shape=shape, classes=7)
    assert model(torch.randn(4, *shape)).shape == (4, 7)
    assert model(torch.randn(0, *shape)).shape == (0, 7)
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(model.dense_layers) <= names
    report = dynasparse.sparsify(model, 0.5, exclude=list(model.dense_layers))
    assert set(report.converted) == names - set(model.dense_layers) and report.converted
    assert not report.skipped
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_zoo_cnn_has_the_zoo_parameter_count():
    model = models.build("zoo-cnn", input_shape=(1, 28, 28), classes=10)
    assert sum(p.numel() for p in model.parameters()) == 2464
    with pytest.raises(ValueError, match="cannot take inputs of shape \\[1, 8, 8\\]"):
        models.build("zoo-cnn", input_shape=(1, 8, 8), classes=10)
    small = models.build("zoo-cnn", input_shape=(1, 8, 8), classes=10, padding=2, dropout=0.1, activation="relu")
    assert small(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_cnn1d_convolves_along_the_signal_as_conv1d():
    """The (1, k) Conv2d layers compute nn.functional.conv1d on the [C, L] signal (float64)."""
    torch.manual_seed(1)
    model = models.build("cnn1d", input_shape=(2, 23), classes=4, channels=[3, 5], kernels=[5, 3],
                         strides=[1, 2]).double()
    x = torch.randn(6, 2, 23, dtype=torch.float64)
    out = x
    for conv in (model.conv1, model.conv2):
        out = torch.relu(nn.functional.conv1d(out, conv.weight[:, :, 0], conv.bias, stride=conv.stride[1],
                                              padding=conv.padding[1]))
    expected = model.fc(out.flatten(1))
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_digits_cnn_is_the_demo_architecture():
    model = models.build("digits-cnn", input_shape=(1, 8, 8), classes=10)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {"conv1.weight": (16, 1, 3, 3), "conv1.bias": (16,), "conv2.weight": (32, 16, 3, 3),
                      "conv2.bias": (32,), "fc1.weight": (128, 512), "fc1.bias": (128,), "fc2.weight": (10, 128),
                      "fc2.bias": (10,)}


def test_resnet_depth_and_mlp_widths():
    def convs(model):
        return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())

    assert convs(models.build("resnet", input_shape=(3, 8, 8), classes=10, depth=14)) == 13
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.build("resnet", input_shape=(3, 8, 8), classes=10, depth=9)
    mlp = models.build("mlp", input_shape=(4,), classes=2, hidden=[3])
    assert [tuple(p.shape) for p in mlp.parameters()] == [(3, 4), (3,), (2, 3), (2,)]
    assert models.build("mlp", input_shape=(4,), classes=2, hidden=[]).dense_layers == ("classifier",)


def test_init_option_and_errors():
    torch.manual_seed(0)
    model = models.build("mlp", input_shape=(6,), classes=3, init="normal")
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model.modules() if isinstance(m, nn.Linear))
    assert float(model.fc1.weight.detach().std()) < 0.02
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build("vgg", input_shape=(1,), classes=2)
    with pytest.raises(TypeError, match="no option.*'width'.*hidden, activation, init"):
        models.build("mlp", input_shape=(1,), classes=2, width=3)
    with pytest.raises(ValueError, match="init must be None or one of"):
        models.build("mlp", input_shape=(1,), classes=2, init="ones")
    with pytest.raises(ValueError, match="activation must be one of"):
        models.build("mlp", input_shape=(1,), classes=2, activation="swish")
    with pytest.raises(ValueError, match="inputs shaped \\[C, L\\]"):
        models.build("cnn1d", input_shape=(1, 8, 8), classes=2)
    with pytest.raises(ValueError, match="even height and width"):
        models.build("digits-cnn", input_shape=(1, 7, 8), classes=2)
    with pytest.raises(ValueError, match="kernels needs 3 entries"):
        models.build("cnn1d", input_shape=(1, 40), classes=2, kernels=[3, 3])
