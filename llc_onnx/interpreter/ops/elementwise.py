"""Element-wise ops: unary math, binary arithmetic and comparisons (numpy broadcasting), variadic Max/Min/
Sum/Mean, Where, Cast/CastLike."""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx
import torch
import torch.nn.functional as F

from ..registry import register_op, register_ops
from ..tensors import FLOAT_TYPES, INT_TYPES, Tensor, is_float

def _unary(name: str, fn: Callable[[Tensor], Tensor]):
    register_op(name)(lambda ctx, xs: fn(xs[0]))


for _name, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Reciprocal": torch.reciprocal,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, like ONNX
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "Identity": lambda x: x,
}.items():
    _unary(_name, _fn)


@register_ops("Add")
def _add(ctx, xs):
    return xs[0] + xs[1]


@register_ops("Sub")
def _sub(ctx, xs):
    return xs[0] - xs[1]


@register_ops("Mul")
def _mul(ctx, xs):
    return xs[0] * xs[1]


@register_ops("Div")
def _div(ctx, xs):
    a, b = xs
    if not is_float(a):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@register_ops("Pow")
def _pow(ctx, xs):
    a, b = xs
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)


@register_ops("Mod")
def _mod(ctx, xs):
    a, b = xs
    if ctx.a("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@register_ops("And")
def _and(ctx, xs):
    return torch.logical_and(xs[0], xs[1])


@register_ops("Or")
def _or(ctx, xs):
    return torch.logical_or(xs[0], xs[1])


@register_ops("Xor")
def _xor(ctx, xs):
    return torch.logical_xor(xs[0], xs[1])


@register_ops("Equal")
def _eq(ctx, xs):
    return torch.eq(xs[0], xs[1])


@register_ops("Greater")
def _gt(ctx, xs):
    return torch.gt(xs[0], xs[1])


@register_ops("GreaterOrEqual")
def _ge(ctx, xs):
    return torch.ge(xs[0], xs[1])


@register_ops("Less")
def _lt(ctx, xs):
    return torch.lt(xs[0], xs[1])


@register_ops("LessOrEqual")
def _le(ctx, xs):
    return torch.le(xs[0], xs[1])


@register_ops("IsInf")
def _isinf(ctx, xs):
    x = xs[0]
    pos, neg = ctx.a("detect_positive", 1), ctx.a("detect_negative", 1)
    out = torch.zeros_like(x, dtype=torch.bool)
    if pos:
        out = out | (x == math.inf)
    if neg:
        out = out | (x == -math.inf)
    return out


def _variadic(fn):
    def impl(ctx, xs):
        xs = [x for x in xs if x is not None]
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return impl


register_op("Max")(_variadic(torch.maximum))
register_op("Min")(_variadic(torch.minimum))
register_op("Sum")(_variadic(torch.add))


@register_ops("Mean")
def _mean(ctx, xs):
    xs = [x for x in xs if x is not None]
    return _variadic(torch.add)(ctx, xs) / len(xs)


@register_ops("Where")
def _where(ctx, xs):
    return torch.where(xs[0], xs[1], xs[2])


@register_ops("Cast")
def _cast(ctx, xs):
    return _cast_to(ctx, xs[0], int(ctx.a("to")))


def _cast_to(ctx, x: Tensor, to: int) -> Tensor:
    if to in FLOAT_TYPES:
        return x.to(ctx.dtype)
    if to in INT_TYPES:
        return x.to(INT_TYPES[to])
    raise ctx.fail(f"cast to ONNX type {onnx.TensorProto.DataType.Name(to)} is not supported")


@register_ops("CastLike")
def _castlike(ctx, xs):
    x, like = xs[0], xs[1]
    return x.to(ctx.dtype) if is_float(like) else x.to(like.dtype)
