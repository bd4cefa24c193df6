"""QuantizeLinear / DequantizeLinear: per tensor, per axis and blocked (``block_size``), with zero points."""

from __future__ import annotations

import torch

from ..registry import register_ops
from ..tensors import Tensor, norm_axis

def _q_broadcast(ctx, scale: Tensor, x: Tensor) -> Tensor:
    if scale.dim() == 0 or scale.numel() == 1 and x.dim() != scale.dim():
        return scale.reshape(())
    axis = norm_axis(ctx.a("axis", 1), x.dim())
    block = ctx.a("block_size", 0)
    if block:
        return scale.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


@register_ops("DequantizeLinear")
def _dequant(ctx, xs):
    x, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 else None
    xf = x.to(ctx.dtype)
    if zp is not None:
        xf = xf - _q_broadcast(ctx, zp.to(ctx.dtype), x)
    return xf * _q_broadcast(ctx, scale, x)


@register_ops("QuantizeLinear")
def _quant(ctx, xs):
    x, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 else None
    out_dtype = zp.dtype if zp is not None else torch.uint8
    info = torch.iinfo(out_dtype)
    q = torch.round(x / _q_broadcast(ctx, scale, x))
    if zp is not None:
        q = q + _q_broadcast(ctx, zp.to(ctx.dtype), x)
    return torch.clamp(q, info.min, info.max).to(out_dtype)
