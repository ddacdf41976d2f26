"""conv2d_panels (csrc/cpu/conv_panels.cpp), the implicit-GEMM convolution over a panel plan,
against float64 F.conv2d of the masked weight: kernel sizes, strides, paddings, dilations,
images narrower and wider than a pixel block, several small images per block, outputs
narrower than a vector (one to three masked loads per vector, or a gather), several K-panels,
every dtype; plus its errors, opcheck, compile and thread independence."""

import pytest
import torch
import torch.nn.functional as F

from dynasparse import ops
from dynasparse.ops import matmul as matmul_ops
from dynasparse.reference import matmul as reference
from tests.helpers import assert_close_to_float64, poison_allocator

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
# (batch, in, out, height, width, kernel, stride, padding, dilation)
GEOMETRIES = [
    (2, 3, 5, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1)),  # 99 pixels: vectors cross output rows (gather)
    (1, 5, 7, 4, 70, (3, 1), (1, 1), (1, 0), (1, 1)),  # rows wider than a 64-pixel slice
    (2, 4, 6, 13, 17, (5, 5), (2, 2), (2, 2), (1, 1)),  # stride 2
    (1, 3, 9, 10, 33, (3, 3), (1, 1), (2, 2), (2, 2)),  # dilation 2
    (3, 7, 3, 5, 5, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1, 25 pixels: 32-pixel slices
    (2, 3, 5, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1)),  # 16 pixels: 16-pixel slices
    (2, 33, 17, 8, 16, (3, 3), (1, 1), (1, 1), (1, 1)),  # K = 297: two panels of 256
    (1, 3, 4, 3, 40, (3, 3), (2, 1), (0, 1), (1, 2)),  # mixed per-dimension parameters
    (0, 2, 4, 6, 6, (3, 3), (1, 1), (0, 0), (1, 1)),  # empty batch
    # Blocks of 4 vectors: several small images per block, the last block partial.
    (7, 3, 6, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1)),  # 15 pixels: 4 images per block, 7 images
    (5, 4, 5, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1)),  # 30 pixels: 2 images per block
    (5, 3, 530, 3, 3, (1, 1), (1, 1), (0, 0), (1, 1)),  # batched images, two groups of W rows
    # Outputs narrower than 16: a vector's lanes span output rows.
    (3, 2, 5, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),  # input as wide as the output: one load
    (3, 4, 6, 10, 10, (3, 3), (1, 1), (0, 0), (1, 1)),  # 8-wide output of a 10-wide input: two loads
    (2, 3, 4, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1)),  # 9-wide rows: three loads; 63 pixels
    (4, 5, 6, 1, 40, (1, 3), (1, 1), (0, 1), (1, 1)),  # SparseConv1d's (1, k) view: 3 vectors
    (3, 5, 6, 40, 1, (3, 1), (1, 1), (1, 0), (1, 1)),  # the (k, 1) view: 1-wide rows gather
]


def generator_for(*key):
    return torch.Generator().manual_seed(hash(key) % 2**31)


def conv_case(geometry, sparsity, dtype, panel, key=()):
    batch, channels, out_channels, height, width, kernel, stride, padding, dilation = geometry
    generator = generator_for(geometry, sparsity, dtype, panel, *key)
    weight = torch.randn(out_channels, channels, *kernel, generator=generator)
    mask = torch.rand(out_channels, channels * kernel[0] * kernel[1], generator=generator) >= sparsity
    x = torch.randn(batch, channels, height, width, generator=generator)
    bias = torch.randn(out_channels, generator=generator)
    row_ptr, cols = ops.plan_panels(mask, panel, backend="cpu")
    weight_2d = weight.reshape(out_channels, -1).to(dtype)
    values = ops.pack_panels(weight_2d, row_ptr, cols, panel, backend="cpu")
    masked = torch.where(mask, weight.reshape(out_channels, -1), 0).reshape(weight.shape)
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    return x.to(dtype), values, row_ptr, cols, bias.to(dtype), masked, conv, kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("panel", [7, 256])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_conv_matches_float64(geometry, panel, sparsity, dtype):
    x, values, row_ptr, cols, bias, masked, conv, kernel = conv_case(geometry, sparsity, dtype, panel)
    n = masked.shape[0]
    with_bias = sparsity != 0.5  # one sparsity without bias
    out_shape = F.conv2d(x.double(), masked.double(), **conv).shape
    poison_allocator(out_shape.numel() * x.element_size(), "cpu")
    y = ops.conv2d_panels(x, values, row_ptr, cols, panel, n, kernel, conv["stride"], conv["padding"],
                          conv["dilation"], bias if with_bias else None, backend="cpu")
    assert y.dtype == dtype and y.shape == out_shape and y.is_contiguous()
    used_bias = bias if with_bias else None
    exact = F.conv2d(x.double(), masked.double(), used_bias.double() if with_bias else None, **conv)
    torch_own = F.conv2d(x, masked.to(dtype), used_bias, **conv)
    assert_close_to_float64(y, torch_own, exact)
    if sparsity == 1.0:
        expected = (bias if with_bias else torch.zeros_like(bias)).reshape(1, n, 1, 1).expand(out_shape)
        assert torch.equal(y, expected)


def test_reference_matches_the_kernel():
    geometry = GEOMETRIES[2]
    x, values, row_ptr, cols, bias, _, conv, kernel = conv_case(geometry, 0.5, torch.float64, 256)
    args = (x, values, row_ptr, cols, 256, geometry[2], kernel, conv["stride"], conv["padding"], conv["dilation"],
            bias)
    torch.testing.assert_close(ops.conv2d_panels(*args, backend="cpu"), reference.conv2d_panels(*args))


@pytest.mark.parametrize("geometry", [
    (3, 19, 40, 20, 24, (3, 3), (1, 1), (1, 1), (1, 1)),  # 480 pixels: 8 blocks per image, the last partial
    (9, 19, 40, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1)),  # 16 pixels: 3 blocks of 4 images, the last partial
    (6, 19, 40, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),  # one block per image
    (6, 19, 40, 1, 40, (1, 3), (1, 1), (0, 1), (1, 1)),  # SparseConv1d's view
], ids=str)
def test_strided_input_and_threads_give_bitwise_equal_results(geometry):
    """A non-contiguous x equals its contiguous copy, and 1 and 2 threads agree bitwise (each
    output element is summed in plan order whatever the split)."""
    batch, channels, n, height, width = geometry[:5]
    x, values, row_ptr, cols, bias, masked, conv, kernel = conv_case(geometry, 0.7, torch.float32, 256)
    strided = torch.randn(batch, height, width, 2 * channels).transpose(1, 3)[:, ::2].transpose(2, 3)
    strided.copy_(x)
    args = (values, row_ptr, cols, 256, n, kernel, conv["stride"], conv["padding"], conv["dilation"], bias)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(ops.conv2d_panels(x, *args, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert not strided.is_contiguous()
    assert torch.equal(results[0], results[1])
    assert torch.equal(ops.conv2d_panels(strided, *args, backend="cpu"), results[0])
    exact = F.conv2d(x.double(), masked.double(), bias.double(), **conv)
    assert_close_to_float64(results[0], F.conv2d(x, masked, bias, **conv), exact)


def small_case():
    geometry = (2, 3, 4, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1))
    x, values, row_ptr, cols, bias, _, _, _ = conv_case(geometry, 0.5, torch.float32, 4, ("small",))
    return x, values, row_ptr, cols, bias


CONV = ([3, 3], [1, 1], [1, 1], [1, 1])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs_raise_the_shared_errors(backend):
    x, values, row_ptr, cols, bias = small_case()

    def call(x=x, values=values, row_ptr=row_ptr, cols=cols, panel=4, n=4, conv=CONV, bias=bias):
        return ops.conv2d_panels(x, values, row_ptr, cols, panel, n, *conv, bias, backend=backend)

    with pytest.raises(ValueError, match="x must be 4-D"):
        call(x=x[0])
    with pytest.raises(TypeError, match="x must be float32"):
        call(x=x.int())
    with pytest.raises(ValueError, match="kernel_size must be two integers >= 1"):
        call(conv=([0, 3], *CONV[1:]))
    with pytest.raises(ValueError, match="stride must be two integers >= 1"):
        call(conv=(CONV[0], [1, 0], *CONV[2:]))
    with pytest.raises(ValueError, match="padding must be two integers >= 0"):
        call(conv=(*CONV[:2], [-1, 1], CONV[3]))
    with pytest.raises(ValueError, match="dilation must be two integers >= 1"):
        call(conv=(*CONV[:3], [1, 0]))
    with pytest.raises(ValueError, match="row_ptr has"):  # a plan for another kernel size
        call(conv=([1, 3], *CONV[1:]))
    with pytest.raises(TypeError, match="values is"):
        call(values=values.double())
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=bias[:3])
    with pytest.raises(ValueError, match="size 5 in dimension 2 is smaller than the dilated kernel's 7"):
        call(conv=(CONV[0], CONV[1], [0, 0], [3, 3]))


def test_opcheck():
    x, values, row_ptr, cols, bias = small_case()
    for args in ((x, values, row_ptr, cols, 4, 4, *CONV, bias),
                 (x[:1], values, row_ptr, cols, 4, 4, [3, 3], [2, 1], [0, 1], [1, 2], None)):
        for overload in matmul_ops._conv2d_panels.overloads():
            torch.library.opcheck(overload, args)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, values, row_ptr, cols, bias = small_case()

    @torch.compile(fullgraph=True, dynamic=False)
    def layer(x):
        return torch.relu(ops.conv2d_panels(x, values, row_ptr, cols, 4, 4, *CONV, bias, backend="cpu"))

    expected = torch.relu(ops.conv2d_panels(x, values, row_ptr, cols, 4, 4, *CONV, bias, backend="cpu"))
    assert torch.equal(layer(x), expected)
