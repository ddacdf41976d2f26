"""Two CPU processes under DistributedDataParallel (gloo): masks and weights stay identical on
every rank through training steps and mask updates."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest

from tests.nn import ddp_worker


def _spawned(rank, world_size, init_file, results):
    ddp_worker.run(rank, world_size, init_file, results[rank])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_masks_agree_across_ranks(tmp_path):
    results = [str(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    mp.spawn(_spawned, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    states = [torch.load(path, weights_only=True) for path in results]
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    for name in ("0.mask", "2.mask"):
        density = states[0][name].float().mean().item()
        assert abs(density - 0.2) < 0.01  # the updates kept the sparsity
