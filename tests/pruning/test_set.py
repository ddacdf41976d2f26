"""SET: RigL's drop, regrowth at random among the weights inactive before the drop (the pruner's
seeded draws, replayed in the test), never a dense gradient, seeded."""

import math

import torch

from tests.pruning.tiny import build, masks_of, topk_reference, train


def test_set_drops_by_magnitude_and_regrows_the_seeded_draws():
    steps, every = 24, 4
    model, optimizer, pruner = build("set", 3, sparsity=0.7, total_steps=steps, update_every=every, seed=11)
    end = round(0.75 * steps)
    seen = {}

    def before(step):
        seen.update(masks=masks_of(pruner), generator=pruner.generator.get_state(),
                    weights={name: layer.weight.detach().clone() for name, layer in pruner.layers.items()},
                    grads={name: layer.weight.grad.clone() for name, layer in pruner.layers.items()})

    def after(step):
        for name, layer in pruner.layers.items():
            assert layer.weight_grad is None
            assert bool((seen["grads"][name][~seen["masks"][name]] == 0).all())  # nonzero-only, always
        if not (step % every == 0 and step <= end):
            assert all(torch.equal(layer.mask, seen["masks"][name]) for name, layer in pruner.layers.items())
            return
        fraction = 0.3 / 2 * (1 + math.cos(math.pi * step / end))
        replay = torch.Generator()
        replay.set_state(seen["generator"])
        for name, layer in pruner.layers.items():  # the pruner draws one tensor per layer, in layer order
            draws = torch.rand(layer.weight.shape, generator=replay)
            old = seen["masks"][name]
            active = int(old.sum())
            k = min(round(fraction * active), old.numel() - active)
            expected = topk_reference(seen["weights"][name].abs(), active - k, old) | topk_reference(draws, k, ~old)
            assert torch.equal(layer.mask, expected), (name, step)
            grown = layer.mask & ~old
            assert bool((layer.weight[grown] == 0).all())
            assert bool((optimizer.state[layer.weight]["momentum_buffer"][grown] == 0).all())

    train(model, optimizer, pruner, steps, before_step=before, after_step=after)
    assert pruner.report().dense_gradient_steps == 0
    assert len(pruner.history) == 1 + end // every


def test_set_is_seeded():
    def final_masks(seed):
        model, optimizer, pruner = build("set", 4, total_steps=16, update_every=4, seed=seed)
        train(model, optimizer, pruner, 12)
        return masks_of(pruner)

    first, again, other = final_masks(1), final_masks(1), final_masks(2)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)
