"""Which implementation computes a weight-only matmul: the Triton kernel on CUDA, the torch reference elsewhere.

These are the functions the interpreter's ``MatMulNBits`` op (``interpreter/ops/contrib.py``), the series
node and the GPU runner call. Arguments mirror the ONNX node: ``x`` the activation ``[..., K]``, ``b`` the
uint8 bytes ``[N, n_blk, blob]``, ``scales`` ``[N·n_blk]``, attributes ``K, N, bits, block_size``, optional
``bias`` ``[N]`` and ``zero_points``. Without zero points (llc-onnx's symmetric format) the call goes to
the ``llc_onnx::matmul_nbits`` custom op, which runs Triton for fp16/bf16/fp32 CUDA tensors and the
reference otherwise; with zero points (ORT's asymmetric quantizers) the reference runs on every device.
"""

from __future__ import annotations

import torch

from ...errors import LLCError
from . import ops, reference

Tensor = torch.Tensor


def matmul_nbits(x: Tensor, b: Tensor, scales: Tensor, *, K: int, N: int, bits: int = 4, block_size: int,
                 bias: Tensor | None = None, zero_points: Tensor | None = None, g_idx: Tensor | None = None
                 ) -> Tensor:
    """``x · dequant(B) (+ bias)`` as ``com.microsoft::MatMulNBits`` defines it."""
    if g_idx is not None:
        raise LLCError("MatMulNBits: the g_idx input (act-order) is not supported; requantize without act-order")
    scales = scales.reshape(-1)
    if zero_points is not None:
        return reference.matmul_nbits(x, b, scales, K=K, N=N, bits=bits, block_size=block_size, bias=bias,
                                      zero_points=zero_points)
    return ops.matmul_nbits(x, b, scales, K, N, bits, block_size, bias)


def series_matmul(x: Tensor, b: Tensor, scales: Tensor, *, K: int, N: int, bits: int, block_size: int, terms: int,
                  bias: Tensor | None = None) -> Tensor:
    """``x · Σ_t W_t (+ bias)`` for ``terms`` terms stacked along K (``x`` untiled, ``K`` of one term)."""
    return ops.series_matmul(x, b, scales.reshape(-1), K, N, bits, block_size, terms, bias)
