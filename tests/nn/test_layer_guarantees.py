"""The sparse layers' guarantees (issue 11): the right answer or a clear error for every input,
caches that follow every write, complete autograd (double backward, torch.func), meta device."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import dynasparse
import dynasparse.optim
from dynasparse.nn import SparseConv1d, SparseConv2d, SparseLinear, sparse_masks
from dynasparse.nn.modules import SparseTransposedLinear


def reference_linear(layer, x):
    """float64 x @ (w * m).T + b, independent of the kernels."""
    weight = torch.where(layer.mask, layer.weight.detach(), 0).double()
    bias = None if layer.bias is None else layer.bias.detach().double()
    return F.linear(x.double(), weight, bias)


def assert_follows_weight(layer, x):
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), reference_linear(layer, x), rtol=1e-5, atol=1e-5)


# --- 1. widths and channels -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_mismatched_input_width_is_an_error_never_output(seed):
    generator = torch.Generator().manual_seed(seed)
    in_features = int(torch.randint(1, 600, (), generator=generator))
    wrong = int(torch.randint(0, 700, (), generator=generator))
    wrong = wrong if wrong != in_features else in_features + 1
    for layer in (SparseLinear(in_features, 7, sparsity=0.5), SparseTransposedLinear(in_features, 7, sparsity=0.5)):
        with pytest.raises(RuntimeError, match="in_features"):
            layer(torch.randn(3, wrong))
        with pytest.raises(RuntimeError, match="in_features"):
            layer(torch.tensor(1.0))
    channels = int(torch.randint(1, 9, (), generator=generator))
    conv = SparseConv2d(channels, 4, 3, sparsity=0.5)
    for bad in (channels - 1, channels + 1):
        if bad >= 1:
            with pytest.raises(RuntimeError, match="channels"):
                conv(torch.randn(2, bad, 6, 6))
            with pytest.raises(RuntimeError, match="channels"):
                conv(torch.randn(bad, 6, 6))


# --- 3. grouped convolution in feedback mode ---------------------------------------------------

@pytest.mark.parametrize("groups", [2, 6])
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_grouped_conv_gradients_follow_the_grad_mode(groups, grad_mode):
    torch.manual_seed(3)
    layer = SparseConv2d(6, 6, 3, padding=1, groups=groups, sparsity=0.6, grad_mode=grad_mode).double()
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    effective = torch.where(layer.mask, layer.weight.detach(), 0).requires_grad_()
    F.conv2d(x, effective, layer.bias.detach(), padding=1, groups=groups).square().sum().backward()
    expected = effective.grad if grad_mode == "feedback" else torch.where(layer.mask, effective.grad, 0)
    torch.testing.assert_close(layer.weight.grad, expected)
    if grad_mode == "feedback":
        assert layer.weight.grad[~layer.mask].abs().sum() > 0  # pruned weights do learn (DPF)


# --- 4. second-order gradients -----------------------------------------------------------------

@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_gradgradcheck_linear_and_conv(grad_mode):
    torch.manual_seed(4)
    linear = SparseLinear(9, 5, sparsity=0.5, grad_mode=grad_mode).double()
    assert torch.autograd.gradgradcheck(linear, (torch.randn(3, 9, dtype=torch.float64, requires_grad=True),))
    conv = SparseConv2d(3, 4, 3, padding=1, sparsity=0.5, grad_mode=grad_mode).double()
    assert torch.autograd.gradgradcheck(conv, (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("make", [lambda mode: SparseLinear(7, 4, sparsity=0.5, grad_mode=mode),
                                  lambda mode: SparseConv2d(3, 4, 3, padding=1, sparsity=0.5, grad_mode=mode)],
                         ids=["linear", "conv"])
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_create_graph_gradients_match_a_torch_reference(make, grad_mode):
    """A gradient penalty ||d loss / d x||^2 differentiated again: both the input and the weight
    receive the second-order terms torch gives for w * m (straight through in feedback mode)."""
    torch.manual_seed(5)
    layer = make(grad_mode).double()
    shape = (3, 7) if isinstance(layer, SparseLinear) else (2, 3, 5, 6)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).sin().sum(), x, create_graph=True)
    gx.square().sum().backward()

    weight = layer.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    mask = layer.mask
    effective = torch.where(mask, weight, 0) if grad_mode == "masked" else weight - torch.where(mask, 0, weight).detach()
    if isinstance(layer, SparseLinear):
        y = F.linear(x_ref, effective, layer.bias.detach())
    else:
        y = F.conv2d(x_ref, effective, layer.bias.detach(), padding=1)
    (gx_ref,) = torch.autograd.grad(y.sin().sum(), x_ref, create_graph=True)
    gx_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, weight.grad)


# --- 5. cached packed weights follow every write ----------------------------------------------

def _writes():
    """Ways torch offers to change a weight in place (name, fn(layer))."""
    def through_data(layer):
        layer.weight.data.mul_(2)

    def through_parameters_data(layer):
        for param in layer.parameters():
            param.data.add_(0.5)

    def data_assignment(layer):
        layer.weight.data = torch.randn_like(layer.weight)

    def no_grad_in_place(layer):
        with torch.no_grad():
            layer.weight.sub_(1)

    def detach_copy(layer):
        layer.weight.detach().copy_(torch.randn_like(layer.weight))

    def init(layer):
        nn.init.normal_(layer.weight)

    def vector_to_parameters(layer):
        vector = nn.utils.parameters_to_vector(layer.parameters())
        nn.utils.vector_to_parameters(torch.randn_like(vector), layer.parameters())

    def load_state_dict(layer):
        state = layer.state_dict()
        state["weight"] = torch.randn_like(state["weight"])
        layer.load_state_dict(state)

    def optimizer(cls, **kwargs):
        def step(layer):
            opt = cls(layer.parameters(), lr=0.5, **kwargs)
            layer(torch.randn(4, layer.in_features)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        return step

    def numpy_then_weight_changed(layer):
        layer.weight.detach().numpy()[...] *= 3
        layer.weight_changed()

    return [("data", through_data), ("parameters-data", through_parameters_data),
            ("data-assignment", data_assignment), ("no-grad", no_grad_in_place), ("detach", detach_copy),
            ("init", init), ("vector_to_parameters", vector_to_parameters), ("load_state_dict", load_state_dict),
            ("adam-fused", optimizer(torch.optim.Adam, fused=True)),
            ("adam-foreach", optimizer(torch.optim.Adam, foreach=True)),
            ("sgd", optimizer(torch.optim.SGD, momentum=0.9)),
            ("adamw-single", optimizer(torch.optim.AdamW, foreach=False)),
            ("numpy+weight_changed", numpy_then_weight_changed)]


@pytest.mark.parametrize("name,write", _writes(), ids=[name for name, _ in _writes()])
def test_output_follows_the_weight_whichever_way_it_is_written(name, write):
    torch.manual_seed(6)
    layer = SparseLinear(300, 37, sparsity=0.7)
    x = torch.randn(5, 300)
    assert_follows_weight(layer, x)  # fills the cache
    write(layer)
    assert_follows_weight(layer, x)
    write(layer)
    assert_follows_weight(layer, x)


@pytest.mark.parametrize("seed", range(3))
def test_random_sequences_of_writes(seed):
    generator = torch.Generator().manual_seed(seed)
    writes = _writes()
    layer = SparseLinear(300, 37, sparsity=0.8)
    x = torch.randn(3, 300)
    for _ in range(12):
        _, write = writes[int(torch.randint(len(writes), (), generator=generator))]
        write(layer)
        assert_follows_weight(layer, x)


def test_the_cache_is_kept_when_nothing_changed(monkeypatch):
    layer = SparseLinear(300, 37, sparsity=0.7)
    x = torch.randn(5, 300)
    packs = []
    original = dynasparse.MaskPlan._pack
    monkeypatch.setattr(dynasparse.MaskPlan, "_pack", lambda self, w: packs.append(1) or original(self, w))
    with torch.no_grad():
        for _ in range(4):
            layer(x)
    assert len(packs) == 1


# --- 6. a replaced mask is used ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["assign", "data-assign", "data-in-place", "in-place"])
def test_a_new_mask_is_what_the_layer_computes_with(how):
    torch.manual_seed(7)
    layer = SparseLinear(40, 9, sparsity=0.5)
    held = layer.mask
    optimizer = dynasparse.optim.SGD(layer.parameters(), lr=0.1, masks=sparse_masks(layer))
    x = torch.randn(4, 40)
    assert_follows_weight(layer, x)
    new = torch.rand(9, 40) < 0.3
    if how == "assign":
        layer.mask = new
    elif how == "data-assign":
        layer.mask.data = new.clone()
    elif how == "data-in-place":
        layer.mask.data.copy_(new)
    else:
        layer.mask.copy_(new)
    assert torch.equal(layer.mask, new)
    assert_follows_weight(layer, x)
    assert torch.equal(optimizer.mask(layer.weight)[0], layer.mask)
    if how == "assign":
        assert layer.mask is held  # copied into the buffer the optimizer holds


def test_assigning_an_invalid_mask_is_an_error_and_changes_nothing():
    layer = SparseLinear(8, 4, sparsity=0.5, layout="2:4")
    before = layer.mask.clone()
    with pytest.raises(TypeError, match="bool"):
        layer.mask = torch.ones(4, 8)
    with pytest.raises(ValueError, match="shape"):
        layer.mask = torch.ones(4, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match="2:4"):
        layer.set_mask(torch.ones(4, 8, dtype=torch.bool))
    assert torch.equal(layer.mask, before)
    layer.mask.data = torch.ones(4, 8)  # a float tensor behind the layer's back
    with pytest.raises(TypeError, match="bool"):
        layer(torch.randn(2, 8))


def test_loading_a_float_or_invalid_mask_is_an_error():
    layer = SparseLinear(8, 4, sparsity=0.5, layout="2:4")
    before = layer.mask.clone()
    state = layer.state_dict()
    with pytest.raises(RuntimeError, match="bool"):
        layer.load_state_dict({**state, "mask": state["mask"].float()})
    with pytest.raises(RuntimeError, match="2:4"):
        layer.load_state_dict({**state, "mask": torch.ones(4, 8, dtype=torch.bool)})
    assert torch.equal(layer.mask, before)


# --- 7. torch.compile and in-place mask edits --------------------------------------------------

def test_compiled_layer_refuses_a_mask_edited_in_place_and_follows_set_mask():
    torch._dynamo.reset()
    torch.manual_seed(8)
    layer = SparseLinear(32, 8, sparsity=0.5)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 32)
    torch.testing.assert_close(compiled(x).double(), reference_linear(layer, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.mask[0] = ~layer.mask[0]
    with pytest.raises(RuntimeError, match="set_mask"):
        compiled(x)
    layer.set_mask(torch.rand(8, 32) < 0.4)
    torch.testing.assert_close(compiled(x).double(), reference_linear(layer, x), rtol=1e-5, atol=1e-5)


# --- 8. channels_last parameters keep their masks ----------------------------------------------

@pytest.mark.parametrize("optimizer_class", [dynasparse.optim.SGD, dynasparse.optim.AdamW])
@pytest.mark.parametrize("grad_mode", ["masked", "feedback"])
def test_channels_last_weights_keep_their_masks(optimizer_class, grad_mode):
    torch.manual_seed(9)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(9)
        layer = SparseConv2d(8, 16, 3, sparsity=0.9, grad_mode=grad_mode)
        layer.to(memory_format=memory_format)
        with torch.no_grad():
            layer.weight.masked_fill_(~layer.mask, 0.5)  # pruned weights nonzero: masked mode must zero them
        optimizer = optimizer_class(layer.parameters(), lr=0.01, weight_decay=0.01, masks=sparse_masks(layer),
                                    statistic="abs")
        x = torch.randn(2, 8, 6, 6).to(memory_format=memory_format)
        for _ in range(2):
            layer(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        if grad_mode == "masked":
            assert int((layer.weight[~layer.mask] != 0).sum()) == 0
        results.append((layer.weight.detach().contiguous(), optimizer.statistics(layer.weight).contiguous(),
                        optimizer.error_norms()[layer.weight]))
    for ours, contiguous in zip(results[1], results[0]):
        torch.testing.assert_close(ours, contiguous, rtol=1e-5, atol=1e-6)


# --- 9. empty batches, atomic set_mask ---------------------------------------------------------

@pytest.mark.parametrize("kernel_size", [1, 3])
def test_conv_backward_on_an_empty_batch(kernel_size):
    for grad_mode in ("feedback", "masked"):
        layer = SparseConv2d(3, 4, kernel_size, sparsity=0.5, grad_mode=grad_mode)
        x = torch.randn(0, 3, 6, 6, requires_grad=True)
        y = layer(x)
        assert y.shape == (0, 4, 7 - kernel_size, 7 - kernel_size)
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def test_set_mask_with_an_invalid_nm_mask_changes_nothing():
    layer = SparseLinear(8, 4, layout="2:4")
    before = layer.mask.clone()
    with pytest.raises(ValueError, match="2:4"):
        layer.set_mask(torch.ones(4, 8, dtype=torch.bool))
    assert torch.equal(layer.mask, before)
    layer(torch.randn(2, 8))


# --- 12. Hugging Face round trip ---------------------------------------------------------------

@pytest.mark.parametrize("grad_mode", ["masked", "feedback"])
def test_hugging_face_round_trip(grad_mode, tmp_path):
    """save_pretrained -> the dense class's from_pretrained gives the same outputs: directly in
    masked mode; in feedback mode (dense values kept for DPF) through the documented densify."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(10)
    model = transformers.BertModel(config).eval()
    dynasparse.sparsify(model, 0.8, grad_mode=grad_mode, include=["encoder.*"])
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        expected = model(tokens).last_hidden_state
    if grad_mode == "feedback":
        dynasparse.densify(model)
    model.save_pretrained(tmp_path)
    dense = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(tokens).last_hidden_state, expected, rtol=1e-4, atol=1e-5)


# --- 13. meta device and torch.func ------------------------------------------------------------

def test_layers_build_on_the_meta_device_and_materialize():
    layer = SparseLinear(16, 8, sparsity=0.75, device="meta")
    assert layer(torch.randn(3, 16, device="meta")).shape == (3, 8)
    with torch.device("meta"):
        model = nn.Sequential(SparseLinear(16, 8, sparsity=0.75), nn.ReLU(),
                              SparseConv2d(2, 4, 3, sparsity=0.5))
    model.to_empty(device="cpu")
    state = {"0.weight": torch.randn(8, 16), "0.bias": torch.randn(8),
             "2.weight": torch.randn(4, 2, 3, 3), "2.bias": torch.randn(4)}
    model.load_state_dict(state, strict=False)
    linear = model[0]
    assert int(linear.mask.sum()) == 32  # the magnitude mask at 75%, chosen from the loaded weights
    assert torch.equal(linear.mask, dynasparse.nn.modules.magnitude_mask(state["0.weight"], 0.75, "unstructured"))
    x = torch.randn(3, 16)
    assert_follows_weight(linear, x)
    conv = model[2]
    assert int(conv.mask.sum()) == 36
    images = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(conv(images), F.conv2d(images, conv.masked_weight(), conv.bias))


def test_meta_layer_materialized_without_a_checkpoint_chooses_its_mask_at_first_use():
    with torch.device("meta"):
        layer = SparseLinear(16, 8, sparsity=0.5)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    x = torch.randn(2, 16)
    assert_follows_weight(layer, x)
    assert int(layer.mask.sum()) == 64


@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_torch_func_transforms(grad_mode):
    torch.manual_seed(12)
    layer = SparseLinear(10, 6, sparsity=0.6, grad_mode=grad_mode)
    effective = torch.where(layer.mask, layer.weight.detach(), 0)
    x = torch.randn(5, 4, 10)
    torch.testing.assert_close(vmap(layer)(x), layer(x))
    torch.testing.assert_close(jacrev(layer)(x[0, 0]), effective)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(params, sample):
        return functional_call(layer, params, (sample,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x[0])
    for i in range(4):
        sample = x[0, i].double().requires_grad_()
        weight = layer.weight.detach().double().requires_grad_()
        masked = torch.where(layer.mask, weight, 0) if grad_mode == "masked" else \
            weight - torch.where(layer.mask, 0, weight).detach()
        F.linear(sample, masked, layer.bias.detach().double()).square().sum().backward()
        torch.testing.assert_close(per_sample["weight"][i].double(), weight.grad, rtol=1e-5, atol=1e-5)
    conv = SparseConv2d(2, 3, 3, sparsity=0.5, grad_mode=grad_mode)
    images = torch.randn(4, 1, 2, 6, 6)
    torch.testing.assert_close(vmap(conv)(images), conv(images.flatten(0, 1)).unflatten(0, (4, 1)))


@pytest.mark.parametrize("conv_class", [SparseConv1d, SparseConv2d])
@pytest.mark.parametrize("grad_mode", ["feedback", "masked"])
def test_torch_func_over_a_convs_input_matches_float64(conv_class, grad_mode):
    """grad and jacrev over the input of a conv pinned to the kernels, and the gradient of an
    earlier layer's functional parameters through it: torch's convolution of w * m runs."""
    torch.manual_seed(13)
    spatial = (7,) if conv_class is SparseConv1d else (6, 5)
    first = (nn.Conv1d if conv_class is SparseConv1d else nn.Conv2d)(3, 4, 3, padding=1)
    sparse = conv_class(4, 5, 3, padding=1, sparsity=0.6, grad_mode=grad_mode, backend="sparse")
    model = nn.Sequential(first, sparse)
    x = torch.randn(2, 3, *spatial)
    first_params = {f"0.{name}": p.detach() for name, p in first.named_parameters()}
    grads = grad(lambda params: functional_call(model, params, (x,)).square().sum())(first_params)
    inner = torch.randn(2, 4, *spatial)
    grad_inner = grad(lambda value: sparse(value).square().sum())(inner)
    jacobian = jacrev(lambda value: sparse(value).sum())(inner)

    conv = F.conv1d if conv_class is SparseConv1d else F.conv2d
    weight = torch.where(sparse.mask, sparse.weight, 0).detach().double()
    bias = sparse.bias.detach().double()
    ref_params = {name: p.double().requires_grad_() for name, p in first_params.items()}
    hidden = conv(x.double(), ref_params["0.weight"], ref_params["0.bias"], padding=1)
    conv(hidden, weight, bias, padding=1).square().sum().backward()
    for name in first_params:
        torch.testing.assert_close(grads[name].double(), ref_params[name].grad, rtol=1e-5, atol=1e-5)
    inner_ref = inner.double().requires_grad_()
    out = conv(inner_ref, weight, bias, padding=1)
    (grad_ref,) = torch.autograd.grad(out.square().sum(), inner_ref, retain_graph=True)
    (jacobian_ref,) = torch.autograd.grad(out.sum(), inner_ref)
    torch.testing.assert_close(grad_inner.double(), grad_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jacobian.double(), jacobian_ref, rtol=1e-5, atol=1e-5)


# --- 15. smaller errors --------------------------------------------------------------------------

def test_from_dense_of_the_wrong_module_is_a_type_error():
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="2-D weight"):
        SparseTransposedLinear.from_dense(nn.ReLU())


def test_temporary_weights_never_hit_a_stale_cache():
    """Autocast casts the weight anew each forward, and a channels_last convolution weight is
    copied by its reshape: such temporaries often reuse the last one's memory with the same
    version, and must not be taken for it."""
    torch.manual_seed(13)
    layer = SparseLinear(300, 37, sparsity=0.7)
    x = torch.randn(4, 300)
    for _ in range(3):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ours = layer(x).double()
        torch.testing.assert_close(ours, reference_linear(layer, x), rtol=2e-2, atol=5e-2)
        with torch.no_grad():
            layer.weight.mul_(-1.5)
    conv = SparseConv2d(8, 16, 3, sparsity=0.8).to(memory_format=torch.channels_last)
    images = torch.randn(2, 8, 6, 6)
    for _ in range(3):
        with torch.no_grad():
            expected = F.conv2d(images.double(), conv.masked_weight().double(), conv.bias.double())
            torch.testing.assert_close(conv(images).double(), expected, rtol=1e-5, atol=1e-5)
            conv.weight.mul_(-1.5)


def test_mask_guard_op():
    mask = torch.rand(4, 6) < 0.5
    like = torch.randn(3, dtype=torch.bfloat16)
    zero = torch.ops.dynasparse.mask_guard(mask, mask._version, like)
    assert zero.dtype == torch.bfloat16 and zero.shape == () and zero.item() == 0
    # opcheck runs the op on deep copies of its inputs, whose version counters are not the
    # originals' (the one thing this op reads): a version no copy exceeds keeps the check silent.
    torch.library.opcheck(torch.ops.dynasparse.mask_guard, (mask, 2**40, like))
    mask[0, 0] = True
    with pytest.raises(RuntimeError, match="set_mask"):
        torch.ops.dynasparse.mask_guard(mask, mask._version - 1, like)
