"""Reductions (ReduceMean/Sum/Max/Min/Prod/SumSquare/L1/L2/LogSumExp): axes as attribute (old opsets) or
input, ``keepdims``, ``noop_with_empty_axes``."""

from __future__ import annotations

import torch

from ..registry import register_op
from ..tensors import norm_axis
from .tensor import _axes_from

def _reduce(fn):
    def impl(ctx, xs):
        x = xs[0]
        axes = _axes_from(ctx, xs)
        keep = bool(ctx.a("keepdims", 1))
        if not axes:
            if ctx.a("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = [norm_axis(a, x.dim()) for a in axes]
        if x.dim() == 0:
            return fn(x.reshape(1), [0], False).reshape(())
        return fn(x, axes, keep)

    return impl


def _prod(x, axes, keep):
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, dim=a, keepdim=keep)
    return x


def _sum_keep_dtype(x, axes, keep):
    out = torch.sum(x, dim=axes, keepdim=keep)
    return out if out.dtype == x.dtype else out.to(x.dtype)


register_op("ReduceMean")(_reduce(lambda x, a, k: torch.mean(x, dim=a, keepdim=k)))
register_op("ReduceSum")(_reduce(_sum_keep_dtype))
register_op("ReduceMax")(_reduce(lambda x, a, k: torch.amax(x, dim=a, keepdim=k)))
register_op("ReduceMin")(_reduce(lambda x, a, k: torch.amin(x, dim=a, keepdim=k)))
register_op("ReduceProd")(_reduce(_prod))
register_op("ReduceSumSquare")(_reduce(lambda x, a, k: torch.sum(x * x, dim=a, keepdim=k)))
register_op("ReduceL1")(_reduce(lambda x, a, k: torch.sum(x.abs(), dim=a, keepdim=k)))
register_op("ReduceL2")(_reduce(lambda x, a, k: torch.sqrt(torch.sum(x * x, dim=a, keepdim=k))))
register_op("ReduceLogSumExp")(_reduce(lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k)))
