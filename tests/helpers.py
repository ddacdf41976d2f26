"""Helpers shared by the test modules."""

import pytest
import torch

from dynasparse import dispatch

CUDA = torch.cuda.is_available()


def backend_device_params(op: str):
    """(backend, device) pairs for every compiled backend, the GPU ones marked `gpu`; one
    that cannot run `op` here (e.g. no kernel of that backend for it) skips with the reason."""
    params = [pytest.param("cpu", "cpu", id="cpu")]
    if dispatch.status("triton").built:
        params.append(pytest.param("triton", "cpu", id="triton-interpreted",
                                   marks=pytest.mark.skipif(CUDA, reason="Triton runs compiled on this GPU machine")))
        params.append(pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu))
    params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu))
    return [_skip_where_unusable(param, op) for param in params]


def _skip_where_unusable(param, op: str):
    backend, device = param.values
    if device == "cuda" and not CUDA:
        return param  # the gpu marker skips it with its reason
    reason = dispatch._runs_on(backend, op, device)
    if reason is None:
        return param
    return pytest.param(backend, device, id=param.id,
                        marks=[*param.marks, pytest.mark.skip(reason=f"{backend} cannot run {op}: {reason}")])


def _generator(seed_or_generator) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(seed_or_generator)


def random_mask(shape, sparsity: float, generator, device="cpu") -> torch.Tensor:
    """Each element kept with probability 1 - sparsity (0 keeps all, 1 none), drawn on the CPU
    from `generator` (or a seed), so that a seed gives the same mask on every device."""
    return (torch.rand(shape, generator=_generator(generator)) >= sparsity).to(device)


def random_block_mask(n: int, k: int, block: int, sparsity: float, generator, *, inner_sparsity: float = 0.0,
                      device="cpu") -> torch.Tensor:
    """Whole block x block blocks kept with probability 1 - sparsity (edge blocks cut to
    [n, k]), then each element of a kept block cleared with probability inner_sparsity:
    block plans must handle masks that are not block-constant."""
    generator = _generator(generator)
    kept = torch.rand(-(-n // block), -(-k // block), generator=generator) >= sparsity
    mask = kept.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    if inner_sparsity:
        mask = mask & (torch.rand(n, k, generator=generator) >= inner_sparsity)
    return mask.to(device)


def poison_allocator(nbytes: int, device: str) -> None:
    """Leave a freed block full of 0xA5 where the next allocation of this size likely lands,
    so an output element a kernel forgets to write shows up as garbage, not as zero."""
    if nbytes:
        block = torch.full((nbytes,), 0xA5, dtype=torch.uint8, device=device)
        del block


def assert_close_to_float64(ours, torch_own, exact):
    """ours within twice torch's own error (same dtype) of the float64 result, plus a few ulps
    of the largest output. float64 results have float64 torch as their oracle, so there the
    bound is a summation-order difference: a few ulps of the largest output per 100 terms.
    The three may live on different devices (compared on the CPU)."""
    ours, torch_own, exact = ours.cpu(), torch_own.cpu(), exact.cpu().double()
    assert ours.shape == exact.shape, (list(ours.shape), list(exact.shape))
    assert torch.isfinite(ours).all(), "non-finite output"
    if exact.numel() == 0:
        return
    eps = torch.finfo(ours.dtype).eps
    scale = max(exact.abs().max().item(), 1.0)
    error = (ours.double() - exact).abs().max().item()
    if ours.dtype == torch.float64:
        assert error <= 64 * eps * scale, error
    else:
        torch_error = (torch_own.double() - exact).abs().max().item()
        assert error <= 2 * torch_error + 4 * eps * scale, (error, torch_error)


def _run_rank(rank: int, run, world_size: int, init_file: str, results: list[str]) -> None:
    run(rank, world_size, init_file, results[rank])


def run_on_ranks(run, tmp_path, world_size: int = 2) -> list[dict]:
    """Spawn `run(rank, world_size, init_file, result_file)` (a module-level function that
    saves a state dict to result_file) on `world_size` CPU processes; their saved states."""
    import torch.multiprocessing as mp

    results = [str(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    mp.spawn(_run_rank, args=(run, world_size, str(tmp_path / "init"), results), nprocs=world_size, join=True)
    return [torch.load(path, weights_only=True) for path in results]
