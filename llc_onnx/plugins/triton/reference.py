"""Torch reference of the weight-only ops: unpack the MatMulNBits bytes, dequantize, multiply.

Runs on any device and dtype (the interpreter's float32/float64, fp16/bf16 on CUDA); it is what the custom
ops run where Triton is absent or the tensors are not on CUDA, and what the kernels are tested against.
Maths as in :mod:`llc_onnx.plugins.layout`: ``W[k, n] = Σ_t (u_t[n, k] − zp) · s_t[n, k // bs]``,
``Y = X · W (+ bias)``, computed in float32 (float64 when X is float64) and returned in X's dtype.
"""

from __future__ import annotations

import torch

from ...errors import LLCError
from ..layout import check_format, n_blocks

Tensor = torch.Tensor


def unpack_codes(b: Tensor, K: int, bits: int) -> Tensor:
    """Unsigned codes ``[N, K]`` (int32) of MatMulNBits bytes ``b`` ``[N, n_blk, blob]`` (uint8)."""
    N = b.shape[0]
    per = 8 // bits
    flat = b.reshape(N, -1).to(torch.int32)
    shifts = torch.arange(per, device=b.device, dtype=torch.int32) * bits
    u = ((flat[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(N, -1)
    if u.shape[1] < K:
        raise LLCError(f"B: {u.shape[1]} codes per row, fewer than K={K}")
    return u[:, :K]


def _zero_points(zero_points: Tensor | None, N: int, nblk: int, bits: int, dtype) -> Tensor | float:
    if zero_points is None:
        return float(1 << (bits - 1))
    if zero_points.dtype == torch.uint8:
        row = -(-nblk // (8 // bits))
        return unpack_codes(zero_points.reshape(N, row, 1), nblk, bits).to(dtype)
    return zero_points.reshape(N, nblk).to(dtype)


def dequantize(b: Tensor, scales: Tensor, *, K: int, N: int, bits: int, block_size: int, terms: int = 1,
               zero_points: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``W`` ``[K, N]`` in ``dtype``. ``K`` is the length of one term; ``b`` holds ``terms`` terms stacked along K
    and ``scales`` is ``[N·terms·n_blk]`` (blocked) or ``[N·terms]`` (one scale per channel and term)."""
    check_format(K, N, bits, block_size)
    if terms > 1 and K % block_size:
        raise LLCError(f"series: K={K} is not a multiple of block_size={block_size}")
    nblk = n_blocks(K, block_size)
    kt = K if terms == 1 else terms * K
    u = unpack_codes(b, kt, bits).to(dtype).reshape(N, terms, K)
    if scales.numel() == N * terms and nblk > 1:
        s = scales.reshape(N, terms, 1).to(dtype)
    else:
        s = scales.reshape(N, terms, nblk).to(dtype).repeat_interleave(block_size, dim=2)[:, :, :K]
    if zero_points is not None:
        if terms > 1:
            raise LLCError("series: zero points are not supported; the series format is symmetric")
        zp = _zero_points(zero_points, N, nblk, bits, dtype).repeat_interleave(block_size, dim=1)[:, None, :K]
    else:
        zp = _zero_points(None, N, nblk, bits, dtype)
    return ((u - zp) * s).sum(dim=1).T


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def matmul_nbits(x: Tensor, b: Tensor, scales: Tensor, *, K: int, N: int, bits: int, block_size: int,
                 bias: Tensor | None = None, zero_points: Tensor | None = None) -> Tensor:
    """``x · W (+ bias)`` for MatMulNBits bytes (``x`` ``[..., K]``)."""
    ct = _compute_dtype(x)
    w = dequantize(b, scales, K=K, N=N, bits=bits, block_size=block_size, zero_points=zero_points, dtype=ct)
    y = x.to(ct) @ w
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def series_matmul(x: Tensor, b: Tensor, scales: Tensor, *, K: int, N: int, bits: int, block_size: int,
                  terms: int, bias: Tensor | None = None) -> Tensor:
    """``x · Σ_t W_t (+ bias)`` for ``terms`` terms stacked along K (``x`` ``[..., K]``, untiled)."""
    ct = _compute_dtype(x)
    w = dequantize(b, scales, K=K, N=N, bits=bits, block_size=block_size, terms=terms, dtype=ct)
    y = x.to(ct) @ w
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)
