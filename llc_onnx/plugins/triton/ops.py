"""The kernels as PyTorch custom ops (``torch.library``): ``llc_onnx::matmul_nbits`` and ``llc_onnx::series_matmul``.

::

    torch.ops.llc_onnx.matmul_nbits(x, b, scales, K, N, bits, block_size, bias=None)      # y = x·W (+ bias)
    torch.ops.llc_onnx.series_matmul(x, b, scales, K, N, bits, block_size, terms, bias=None)

``x`` ``[..., K]`` (untiled for the series), ``b`` the MatMulNBits bytes (uint8 ``[N, terms·n_blk, blob]``),
``scales`` float ``[N·terms·n_blk]`` (blocked) or ``[N·terms]`` (per channel). CUDA tensors of dtype
fp16/bf16/fp32 run the Triton kernels (when triton imports); every other case runs the torch reference
(:mod:`.reference`). Both ops have a fake (meta) implementation and an autograd formula for ``x`` and
``bias`` (``dx = dy · Wᵀ`` with W dequantized by the reference), so the interpreter can take gradients
through them. Importing this module registers the ops once per process.
"""

from __future__ import annotations

import importlib.util

import torch

from . import reference

Tensor = torch.Tensor
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """Whether ``triton`` is importable (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: Tensor) -> bool:
    return x.device.type == "cuda" and x.dtype in _TRITON_DTYPES and triton_available()


@torch.library.custom_op("llc_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: Tensor, b: Tensor, scales: Tensor, K: int, N: int, bits: int, block_size: int,
                 bias: Tensor | None = None) -> Tensor:
    return reference.matmul_nbits(x, b, scales, K=K, N=N, bits=bits, block_size=block_size, bias=bias)


@matmul_nbits.register_kernel("cuda")
def _matmul_nbits_cuda(x, b, scales, K, N, bits, block_size, bias=None):
    if _use_triton(x):
        from .launch import matmul_nbits_triton

        return matmul_nbits_triton(x, b, scales, K=K, N=N, bits=bits, block_size=block_size, bias=bias)
    return reference.matmul_nbits(x, b, scales, K=K, N=N, bits=bits, block_size=block_size, bias=bias)


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, b, scales, K, N, bits, block_size, bias=None):
    return x.new_empty((*x.shape[:-1], N))


@torch.library.custom_op("llc_onnx::series_matmul", mutates_args=())
def series_matmul(x: Tensor, b: Tensor, scales: Tensor, K: int, N: int, bits: int, block_size: int, terms: int,
                  bias: Tensor | None = None) -> Tensor:
    return reference.series_matmul(x, b, scales, K=K, N=N, bits=bits, block_size=block_size, terms=terms,
                                   bias=bias)


@series_matmul.register_kernel("cuda")
def _series_matmul_cuda(x, b, scales, K, N, bits, block_size, terms, bias=None):
    if _use_triton(x):
        from .launch import matmul_nbits_triton

        return matmul_nbits_triton(x, b, scales, K=K, N=N, bits=bits, block_size=block_size, terms=terms,
                                   bias=bias)
    return reference.series_matmul(x, b, scales, K=K, N=N, bits=bits, block_size=block_size, terms=terms,
                                   bias=bias)


@series_matmul.register_fake
def _series_matmul_fake(x, b, scales, K, N, bits, block_size, terms, bias=None):
    return x.new_empty((*x.shape[:-1], N))


# -- autograd: gradients reach x and bias (the packed weights are constants) ---------------------------------
def _setup(ctx, inputs, output, terms_pos: int | None):
    x, b, scales = inputs[:3]
    K, N, bits, block_size = inputs[3:7]
    terms = inputs[terms_pos] if terms_pos is not None else 1
    bias = inputs[-1]
    ctx.save_for_backward(b, scales)
    ctx.meta = (K, N, bits, block_size, terms, x.dtype, bias is not None, bias.dtype if bias is not None else None)


def _backward(ctx, grad, n_int_args: int):
    b, scales = ctx.saved_tensors
    K, N, bits, block_size, terms, xdtype, has_bias, bdtype = ctx.meta
    ct = torch.float64 if grad.dtype == torch.float64 else torch.float32
    w = reference.dequantize(b, scales, K=K, N=N, bits=bits, block_size=block_size, terms=terms, dtype=ct)
    dx = (grad.to(ct) @ w.T).to(xdtype)
    dbias = grad.to(ct).reshape(-1, N).sum(0).to(bdtype) if has_bias else None
    return (dx, None, None) + (None,) * n_int_args + (dbias,)


torch.library.register_autograd(
    "llc_onnx::matmul_nbits", lambda ctx, grad: _backward(ctx, grad, 4),
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, None))
torch.library.register_autograd(
    "llc_onnx::series_matmul", lambda ctx, grad: _backward(ctx, grad, 5),
    setup_context=lambda ctx, inputs, output: _setup(ctx, inputs, output, 7))
