"""One rank of the 2-process DPF test under DistributedDataParallel (tests/pruning/test_distributed.py)."""

import torch
import torch.distributed as dist
from torch import nn

from dynasparse import optim, pruning


def run(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(200 + rank)  # different initial weights per rank: DDP broadcasts rank 0's
    model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))
    pruner = pruning.DPF(model, 0.9, 24, ramp_end=0.5, update_every=4, exclude=["4"])
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    pruner.attach(optimizer)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(24):
        optimizer.zero_grad()
        x = torch.randn(16, 20, generator=generator)  # different data per rank
        ddp(x).square().mean().backward()
        optimizer.step()
        pruner.step()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["reactivated"] = torch.tensor(pruner.report().reactivated_fraction)
    state["updates"] = torch.tensor(len(pruner.history))
    torch.save(state, result_file)
    dist.destroy_process_group()


ALGORITHMS = {"rigl": {"total_steps": 16, "update_every": 4}, "set": {"total_steps": 16, "update_every": 4},
              "snip": {}, "dnw": {}}


def run_algorithms(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    """RigL, SET, SNIP and DNW in turn under DDP; every rank records its masks after every update.
    Ranks start from different weights and see different data (SNIP calibrates on its own batch),
    and DDP does not broadcast buffers, so only the pruner keeps the masks equal."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    state = {}
    for name, options in ALGORITHMS.items():
        torch.manual_seed(300 + rank)
        model = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))
        pruner = pruning.create(name, model, sparsity=0.8, exclude=["4"], **options)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        generator = torch.Generator().manual_seed(rank)
        updates = []
        pruner.on_update(lambda step, masks: updates.append((step, {n: m.clone() for n, m in masks.items()})))
        if pruner.needs_data:
            pruner.calibrate([(torch.randn(16, 20, generator=generator), torch.randint(0, 5, (16,),
                                                                                    generator=generator))])
        optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner.attach(optimizer)
        for _ in range(12):
            optimizer.zero_grad()
            ddp(torch.randn(16, 20, generator=generator)).square().mean().backward()
            optimizer.step()
            pruner.step()
        for step, masks in updates:
            for layer, mask in masks.items():
                state[f"{name}/{step}/{layer}"] = mask
                # the installed masks are the synchronized ones
                assert step != updates[-1][0] or torch.equal(pruner.layers[layer].mask, mask)
        state[f"{name}/dense_gradient_steps"] = torch.tensor(pruner.report().dense_gradient_steps)
        state[f"{name}/weights"] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(state, result_file)
    dist.destroy_process_group()
