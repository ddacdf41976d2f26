"""The SparseProp peer in the nn benchmark cases: present only where it is installed, built on
the same pruned weights as the dense baseline and the dynasparse variants, and computing what
dense computes on w * m (the harness's output check and an independent float64 reference)."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

from dynasparse.bench import harness, nn_cases

CPU = torch.device("cpu")
QUICK_FWD_BWD = ("nn/linear1024-fwd-bwd-masked-b32-s0.9", "nn/conv3x3-32ch-8px-fwd-bwd-masked-b8-s0.9")
PEER_INSTALLED = importlib.util.find_spec("sparseprop") is not None
needs_peer = pytest.mark.skipif(not PEER_INSTALLED, reason="SparseProp is not installed (pip install sparseprop)")


def _cases(ids):
    registry = harness.load_cases()
    return [registry.select(pattern=f"^{case_id}$")[0] for case_id in ids]


@pytest.fixture
def without_peer(monkeypatch):
    """find_spec as on a machine without SparseProp (CI), for every other module unchanged."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "sparseprop" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_without_sparseprop_the_cases_run_with_the_dynasparse_variants_only(without_peer):
    cases = _cases(QUICK_FWD_BWD)
    for case in cases:
        assert set(case.build(CPU)[1]) == set(nn_cases.VARIANTS)
    report = harness.run(cases, device=CPU, target_s=0.01, repeats=2)
    for result in report.results:
        assert result.errors == {}, result.errors
        assert set(result.variants) == set(nn_cases.VARIANTS)


@needs_peer
def test_with_sparseprop_its_variants_run_beside_dynasparse_and_match_dense():
    linear, conv = _cases(QUICK_FWD_BWD)
    report = harness.run([linear, conv], device=CPU, target_s=0.01, repeats=2)
    linear_result, conv_result = report.results
    # An error here would also be the output check failing: the peer computing something else.
    assert linear_result.errors == {} and conv_result.errors == {}, (linear_result.errors, conv_result.errors)
    assert set(linear_result.variants) == {*nn_cases.VARIANTS, "sparseprop"}
    assert set(conv_result.variants) == {*nn_cases.VARIANTS, "sparseprop", "sparseprop-over-on"}


@needs_peer
def test_only_the_forward_and_backward_cases_carry_the_peer():
    for case in harness.load_cases().select(families=["nn"], quick=True):
        names = set(case.build(CPU)[1])
        assert ("sparseprop" in names) == (case.params["mode"] == "fwd-bwd-masked"), case.id


@needs_peer
def test_the_output_check_rejects_a_peer_that_drops_one_weight(monkeypatch):
    real_peer_layers = nn_cases._peer_layers

    def dropping_the_largest_weight(pruned, device):
        wrong = copy.deepcopy(pruned)
        with torch.no_grad():
            flat = wrong.weight.view(-1)
            flat[flat.abs().argmax()] = 0
        return real_peer_layers(wrong, device)

    monkeypatch.setattr(nn_cases, "_peer_layers", dropping_the_largest_weight)
    report = harness.run(_cases(QUICK_FWD_BWD), device=CPU, target_s=0.01, repeats=2)
    for result in report.results:
        peers = {name for name in result.errors if name.startswith("sparseprop")}
        assert peers and set(result.variants) == set(nn_cases.VARIANTS), (result.case.id, result.errors)
        for name in peers:
            assert "output differs from the baseline's" in result.errors[name]


@needs_peer
@pytest.mark.parametrize("over_on", [False, True])
def test_peer_conv_forward_and_gradients_equal_float64_dense_on_the_pruned_weights(over_on):
    generator = torch.Generator().manual_seed(13)
    in_channels, out_channels, spatial, batch = 5, 7, 11, 16  # odd sizes; batch a multiple of 8 (see nn_cases)
    dense = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    mask = torch.rand(dense.weight.shape, generator=generator) >= 0.9
    with torch.no_grad():
        dense.weight.copy_(torch.randn(dense.weight.shape, generator=generator) * mask)
        dense.bias.copy_(torch.randn(out_channels, generator=generator))
    peers = nn_cases._peer_layers(dense, CPU)
    peer = peers["sparseprop-over-on" if over_on else "sparseprop"]
    _assert_peer_matches_float64(peer, dense, torch.randn(batch, in_channels, spatial, spatial, generator=generator),
                                 mask, generator)


@needs_peer
def test_peer_linear_forward_and_gradients_equal_float64_dense_on_the_pruned_weights():
    generator = torch.Generator().manual_seed(14)
    dense = nn.Linear(37, 23)
    mask = torch.rand(dense.weight.shape, generator=generator) >= 0.9
    with torch.no_grad():
        dense.weight.copy_(torch.randn(dense.weight.shape, generator=generator) * mask)
    (peer,) = nn_cases._peer_layers(dense, CPU).values()
    _assert_peer_matches_float64(peer, dense, torch.randn(19, 37, generator=generator), mask, generator)


def _assert_peer_matches_float64(peer, dense, x, mask, generator):
    x = x.requires_grad_()
    output = peer(x)
    grad_output = torch.randn(output.shape, generator=generator)
    output.backward(grad_output)

    reference = nn.Sequential(dense).double()
    x64 = x.detach().double().requires_grad_()
    output64 = reference(x64)
    output64.backward(grad_output.double())
    # The peer keeps the nonzeros in row-major order of the dense weight.
    weight_grad64 = reference[0].weight.grad[mask & (reference[0].weight != 0)]

    for got, want in ((output, output64), (x.grad, x64.grad), (peer.weight.grad, weight_grad64),
                      (peer.bias.grad, reference[0].bias.grad)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
