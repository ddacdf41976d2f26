"""DPF on two CPU processes under DistributedDataParallel (gloo): identical masks and weights."""

import pytest
import torch
import torch.distributed as dist

from tests.pruning import ddp_worker
from tests.helpers import run_on_ranks


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_dpf_masks_agree_across_ranks(tmp_path):
    states = run_on_ranks(ddp_worker.run, tmp_path)
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    assert int(states[0]["updates"]) == 7  # step 0, then every 4 steps
    masks = [states[0]["0.mask"], states[0]["2.mask"]]
    kept = sum(int(mask.sum()) for mask in masks)
    assert kept == round(sum(mask.numel() for mask in masks) * 0.1)
