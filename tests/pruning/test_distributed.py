"""DPF on two CPU processes under DistributedDataParallel (gloo): identical masks and weights."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.pruning import ddp_worker


def _spawned(rank, world_size, init_file, results):
    ddp_worker.run(rank, world_size, init_file, results[rank])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_dpf_masks_agree_across_ranks(tmp_path):
    results = [str(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    mp.spawn(_spawned, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    states = [torch.load(path, weights_only=True) for path in results]
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    assert int(states[0]["updates"]) == 7  # step 0, then every 4 steps
    masks = [states[0]["0.mask"], states[0]["2.mask"]]
    kept = sum(int(mask.sum()) for mask in masks)
    assert kept == round(sum(mask.numel() for mask in masks) * 0.1)
