"""Series-expansion ops of the ``ai.llc_onnx`` domain (:mod:`llc_onnx.passes.series`), run directly.

``SeriesMatMul(A, B, scales)`` and ``SeriesConv(X, B, scales[, bias])``: ``B`` uint8 ``[N, T·nb, blob]`` holds the
T stacked terms in the MatMulNBits layout (codes along K, low bits first, ``u = q + 2^(bits−1)``), ``scales``
``[N·T·nb]``. The weight is ``w[N, K] = Σ_t s_t·Q_t`` and the node computes ``A·wᵀ`` (resp. ``Conv(X, w)``).
Models that carry the ops' local functions are inlined by :class:`TorchGraph` and never reach these
implementations; a model with the bare custom nodes (``SeriesPass(function=False)``) does.
"""

from __future__ import annotations

import torch
from ..registry import lookup, register_op
from ..tensors import Tensor

DOMAIN = "ai.llc_onnx"


def series_weight(ctx, b: Tensor, scales: Tensor) -> Tensor:
    """``w [N, K] = Σ_t s_t·Q_t`` from the packed bytes and scales (attributes K, N, bits, block_size, terms)."""
    k, n, bits = int(ctx.a("K")), int(ctx.a("N")), int(ctx.a("bits"))
    block, terms = int(ctx.a("block_size")), int(ctx.a("terms"))
    if bits not in (2, 4, 8):
        raise ctx.fail(f"bits={bits}; series terms have 2, 4 or 8 bits")
    nb = -(-k // block)
    per = 8 // bits
    blob = -(-block * bits // 8)
    if tuple(b.shape) != (n, terms * nb, blob):
        raise ctx.fail(f"B has shape {tuple(b.shape)}, expected {(n, terms * nb, blob)} from K={k}, N={n}, "
                       f"bits={bits}, block_size={block}, terms={terms}")
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=b.device)
    u = (b.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    q = u.reshape(n, terms * nb, blob * per)[:, :, :block] - (1 << (bits - 1))
    dq = q.to(ctx.dtype) * scales.reshape(n, terms * nb, 1).to(ctx.dtype)
    return dq.reshape(n, terms, nb * block)[:, :, :k].sum(dim=1)


@register_op("SeriesMatMul", domain=DOMAIN)
def _series_matmul(ctx, xs):
    a, b, scales = xs[0], xs[1], xs[2]
    return torch.matmul(a, series_weight(ctx, b, scales).t())


@register_op("SeriesConv", domain=DOMAIN)
def _series_conv(ctx, xs):
    x, b, scales = xs[0], xs[1], xs[2]
    bias = xs[3] if len(xs) > 3 else None
    ks = [int(v) for v in ctx.a("kernel_shape")]
    w = series_weight(ctx, b, scales).reshape(int(ctx.a("N")), -1, *ks)
    conv = lookup("Conv", "", 11)  # the ONNX Conv implementation reads the same attributes from ctx
    return conv(ctx, [x, w, bias])
