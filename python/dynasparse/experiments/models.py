"""Models by name: `build(name, input_shape=..., classes=..., **options) -> nn.Module`.

Every model is an nn.Module of named nn.Linear / nn.Conv2d layers (which the pruners turn
into sparse layers) with a `dense_layers` attribute: the layer names a run keeps dense unless
its method options say otherwise (`exclude` / `include`), by the common convention of pruning
papers: the first weight layer and the classifier of a convolutional network, the classifier
of an MLP.

- "mlp": flatten, `hidden` (default [128, 128]) fully connected layers fc1, fc2, ... with
  `activation`, then `classifier`. Any input shape.
- "zoo-cnn": the small CNN of the model zoos (Schürholt et al. 2021; Honegger et al. 2023):
  conv 5x5 (8) -> max-pool -> conv 5x5 (6) -> max-pool -> conv 2x2 (4) -> fc 20 -> fc classes,
  2,464 parameters on 28 x 28 single-channel images; `channels`, `kernels`, `hidden`,
  `activation`, `dropout` (the zoo's hyperparameters) and `padding` for smaller images.
  Inputs [C, H, W].
- "cnn1d": a 1-D CNN for MNIST-1D: `channels` (default [32, 32, 32]) convolutions with
  `kernels` [5, 3, 3] and `strides` [1, 2, 2] along the signal, each followed by `activation`
  (and by `dropout`, when above 0, as zoo-cnn's), then the classifier `fc` on the flattened
  features. The convolutions are nn.Conv2d with
  (1, k) kernels on the signal viewed as [C, 1, L] (so that they become SparseConv2d).
  Inputs [C, L].
- "digits-cnn": the demo's CNN for 8 x 8 digits: conv1 3x3 (16), conv2 3x3 (32), max-pool,
  fc1 (128), fc2. Inputs [C, H, W] with even H, W.
- "resnet": a CIFAR-style ResNet of depth 6n + 2 (`depth`, default 8) and `width` 16:
  a 3x3 stem conv, three stages of basic blocks (widths w, 2w, 4w, stride 2 between stages,
  1x1 projection shortcuts), batch norm, global average pooling, `fc`. Inputs [C, H, W].

`init` (any model): None (torch's defaults) or "kaiming_uniform", "kaiming_normal",
"xavier_uniform", "xavier_normal", "uniform" (U(-0.1, 0.1)), "normal" (N(0, 0.01)) for every
weight of a conv and linear layer, biases zeroed. The random draws come from torch's global
generator: seed it (the trainer does) for a reproducible model.
"""

from __future__ import annotations

import collections
import copy
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..pruning.schedules import check_int, check_real

_OWNER = "dynasparse.experiments.models"

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU}

INITS: dict[str, Callable[[torch.Tensor], None]] = {
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "uniform": lambda w: nn.init.uniform_(w, -0.1, 0.1),
    "normal": lambda w: nn.init.normal_(w, 0.0, 0.01)}


class Model(nn.Sequential):
    """nn.Sequential with the names of the layers kept dense by default."""

    def __init__(self, layers: dict[str, nn.Module], dense_layers: Sequence[str]):
        super().__init__(collections.OrderedDict(layers))
        self.dense_layers = tuple(dense_layers)


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"{_OWNER}: activation must be one of {', '.join(sorted(ACTIVATIONS))}, got {name!r}")
    return ACTIVATIONS[name]()


def _ints(option: str, value, length: int | None = None, minimum: int = 1) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * (length or 1)
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{_OWNER}: {option} must be an int or a non-empty list of ints, got {value!r}")
    for item in value:
        check_int(_OWNER, option, item, minimum)
    if length is not None and len(value) != length:
        raise ValueError(f"{_OWNER}: {option} needs {length} entries, got {len(value)}: {list(value)}")
    return list(value)


def _input_shape(name: str, input_shape, dims: int) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if len(shape) != dims or not all(isinstance(s, int) and s >= 1 for s in shape):
        form = "[C, L]" if dims == 2 else "[C, H, W]"
        raise ValueError(f"{_OWNER}: model {name!r} takes inputs shaped {form}, got input_shape {list(shape)}")
    return shape


def _flat_features(layers: dict[str, nn.Module], input_shape: Sequence[int], name: str) -> int:
    """The feature count after `layers` for one input, through a meta-device forward (no
    arithmetic); a shape the layers cannot take is an error naming the model."""
    probe = copy.deepcopy(nn.Sequential(collections.OrderedDict(layers))).to("meta")
    try:
        with torch.no_grad():
            out = probe(torch.empty(1, *input_shape, device="meta"))
    except RuntimeError as error:
        raise ValueError(f"{_OWNER}: model {name!r} cannot take inputs of shape {list(input_shape)} "
                         f"({error}); choose smaller kernels or add padding") from None
    return out[0].numel()


def mlp(input_shape, classes: int, *, hidden=(128, 128), activation: str = "relu") -> Model:
    features = 1
    for size in input_shape:
        features *= size
    widths = _ints("mlp option hidden", list(hidden)) if hidden else []
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    for i, width in enumerate(widths, 1):
        layers[f"fc{i}"], layers[f"act{i}"] = nn.Linear(features, width), _activation(activation)
        features = width
    layers["classifier"] = nn.Linear(features, classes)
    return Model(layers, ["classifier"])


def zoo_cnn(input_shape, classes: int, *, channels=(8, 6, 4), kernels=(5, 5, 2), hidden: int = 20,
            activation: str = "tanh", dropout: float = 0.0, padding: int = 0) -> Model:
    c, _, _ = _input_shape("zoo-cnn", input_shape, 3)
    channels, kernels = _ints("zoo-cnn option channels", channels, 3), _ints("zoo-cnn option kernels", kernels, 3)
    check_int(_OWNER, "zoo-cnn option hidden", hidden, 1)
    check_int(_OWNER, "zoo-cnn option padding", padding, 0)
    check_real(_OWNER, "zoo-cnn option dropout", dropout, "[0, 1)")
    layers: dict[str, nn.Module] = {}
    for i, (width, kernel) in enumerate(zip(channels, kernels), 1):
        layers[f"conv{i}"] = nn.Conv2d(c, width, kernel, padding=padding)
        if i < 3:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
        layers[f"act{i}"] = _activation(activation)
        if dropout:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        c = width
    layers["flatten"] = nn.Flatten()
    features = _flat_features(layers, input_shape, "zoo-cnn")
    layers["fc1"], layers["act4"] = nn.Linear(features, hidden), _activation(activation)
    if dropout:
        layers["drop4"] = nn.Dropout(dropout)
    layers["fc2"] = nn.Linear(hidden, classes)
    return Model(layers, ["conv1", "fc2"])


def cnn1d(input_shape, classes: int, *, channels=(32, 32, 32), kernels=(5, 3, 3), strides=(1, 2, 2),
          activation: str = "relu", dropout: float = 0.0) -> Model:
    c, _ = _input_shape("cnn1d", input_shape, 2)
    channels = _ints("cnn1d option channels", channels)
    kernels = _ints("cnn1d option kernels", kernels, len(channels))
    strides = _ints("cnn1d option strides", strides, len(channels))
    check_real(_OWNER, "cnn1d option dropout", dropout, "[0, 1)")
    layers: dict[str, nn.Module] = {"unflatten": nn.Unflatten(1, (c, 1))}
    for i, (width, kernel, stride) in enumerate(zip(channels, kernels, strides), 1):
        layers[f"conv{i}"] = nn.Conv2d(c, width, (1, kernel), stride=(1, stride), padding=(0, kernel // 2))
        layers[f"act{i}"] = _activation(activation)
        if dropout:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        c = width
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(_flat_features(layers, input_shape, "cnn1d"), classes)
    return Model(layers, ["conv1", "fc"])


def digits_cnn(input_shape, classes: int, *, channels=(16, 32), hidden: int = 128) -> Model:
    c, h, w = _input_shape("digits-cnn", input_shape, 3)
    if h % 2 or w % 2:
        raise ValueError(f"{_OWNER}: model 'digits-cnn' needs an even height and width (it max-pools by 2), got "
                         f"input_shape {list(input_shape)}")
    first, second = _ints("digits-cnn option channels", channels, 2)
    check_int(_OWNER, "digits-cnn option hidden", hidden, 1)
    return Model({
        "conv1": nn.Conv2d(c, first, 3, padding=1), "relu1": nn.ReLU(),
        "conv2": nn.Conv2d(first, second, 3, padding=1), "relu2": nn.ReLU(),
        "pool": nn.MaxPool2d(2), "flatten": nn.Flatten(),
        "fc1": nn.Linear(second * (h // 2) * (w // 2), hidden), "relu3": nn.ReLU(),
        "fc2": nn.Linear(hidden, classes)}, ["conv1", "fc2"])


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(input_shape, classes: int, *, depth: int = 8, width: int = 16) -> Model:
    c, _, _ = _input_shape("resnet", input_shape, 3)
    check_int(_OWNER, "resnet option depth", depth, 8)
    if (depth - 2) % 6:
        raise ValueError(f"{_OWNER}: resnet option depth must be 6n + 2 (8, 14, 20, 32, 56, ...), got {depth}")
    check_int(_OWNER, "resnet option width", width, 1)
    blocks = (depth - 2) // 6
    layers: dict[str, nn.Module] = {"stem": nn.Conv2d(c, width, 3, padding=1, bias=False),
                                    "stem_bn": nn.BatchNorm2d(width), "stem_relu": nn.ReLU()}
    inputs = width
    for stage in range(3):
        outputs = width * 2 ** stage
        layers[f"stage{stage + 1}"] = nn.Sequential(*[
            BasicBlock(inputs if i == 0 else outputs, outputs, 2 if stage and i == 0 else 1) for i in range(blocks)])
        inputs = outputs
    layers["pool"], layers["flatten"] = nn.AdaptiveAvgPool2d(1), nn.Flatten()
    layers["fc"] = nn.Linear(inputs, classes)
    return Model(layers, ["stem", "fc"])


_MODELS: dict[str, Callable[..., Model]] = {"mlp": mlp, "zoo-cnn": zoo_cnn, "cnn1d": cnn1d,
                                            "digits-cnn": digits_cnn, "resnet": resnet}


def available() -> list[str]:
    return sorted(_MODELS)


def check_options(name: str, options: dict) -> None:
    """Refuse an unknown model or option name."""
    if name not in _MODELS:
        raise ValueError(f"{_OWNER}: unknown model {name!r}; available: {', '.join(available())}")
    known = [p.name for p in inspect.signature(_MODELS[name]).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known) - {"init"})
    if unknown:
        raise TypeError(f"{_OWNER}: model {name!r} has no option(s) {', '.join(map(repr, unknown))}; its options are "
                        f"{', '.join(known + ['init'])}")


def build(name: str, *, input_shape: Sequence[int], classes: int, init: str | None = None, **options) -> Model:
    """Model `name` for inputs of `input_shape` (one example, no batch dimension) and
    `classes` outputs, with the model's `options` (see the module docstring)."""
    check_options(name, options)
    check_int(_OWNER, "classes", classes, 1)
    if init is not None and init not in INITS:
        raise ValueError(f"{_OWNER}: init must be None or one of {', '.join(sorted(INITS))}, got {init!r}")
    model = _MODELS[name](tuple(input_shape), classes, **options)
    if init is not None:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                INITS[init](module.weight.data)
                if module.bias is not None:
                    nn.init.zeros_(module.bias.data)
    return model
