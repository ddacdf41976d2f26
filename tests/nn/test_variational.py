"""Sparse variational dropout layers (dynasparse.nn.variational) against float64 references of
Molchanov et al.'s formulas: the local reparameterization trick's mean and variance, the KL
approximation, the threshold, the eval forward and its plain sparse layer, gradients, resume."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynasparse.optim
from dynasparse.nn import SparseConv1d, SparseConv2d, SparseLinear
from dynasparse.nn.variational import VDConv1d, VDConv2d, VDLinear

K1, K2, K3 = 0.63576, 1.87320, 1.48695
# Samples per output of the Monte-Carlo checks, and the bound in standard errors: a fresh
# seed fails a 6-sigma bound on one of a few hundred outputs with probability below 1e-6.
SAMPLES = 4000
SIGMAS = 6.0


def reference_log_alpha(theta, log_sigma2):
    return (log_sigma2.double() - 2 * torch.log(theta.double().abs() + 1e-8)).clamp(-10, 10)


def spread_log_alpha(layer, low=-6.0, high=6.0):
    """log_sigma2 drawn so that log_alpha spans [low, high] (some weights above the threshold 3)."""
    with torch.no_grad():
        target = torch.empty_like(layer.weight).uniform_(low, high)
        layer.log_sigma2.copy_(target + 2 * torch.log(layer.weight.abs() + 1e-8))


def reference_moments(x, theta, log_sigma2, bias, mask, product):
    """Float64 mean and variance of the LRT output: product(x, theta * m) + b and
    product(x * x, alpha * theta**2 * m) + 1e-8."""
    x, theta = x.double(), theta.double()
    alpha = torch.exp(reference_log_alpha(theta, log_sigma2))
    mean = product(x, torch.where(mask, theta, 0), None if bias is None else bias.double())
    var = product(x * x, torch.where(mask, alpha * theta ** 2, 0), None) + 1e-8
    return mean, var


def check_moments(samples, mean, var):
    """Sample mean and variance (over dim 0) within SIGMAS standard errors of the exact ones."""
    n = samples.shape[0]
    samples = samples.double()
    sample_mean = samples.mean(0)
    sample_var = samples.var(0)
    assert ((sample_mean - mean).abs() <= SIGMAS * torch.sqrt(var / n) + 1e-5).all()
    # The sample variance of a Gaussian has standard deviation var * sqrt(2 / (n - 1)).
    assert ((sample_var - var).abs() <= SIGMAS * var * math.sqrt(2 / (n - 1)) + 1e-6).all()


def weight_noise_moments(x, theta, log_sigma2, bias, mask, product, draws=4000):
    """A Monte-Carlo reference of the same moments without the trick: weights sampled from
    N(theta, alpha * theta**2) (masked), the product taken with each draw, in float64."""
    theta = theta.double()
    std = torch.sqrt(torch.exp(reference_log_alpha(theta, log_sigma2)) * theta ** 2)
    outs = []
    for _ in range(draws // 200):
        weights = theta + std * torch.randn(200, *theta.shape, dtype=torch.float64)
        outs.append(torch.stack([product(x.double(), torch.where(mask, w, 0), None if bias is None else bias.double())
                                 for w in weights]))
    outs = torch.cat(outs)
    return outs.mean(0), outs.var(0)


def linear(x, w, b):
    return F.linear(x, w, b)


@pytest.mark.parametrize("grad_mode", ["masked", "feedback"])
def test_linear_training_forward_matches_the_lrt_moments(grad_mode):
    torch.manual_seed(0)
    layer = VDLinear(13, 9, grad_mode=grad_mode)
    spread_log_alpha(layer)
    layer.refresh_mask()
    assert 0 < layer.sparsity < 1
    x = torch.randn(3, 13)
    mean, var = reference_moments(x, layer.weight.detach(), layer.log_sigma2.detach(), layer.bias.detach(),
                                  layer.mask, linear)
    with torch.no_grad():
        samples = layer(x.repeat(SAMPLES, 1)).reshape(SAMPLES, 3, 9)
    check_moments(samples, mean, var)
    # The reference itself: the trick's moments are those of sampling the weights.
    mc_mean, mc_var = weight_noise_moments(x, layer.weight.detach(), layer.log_sigma2.detach(), layer.bias.detach(),
                                           layer.mask, linear)
    check_moments_against(mc_mean, mc_var, mean, var)


def check_moments_against(mc_mean, mc_var, mean, var, n=4000):
    assert ((mc_mean - mean).abs() <= SIGMAS * torch.sqrt(var / n) + 1e-6).all()
    assert ((mc_var - (var - 1e-8)).abs() <= SIGMAS * var * math.sqrt(2 / (n - 1)) + 1e-6).all()


def test_noise_is_one_draw_per_output():
    """Outputs of one forward are independent: the sample correlation of two outputs of the
    same example is near 0 (a shared draw would make it 1)."""
    torch.manual_seed(1)
    layer = VDLinear(6, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.ones(2, 6))
        layer.log_sigma2.fill_(0.0)  # alpha = 1: the noise dominates
    with torch.no_grad():
        out = layer(torch.ones(SAMPLES, 6)).double()
    correlation = torch.corrcoef(out.T)[0, 1]
    assert abs(float(correlation)) < SIGMAS / math.sqrt(SAMPLES)


@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=(2, 3), stride=(2, 1),
                                                                        dilation=(1, 2), padding=(1, 0))])
def test_conv2d_training_forward_matches_the_lrt_moments(conv):
    torch.manual_seed(2)
    layer = VDConv2d(3, 5, **conv)
    spread_log_alpha(layer)
    layer.refresh_mask()
    x = torch.randn(1, 3, 6, 7)
    geometry = {k: v for k, v in conv.items() if k != "kernel_size"}

    def product(inputs, w, b):
        return F.conv2d(inputs, w, b, **geometry)

    mean, var = reference_moments(x, layer.weight.detach(), layer.log_sigma2.detach(), layer.bias.detach(),
                                  layer.mask, product)
    with torch.no_grad():
        samples = layer(x.expand(SAMPLES, -1, -1, -1))
    check_moments(samples, mean[0], var[0])


def test_conv1d_training_forward_matches_the_lrt_moments():
    torch.manual_seed(3)
    layer = VDConv1d(2, 4, 5, stride=2, padding=2)
    spread_log_alpha(layer)
    layer.refresh_mask()
    x = torch.randn(1, 2, 11)

    def product(inputs, w, b):
        return F.conv1d(inputs, w, b, stride=2, padding=2)

    mean, var = reference_moments(x, layer.weight.detach(), layer.log_sigma2.detach(), layer.bias.detach(),
                                  layer.mask, product)
    with torch.no_grad():
        samples = layer(x.expand(SAMPLES, -1, -1))
    check_moments(samples, mean[0], var[0])


def test_kl_matches_the_formula_in_float64():
    torch.manual_seed(4)
    layer = VDLinear(7, 5, dtype=torch.float64)
    spread_log_alpha(layer, -14.0, 14.0)  # past both clamps
    expected = 0.0
    for theta, log_sigma2 in zip(layer.weight.flatten().tolist(), layer.log_sigma2.flatten().tolist()):
        log_alpha = min(10.0, max(-10.0, log_sigma2 - 2 * math.log(abs(theta) + 1e-8)))
        negative_kl = K1 / (1 + math.exp(-(K2 + K3 * log_alpha))) - 0.5 * math.log1p(math.exp(-log_alpha)) - K1
        expected -= negative_kl
    kl = layer.kl()
    assert kl.dim() == 0
    assert math.isclose(float(kl.detach()), expected, rel_tol=1e-12, abs_tol=1e-12)
    # Pruned weights (outside the mask) are removed: alpha is infinite, the KL's limit 0.
    mask = torch.rand_like(layer.weight) < 0.5
    layer.set_mask(mask)
    expected_active = 0.0
    for theta, log_sigma2, kept in zip(layer.weight.flatten().tolist(), layer.log_sigma2.flatten().tolist(),
                                       mask.flatten().tolist()):
        if kept:
            log_alpha = min(10.0, max(-10.0, log_sigma2 - 2 * math.log(abs(theta) + 1e-8)))
            expected_active += K1 - K1 / (1 + math.exp(-(K2 + K3 * log_alpha))) + 0.5 * math.log1p(
                math.exp(-log_alpha))
    assert math.isclose(float(layer.kl().detach()), expected_active, rel_tol=1e-12, abs_tol=1e-12)
    layer.set_mask(torch.zeros_like(mask))
    assert float(layer.kl().detach()) == 0.0
    log_alpha = layer.log_alpha().detach()
    assert float(log_alpha.min()) == -10.0 and float(log_alpha.max()) == 10.0


def test_threshold_and_eval_forward():
    layer = VDLinear(4, 2)
    with torch.no_grad():
        layer.weight.fill_(1.0)  # log(1 + 1e-8) is 0 in float32: log_alpha = log_sigma2 exactly
        layer.log_sigma2.copy_(torch.tensor([[2.99, 3.0, 3.01, -20.0], [50.0, -3.0, 2.0, 9.0]]))
    assert torch.equal(layer.log_alpha(), torch.tensor([[2.99, 3.0, 3.01, -10.0], [10.0, -3.0, 2.0, 9.0]]))
    kept = torch.tensor([[True, False, False, True], [False, True, True, False]])
    assert torch.equal(layer.threshold_mask(), kept)
    layer.eval()
    x = torch.randn(5, 4)
    # The mask is still all ones: the eval forward zeroes the weights at log_alpha >= 3 itself.
    expected = F.linear(x.double(), torch.where(kept, layer.weight, 0).double(), layer.bias.double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)
    layer.refresh_mask()
    assert torch.equal(layer.mask, kept)
    assert torch.equal(layer.weight == 0, ~kept)  # masked mode: the pruned weights are zeroed


@pytest.mark.parametrize("refresh", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_to_sparse_gives_the_eval_forward(kind, refresh):
    torch.manual_seed(5)
    if kind == "linear":
        layer, x, plain = VDLinear(33, 17), torch.randn(4, 33), SparseLinear
    elif kind == "conv2d":
        layer, x, plain = VDConv2d(3, 6, 3, padding=1), torch.randn(2, 3, 8, 8), SparseConv2d
    else:
        layer, x, plain = VDConv1d(3, 6, 5, padding=2), torch.randn(2, 3, 19), SparseConv1d
    spread_log_alpha(layer)
    if refresh:
        layer.refresh_mask()
    layer.eval()
    sparse = layer.to_sparse().eval()
    assert type(sparse) is plain
    assert set(sparse.state_dict()) == {"weight", "bias", "mask"}
    assert torch.equal(sparse.mask, layer.mask & layer.threshold_mask())
    assert torch.equal(sparse.weight == 0, ~sparse.mask | (layer.weight == 0))
    with torch.no_grad():
        if refresh and kind != "conv1d":  # the same mask and values on the same kernel: bitwise equal
            assert torch.equal(sparse(x), layer(x))
        else:  # VDConv1d's eval unfolds patches, SparseConv1d runs the implicit GEMM: another sum order
            torch.testing.assert_close(sparse(x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
@pytest.mark.parametrize("grad_mode", ["masked", "feedback"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradients_reach_theta_and_log_sigma2(kind, grad_mode, backend, monkeypatch):
    """Gradients of (output * g).sum() + KL with the layer's noise fixed, against float64
    autograd of the formulas: masked mode gives the pruned weights no data gradient, feedback
    the gradient taken at the masked weights (straight through); the same on the kernels and
    on torch's dense ops (backend "dense")."""
    torch.manual_seed(6)
    if kind == "linear":
        layer, x = VDLinear(19, 7, grad_mode=grad_mode), torch.randn(5, 19)

        def product(inputs, w, b):
            return F.linear(inputs, w, b)
    else:
        layer, x = VDConv2d(2, 4, 3, stride=2, padding=1, grad_mode=grad_mode), torch.randn(3, 2, 7, 6)

        def product(inputs, w, b):
            return F.conv2d(inputs, w, b, stride=2, padding=1)
    layer.backend = backend
    spread_log_alpha(layer)
    with torch.no_grad():
        mask = layer.threshold_mask() | (torch.rand_like(layer.weight) < 0.2)  # some weights above 3 stay active
    layer.set_mask(mask)
    eps = torch.randn_like(product(x, layer.weight.detach(), None))
    grad_out = torch.randn_like(eps)
    monkeypatch.setattr(torch, "randn_like", lambda t, **kwargs: eps.to(t.dtype))
    loss = (layer(x) * grad_out).sum() + layer.kl()
    got = torch.autograd.grad(loss, (layer.weight, layer.log_sigma2, layer.bias))

    theta = layer.weight.detach().double().requires_grad_()
    log_sigma2 = layer.log_sigma2.detach().double().requires_grad_()
    bias = layer.bias.detach().double().requires_grad_()

    def masked(w):
        if grad_mode == "masked":
            return torch.where(mask, w, 0)
        return w - torch.where(mask, 0, w).detach()

    log_alpha = (log_sigma2 - 2 * torch.log(theta.abs() + 1e-8)).clamp(-10, 10)
    mean = product(x.double(), masked(theta), bias)
    var = product(x.double() ** 2, masked(torch.exp(log_alpha) * theta ** 2), None)
    kl = torch.where(mask, K1 - K1 * torch.sigmoid(K2 + K3 * log_alpha) + 0.5 * torch.log1p(torch.exp(-log_alpha)),
                     0).sum()
    reference = ((mean + torch.sqrt(var + 1e-8) * eps.double()) * grad_out.double()).sum() + kl
    want = torch.autograd.grad(reference, (theta, log_sigma2, bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
    assert float(got[1].abs().sum()) > 0 and float(got[0].abs().sum()) > 0


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_both_training_products_run_on_the_masked_kernels(kind, monkeypatch):
    """The mean and the variance product each call the masked kernel once (the masked matmul;
    a convolution the implicit-GEMM one, VDConv1d's through the same 2-D kernel), with packed
    values of the active weights only (the pruned ones are skipped), and never torch's dense
    product."""
    torch.manual_seed(11)
    layer, x, op = {"linear": (VDLinear(40, 24), torch.randn(4, 40), "spmm_panels"),
                    "conv2d": (VDConv2d(3, 8, 3, padding=1), torch.randn(2, 3, 6, 6), "conv2d_panels"),
                    "conv1d": (VDConv1d(3, 8, 5, stride=2, padding=2), torch.randn(2, 3, 11), "conv2d_panels")}[kind]
    spread_log_alpha(layer)
    layer.refresh_mask()
    sizes = []
    for name in ("spmm_panels", "conv2d_panels"):
        original = getattr(dynasparse.ops, name)
        monkeypatch.setattr(dynasparse.ops, name, lambda x, values, *args, _op=original, _name=name, **kwargs:
                            sizes.append((_name, values.numel())) or _op(x, values, *args, **kwargs))
    for dense in ("linear", "conv1d", "conv2d"):
        monkeypatch.setattr(F, dense, None)
    layer(x)
    active = int(layer.mask.sum())
    assert active < layer.mask.numel() and sizes == [(op, active), (op, active)]


def _count_products(monkeypatch) -> dict:
    """Calls of the kernels (masked matmul, implicit-GEMM convolution) and of torch's dense products."""
    calls = {"kernel": 0, "dense": 0}
    for owner, names, kind in ((dynasparse.ops, ("spmm_panels", "conv2d_panels"), "kernel"),
                               (F, ("linear", "conv1d", "conv2d"), "dense")):
        for name in names:
            real = getattr(owner, name)

            def counted(*args, _real=real, _kind=kind, **kwargs):
                calls[_kind] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("timings", [(1.0, 2.0), (2.0, 1.0)], ids=["sparse-wins", "dense-wins"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d"])
def test_auto_runs_the_measured_way_with_the_same_noise_values_and_gradients(kind, timings, monkeypatch,
                                                                             cost_model):  # noqa: F811
    """backend="auto" measures its first training call (both ways once, drawing no noise, so the
    generator is where the pinned layers leave it), then runs the faster way; the output and the
    gradients equal the kernels' and torch's dense ops' for the same generator state (the noise
    is drawn in the output's logical order on every way). The eval forward is keyed apart."""
    _, fake_costs = cost_model
    fake_costs["timings"] = timings
    torch.manual_seed(14)
    auto, x = {"linear": lambda: (VDLinear(23, 9), torch.randn(6, 23)),
               "conv2d": lambda: (VDConv2d(3, 5, 3, stride=2, padding=1), torch.randn(2, 3, 7, 8)),
               "conv1d": lambda: (VDConv1d(3, 5, 5, padding=2), torch.randn(4, 3, 13))}[kind]()
    spread_log_alpha(auto)
    auto.refresh_mask()
    layers = {"auto": auto, "sparse": copy.deepcopy(auto), "dense": copy.deepcopy(auto)}
    for backend, layer in layers.items():
        layer.backend = backend
    x.requires_grad_()
    results = {}
    for backend, layer in layers.items():
        torch.manual_seed(15)
        out = layer(x)
        generator = torch.get_rng_state()
        grad_out = torch.randn_like(out)
        loss = (out * grad_out).sum() + layer.kl()
        results[backend] = (out, generator, torch.autograd.grad(loss, (x, layer.weight, layer.log_sigma2, layer.bias)))
    assert fake_costs["measured"] == 1
    assert torch.equal(results["auto"][1], results["sparse"][1])
    for other in ("sparse", "dense"):
        torch.testing.assert_close(results["auto"][0], results[other][0], rtol=1e-5, atol=1e-5)
        for name, a, b in zip(("input", "theta", "log_sigma2", "bias"), results["auto"][2], results[other][2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} gradient, auto vs {other}")
    [row] = auto.backend_report()
    chosen = "sparse" if timings[0] < timings[1] else "dense"
    assert row["choice"] == chosen and row["key"][2][-1] == "lrt"
    calls = _count_products(monkeypatch)
    auto(x)
    assert calls == ({"kernel": 2, "dense": 0} if chosen == "sparse" else {"kernel": 0, "dense": 2})
    auto.eval()
    auto(x)
    assert fake_costs["measured"] == 2
    assert sorted(row["key"][2][-1] for row in auto.backend_report()) == ["eval", "lrt"]


def test_all_pruned_and_empty_batches():
    torch.manual_seed(7)
    layer = VDLinear(8, 3)
    layer.set_mask(torch.zeros_like(layer.mask))
    x = torch.randn(4, 8)
    layer.eval()
    assert torch.equal(layer(x), layer.bias.detach().expand(4, 3))
    layer.train()
    with torch.no_grad():
        noise = layer(x.repeat(1000, 1)) - layer.bias
    assert float(noise.std()) == pytest.approx(1e-4, rel=0.1)  # sqrt(0 + 1e-8) * eps
    assert layer(torch.randn(0, 8)).shape == (0, 3)
    conv = VDConv2d(2, 3, 3)
    assert conv(torch.randn(0, 2, 5, 5)).shape == (0, 3, 3, 3)
    assert conv(torch.randn(2, 5, 5)).shape == (3, 3, 3)  # unbatched


def test_from_dense_keeps_values_and_sparse_masks():
    torch.manual_seed(8)
    dense = nn.Linear(10, 4)
    vd = VDLinear.from_dense(dense)
    assert torch.equal(vd.weight, dense.weight) and torch.equal(vd.bias, dense.bias)
    assert bool(vd.mask.all()) and bool((vd.log_sigma2 == -10).all())
    assert vd.weight.data_ptr() != dense.weight.data_ptr()
    sparse = SparseConv2d(3, 4, 3, sparsity=0.6, grad_mode="feedback")
    vd_conv = VDConv2d.from_dense(sparse, log_sigma2=-8.0)
    assert torch.equal(vd_conv.mask, sparse.mask) and vd_conv.grad_mode == "feedback"
    assert bool((vd_conv.log_sigma2 == -8).all())
    conv1d = nn.Conv1d(2, 3, 4, padding=1)
    vd1 = VDConv1d.from_dense(conv1d).eval()
    x = torch.randn(2, 2, 9)
    expected = F.conv1d(x.double(), torch.where(vd1.threshold_mask(), conv1d.weight, 0).double(),
                        conv1d.bias.double(), padding=1)
    torch.testing.assert_close(vd1(x).double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vd1.to_dense()(x), vd1(x))


def test_state_dict_resume_follows_the_same_trajectory():
    def steps(layer, optimizer, count, seed):
        torch.manual_seed(seed)
        for _ in range(count):
            x = torch.randn(16, 12)
            loss = layer(x).square().mean() + 0.01 * layer.kl()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        layer.refresh_mask()

    torch.manual_seed(9)
    layer = VDLinear(12, 6)
    optimizer = dynasparse.optim.AdamW(layer.parameters(), lr=0.05)
    steps(layer, optimizer, 5, 10)
    saved = copy.deepcopy({"layer": layer.state_dict(), "optimizer": optimizer.state_dict()})
    assert set(saved["layer"]) == {"weight", "bias", "log_sigma2", "mask"}
    steps(layer, optimizer, 5, 11)

    resumed = VDLinear(12, 6)
    resumed.load_state_dict(saved["layer"])
    resumed_optimizer = dynasparse.optim.AdamW(resumed.parameters(), lr=0.05)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    steps(resumed, resumed_optimizer, 5, 11)
    for (name, a), b in zip(layer.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_inputs_raise_clear_errors():
    layer = VDLinear(5, 3)
    with pytest.raises(RuntimeError, match="in_features = 5"):
        layer(torch.randn(2, 6))
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="int64"):
        layer(torch.ones(2, 5, dtype=torch.long))
    conv = VDConv2d(3, 2, 3)
    with pytest.raises(RuntimeError, match="3 channels"):
        conv(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        conv(torch.randn(5, 5))
    with pytest.raises(ValueError, match="3-D"):
        VDConv1d(2, 2, 3)(torch.randn(1, 1, 2, 5))
    with pytest.raises(TypeError, match="nn.Linear"):
        VDLinear.from_dense(nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        VDConv2d.from_dense(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="unstructured"):
        VDLinear.from_dense(SparseLinear(32, 32, layout="block16"))
    with pytest.raises(ValueError, match="threshold"):
        VDLinear(2, 2, threshold=float("nan"))
    with pytest.raises(ValueError, match="log_sigma2"):
        VDLinear(2, 2, log_sigma2="high")
    with pytest.raises(TypeError, match="bool"):
        layer.set_mask(torch.ones(3, 5))
    with pytest.raises(ValueError, match="padding='same'"):
        VDConv1d(2, 2, 4, padding="same")


@pytest.mark.parametrize("training", [False, True])
def test_compiled_forward_matches_eager_without_graph_breaks(training):
    torch.manual_seed(12)
    model = nn.Sequential(VDConv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), VDLinear(64, 8))
    for layer in (model[0], model[3]):
        spread_log_alpha(layer)
        layer.refresh_mask()
    model.train(training)
    x = torch.randn(5, 2, 4, 4)
    # At eval, log_sigma2 only decides which weights are zero: no gradient reaches it.
    params = [p for name, p in model.named_parameters() if training or not name.endswith("log_sigma2")]
    torch.manual_seed(13)
    eager = model(x).square().sum()
    eager_grads = torch.autograd.grad(eager, params)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(13)
    out = compiled(x).square().sum()
    grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
