"""conv2d_sddmm_panels (csrc/cpu/conv_sddmm.cpp), a convolution's weight gradient at the
nonzeros of a panel plan, against float64 torch.nn.grad.conv2d_weight gathered at the mask in
plan order: kernel sizes, strides 1-3, paddings (also beyond the kernel's reach), dilations,
images narrower and wider than a pixel block (the gather, single-load and multi-row load tile
paths, several images per block), several K-panels, every dtype, sparsity 0 to 1; plus its
errors, opcheck, compile, thread independence and its use as SparseConv2d's masked weight
gradient."""

import pytest
import torch
import torch.nn.functional as F

from dynasparse import ops
from dynasparse.nn import SparseConv2d
from dynasparse.ops import matmul as matmul_ops
from dynasparse.reference import matmul as reference
from tests.helpers import assert_close_to_float64

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPARSITIES = [0.0, 0.9, 1.0]
# (batch, in, out, height, width, kernel, stride, padding, dilation)
GEOMETRIES = [
    (2, 3, 5, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1)),  # 99 pixels: vectors span up to 3 output rows
    (1, 5, 7, 4, 70, (3, 1), (1, 1), (1, 0), (1, 1)),  # rows wider than 4 vectors
    (3, 6, 4, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),  # input as wide as the output: one load per vector
    (20, 3, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),  # 20 small images: blocks of several, several tasks
    (3, 2, 3, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1)),  # 4 pixels wide (gather)
    (2, 3, 4, 40, 37, (3, 3), (1, 1), (1, 1), (1, 1)),  # 1480 pixels: several blocks per image, the last partial
    (2, 4, 6, 13, 17, (5, 5), (2, 2), (2, 2), (1, 1)),  # stride 2 (gather)
    (2, 3, 4, 17, 14, (3, 3), (3, 3), (0, 1), (1, 1)),  # stride 3
    (1, 3, 4, 3, 40, (3, 3), (2, 1), (0, 1), (1, 2)),  # stride 2 down the rows only: row loads
    (1, 3, 9, 10, 33, (3, 3), (1, 1), (2, 2), (2, 2)),  # dilation 2
    (2, 3, 4, 3, 5, (3, 3), (1, 1), (4, 5), (1, 1)),  # padding beyond the kernel's reach
    (3, 7, 3, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1, 25 pixels: a partial last vector
    (2, 5, 4, 3, 3, (3, 3), (1, 1), (0, 0), (1, 1)),  # a 1 x 1 output
    (2, 33, 17, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # K = 297: two panels of 256, C not a multiple of 16
    (9, 19, 24, 20, 24, (3, 3), (1, 1), (1, 1), (1, 1)),  # 9 images of 480 pixels: more blocks than tasks
    (0, 2, 4, 6, 6, (3, 3), (1, 1), (0, 0), (1, 1)),  # empty batch
]


def generator_for(*key):
    return torch.Generator().manual_seed(hash(key) % 2**31)


def output_size(geometry):
    _, _, _, height, width, kernel, stride, padding, dilation = geometry
    return tuple((size + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
                 for d, size in enumerate((height, width)))


def plan_order(mask, panel):
    """(rows, columns) of the mask's nonzeros in plan order: panel by panel, then row, then
    column (the layout of csrc/ops.cpp), without the library."""
    n, k = mask.shape
    rows, columns = mask.nonzero(as_tuple=True)
    order = torch.argsort((columns // panel) * n * k + rows * k + columns)
    return rows[order], columns[order]


def sddmm_case(geometry, sparsity, dtype, panel, key=()):
    batch, channels, out_channels, height, width, kernel, stride, padding, dilation = geometry
    generator = generator_for(geometry, sparsity, dtype, panel, *key)
    x = torch.randn(batch, channels, height, width, generator=generator)
    grad_out = torch.randn(batch, out_channels, *output_size(geometry), generator=generator)
    mask = torch.rand(out_channels, channels * kernel[0] * kernel[1], generator=generator) >= sparsity
    row_ptr, cols = ops.plan_panels(mask, panel, backend="cpu")
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    return grad_out.to(dtype), x.to(dtype), mask, row_ptr, cols, kernel, conv


def conv_weight_at(grad_out, x, mask, panel, kernel, conv, dtype):
    """torch's dense weight gradient in `dtype`, at the mask's nonzeros in plan order."""
    rows, columns = plan_order(mask, panel)
    shape = (grad_out.shape[1], x.shape[1], *kernel)
    dense = torch.nn.grad.conv2d_weight(x.to(dtype), shape, grad_out.to(dtype), conv["stride"], conv["padding"],
                                        conv["dilation"])
    return dense.reshape(shape[0], -1)[rows, columns]


def call(grad_out, x, row_ptr, cols, panel, kernel, conv, backend="cpu"):
    return ops.conv2d_sddmm_panels(grad_out, x, row_ptr, cols, panel, kernel, conv["stride"], conv["padding"],
                                   conv["dilation"], backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("panel", [7, 256])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_matches_float64(geometry, panel, sparsity, dtype):
    grad_out, x, mask, row_ptr, cols, kernel, conv = sddmm_case(geometry, sparsity, dtype, panel)
    values = call(grad_out, x, row_ptr, cols, panel, kernel, conv)
    assert values.dtype == dtype and values.shape == (int(mask.sum()),)
    exact = conv_weight_at(grad_out.double(), x.double(), mask, panel, kernel, conv, torch.float64)
    torch_own = conv_weight_at(grad_out, x, mask, panel, kernel, conv, dtype)
    assert_close_to_float64(values, torch_own, exact)
    if geometry[0] == 0:
        assert torch.equal(values, torch.zeros_like(values))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", [GEOMETRIES[i] for i in (0, 6, 10, 13, 15)], ids=str)
def test_reference_matches_float64(geometry, dtype):
    """The reference (F.unfold against grad_out; what CUDA tensors run) against the oracle."""
    grad_out, x, mask, row_ptr, cols, kernel, conv = sddmm_case(geometry, 0.6, dtype, 7, ("reference",))
    exact = conv_weight_at(grad_out.double(), x.double(), mask, 7, kernel, conv, torch.float64)
    torch_own = conv_weight_at(grad_out, x, mask, 7, kernel, conv, dtype)
    assert_close_to_float64(call(grad_out, x, row_ptr, cols, 7, kernel, conv, backend="reference"), torch_own, exact)


def test_cuda_tensors_run_the_reference(recwarn):
    """No CUDA kernel: a call on a CUDA device gets the reference, without a fallback warning
    (run here on CPU tensors, the device given explicitly)."""
    grad_out, x, mask, row_ptr, cols, kernel, conv = sddmm_case(GEOMETRIES[0], 0.5, torch.float64, 7)
    values = matmul_ops._conv2d_sddmm_panels(grad_out, x, row_ptr, cols, 7, list(kernel), list(conv["stride"]),
                                             list(conv["padding"]), list(conv["dilation"]),
                                             device=torch.device("cuda"))
    torch.testing.assert_close(values, reference.conv2d_sddmm_panels(grad_out, x, row_ptr, cols, 7, kernel,
                                                                     conv["stride"], conv["padding"],
                                                                     conv["dilation"]))
    assert not [w for w in recwarn if "conv2d_sddmm_panels" in str(w.message)]


def test_strided_inputs_and_threads_give_bitwise_equal_results():
    """Non-contiguous grad_out and x equal their contiguous copies, and 1 and 2 threads agree
    bitwise (each task sums its fixed share of the pixels, the shares added in task order)."""
    geometry = GEOMETRIES[14]
    grad_out, x, mask, row_ptr, cols, kernel, conv = sddmm_case(geometry, 0.7, torch.float32, 256)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(call(grad_out, x, row_ptr, cols, 256, kernel, conv))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    strided_x = torch.empty(x.shape[::-1]).permute(3, 2, 1, 0)
    strided_x.copy_(x)
    strided_grad = torch.empty(grad_out.shape[::-1]).permute(3, 2, 1, 0)
    strided_grad.copy_(grad_out)
    assert not strided_x.is_contiguous() and not strided_grad.is_contiguous()
    assert torch.equal(call(strided_grad, strided_x, row_ptr, cols, 256, kernel, conv), results[0])
    exact = conv_weight_at(grad_out.double(), x.double(), mask, 256, kernel, conv, torch.float64)
    assert_close_to_float64(results[0], conv_weight_at(grad_out, x, mask, 256, kernel, conv, torch.float32), exact)


def test_non_finite_inputs_reach_only_the_weights_that_read_them():
    """An inf in x spreads to exactly the weights whose taps read it (never through the zero
    padding or lanes past the image), as in torch's gradient."""
    geometry = (1, 2, 3, 9, 10, (3, 3), (1, 1), (1, 1), (1, 1))
    grad_out, x, mask, row_ptr, cols, kernel, conv = sddmm_case(geometry, 0.0, torch.float32, 256)
    x[0, 1, 4, 9] = float("inf")
    values = call(grad_out, x, row_ptr, cols, 256, kernel, conv)
    exact = conv_weight_at(grad_out.double(), x.double(), mask, 256, kernel, conv, torch.float64)
    assert torch.equal(torch.isfinite(values), torch.isfinite(exact))


def small_case():
    geometry = (2, 3, 4, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1))
    grad_out, x, _, row_ptr, cols, _, _ = sddmm_case(geometry, 0.5, torch.float32, 4, ("small",))
    return grad_out, x, row_ptr, cols


CONV = ([3, 3], [1, 1], [1, 1], [1, 1])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs_raise_clear_errors(backend):
    grad_out, x, row_ptr, cols = small_case()

    def run(grad_out=grad_out, x=x, row_ptr=row_ptr, cols=cols, panel=4, conv=CONV):
        return ops.conv2d_sddmm_panels(grad_out, x, row_ptr, cols, panel, *conv, backend=backend)

    with pytest.raises(ValueError, match="conv2d_sddmm_panels: x must be 4-D"):
        run(x=x[0])
    with pytest.raises(ValueError, match="grad_out must be 4-D"):
        run(grad_out=grad_out[0])
    with pytest.raises(TypeError, match="x must be float32"):
        run(x=x.int())
    with pytest.raises(TypeError, match=r"grad_out is .* but x is .* \(one dtype per product\)"):
        run(grad_out=grad_out.double())
    with pytest.raises(ValueError, match="conv2d_sddmm_panels: stride must be two integers >= 1"):
        run(conv=(CONV[0], [1, 0], *CONV[2:]))
    with pytest.raises(ValueError, match="conv2d_sddmm_panels: padding must be two integers >= 0"):
        run(conv=(*CONV[:2], [-1, 1], CONV[3]))
    with pytest.raises(ValueError, match=r"grad_out must be \[2, N, 5, 6\]"):
        run(grad_out=grad_out[:, :, :4])  # an output of another geometry
    with pytest.raises(ValueError, match=r"grad_out must be \[2, N, 5, 6\]"):
        run(grad_out=grad_out[:1])  # another batch
    with pytest.raises(ValueError, match="row_ptr has"):  # grad_out of another channel count
        run(grad_out=grad_out[:, :3])
    with pytest.raises(ValueError, match="row_ptr has"):  # a plan for another kernel size
        run(x=x[:, :2])
    with pytest.raises(ValueError, match="size 5 in dimension 2 is smaller than the dilated kernel's 7"):
        run(conv=(CONV[0], CONV[1], [0, 0], [3, 3]))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_plans_raise_clear_errors(backend):
    """A plan the plan ops could not have built fails before anything is read through it."""
    grad_out, x, row_ptr, cols = small_case()

    def run(row_ptr=row_ptr, cols=cols):
        return ops.conv2d_sddmm_panels(grad_out, x, row_ptr, cols, 4, *CONV, backend=backend)

    outside = cols.clone()
    outside[3] = 4  # panel width 4: offsets are in [0, 4)
    with pytest.raises(IndexError, match=r"cols\[3\] = 4 is outside panel"):
        run(cols=outside)
    last_panel = cols.clone()
    last_panel[-1] = 3  # K = 27: the last panel has 3 columns
    with pytest.raises(IndexError, match=r"whose column offsets are in \[0, 3\)"):
        run(cols=last_panel)
    negative = cols.clone()
    negative[0] = -1  # read as 65535
    with pytest.raises(IndexError, match="is outside panel"):
        run(cols=negative)
    decreasing = row_ptr.clone()
    decreasing[5] = decreasing[6] + 1
    with pytest.raises(ValueError, match="row_ptr must not decrease"):
        run(row_ptr=decreasing)
    past = row_ptr.clone()
    past[-1] = cols.numel() + 1
    with pytest.raises(ValueError, match=r"must be cols.numel\(\)"):
        run(row_ptr=past)
    inner_past = row_ptr.clone()
    inner_past[7] = cols.numel() + 5
    with pytest.raises(ValueError, match=rf"row_ptr\[7\] = {cols.numel() + 5} > row_ptr\[8\]"):
        run(row_ptr=inner_past)
    unordered = cols.clone()
    segment = int(torch.nonzero(torch.diff(row_ptr) >= 2)[0])
    first = int(row_ptr[segment])
    unordered[first], unordered[first + 1] = cols[first + 1], cols[first]
    with pytest.raises(ValueError, match="column offsets must ascend"):
        run(cols=unordered)
    with pytest.raises(TypeError, match=r"cols must be .* \(as built by the plan ops\)"):
        run(cols=cols.int())


def test_opcheck():
    grad_out, x, row_ptr, cols = small_case()
    for args in ((grad_out, x, row_ptr, cols, 4, *CONV),
                 (grad_out[:1, :, ::2], x[:1], row_ptr, cols, 4, [3, 3], [2, 1], [1, 1], [1, 1])):
        torch.library.opcheck(matmul_ops._conv2d_sddmm_panels.native, args)


def test_compile_fullgraph():
    torch._dynamo.reset()
    grad_out, x, row_ptr, cols = small_case()

    @torch.compile(fullgraph=True, dynamic=False)
    def weight_grad(grad_out, x):
        values = ops.conv2d_sddmm_panels(grad_out, x, row_ptr, cols, 4, *CONV, backend="cpu")
        return ops.unpack_panels(values, row_ptr, cols, 4, grad_out.shape[1], x.shape[1] * 9, backend="cpu") * 2

    values = ops.conv2d_sddmm_panels(grad_out, x, row_ptr, cols, 4, *CONV, backend="cpu")
    expected = ops.unpack_panels(values, row_ptr, cols, 4, grad_out.shape[1], x.shape[1] * 9, backend="cpu") * 2
    assert torch.equal(weight_grad(grad_out, x), expected)


def test_reference_runs_traced():
    """The reference (what CUDA tensors run) under torch.compile, plan checks included."""
    torch._dynamo.reset()
    grad_out, x, row_ptr, cols = small_case()
    compiled = torch.compile(reference.conv2d_sddmm_panels, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(grad_out, x, row_ptr, cols, 4, *CONV),
                               ops.conv2d_sddmm_panels(grad_out, x, row_ptr, cols, 4, *CONV, backend="cpu"))


# --- SparseConv2d's masked weight gradient on the kernel ------------------------------------

@pytest.fixture
def sddmm_calls(monkeypatch):
    """Counts the SDDMM calls (eager only: a traced backward may not mutate a counter)."""
    calls = []
    original = ops.conv2d_sddmm_panels
    monkeypatch.setattr(ops, "conv2d_sddmm_panels", lambda *args, **kwargs: calls.append(1) or original(*args,
                                                                                                         **kwargs))
    return calls


@pytest.fixture
def torch_weight_grads(monkeypatch):
    """Counts the weight gradients torch's convolution backward is asked for (eager only: the
    compiler looks the op up too)."""
    calls = []
    original = torch.ops.aten.convolution_backward

    def convolution_backward(*args):
        calls.append(bool(args[-1][1]))
        return original(*args)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", convolution_backward)
    return calls


@pytest.mark.parametrize("kernel_size, conv", [
    ((3, 3), dict(padding=(1, 1))), ((3, 5), dict(padding=(0, 4), dilation=(1, 2))),
    ((3, 3), dict(padding=(1, 1), stride=(2, 2))), ((5, 3), dict(padding=(2, 0), stride=(3, 2), dilation=(1, 2))),
    ((4, 2), dict(padding=(5, 0), stride=(2, 3))),
], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
def test_sparse_conv2d_masked_weight_gradient_on_the_kernel(kernel_size, conv, sparsity, sddmm_calls,
                                                            torch_weight_grads):
    """SparseConv2d in masked mode takes its weight gradient from conv2d_sddmm_panels (torch's
    convolution backward computes no weight gradient) and matches float64 F.conv2d of w * m,
    kept at the mask, within twice torch's own float32 error."""
    torch.manual_seed(16)
    layer = SparseConv2d(7, 10, kernel_size, sparsity=min(sparsity, 0.5), grad_mode="masked", backend="sparse",
                         **conv)
    if sparsity != 0.5:
        layer.set_mask(torch.rand(layer.mask.shape) >= sparsity)
    x = torch.randn(3, 7, 12, 17, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), grad_out)
    assert len(sddmm_calls) == 1 and not any(torch_weight_grads)

    def torch_conv(dtype):
        x_ref = x.detach().to(dtype).requires_grad_()
        w_ref = torch.where(layer.mask, layer.weight, 0).detach().to(dtype).requires_grad_()
        b_ref = layer.bias.detach().to(dtype).requires_grad_()
        y_ref = F.conv2d(x_ref, w_ref, b_ref, **conv)
        gx_ref, gw_ref, gb_ref = torch.autograd.grad(y_ref, (x_ref, w_ref, b_ref), grad_out.to(dtype))
        return gx_ref, torch.where(layer.mask, gw_ref, 0), gb_ref

    for got, torch_own, exact in zip((gx, gw, gb), torch_conv(torch.float32), torch_conv(torch.float64)):
        assert_close_to_float64(got, torch_own, exact)
    assert torch.equal(gw[~layer.mask], torch.zeros(int((~layer.mask).sum())))


def test_sparse_conv2d_masked_weight_gradient_compiles():
    torch.manual_seed(17)
    layer = SparseConv2d(6, 10, 3, padding=1, sparsity=0.7, grad_mode="masked", backend="sparse")
    x = torch.randn(2, 6, 9, 11, requires_grad=True)
    eager_grads = torch.autograd.grad(layer(x).square().sum(), (x, layer.weight, layer.bias))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    grads = torch.autograd.grad(compiled(x).square().sum(), (x, layer.weight, layer.bias))
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_sparse_conv2d_double_backward_stays_on_torch_ops(sddmm_calls):
    """create_graph=True: the backward must itself be differentiable, so it runs torch's (the
    second backward, recording nothing, reaches the layer again through grad_out and runs the
    kernel)."""
    torch.manual_seed(18)
    layer = SparseConv2d(3, 4, 3, padding=1, sparsity=0.5, grad_mode="masked", backend="sparse")
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    (gw,) = torch.autograd.grad(layer(x).square().sum(), (layer.weight,), create_graph=True)
    assert not sddmm_calls
    gw.sum().backward()
    assert len(sddmm_calls) == 1
    w_ref = layer.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    (gw_ref,) = torch.autograd.grad(F.conv2d(x_ref, torch.where(layer.mask, w_ref, 0), layer.bias, padding=1)
                                    .square().sum(), (w_ref,), create_graph=True)
    gw_ref.sum().backward()
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
