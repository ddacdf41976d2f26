"""One rank of the 2-process DistributedDataParallel test (tests/nn/test_distributed.py)."""

import torch
import torch.distributed as dist
from torch import nn

import dynasparse
import dynasparse.optim
from dynasparse.nn import sparse_masks
from dynasparse.nn.modules import magnitude_mask


def run(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(100 + rank)  # different weights per rank: DDP must synchronize them
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    dynasparse.sparsify(model, 0.8, grad_mode="feedback")
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = dynasparse.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, masks=sparse_masks(model))
    generator = torch.Generator().manual_seed(rank)
    for step in range(6):
        optimizer.zero_grad()
        x = torch.randn(16, 20, generator=generator)  # different data per rank
        ddp(x).square().mean().backward()
        optimizer.step()
        if step % 2 == 1:  # a mask update from the synchronized dense weights (DPF-style)
            for layer in (model[0], model[2]):
                layer.set_mask(magnitude_mask(layer.weight, 0.8, "unstructured"))
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    torch.save(state, result_file)
    dist.destroy_process_group()
