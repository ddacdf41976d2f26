"""IMP: rounds prune 20% of the remaining weights by global |w| (float64 reference) and rewind
every parameter to the rewind point (initialization or step k); the point is in state_dict."""

import pytest
import torch

from dynasparse import pruning
from tests.pruning.tiny import build, global_topk_reference, tiny_model, train


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_imp_prunes_a_fifth_of_the_remaining_and_rewinds(rewind_step):
    # sparsity 0.5: 0.8**3 = 0.512 > 0.5, so 4 rounds, the last one exactly at 0.5
    model, optimizer, pruner = build("imp", 10, sparsity=0.5, total_steps=50, rewind_step=rewind_step)
    assert (pruner.rounds, pruner.round_steps) == (4, 10)
    total = sum(layer.mask.numel() for layer in pruner.layers.values())
    point, seen, rounds = {}, {}, []

    def before(step):
        if step == rewind_step:
            point.update({name: p.detach().clone() for name, p in model.named_parameters()})
        seen.update({name: (layer.mask.clone(), layer.weight.detach().clone())
                     for name, layer in pruner.layers.items()})

    def after(step):
        if step % 10 or step > 40:
            assert all(torch.equal(layer.mask, seen[name][0]) for name, layer in pruner.layers.items())
            return
        done = step // 10
        keep = round(total * (0.8 ** done if done < 4 else 0.5))
        names = list(pruner.layers)
        expected = global_topk_reference([seen[name][1].abs() for name in names], keep,
                                         [seen[name][0] for name in names])
        for name, mask in zip(names, expected):
            assert torch.equal(pruner.layers[name].mask, mask), (name, step)
        for name, param in model.named_parameters():
            layer = pruner.layers.get(name.rsplit(".", 1)[0]) if name.endswith("weight") else None
            reference = point[name] if layer is None else torch.where(layer.mask, point[name], 0)
            assert torch.equal(param.detach(), reference), (name, step)
            state = optimizer.state.get(param, {}).get("momentum_buffer")
            assert state is None or bool((state == 0).all())
        assert pruner.report().notes["round"] == done
        rounds.append(step)

    if rewind_step == 0:
        point.update({name: p.detach().clone() for name, p in model.named_parameters()})
    train(model, optimizer, pruner, 50, before_step=before, after_step=after)
    assert rounds == [10, 20, 30, 40]
    assert pruner.report().sparsity == pytest.approx(1 - round(total * 0.5) / total)
    saved = pruner.state_dict()["extra"]["rewind_point"]
    assert all(torch.equal(saved[name], point[name]) for name in point)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"total_steps": None}, ValueError, "give total_steps .* or round_steps"),
    ({"total_steps": 3}, ValueError, "shorter than the 4 rounds"),
    ({"round_steps": 5, "rewind_step": 5}, ValueError, "rewind_step .5. must come before the first prune"),
    ({"prune_fraction": 1.0}, ValueError, r"prune_fraction must be a number in \(0, 1\)"),
    ({"round_steps": 0}, ValueError, "round_steps must be >= 1"),
])
def test_imp_arguments(kwargs, error, message):
    spec = {"sparsity": 0.4, "total_steps": 100, **kwargs}
    with pytest.raises(error, match=message):
        pruning.create("imp", tiny_model(), **spec)
