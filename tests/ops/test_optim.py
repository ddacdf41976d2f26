"""Fused sgd_step / adamw_step on every backend against torch.optim (foreach=False) and float64.

Trajectory tolerance: over many steps on a gradient that depends on the weights, our distance
to a float64 torch.optim run is at most twice torch.optim's own fp32 distance to it (plus a
floor of 1e-6 relative to the weights' norm, for runs where torch's error is exactly zero).
Masked mode is compared with torch.optim on the masked gradient from a masked start, which
is what masked mode must equal in exact arithmetic; feedback mode with torch.optim on the
dense weights with the gradient taken at m * w.
"""

import zlib

import pytest
import torch

from dynasparse import checks, ops
from dynasparse.ops import optim as optim_ops
from dynasparse.reference import matmul as matmul_reference
from tests.helpers import CUDA, backend_device_params

BACKENDS = backend_device_params("sgd_step") + [pytest.param("reference", "cpu", id="reference")]
INTERPRETED = ("triton", "cpu")

SHAPES = [(37, 29), (1, 1), (1500,)]  # odd sizes: not multiples of any vector or block width
SGD_SETTINGS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.5),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(momentum=0.9, weight_decay=0.05, maximize=True),
    dict(momentum=0.0, weight_decay=0.05, maximize=True),
]
ADAMW_SETTINGS = [
    dict(),
    dict(betas=(0.8, 0.99), weight_decay=0.1),
    dict(betas=(0.3, 0.5)),  # 1 - beta1 >= 0.5: the other branch of torch's lerp
    dict(amsgrad=True),
    dict(amsgrad=True, maximize=True, weight_decay=0.0),
]
SETTINGS = [("sgd", s) for s in SGD_SETTINGS] + [("adamw", s) for s in ADAMW_SETTINGS]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_KEYS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def _id(setting):
    kind, hyper = setting
    return kind + "-" + ("-".join(f"{k}={v}" for k, v in hyper.items()) or "default")


class Problem:
    """A quadratic with fresh noise each step: grad(w) = c * (w - target) + noise_t, at w or m * w.

    With `follow_weights=False` the gradient is taken at the initial weights every step, so it
    is the same in every run: low-precision grads then round identically in all of them (with
    weight-dependent grads, runs a rounding apart would see bf16 grads an ulp apart, and the
    comparison would measure the bf16 lottery instead of the optimizer).
    """

    def __init__(self, seed, mode, maximize=False, shapes=SHAPES, follow_weights=True):
        generator = torch.Generator().manual_seed(seed)
        # Initial weights representable in fp32, so every run starts from the same point.
        self.initial = [torch.randn(s, generator=generator, dtype=torch.float64).float().double() for s in shapes]
        self.target = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
        self.curvature = [torch.rand(s, generator=generator, dtype=torch.float64) + 0.5 for s in shapes]
        self.masks = [torch.rand(s, generator=generator) < 0.6 for s in shapes] if mode != "dense" else None
        self.mode = mode
        self.sign = -1.0 if maximize else 1.0
        self.generator = generator
        self.follow_weights = follow_weights

    def noise(self, steps):
        return [[0.1 * torch.randn(t.shape, generator=self.generator, dtype=torch.float64) for t in self.target]
                for _ in range(steps)]

    def grads(self, weights, noise):
        grads = []
        for i, weight in enumerate(weights if self.follow_weights else self.initial):
            at = weight.double()
            if self.mode == "feedback":
                at = at * self.masks[i]
            grad = self.sign * (self.curvature[i] * (at - self.target[i]) + noise[i])
            grads.append(grad * self.masks[i] if self.mode == "masked" else grad)
        return grads


def torch_run(problem, kind, hyper, dtype, grad_dtype, noise):
    """torch.optim (foreach=False) in `dtype`, grads rounded through grad_dtype like ours."""
    start = [w.to(dtype) for w in problem.initial]
    if problem.mode == "masked":
        start = [w * m for w, m in zip(start, problem.masks)]
    params = [torch.nn.Parameter(w) for w in start]
    lr = 0.05 if kind == "sgd" else 0.01
    optimizer = (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(params, lr=lr, foreach=False, **hyper)
    for step_noise in noise:
        for param, grad in zip(params, problem.grads([p.detach() for p in params], step_noise)):
            param.grad = grad.to(grad_dtype).to(dtype)
        optimizer.step()
    states = [optimizer.state[p] for p in params]
    return [p.detach() for p in params], states


def our_run(problem, kind, hyper, grad_dtype, noise, backend, device, statistic="none", statistic_ema=None,
            record=None):
    params = [w.float().to(device) for w in problem.initial]
    n = len(params)
    masks = [m.to(device) for m in problem.masks] if problem.masks is not None else None
    feedback = [problem.mode == "feedback"] * n
    statistics = [torch.zeros_like(p) for p in params] if statistic != "none" else []
    hyper = dict(hyper)
    lr = 0.05 if kind == "sgd" else 0.01
    state = {}
    norms = None
    if kind == "sgd":
        state["momentum_buffer"] = [torch.zeros_like(p) for p in params] if hyper.get("momentum", 0.0) else []
    else:
        beta1, beta2 = hyper.pop("betas", (0.9, 0.999))
        hyper.update(beta1=beta1, beta2=beta2)
        state["exp_avg"] = [torch.zeros_like(p) for p in params]
        state["exp_avg_sq"] = [torch.zeros_like(p) for p in params]
        state["max_exp_avg_sq"] = [torch.zeros_like(p) for p in params] if hyper.get("amsgrad") else []
    for t, step_noise in enumerate(noise):
        grads = [g.to(grad_dtype).to(device) for g in problem.grads([p.cpu() for p in params], step_noise)]
        if record is not None:
            record.append(grads)
        if kind == "sgd":
            norms = ops.sgd_step(params, grads, state["momentum_buffer"], masks, feedback, statistics, lr=lr,
                                 first_step=t == 0, statistic=statistic, statistic_ema=statistic_ema,
                                 backend=backend, **hyper)
        else:
            norms = ops.adamw_step(params, grads, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"],
                                   masks, feedback, statistics, lr=lr, step=t + 1, statistic=statistic,
                                   statistic_ema=statistic_ema, backend=backend, **hyper)
    return params, state, statistics, norms


def assert_within_twice_torch_error(ours, torch32, torch64, what):
    ours, torch32, torch64 = ours.cpu().double(), torch32.double(), torch64.double()
    our_error = (ours - torch64).norm().item()
    torch_error = (torch32 - torch64).norm().item()
    floor = 1e-6 * max(torch64.norm().item(), 1e-3)
    assert our_error <= 2 * torch_error + floor, f"{what}: ours {our_error:.3g} vs torch {torch_error:.3g}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["dense", "masked", "feedback"])
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("setting", SETTINGS, ids=_id)
def test_trajectory_matches_torch_optim(backend, device, mode, grad_dtype, setting):
    kind, hyper = setting
    if (backend, device) == INTERPRETED and grad_dtype != torch.float32 and setting != SETTINGS[3]:
        pytest.skip("interpreted Triton: low-precision grads on one setting per optimizer keep the suite fast")
    steps = 12 if (backend, device) == INTERPRETED else 100
    problem = Problem(zlib.crc32(f"{kind}{hyper}{mode}{grad_dtype}".encode()), mode, hyper.get("maximize", False),
                      follow_weights=grad_dtype == torch.float32)
    noise = problem.noise(steps)
    ours, our_state, _, norms = our_run(problem, kind, hyper, grad_dtype, noise, backend, device)
    torch32, states32 = torch_run(problem, kind, hyper, torch.float32, grad_dtype, noise)
    torch64, states64 = torch_run(problem, kind, hyper, torch.float64, grad_dtype, noise)
    # Over all tensors at once: a one-element tensor alone makes the ratio a coin toss.
    flat = lambda tensors: torch.cat([t.cpu().double().flatten() for t in tensors])  # noqa: E731
    assert_within_twice_torch_error(flat(ours), flat(torch32), flat(torch64), "weights")
    for key in STATE_KEYS[kind]:
        if our_state.get(key):
            assert_within_twice_torch_error(flat(our_state[key]), flat(s[key] for s in states32),
                                            flat(s[key] for s in states64), key)
    for i in range(len(ours)):
        expected_norm = 0.0 if mode != "feedback" else (ours[i].cpu().double() * ~problem.masks[i]).norm().item()
        assert norms[i].item() == pytest.approx(expected_norm, rel=1e-6, abs=1e-30)
    if mode == "masked":
        for i, mask in enumerate(problem.masks):
            pruned = ~mask.to(device)
            assert (ours[i][pruned] == 0).all()
            for values in our_state.values():
                if values:
                    assert (values[i][pruned] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_masked_mode_zeroes_a_dense_start_and_keeps_it_zero(backend, device, kind):
    """Pruned weights and state non-zero on entry (a fresh mask on a trained dense layer), every
    resurrecting option on: after each step they are exactly +0.0, bit for bit."""
    generator = torch.Generator().manual_seed(5)
    shape = (33, 65)
    param = torch.randn(shape, generator=generator).to(device)
    mask = (torch.rand(shape, generator=generator) < 0.3).to(device)
    states = [torch.randn(shape, generator=generator).abs().to(device) for _ in range(3)]
    for step in range(1, 6):
        grad = torch.randn(shape, generator=generator).to(device)
        if kind == "sgd":
            norms = ops.sgd_step([param], [grad], [states[0]], [mask], [False], lr=0.1, momentum=0.9,
                                 weight_decay=0.1, nesterov=True, backend=backend)
            touched = states[:1]
        else:
            norms = ops.adamw_step([param], [grad], states[0:1], states[1:2], states[2:3], [mask], [False], lr=0.1,
                                   step=step, weight_decay=0.1, amsgrad=True, backend=backend)
            touched = states
        for tensor in (param, *touched):
            pruned = tensor[~mask]
            assert torch.equal(pruned.view(torch.int32), torch.zeros_like(pruned).view(torch.int32))
        assert (param[mask] != 0).all()
        assert norms.tolist() == [0.0]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("statistic", ["abs", "square"])
@pytest.mark.parametrize("statistic_ema", [None, 0.9])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_statistics_match_float64(backend, device, statistic, statistic_ema, kind):
    """f(grad) gathered at every position, pruned ones included, in one pass with the step."""
    steps = 6 if (backend, device) == INTERPRETED else 40
    problem = Problem(11, "feedback")
    noise = problem.noise(steps)
    hyper = dict(momentum=0.9) if kind == "sgd" else {}
    raw_grads = []
    _, _, statistics, _ = our_run(problem, kind, hyper, torch.bfloat16, noise, backend, device, statistic,
                                  statistic_ema, record=raw_grads)
    for i, buffer in enumerate(statistics):
        expected64 = torch.zeros_like(problem.initial[i])
        expected32 = torch.zeros_like(problem.initial[i]).float()
        for grads in raw_grads:
            grad = grads[i].cpu().double()
            value = grad.abs() if statistic == "abs" else grad.square()
            if statistic_ema is None:
                expected64 += value
                expected32 += value.float()
            else:
                expected64 = statistic_ema * expected64 + (1 - statistic_ema) * value
                expected32 = statistic_ema * expected32 + (1 - statistic_ema) * value.float()
        assert_within_twice_torch_error(buffer, expected32, expected64, f"statistic {i}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_error_norm_edge_masks_and_empty_tensors(backend, device, density):
    generator = torch.Generator().manual_seed(3)
    shapes = [(17, 3), (0,), (4, 0), (2049,)]
    params = [torch.randn(s, generator=generator).to(device) for s in shapes]
    grads = [torch.randn(s, generator=generator).to(device) for s in shapes]
    masks = [torch.full(s, density == 1.0, dtype=torch.bool, device=device) for s in shapes]
    norms = ops.sgd_step(params, grads, masks=masks, feedback=[True] * len(shapes), lr=0.5, backend=backend)
    expected = [0.0 if density == 1.0 else p.double().norm().item() for p in params]
    assert norms.device.type == device and norms.dtype == torch.float32
    assert norms.cpu().tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_error_norm_is_deterministic(backend, device):
    generator = torch.Generator().manual_seed(4)
    size = 50_000 if (backend, device) != INTERPRETED else 5_000
    base = torch.randn(size, generator=generator).to(device)
    grad = torch.randn(size, generator=generator).to(device)
    mask = (torch.rand(size, generator=generator) < 0.5).to(device)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        param = base.clone()
        results.append(ops.sgd_step([param], [grad], masks=[mask], feedback=[True], lr=0.1, backend=backend))
    torch.set_num_threads(2)
    assert torch.equal(results[0], results[1])
    assert results[0].item() == pytest.approx((param.double() * ~mask).norm().item(), rel=1e-6)


def _sgd_args(device, **overrides):
    generator = torch.Generator().manual_seed(0)
    args = dict(params=[torch.randn(4, 5, generator=generator).to(device)],
                grads=[torch.randn(4, 5, generator=generator).to(device)],
                momentum_buffers=[torch.zeros(4, 5, device=device)],
                masks=[torch.rand(4, 5, generator=generator).to(device) < 0.5], feedback=[False], statistics=[],
                lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                first_step=False, statistic="none", statistic_ema=None)
    args.update(overrides)
    return args


def _call_sgd(args, backend):
    args = dict(args)
    params, grads = args.pop("params"), args.pop("grads")
    positional = [args.pop(k) for k in ("momentum_buffers", "masks", "feedback", "statistics")]
    return ops.sgd_step(params, grads, *positional, backend=backend, **args)


BAD_SGD = [
    (lambda d: dict(params=[torch.zeros(4, 5, dtype=torch.int64, device=d)]), TypeError,
     r"params\[0\] must be torch.float32, got Long"),
    (lambda d: dict(params=[torch.zeros(4, 5, dtype=torch.float64, device=d)]), TypeError,
     r"params\[0\] must be torch.float32, got Double"),
    (lambda d: dict(params=[torch.zeros(5, 4, device=d).t()]), ValueError, r"params\[0\] must be contiguous"),
    (lambda d: dict(grads=[torch.zeros(4, 5, dtype=torch.int32, device=d)]), TypeError,
     r"grads\[0\] must be torch.float32, bfloat16 or float16, got Int"),
    (lambda d: dict(grads=[torch.zeros(5, 4, device=d)]), ValueError, r"grads\[0\] has shape \[5, 4\] but params"),
    (lambda d: dict(masks=[torch.ones(4, 5, device=d)]), TypeError, r"masks\[0\] must be torch.bool, got Float"),
    (lambda d: dict(masks=[torch.ones(4, 6, dtype=torch.bool, device=d)]), ValueError,
     r"masks\[0\] has shape \[4, 6\] but params\[0\] has shape \[4, 5\]"),
    (lambda d: dict(feedback=[False, True]), ValueError, "must have the same length, got 1, 1, 1 and 2"),
    (lambda d: dict(momentum_buffers=[]), ValueError,
     r"momentum_buffers must hold 1 tensors \(one per param when momentum != 0, else none\), got 0"),
    (lambda d: dict(momentum_buffers=[torch.zeros(4, 5, dtype=torch.bfloat16, device=d)]), TypeError,
     r"momentum_buffers\[0\] must be torch.float32, got BFloat16"),
    (lambda d: dict(statistic="fisher"), ValueError, "statistic must be 'none', 'abs' or 'square', got 'fisher'"),
    (lambda d: dict(statistic="abs"), ValueError, "statistics must hold 1 tensors"),
    (lambda d: dict(statistic="abs", statistics=[torch.zeros(4, 5, device=d)], statistic_ema=1.0), ValueError,
     r"statistic_ema must be in \[0, 1\)"),
    (lambda d: dict(nesterov=True, dampening=0.1), ValueError, "nesterov needs momentum > 0 and dampening == 0"),
    (lambda d: dict(lr=-1.0), ValueError, "lr must be >= 0"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad,error,message", BAD_SGD)
def test_sgd_rejects_bad_input_alike_on_every_backend(backend, device, bad, error, message):
    with pytest.raises(error, match=message):
        _call_sgd(_sgd_args(device, **bad(device)), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("overrides,message", [
    (dict(amsgrad=True), r"max_exp_avg_sqs must hold 1 tensors \(one per param when amsgrad, else none\), got 0"),
    (dict(step=0), r"step \(the count including this one\) must be >= 1, got 0"),
    (dict(beta1=1.0), r"betas must be in \[0, 1\)"),
    (dict(exp_avgs=[]), r"exp_avgs must hold 1 tensors \(one per param\), got 0"),
])
def test_adamw_rejects_bad_input_alike_on_every_backend(backend, device, overrides, message):
    args = dict(exp_avgs=[torch.zeros(3, device=device)], exp_avg_sqs=[torch.zeros(3, device=device)], lr=0.1,
                step=1)
    args.update(overrides)
    with pytest.raises(ValueError, match=message):
        ops.adamw_step([torch.zeros(3, device=device)], [torch.zeros(3, device=device)], args.pop("exp_avgs"),
                       args.pop("exp_avg_sqs"), backend=backend, **args)


def test_params_on_two_devices_or_empty_lists():
    assert ops.sgd_step([], [], lr=0.1).numel() == 0
    if CUDA:
        with pytest.raises(ValueError, match="all params must be on one device"):
            ops.sgd_step([torch.zeros(2), torch.zeros(2, device="cuda")], [torch.zeros(2)] * 2, lr=0.1)


def _opcheck_args(kind, device):
    generator = torch.Generator().manual_seed(9)
    shapes = [(6, 7), (13,)]
    params = [torch.randn(s, generator=generator).to(device) for s in shapes]
    grads = [torch.randn(s, generator=generator).to(device).to(dtype) for s, dtype in
             zip(shapes, (torch.float32, torch.bfloat16))]
    masks = [(torch.rand(shapes[0], generator=generator) < 0.5).to(device), None]
    statistics = [torch.zeros(s, device=device) for s in shapes]
    state = [torch.rand(s, generator=generator).to(device) for s in shapes]
    row_ptr, cols = ops.plan_panels(masks[0], 4, backend="reference")
    packing = ([0], [torch.zeros(cols.numel(), device=device)], [row_ptr], [cols], [4])
    if kind == "sgd":
        return (params, grads, state, masks, [True, False], statistics, 0.1, 0.9, 0.0, 0.01, True, False, False,
                "abs", 0.5, *packing)
    return (params, grads, state, [s.clone() for s in state], [s.clone() for s in state], masks, [False, False],
            statistics, 0.1, 0.9, 0.999, 1e-8, 0.01, 3, True, True, "square", None, *packing)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_opcheck_every_overload(kind, device):
    op = optim_ops._sgd if kind == "sgd" else optim_ops._adamw
    overloads = op.overloads()
    assert overloads[0].name() == f"dynasparse::{kind}_step"
    for overload in overloads:
        torch.library.opcheck(overload, _opcheck_args(kind, device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_compiles_fullgraph(backend, device):
    torch._dynamo.reset()
    args = _opcheck_args("sgd", device)
    eager = [[t.clone() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else a
             for a in args]

    _, packed_values, row_ptrs, cols, panels = args[-5:]

    def step(params, grads, buffers, masks, statistics, values):
        return ops.sgd_step(params, grads, buffers, masks, [True, False], statistics, lr=0.1, momentum=0.9,
                            weight_decay=0.01, nesterov=True, statistic="abs", statistic_ema=0.5,
                            packed={0: (values, row_ptrs[0], cols[0], panels[0])}, backend=backend)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    norms = compiled(args[0], args[1], args[2], args[3], args[5], packed_values[0])
    expected = step(eager[0], eager[1], eager[2], eager[3], eager[5], eager[-4][0])
    # The kernels are opaque to the compiler: bit for bit. The reference is plain torch that
    # inductor fuses, which may round differently.
    same = torch.equal if backend != "reference" else lambda a, b: torch.testing.assert_close(a, b) is None
    assert same(norms, expected)
    for ours, theirs in zip(args[0] + args[2] + args[5] + packed_values, eager[0] + eager[2] + eager[5] + eager[-4]):
        assert same(ours, theirs)
    assert torch.equal(packed_values[0], matmul_reference.pack_panels(args[0][0], row_ptrs[0], cols[0], panels[0]))


@pytest.mark.gpu
def test_cuda_kernels_run_on_the_current_stream():
    """Grads produced on a side stream, no sync before the step: a step on the default stream
    would read them before they are written."""
    side = torch.cuda.Stream()
    generator = torch.Generator(device="cuda").manual_seed(4)
    with torch.cuda.stream(side):
        big = torch.randn(2048, 2048, device="cuda", generator=generator)
        for _ in range(8):
            big = big @ big.T / 45
        grad = big[:512].contiguous()
        mask = grad > 0
        for backend in ("cuda", "triton"):
            param = torch.ones_like(grad)
            ops.sgd_step([param], [grad], masks=[mask], feedback=[False], lr=1.0, backend=backend)
            assert torch.equal(param, torch.where(mask, 1.0 - grad, 0.0)), backend
    side.synchronize()


def test_bias_correction_uses_the_step():
    """adamw_step's step argument drives the bias correction: step 1 moves each weight by lr."""
    param = torch.zeros(5)
    grad = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.5])
    ops.adamw_step([param], [grad], [torch.zeros(5)], [torch.zeros(5)], lr=0.1, step=1, eps=0.0, weight_decay=0.0)
    assert torch.allclose(param, -0.1 * grad.sign(), rtol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_steps_bump_the_version_counters_of_what_they_write(backend, device):
    # Caches keyed on version counters (a sparse layer's packed values) must see every step,
    # also when a kernel writes through data pointers.
    param, grad = torch.randn(40, device=device), torch.randn(40, device=device)
    buffer, exp_avg, exp_avg_sq = (torch.zeros(40, device=device) for _ in range(3))
    before = (param._version, buffer._version)
    ops.sgd_step([param], [grad], [buffer], lr=0.1, momentum=0.9, first_step=True, backend=backend)
    assert param._version > before[0] and buffer._version > before[1]
    before = (param._version, exp_avg._version, exp_avg_sq._version)
    ops.adamw_step([param], [grad], [exp_avg], [exp_avg_sq], lr=0.1, step=1, backend=backend)
    assert all(after > old for after, old in zip((param._version, exp_avg._version, exp_avg_sq._version), before))


# Packed values for the masked matmul, written by the step ----------------------------------

PACKED_SHAPES = [((37, 301), 64), ((5, 3, 3, 3), 256), ((3, 20000), 256), ((4, 9), 2), ((0, 6), 4)]


def _packed_case(device, generator):
    """Params with packed values (odd shapes, a conv weight, rows longer than a CPU span, panels
    narrower than a row, an empty one), plus a packed param with an all-zero mask, a masked one
    without packing and a dense one."""
    params, masks, packed = [], [], {}
    for shape, panel in PACKED_SHAPES + [((6, 10), 4)]:
        params.append(torch.randn(shape, generator=generator).to(device))
        density = 0.0 if len(params) == len(PACKED_SHAPES) + 1 else 0.3
        masks.append((torch.rand(shape, generator=generator) < density).to(device))
        row_ptr, cols = ops.plan_panels(masks[-1].view(checks.packed_matrix_shape(masks[-1])), panel,
                                        backend="reference")
        values = torch.full((cols.numel(),), float("nan"), device=device)  # every entry must be written
        packed[len(params) - 1] = (values, row_ptr.to(device), cols.to(device), panel)
    params += [torch.randn(7, 11, generator=generator).to(device), torch.randn(13, generator=generator).to(device)]
    masks += [(torch.rand(7, 11, generator=generator) < 0.5).to(device), None]
    return params, masks, packed


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["masked", "feedback"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_step_writes_the_packed_values_of_the_updated_weights(kind, mode, backend, device):
    generator = torch.Generator().manual_seed(zlib.crc32(f"{kind}{mode}{backend}".encode()))
    params, masks, packed = _packed_case(device, generator)
    unpacked = [p.clone() for p in params]
    feedback = [mode == "feedback" and m is not None for m in masks]

    def state():
        return [torch.zeros_like(p) for p in params]

    states, states_unpacked = (state(), state(), state()), (state(), state(), state())
    for step in range(1, 4):
        grads = [torch.randn(p.shape, generator=generator).to(device) for p in params]
        for run_params, run_states, run_packed in [(params, states, packed), (unpacked, states_unpacked, None)]:
            if kind == "sgd":
                ops.sgd_step(run_params, grads, run_states[0], masks, feedback, lr=0.1, momentum=0.9,
                             weight_decay=0.01, nesterov=True, first_step=step == 1, packed=run_packed,
                             backend=backend)
            else:
                ops.adamw_step(run_params, grads, run_states[0], run_states[1], run_states[2], masks, feedback,
                               lr=0.01, step=step, amsgrad=True, packed=run_packed, backend=backend)
        # Packing changes nothing else the step writes...
        for ours, plain in zip(params + [t for s in states for t in s], unpacked + [t for s in states_unpacked for t in s]):
            assert torch.equal(ours, plain)
        # ...and the packed values are the updated weights at the plan's nonzeros, bit for bit.
        for i, (values, row_ptr, cols, panel) in packed.items():
            weight = params[i].view(checks.packed_matrix_shape(params[i])).cpu()
            expected = matmul_reference.pack_panels(weight, row_ptr.cpu(), cols.cpu(), panel)
            assert torch.equal(values.cpu(), expected), (i, step)


BAD_PACKING = [
    (lambda p: dict(packed_params=[0, 0]), "listed twice in packed_params"),
    (lambda p: dict(packed_params=[3]), r"packed_params\[0\] = 3 is not the index of a param \(there are 2\)"),
    (lambda p: dict(packed_params=[1]), r"params\[1\] has packed values but no mask"),
    (lambda p: dict(packed_panels=[8]), "a plan built for another shape or panel width"),
    (lambda p: dict(packed_values=[p["packed_values"][0].double()]), r"packed_values\[0\] must be torch.float32"),
    (lambda p: dict(packed_values=[p["packed_values"][0][1:]]), "one entry per plan nonzero"),
    (lambda p: dict(packed_row_ptrs=[p["packed_row_ptrs"][0].int()]), "row_ptr must be Long"),
    (lambda p: dict(packed_cols=[]), "must have the same length"),
]


@pytest.mark.parametrize("case", range(len(BAD_PACKING)))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_packing_is_rejected_alike_on_every_backend(case, backend, device):
    overrides, message = BAD_PACKING[case]
    mask = torch.rand(6, 7) < 0.5
    row_ptr, cols = ops.plan_panels(mask, 4, backend="reference")
    packing = dict(packed_params=[0, 0][:1], packed_values=[torch.zeros(cols.numel(), device=device)],
                   packed_row_ptrs=[row_ptr.to(device)], packed_cols=[cols.to(device)], packed_panels=[4])
    duplicated = overrides(packing)
    if duplicated.get("packed_params") == [0, 0]:
        packing = {key: value * 2 for key, value in packing.items()}
    packing.update(duplicated)
    params = [torch.zeros(6, 7, device=device), torch.zeros(3, device=device)]
    exception = TypeError if "must be torch.float32" in message or "must be Long" in message else ValueError
    with pytest.raises(exception, match=message):
        optim_ops._sgd(params, [torch.zeros_like(p) for p in params], [], [mask.to(device), None], [False, False],
                       [], 0.1, 0.0, 0.0, 0.0, False, False, False, "none", None, *packing.values(),
                       backend=backend)
