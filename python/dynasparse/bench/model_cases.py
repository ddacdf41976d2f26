"""Benchmark cases of whole models, registered on import: the models users train, sparsified
by `dynasparse.sparsify` against the same dense model in the same run.

Models: the ResNet-style CIFAR net (`experiments.models.resnet`, depth 8, width 64: stages of
64, 128 and 256 channels, 32 x 32 inputs, batch 32), the digits CNN (8 x 8 inputs, batch 64),
the demo's 1-D CNN (`experiments.models.cnn1d` on MNIST-1D's 40 samples, batch 64),
and with transformers installed BERT-base width and GPT-2 small width with 4 layers each
(batch 8 x 128 tokens). Every layer sparsify converts is pruned by magnitude, except the
first convolution and the classifier of the CNNs (their `dense_layers`).

Modes: "inference" (forward under no_grad, eval mode) and "train" (one step in train mode:
zero_grad, forward, backward of the mean square of the output, SGD with momentum: torch's
foreach SGD for the dense model, `dynasparse.optim.SGD` with the masks for the sparse ones).
Variants: "dynasparse" (the layers pinned to the kernels, backend="sparse") and
"dynasparse-auto" (backend="auto": each layer call the faster of the kernels and dense on
w * m, measured during the harness's warm-up). Outputs differ from the dense model's by
design (pruned weights); only shapes are checked.
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from torch import nn

from dynasparse import optim as sparse_optim
from dynasparse.experiments import models
from dynasparse.nn import sparse_masks, sparsify

from .harness import Case, register

VARIANTS = {"dynasparse": "sparse", "dynasparse-auto": "auto"}
SPARSITIES = (0.8, 0.9, 0.95)
LAYOUTS = ("unstructured", "block16")
TOKENS = (8, 128)  # batch, sequence length of the transformer cases


def _cnn(name: str):
    if name == "resnet":
        return models.resnet((3, 32, 32), 10, depth=8, width=64), torch.randn(32, 3, 32, 32)
    if name == "cnn1d":
        return models.cnn1d((1, 40), 10), torch.randn(64, 1, 40)
    return models.digits_cnn((1, 8, 8), 10), torch.randn(64, 1, 8, 8)


def _transformer(name: str):
    import transformers

    if name == "bert4":
        config = transformers.BertConfig(num_hidden_layers=4)
        model = transformers.BertModel(config, add_pooling_layer=False)
    else:
        config = transformers.GPT2Config(n_layer=4)
        model = transformers.GPT2Model(config)
    return model, torch.randint(0, config.vocab_size, TOKENS)


def _output(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result[0]


def model_workload(device: torch.device, model: str, mode: str, sparsity: float, layout: str):
    torch.manual_seed(0)
    dense, x = _transformer(model) if model in ("bert4", "gpt2-4") else _cnn(model)
    dense, x = dense.to(device), x.to(device)
    exclude = list(getattr(dense, "dense_layers", ()))
    sparse = {}
    for variant, backend in VARIANTS.items():
        copy_ = copy.deepcopy(dense)
        sparsify(copy_, sparsity, layout=layout, exclude=exclude, backend=backend)
        sparse[variant] = copy_
    if mode == "inference":
        def run(module):
            module.eval()

            @torch.no_grad()
            def forward():
                return _output(module(x))
            return forward

        return run(dense), {variant: run(module) for variant, module in sparse.items()}

    def step(module, optimizer):
        module.train()

        def run():
            optimizer.zero_grad()
            _output(module(x)).float().square().mean().backward()
            optimizer.step()
        return run

    dense_step = step(dense, torch.optim.SGD(dense.parameters(), lr=1e-4, momentum=0.9, foreach=True))
    return dense_step, {variant: step(module, sparse_optim.SGD(module.parameters(), lr=1e-4, momentum=0.9,
                                                               masks=sparse_masks(module)))
                        for variant, module in sparse.items()}


def _same_shape(output, expected):
    assert output.shape == expected.shape and output.dtype == expected.dtype


def _register() -> None:
    names = ["resnet", "digits-cnn", "cnn1d"]
    if importlib.util.find_spec("transformers") is not None:
        names += ["bert4", "gpt2-4"]
    for model in names:
        for mode in ("inference", "train"):
            for layout in LAYOUTS:
                for sparsity in SPARSITIES:
                    quick = model == "digits-cnn" and layout == "unstructured" and sparsity == 0.9
                    params = {"model": model, "mode": mode, "sparsity": sparsity, "layout": layout}
                    register(Case("models", f"{model}-{mode}-{layout}-s{sparsity}", params, model_workload,
                                  quick=quick, check=_same_shape if mode == "inference" else None))


_register()
