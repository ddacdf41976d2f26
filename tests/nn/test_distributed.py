"""Two CPU processes under DistributedDataParallel (gloo): masks and weights stay identical on
every rank through training steps and mask updates."""

import torch
import torch.distributed as dist
import pytest

from tests.nn import ddp_worker
from tests.helpers import run_on_ranks


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_masks_agree_across_ranks(tmp_path):
    states = run_on_ranks(ddp_worker.run, tmp_path)
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    for name in ("0.mask", "2.mask"):
        density = states[0][name].float().mean().item()
        assert abs(density - 0.2) < 0.01  # the updates kept the sparsity
