"""Triton kernels and their launch wrappers, one module per kernel family (bitmask, ...).

Importing a submodule requires the triton package. Nothing is imported here: whether a
@triton.jit function is compiled or interpreted is fixed when its module is imported (by
TRITON_INTERPRET at that moment), so each module is loaded only when first used, normally
by dynasparse.ops. Each module lists its kernels and launch configs in `AOT_SPECS`, which
`python -m dynasparse.kernels.aot` compiles for sm_80 and sm_90 without a GPU.
"""
