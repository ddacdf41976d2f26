"""RigL, SET, SNIP and DNW on two CPU processes under DistributedDataParallel (gloo): both ranks
hold identical masks after every update, and identical weights."""

import pytest
import torch
import torch.distributed as dist

from tests.helpers import run_on_ranks
from tests.pruning import ddp_worker


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_masks_agree_across_ranks_after_every_update(tmp_path):
    states = run_on_ranks(ddp_worker.run_algorithms, tmp_path)
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    updates = {name: sorted({int(key.split("/")[1]) for key in states[0] if key.startswith(name + "/")
                             and key.split("/")[1].isdigit()}) for name in ddp_worker.ALGORITHMS}
    assert updates == {"rigl": [0, 4, 8, 12], "set": [0, 4, 8, 12], "snip": [0], "dnw": list(range(13))}
    assert int(states[0]["rigl/dense_gradient_steps"]) == 3 and int(states[0]["set/dense_gradient_steps"]) == 0
    # the masks moved: the test compares real updates, not the initial masks only
    assert not torch.equal(states[0]["rigl/4/0"], states[0]["rigl/12/0"])
    assert not torch.equal(states[0]["dnw/1/2"], states[0]["dnw/12/2"])
