"""ONNX -> PyTorch interpreter.

:class:`TorchGraph` executes an ONNX graph node by node with torch ops, in float32 or float64, on CPU or
CUDA, so that the loss and its gradients can be measured on the ONNX graph itself. Hooks let callers
transform the weight or the activation input of a node (quantization noise, low-rank, ...) and capture
node-local aliases of the (weight, activation) pair actually used by that node, whose gradients are
the gradients *through that node only*.

Conventions
- Float initializers become leaf tensors in ``dtype`` (``TorchGraph.params``); integer/bool initializers
  are kept with their integer dtype. Every float computation runs in ``dtype`` (``Cast`` to any float
  type casts to ``dtype``).
- Shape tensors (outputs of ``Shape``, ``Gather`` on them, ...) are small int64 tensors on the device;
  they are read as Python ints (``.tolist()``) only where an op needs static sizes.
- Nodes are keyed by ``node.name``, or ``f"{op_type}_{index}"`` (index in ``graph.node``) when unnamed,
  the same rule as ``model_io.prepare_model``.
- Intermediate tensors are freed after their last consumer has run.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from llc_onnx.errors import LLCError

Tensor = torch.Tensor

__all__ = ["TorchGraph", "node_key", "SUPPORTED_OPS"]

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
_INT_TYPES = {
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.UINT16: torch.int32,
    onnx.TensorProto.UINT32: torch.int64,
    onnx.TensorProto.UINT64: torch.int64,
    onnx.TensorProto.INT4: torch.int8,
    onnx.TensorProto.UINT4: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}
if hasattr(onnx.TensorProto, "INT2"):
    _INT_TYPES[onnx.TensorProto.INT2] = torch.int8
if hasattr(onnx.TensorProto, "UINT2"):
    _INT_TYPES[onnx.TensorProto.UINT2] = torch.uint8

# ops whose weight / activation operands the hooks address in a fixed way
_CONV_LIKE = {"Conv", "ConvTranspose"}
_MATMUL_LIKE = {"MatMul", "Gemm"}


def node_key(node: onnx.NodeProto, index: int) -> str:
    """Hook key of a node: its name, or ``<op_type>_<index>`` when unnamed."""
    return node.name if node.name else f"{node.op_type}_{index}"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _np_to_torch(arr: np.ndarray, float_dtype: torch.dtype, device) -> Tensor:
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" or arr.dtype.name in ("bfloat16", "float16") or "float" in arr.dtype.name:
        return torch.from_numpy(np.array(arr, dtype=np.float64, order="C")).to(device=device, dtype=float_dtype)
    if arr.dtype == np.bool_:
        return torch.from_numpy(np.array(arr, order="C")).to(device)
    if arr.dtype.kind in "iu":
        if arr.dtype in (np.uint16, np.uint32, np.uint64):
            arr = arr.astype(np.int64)
        return torch.from_numpy(np.array(arr, order="C")).to(device)
    # int4/uint4/int2 (ml_dtypes) and friends
    name = arr.dtype.name
    if "int" in name:
        return torch.from_numpy(np.array(arr, dtype=np.int16, order="C")).to(device)
    raise LLCError(f"tensor of dtype {arr.dtype}: not supported by the llc-onnx interpreter")


def _ints(t: Tensor | None) -> list[int] | None:
    if t is None:
        return None
    return [int(v) for v in t.reshape(-1).tolist()]


def _scalar(t: Tensor) -> Any:
    return t.reshape(-1)[0].item()


def _is_float(t: Tensor) -> bool:
    return t.is_floating_point()


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _attr_value(attr: onnx.AttributeProto) -> Any:
    if attr.type == onnx.AttributeProto.GRAPH or attr.type == onnx.AttributeProto.GRAPHS:
        return attr  # only reported as unsupported (control flow)
    if attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    v = onnx.helper.get_attribute_value(attr)
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [s.decode("utf-8") for s in v]
    return v


class _Node:
    __slots__ = ("index", "key", "op", "domain", "inputs", "outputs", "attrs", "proto", "w_idx", "x_idx")

    def __init__(self, index: int, proto: onnx.NodeProto):
        self.index = index
        self.key = node_key(proto, index)
        self.op = proto.op_type
        self.domain = proto.domain or ""
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: _attr_value(a) for a in proto.attribute}
        self.proto = proto
        self.w_idx: int | None = None
        self.x_idx: int | None = None


class _Ctx:
    """What an op implementation sees: graph settings and the node."""

    __slots__ = ("g", "node", "attrs")

    def __init__(self, g: TorchGraph, node: _Node):
        self.g = g
        self.node = node
        self.attrs = node.attrs

    def a(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    @property
    def dtype(self) -> torch.dtype:
        return self.g.dtype

    @property
    def device(self) -> torch.device:
        return self.g.device

    def fail(self, what: str) -> LLCError:
        return LLCError(f"node '{self.node.key}' (op {self.node.op}): {what}")


# --------------------------------------------------------------------------------------------------
# op implementations: fn(ctx, inputs: list[Tensor | None]) -> Tensor | list[Tensor]
# --------------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[_Ctx, list], Any]] = {}


def _op(*names: str):
    def deco(fn):
        for n in names:
            _OPS[n] = fn
        return fn

    return deco


def _unary(name: str, fn: Callable[[Tensor], Tensor]):
    _OPS[name] = lambda ctx, xs: fn(xs[0])


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


@_op("Add")
def _add(ctx, xs):
    return xs[0] + xs[1]


@_op("Sub")
def _sub(ctx, xs):
    return xs[0] - xs[1]


@_op("Mul")
def _mul(ctx, xs):
    return xs[0] * xs[1]


@_op("Div")
def _div(ctx, xs):
    a, b = xs
    if not _is_float(a):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@_op("Pow")
def _pow(ctx, xs):
    a, b = xs
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)


@_op("Mod")
def _mod(ctx, xs):
    a, b = xs
    if ctx.a("fmod", 0):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


@_op("And")
def _and(ctx, xs):
    return torch.logical_and(xs[0], xs[1])


@_op("Or")
def _or(ctx, xs):
    return torch.logical_or(xs[0], xs[1])


@_op("Xor")
def _xor(ctx, xs):
    return torch.logical_xor(xs[0], xs[1])


@_op("Equal")
def _eq(ctx, xs):
    return torch.eq(xs[0], xs[1])


@_op("Greater")
def _gt(ctx, xs):
    return torch.gt(xs[0], xs[1])


@_op("GreaterOrEqual")
def _ge(ctx, xs):
    return torch.ge(xs[0], xs[1])


@_op("Less")
def _lt(ctx, xs):
    return torch.lt(xs[0], xs[1])


@_op("LessOrEqual")
def _le(ctx, xs):
    return torch.le(xs[0], xs[1])


@_op("IsInf")
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


_OPS["Max"] = _variadic(torch.maximum)
_OPS["Min"] = _variadic(torch.minimum)
_OPS["Sum"] = _variadic(torch.add)


@_op("Mean")
def _mean(ctx, xs):
    xs = [x for x in xs if x is not None]
    return _variadic(torch.add)(ctx, xs) / len(xs)


@_op("Where")
def _where(ctx, xs):
    return torch.where(xs[0], xs[1], xs[2])


@_op("Cast")
def _cast(ctx, xs):
    return _cast_to(ctx, xs[0], int(ctx.a("to")))


def _cast_to(ctx, x: Tensor, to: int) -> Tensor:
    if to in _FLOAT_TYPES:
        return x.to(ctx.dtype)
    if to in _INT_TYPES:
        return x.to(_INT_TYPES[to])
    raise ctx.fail(f"cast to ONNX type {onnx.TensorProto.DataType.Name(to)} is not supported")


@_op("CastLike")
def _castlike(ctx, xs):
    x, like = xs[0], xs[1]
    return x.to(ctx.dtype) if _is_float(like) else x.to(like.dtype)


@_op("Constant")
def _constant(ctx, xs):
    a = ctx.attrs
    if "value" in a:
        return _np_to_torch(a["value"], ctx.dtype, ctx.device)
    if "value_float" in a:
        return torch.tensor(a["value_float"], dtype=ctx.dtype, device=ctx.device)
    if "value_floats" in a:
        return torch.tensor(list(a["value_floats"]), dtype=ctx.dtype, device=ctx.device)
    if "value_int" in a:
        return torch.tensor(a["value_int"], dtype=torch.int64, device=ctx.device)
    if "value_ints" in a:
        return torch.tensor(list(a["value_ints"]), dtype=torch.int64, device=ctx.device)
    raise ctx.fail("only value/value_float(s)/value_int(s) Constants are supported")


@_op("ConstantOfShape")
def _const_of_shape(ctx, xs):
    shape = _ints(xs[0])
    value = ctx.a("value")
    if value is None:
        return torch.zeros(shape, dtype=ctx.dtype, device=ctx.device)
    v = _np_to_torch(np.asarray(value).reshape(-1)[:1], ctx.dtype, ctx.device)
    return v.reshape(()).expand(shape).contiguous() if shape else v.reshape(())


@_op("Shape")
def _shape(ctx, xs):
    shape = list(xs[0].shape)
    start, end = ctx.a("start", 0), ctx.a("end", None)
    shape = shape[start:end] if end is not None else shape[start:]
    return torch.tensor(shape, dtype=torch.int64, device=ctx.device)


@_op("Size")
def _size(ctx, xs):
    return torch.tensor(xs[0].numel(), dtype=torch.int64, device=ctx.device)


@_op("Reshape")
def _reshape(ctx, xs):
    x, shape = xs[0], _ints(xs[1])
    if not ctx.a("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_op("Flatten")
def _flatten(ctx, xs):
    x = xs[0]
    axis = _norm_axis(ctx.a("axis", 1), x.dim())
    lead = math.prod(x.shape[:axis])
    return x.reshape(lead, math.prod(x.shape[axis:]))


@_op("Transpose")
def _transpose(ctx, xs):
    x = xs[0]
    perm = ctx.a("perm")
    if perm is None:
        perm = list(range(x.dim()))[::-1]
    return x.permute(*perm)


def _axes_from(ctx, xs, idx: int = 1) -> list[int] | None:
    """``axes`` as attribute (older opsets) or as input ``idx`` (newer)."""
    if "axes" in ctx.attrs:
        return list(ctx.attrs["axes"])
    if len(xs) > idx and xs[idx] is not None:
        return _ints(xs[idx])
    return None


@_op("Squeeze")
def _squeeze(ctx, xs):
    x = xs[0]
    axes = _axes_from(ctx, xs)
    if axes is None:
        return x.reshape([d for d in x.shape if d != 1])
    axes = {_norm_axis(a, x.dim()) for a in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])


@_op("Unsqueeze")
def _unsqueeze(ctx, xs):
    x = xs[0]
    axes = _axes_from(ctx, xs)
    rank = x.dim() + len(axes)
    axes = sorted(_norm_axis(a, rank) for a in axes)
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return x.reshape(shape)


@_op("Concat")
def _concat(ctx, xs):
    xs = [x for x in xs if x is not None]
    axis = ctx.a("axis")
    return torch.cat(xs, dim=_norm_axis(axis, xs[0].dim()))


@_op("Split")
def _split(ctx, xs):
    x = xs[0]
    axis = _norm_axis(ctx.a("axis", 0), x.dim())
    n_out = len(ctx.node.outputs)
    split = None
    if "split" in ctx.attrs:
        split = list(ctx.attrs["split"])
    elif len(xs) > 1 and xs[1] is not None:
        split = _ints(xs[1])
    if split is None:
        dim = x.shape[axis]
        n = ctx.a("num_outputs", n_out)
        chunk = -(-dim // n)
        split = [min(chunk, dim - i * chunk) for i in range(n)]
    return list(torch.split(x, split, dim=axis))


def _fix_index(idx: Tensor, dim: int) -> Tensor:
    return torch.where(idx < 0, idx + dim, idx)


@_op("Gather")
def _gather(ctx, xs):
    x, idx = xs
    axis = _norm_axis(ctx.a("axis", 0), x.dim())
    idx = _fix_index(idx.to(torch.int64), x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1 :]))


@_op("GatherElements")
def _gather_elements(ctx, xs):
    x, idx = xs
    axis = _norm_axis(ctx.a("axis", 0), x.dim())
    return torch.gather(x, axis, _fix_index(idx.to(torch.int64), x.shape[axis]))


@_op("GatherND")
def _gather_nd(ctx, xs):
    data, idx = xs
    b = ctx.a("batch_dims", 0)
    idx = idx.to(torch.int64)
    k = idx.shape[-1]
    batch_shape = list(data.shape[:b])
    nb = math.prod(batch_shape)
    data_r = data.reshape([nb] + list(data.shape[b:]))
    idx_r = idx.reshape(nb, -1, k)
    m = idx_r.shape[1]
    bidx = torch.arange(nb, device=data.device).reshape(nb, 1).expand(nb, m)
    cols = tuple(_fix_index(idx_r[..., j], data.shape[b + j]) for j in range(k))
    out = data_r[(bidx,) + cols]
    return out.reshape(list(idx.shape[:-1]) + list(data.shape[b + k :]))


@_op("ScatterND")
def _scatter_nd(ctx, xs):
    data, idx, upd = xs
    red = ctx.a("reduction", "none")
    idx = idx.to(torch.int64)
    k = idx.shape[-1]
    out = data.clone()
    cols = tuple(_fix_index(idx[..., j], data.shape[j]) for j in range(k))
    if red == "none":
        out[cols] = upd
    elif red == "add":
        out.index_put_(cols, upd, accumulate=True)
    else:
        raise ctx.fail(f"reduction '{red}' is not supported")
    return out


@_op("ScatterElements")
def _scatter_elements(ctx, xs):
    data, idx, upd = xs
    axis = _norm_axis(ctx.a("axis", 0), data.dim())
    idx = _fix_index(idx.to(torch.int64), data.shape[axis])
    red = ctx.a("reduction", "none")
    if red == "none":
        return data.scatter(axis, idx, upd)
    mode = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(red)
    if mode is None:
        raise ctx.fail(f"reduction '{red}' is not supported")
    return data.scatter_reduce(axis, idx, upd, reduce=mode, include_self=True)


@_op("Expand")
def _expand(ctx, xs):
    x, shape = xs[0], _ints(xs[1])
    out_shape = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(out_shape)


@_op("Tile")
def _tile(ctx, xs):
    return xs[0].repeat(*_ints(xs[1]))


@_op("Slice")
def _slice(ctx, xs):
    x = xs[0]
    if "starts" in ctx.attrs:  # opset 1
        starts, ends = list(ctx.attrs["starts"]), list(ctx.attrs["ends"])
        axes = list(ctx.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(xs[1]), _ints(xs[2])
        axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
        steps = _ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _norm_axis(axis, x.dim())
        dim = x.shape[axis]
        if step == 0:
            raise ctx.fail("slice step 0 is invalid")
        if start < 0:
            start += dim
        if end < 0:
            end += dim
        if step > 0:
            start = min(max(start, 0), dim)
            end = min(max(end, 0), dim)
            index = [slice(None)] * axis + [slice(start, end, step)]
            out = out[tuple(index)]
        else:
            start = min(max(start, 0), dim - 1)
            end = min(max(end, -1), dim - 1)
            idx = torch.arange(start, end, step, device=x.device, dtype=torch.int64)
            out = out.index_select(axis, idx)
    return out


@_op("Pad")
def _pad(ctx, xs):
    x = xs[0]
    mode = ctx.a("mode", "constant")
    if "pads" in ctx.attrs:  # opset < 11
        pads = list(ctx.attrs["pads"])
        value = ctx.a("value", 0.0)
        axes = None
    else:
        pads = _ints(xs[1])
        value = _scalar(xs[2]) if len(xs) > 2 and xs[2] is not None else 0
        axes = _ints(xs[3]) if len(xs) > 3 and xs[3] is not None else None
    r = x.dim()
    if axes is None:
        axes = list(range(r))
    axes = [_norm_axis(a, r) for a in axes]
    n = len(axes)
    begin = {a: pads[i] for i, a in enumerate(axes)}
    end = {a: pads[i + n] for i, a in enumerate(axes)}
    torch_pads: list[int] = []
    for a in reversed(range(r)):
        torch_pads += [begin.get(a, 0), end.get(a, 0)]
    # torch's reflect/replicate only pad trailing dims of a batched tensor; constant pads any
    if mode == "constant":
        return F.pad(x, torch_pads, mode="constant", value=value)
    tmode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if tmode is None:
        raise ctx.fail(f"pad mode '{mode}' is not supported")
    # torch pads the trailing (up to 3) dims of a (1, P, *spatial) tensor in these modes
    padded = [a for a in range(r) if begin.get(a, 0) or end.get(a, 0)]
    if not padded:
        return x
    first = min(padded)
    nsp = r - first
    if nsp > 3:
        raise ctx.fail(f"pad mode '{mode}' on more than 3 trailing axes is not supported")
    shape = list(x.shape)
    y = x.reshape([1, math.prod(shape[:first])] + shape[first:])
    y = F.pad(y, torch_pads[: 2 * nsp], mode=tmode)
    return y.reshape(shape[:first] + list(y.shape[2:]))


@_op("Range")
def _range(ctx, xs):
    start, limit, delta = xs
    if _is_float(start):
        s, l_, d = float(_scalar(start)), float(_scalar(limit)), float(_scalar(delta))
        n = max(int(math.ceil((l_ - s) / d)), 0)
        return s + torch.arange(n, dtype=ctx.dtype, device=ctx.device) * d
    s, l_, d = int(_scalar(start)), int(_scalar(limit)), int(_scalar(delta))
    return torch.arange(s, l_, d, dtype=start.dtype, device=ctx.device)


@_op("Trilu")
def _trilu(ctx, xs):
    x = xs[0]
    k = int(_scalar(xs[1])) if len(xs) > 1 and xs[1] is not None else 0
    return torch.triu(x, k) if ctx.a("upper", 1) else torch.tril(x, k)


@_op("CumSum")
def _cumsum(ctx, xs):
    x = xs[0]
    axis = _norm_axis(int(_scalar(xs[1])), x.dim())
    rev, excl = ctx.a("reverse", 0), ctx.a("exclusive", 0)
    if rev:
        x = x.flip(axis)
    out = torch.cumsum(x, dim=axis)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    if excl:
        zero = torch.zeros_like(out.narrow(axis, 0, 1))
        out = torch.cat([zero, out.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)
    return out.flip(axis) if rev else out


@_op("Einsum")
def _einsum(ctx, xs):
    return torch.einsum(ctx.a("equation").replace(" ", ""), *xs)


@_op("ArgMax", "ArgMin")
def _argmax(ctx, xs):
    x = xs[0]
    axis = _norm_axis(ctx.a("axis", 0), x.dim())
    keep = bool(ctx.a("keepdims", 1))
    if ctx.a("select_last_index", 0):
        x = x.flip(axis)
        fn = torch.argmax if ctx.node.op == "ArgMax" else torch.argmin
        out = x.shape[axis] - 1 - fn(x, dim=axis, keepdim=keep)
        return out
    fn = torch.argmax if ctx.node.op == "ArgMax" else torch.argmin
    return fn(x, dim=axis, keepdim=keep)


# reductions ---------------------------------------------------------------------------------------


def _reduce(fn):
    def impl(ctx, xs):
        x = xs[0]
        axes = _axes_from(ctx, xs)
        keep = bool(ctx.a("keepdims", 1))
        if not axes:
            if ctx.a("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = [_norm_axis(a, x.dim()) for a in axes]
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


_OPS["ReduceMean"] = _reduce(lambda x, a, k: torch.mean(x, dim=a, keepdim=k))
_OPS["ReduceSum"] = _reduce(_sum_keep_dtype)
_OPS["ReduceMax"] = _reduce(lambda x, a, k: torch.amax(x, dim=a, keepdim=k))
_OPS["ReduceMin"] = _reduce(lambda x, a, k: torch.amin(x, dim=a, keepdim=k))
_OPS["ReduceProd"] = _reduce(_prod)
_OPS["ReduceSumSquare"] = _reduce(lambda x, a, k: torch.sum(x * x, dim=a, keepdim=k))
_OPS["ReduceL1"] = _reduce(lambda x, a, k: torch.sum(x.abs(), dim=a, keepdim=k))
_OPS["ReduceL2"] = _reduce(lambda x, a, k: torch.sqrt(torch.sum(x * x, dim=a, keepdim=k)))
_OPS["ReduceLogSumExp"] = _reduce(lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k))


# activations / normalization ---------------------------------------------------------------------


@_op("Gelu")
def _gelu(ctx, xs):
    return F.gelu(xs[0], approximate=ctx.a("approximate", "none"))


@_op("FastGelu")
def _fast_gelu(ctx, xs):
    x = xs[0] if len(xs) < 2 or xs[1] is None else xs[0] + xs[1]
    return F.gelu(x, approximate="tanh")


@_op("BiasGelu")
def _bias_gelu(ctx, xs):
    return F.gelu(xs[0] + xs[1])


@_op("LeakyRelu")
def _leaky(ctx, xs):
    return F.leaky_relu(xs[0], ctx.a("alpha", 0.01))


@_op("PRelu")
def _prelu(ctx, xs):
    x, s = xs
    return torch.where(x < 0, x * s, x)


@_op("Elu")
def _elu(ctx, xs):
    return F.elu(xs[0], ctx.a("alpha", 1.0))


@_op("Selu")
def _selu(ctx, xs):
    x = xs[0]
    alpha, gamma = ctx.a("alpha", 1.67326319217681884765625), ctx.a("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@_op("HardSigmoid")
def _hard_sigmoid(ctx, xs):
    return torch.clamp(ctx.a("alpha", 0.2) * xs[0] + ctx.a("beta", 0.5), 0.0, 1.0)


@_op("HardSwish")
def _hard_swish(ctx, xs):
    x = xs[0]
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@_op("Clip")
def _clip(ctx, xs):
    x = xs[0]
    lo = xs[1] if len(xs) > 1 else None
    hi = xs[2] if len(xs) > 2 else None
    if lo is None and "min" in ctx.attrs:
        lo = torch.tensor(ctx.attrs["min"], dtype=x.dtype, device=x.device)
    if hi is None and "max" in ctx.attrs:
        hi = torch.tensor(ctx.attrs["max"], dtype=x.dtype, device=x.device)
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


def _softmax_like(fn):
    def impl(ctx, xs):
        x = xs[0]
        if ctx.g.opset < 13:  # coerce to 2D at `axis` (default 1)
            axis = _norm_axis(ctx.a("axis", 1), x.dim())
            shape = x.shape
            y = x.reshape(math.prod(shape[:axis]), math.prod(shape[axis:]))
            return fn(y, dim=1).reshape(shape)
        return fn(x, dim=_norm_axis(ctx.a("axis", -1), x.dim()))

    return impl


_OPS["Softmax"] = _softmax_like(torch.softmax)
_OPS["LogSoftmax"] = _softmax_like(torch.log_softmax)


@_op("LayerNormalization")
def _layer_norm(ctx, xs):
    x = xs[0]
    scale = xs[1] if len(xs) > 1 else None
    bias = xs[2] if len(xs) > 2 else None
    axis = _norm_axis(ctx.a("axis", -1), x.dim())
    eps = ctx.a("epsilon", 1e-5)
    dims = list(range(axis, x.dim()))
    norm_shape = tuple(x.shape[axis:])
    n_out = len([o for o in ctx.node.outputs if o])
    if n_out == 1 and (scale is None or tuple(scale.shape) == norm_shape) and (
        bias is None or tuple(bias.shape) == norm_shape
    ):
        return F.layer_norm(x, norm_shape, scale, bias, eps)
    mean = x.mean(dim=dims, keepdim=True)
    d = x - mean
    inv = torch.rsqrt((d * d).mean(dim=dims, keepdim=True) + eps)
    y = d * inv
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv]


def _rms_norm_impl(ctx, xs, default_axis: int = -1):
    x = xs[0]
    scale = xs[1] if len(xs) > 1 else None
    axis = _norm_axis(ctx.a("axis", default_axis), x.dim())
    eps = ctx.a("epsilon", 1e-5)
    dims = list(range(axis, x.dim()))
    inv = torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + eps)
    y = x * inv
    if scale is not None:
        y = y * scale
    return y, inv


@_op("RMSNormalization")
def _rms_norm(ctx, xs):
    return _rms_norm_impl(ctx, xs)[0]


@_op("SimplifiedLayerNormalization")
def _simplified_ln(ctx, xs):
    y, inv = _rms_norm_impl(ctx, xs)
    return [y, inv]


@_op("SkipSimplifiedLayerNormalization")
def _skip_simplified_ln(ctx, xs):
    s = xs[0] + xs[1]
    if len(xs) > 3 and xs[3] is not None:
        s = s + xs[3]
    y, inv = _rms_norm_impl(ctx, [s, xs[2]])
    return [y, inv, inv, s]  # (output, mean (unused), inv_std_var, input_skip_bias_sum)


@_op("BatchNormalization")
def _batch_norm(ctx, xs):
    x, scale, b, mean, var = xs[:5]
    if ctx.a("training_mode", 0):
        raise ctx.fail("training_mode=1 is not supported; export the model in eval mode")
    eps = ctx.a("epsilon", 1e-5)
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = torch.rsqrt(var + eps).reshape(shape)
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + b.reshape(shape)


@_op("InstanceNormalization")
def _instance_norm(ctx, xs):
    x, scale, b = xs
    dims = list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    d = x - mean
    inv = torch.rsqrt((d * d).mean(dim=dims, keepdim=True) + ctx.a("epsilon", 1e-5))
    shape = [1, -1] + [1] * (x.dim() - 2)
    return d * inv * scale.reshape(shape) + b.reshape(shape)


@_op("Dropout")
def _dropout(ctx, xs):
    x = xs[0]
    outs = [x]
    if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
        outs.append(torch.ones_like(x, dtype=torch.bool))
    return outs


# linear algebra ---------------------------------------------------------------------------------


@_op("MatMul")
def _matmul(ctx, xs):
    return torch.matmul(xs[0], xs[1])


@_op("Gemm")
def _gemm(ctx, xs):
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    if ctx.a("transA", 0):
        a = a.transpose(0, 1)
    if ctx.a("transB", 0):
        b = b.transpose(0, 1)
    alpha, beta = ctx.a("alpha", 1.0), ctx.a("beta", 1.0)
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return y


# convolution / pooling ---------------------------------------------------------------------------


def _conv_pads(ctx, in_sizes, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """(begin pads, end pads) per spatial dim, honouring auto_pad."""
    n = len(in_sizes)
    auto = ctx.a("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            out = -(-in_sizes[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sizes[i])
            small = total // 2
            if auto == "SAME_UPPER":
                begin.append(small)
                end.append(total - small)
            else:
                begin.append(total - small)
                end.append(small)
        return begin, end
    if auto == "VALID":
        return [0] * n, [0] * n
    pads = list(ctx.a("pads", [0] * (2 * n)))
    return pads[:n], pads[n:]


def _torch_pad_list(begin: list[int], end: list[int]) -> list[int]:
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@_op("Conv")
def _conv(ctx, xs):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nsp = x.dim() - 2
    if nsp not in _CONV_FNS:
        raise ctx.fail(f"{nsp}-D convolution is not supported")
    kernel = list(w.shape[2:])
    strides = list(ctx.a("strides", [1] * nsp))
    dil = list(ctx.a("dilations", [1] * nsp))
    begin, end = _conv_pads(ctx, list(x.shape[2:]), kernel, strides, dil)
    if begin == end:
        padding = begin
    else:
        x = F.pad(x, _torch_pad_list(begin, end))
        padding = [0] * nsp
    return _CONV_FNS[nsp](x, w, b, stride=strides, padding=padding, dilation=dil, groups=ctx.a("group", 1))


_CONVT_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@_op("ConvTranspose")
def _conv_transpose(ctx, xs):
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nsp = x.dim() - 2
    if nsp not in _CONVT_FNS:
        raise ctx.fail(f"{nsp}-D transposed convolution is not supported")
    kernel = list(w.shape[2:])
    in_sizes = list(x.shape[2:])
    strides = list(ctx.a("strides", [1] * nsp))
    dil = list(ctx.a("dilations", [1] * nsp))
    out_pad = list(ctx.a("output_padding", [0] * nsp))
    full = [strides[i] * (in_sizes[i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nsp)]
    auto = ctx.a("auto_pad", "NOTSET")
    out_shape = ctx.a("output_shape")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(out_shape)[-nsp:] if out_shape is not None else [s * st for s, st in zip(in_sizes, strides)]
        total = [f - t for f, t in zip(full, target)]
        if auto == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [t - bg for t, bg in zip(total, begin)]
    elif auto == "VALID":
        begin, end = [0] * nsp, [0] * nsp
    else:
        pads = list(ctx.a("pads", [0] * (2 * nsp)))
        begin, end = pads[:nsp], pads[nsp:]
    y = _CONVT_FNS[nsp](x, w, None, stride=strides, padding=0, groups=ctx.a("group", 1), dilation=dil)
    # y has the size without output_padding: add it at the end, then crop (or pad) by the pads
    crop = _torch_pad_list([-bg for bg in begin], [op - e for op, e in zip(out_pad, end)])
    if any(crop):
        y = F.pad(y, crop)
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nsp)
    return y


def _pool_geometry(ctx, x: Tensor):
    nsp = x.dim() - 2
    kernel = list(ctx.a("kernel_shape"))
    strides = list(ctx.a("strides", [1] * nsp))
    dil = list(ctx.a("dilations", [1] * nsp))
    in_sizes = list(x.shape[2:])
    begin, end = _conv_pads(ctx, in_sizes, kernel, strides, dil)
    ceil = bool(ctx.a("ceil_mode", 0))
    extra = []  # additional right padding (beyond the declared pads) needed by ceil_mode
    for i in range(nsp):
        span = in_sizes[i] + begin[i] + end[i] - dil[i] * (kernel[i] - 1) - 1
        out = (-(-span // strides[i]) if ceil else span // strides[i]) + 1
        if ceil and (out - 1) * strides[i] >= in_sizes[i] + begin[i]:
            out -= 1  # a window may not start in the right padding
        need = (out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1
        extra.append(need - (in_sizes[i] + begin[i] + end[i]))
    return nsp, kernel, strides, dil, begin, end, extra


@_op("MaxPool")
def _max_pool(ctx, xs):
    x = xs[0]
    if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
        raise ctx.fail("the Indices output is not supported")
    nsp, kernel, strides, dil, begin, end, extra = _pool_geometry(ctx, x)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}.get(nsp)
    if fn is None:
        raise ctx.fail(f"{nsp}-D pooling is not supported")
    end2 = [e + max(x_, 0) for e, x_ in zip(end, extra)]
    if any(begin) or any(end2):
        x = F.pad(x, _torch_pad_list(begin, end2), value=-math.inf)
    # negative `extra` means trailing elements no window reaches: floor mode handles them
    return fn(x, kernel, strides, 0, dil, ceil_mode=False)


def _sum_pool(x: Tensor, kernel, strides, dil) -> Tensor:
    nsp = x.dim() - 2
    n, c = x.shape[0], x.shape[1]
    y = x.reshape([n * c, 1] + list(x.shape[2:]))
    ones = torch.ones([1, 1] + list(kernel), dtype=x.dtype, device=x.device)
    y = _CONV_FNS[nsp](y, ones, None, stride=strides, dilation=dil)
    return y.reshape([n, c] + list(y.shape[2:]))


@_op("AveragePool")
def _avg_pool(ctx, xs):
    x = xs[0]
    nsp, kernel, strides, dil, begin, end, extra = _pool_geometry(ctx, x)
    if nsp not in _CONV_FNS:
        raise ctx.fail(f"{nsp}-D pooling is not supported")
    ex = [max(e, 0) for e in extra]
    pad_all = _torch_pad_list(begin, [e + x_ for e, x_ in zip(end, ex)])
    xp = F.pad(x, pad_all)
    total = _sum_pool(xp, kernel, strides, dil)
    # divisor: how many counted positions each window covers
    mask = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
    if ctx.a("count_include_pad", 0):
        mask = F.pad(mask, _torch_pad_list(begin, end), value=1.0)
        mask = F.pad(mask, _torch_pad_list([0] * nsp, ex), value=0.0)
    else:
        mask = F.pad(mask, pad_all, value=0.0)
    count = _sum_pool(mask, kernel, strides, dil)
    return total / count


@_op("GlobalAveragePool")
def _gap(ctx, xs):
    x = xs[0]
    return x.mean(dim=list(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _gmp(ctx, xs):
    x = xs[0]
    return x.amax(dim=list(range(2, x.dim())), keepdim=True)


# quantization (DequantizeLinear graphs written by passes/qdq) ------------------------------------


def _q_broadcast(ctx, scale: Tensor, x: Tensor) -> Tensor:
    if scale.dim() == 0 or scale.numel() == 1 and x.dim() != scale.dim():
        return scale.reshape(())
    axis = _norm_axis(ctx.a("axis", 1), x.dim())
    block = ctx.a("block_size", 0)
    if block:
        return scale.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


@_op("DequantizeLinear")
def _dequant(ctx, xs):
    x, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 else None
    xf = x.to(ctx.dtype)
    if zp is not None:
        xf = xf - _q_broadcast(ctx, zp.to(ctx.dtype), x)
    return xf * _q_broadcast(ctx, scale, x)


@_op("QuantizeLinear")
def _quant(ctx, xs):
    x, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 else None
    out_dtype = zp.dtype if zp is not None else torch.uint8
    info = torch.iinfo(out_dtype)
    q = torch.round(x / _q_broadcast(ctx, scale, x))
    if zp is not None:
        q = q + _q_broadcast(ctx, zp.to(ctx.dtype), x)
    return torch.clamp(q, info.min, info.max).to(out_dtype)


SUPPORTED_OPS = frozenset(_OPS)


# --------------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------------


class TorchGraph:
    """Executes an ONNX model with torch ops (see module docstring).

    ``params``: float initializers as leaf tensors in ``dtype`` on ``device`` (``requires_grad`` off;
    turn it on with :meth:`requires_grad_`). ``input_names`` / ``output_names``: graph inputs (excluding
    initializers) and outputs.
    """

    def __init__(self, model: onnx.ModelProto, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if dtype not in (torch.float32, torch.float64):
            raise LLCError(f"interpreter dtype {dtype}: not supported; use torch.float32 or torch.float64")
        self.dtype = dtype
        self.device = torch.device(device)
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        graph = model.graph
        self.opset = 21
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = int(imp.version)

        self.params: dict[str, Tensor] = {}
        self.consts: dict[str, Tensor] = {}  # integer/bool initializers and Constant outputs
        for init in graph.initializer:
            arr = numpy_helper.to_array(init)
            t = _np_to_torch(arr, dtype, self.device)
            if t.is_floating_point():
                self.params[init.name] = t
            else:
                self.consts[init.name] = t
        init_names = set(self.params) | set(self.consts)
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in init_names]
        self.output_names: list[str] = [o.name for o in graph.output]

        self._nodes: list[_Node] = []
        self._by_key: dict[str, list[_Node]] = {}
        self._producer: dict[str, int] = {}
        unsupported = []
        for i, proto in enumerate(graph.node):
            n = _Node(i, proto)
            if n.op not in _OPS or n.domain not in ("", "ai.onnx", "com.microsoft"):
                unsupported.append(n)
                continue
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in proto.attribute):
                unsupported.append(n)
                continue
            self._nodes.append(n)
            self._by_key.setdefault(n.key, []).append(n)
            for o in n.outputs:
                if o:
                    self._producer[o] = len(self._nodes) - 1
        if unsupported:
            n = unsupported[0]
            dom = f" domain {n.domain}" if n.domain else ""
            more = f" (and {len(unsupported) - 1} more unsupported nodes)" if len(unsupported) > 1 else ""
            raise LLCError(
                f"node '{n.key}' (op {n.op}{dom}): not supported by the llc-onnx interpreter{more}; "
                f"supported ops: {', '.join(sorted(_OPS))}"
            )

        # fold Constant nodes once
        for n in self._nodes:
            if n.op == "Constant":
                self.consts[n.outputs[0]] = _constant(_Ctx(self, n), [])

        for n in self._nodes:
            self._assign_operands(n)
        self._plans: dict[tuple, tuple[list[_Node], dict[str, int]]] = {}
        self._positions: dict[tuple[str, ...], dict[int, int]] = {}  # outputs -> node index -> position

    # ------------------------------------------------------------------------------------------
    def _is_init(self, name: str) -> bool:
        return name in self.params or name in self.consts

    def _assign_operands(self, n: _Node) -> None:
        """Which input is the weight (W) and which the activation (X) for hooks/capture."""
        ins = n.inputs
        if n.op in _CONV_LIKE:
            n.w_idx, n.x_idx = 1, 0
        elif n.op in _MATMUL_LIKE:
            if len(ins) > 1 and ins[1] in self.params:
                n.w_idx, n.x_idx = 1, 0
            elif ins and ins[0] in self.params:
                n.w_idx, n.x_idx = 0, 1
            else:
                n.w_idx, n.x_idx = 1, 0
        else:
            ws = [i for i, name in enumerate(ins) if name in self.params]
            xs = [i for i, name in enumerate(ins) if name and not self._is_init(name)]
            n.w_idx = ws[0] if ws else None
            n.x_idx = xs[0] if xs else None

    def node_names(self) -> list[str]:
        """Hook keys of all nodes, in graph order."""
        return [n.key for n in self._nodes]

    def requires_grad_(self, names: Iterable[str] | None = None, requires_grad: bool = True) -> TorchGraph:
        """Turn ``requires_grad`` on (or off) for the named params (all when ``names`` is None)."""
        names = list(self.params) if names is None else list(names)
        for name in names:
            if name not in self.params:
                raise LLCError(f"initializer '{name}': not a float initializer of the graph")
            self.params[name].requires_grad_(requires_grad)
        return self

    def to(self, device: str | torch.device) -> TorchGraph:
        self.device = torch.device(device)
        self.params = {k: v.detach().to(self.device).requires_grad_(v.requires_grad) for k, v in self.params.items()}
        self.consts = {k: v.to(self.device) for k, v in self.consts.items()}
        return self

    # ------------------------------------------------------------------------------------------
    def _plan(self, outputs: tuple[str, ...], capture: tuple[str, ...]) -> tuple[list[_Node], dict[str, int]]:
        key = (outputs, capture)
        if key in self._plans:
            return self._plans[key]
        needed: set[str] = set(outputs)
        for c in capture:
            for n in self._by_key[c]:
                needed.update(i for i in n.inputs if i)
        run_mask = [False] * len(self._nodes)
        stack = [self._producer[t] for t in needed if t in self._producer]
        while stack:
            i = stack.pop()
            if run_mask[i]:
                continue
            run_mask[i] = True
            for t in self._nodes[i].inputs:
                if t and t in self._producer and not run_mask[self._producer[t]]:
                    stack.append(self._producer[t])
        for c in capture:
            for n in self._by_key[c]:
                run_mask[n.index] = True
        order = [n for i, n in enumerate(self._nodes) if run_mask[i] and n.op != "Constant"]
        last_use: dict[str, int] = {}
        for pos, n in enumerate(order):
            for t in n.inputs:
                if t:
                    last_use[t] = pos
        for t in outputs:
            last_use[t] = len(order)  # never freed
        self._plans[key] = (order, last_use)
        return order, last_use

    def _feed(self, name: str, value: Any) -> Tensor:
        if isinstance(value, Tensor):
            t = value.to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t
        arr = np.asarray(value)
        return _np_to_torch(arr, self.dtype, self.device)

    def run(
        self,
        feeds: dict[str, np.ndarray | Tensor],
        *,
        weight_fns: dict[str, Callable[[Tensor], Tensor]] | None = None,
        input_fns: dict[str, Callable[[Tensor], Tensor]] | None = None,
        capture: Iterable[str] = (),
        outputs: Iterable[str] | None = None,
        resume: Snapshots | None = None,
        _record: tuple[set[int], dict[int, dict[str, Tensor]]] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """Run the graph. Returns ``(outputs, captured)``: output name -> tensor, and for each
        captured node, the node-local aliases ``(W, X)`` as used by that node (after the hooks).

        ``resume``: snapshots of an unhooked run on the same ``feeds`` (:meth:`snapshot`); execution starts at
        the last snapshot at or before the first hooked node instead of at the top (same result, less work)."""
        weight_fns = weight_fns or {}
        input_fns = input_fns or {}
        capture = tuple(dict.fromkeys(capture))
        outs = tuple(self.output_names if outputs is None else outputs)
        for kind, keys in (("weight_fns", weight_fns), ("input_fns", input_fns), ("capture", capture)):
            for k in keys:
                nodes = self._by_key.get(k)
                if not nodes:
                    raise LLCError(f"{kind}: node '{k}' is not in the graph; use a node name from the model")
                for n in nodes:
                    if kind != "input_fns" and n.w_idx is None:
                        raise LLCError(
                            f"{kind}: node '{k}' (op {n.op}) has no weight input; hook MatMul/Gemm/Conv nodes"
                        )
                    if kind != "weight_fns" and n.x_idx is None:
                        raise LLCError(f"{kind}: node '{k}' (op {n.op}) has no activation input")
        env: dict[str, Tensor] = {}
        for name, value in feeds.items():
            if name not in self.input_names and name not in self.params and name not in self.consts:
                raise LLCError(f"feed '{name}': not an input of the graph; inputs are {self.input_names}")
            env[name] = self._feed(name, value)
        for name in self.input_names:
            if name not in env:
                raise LLCError(f"input '{name}': missing from the feeds; feed every graph input {self.input_names}")
        for t in outs:
            if t not in self._producer and t not in env and not self._is_init(t):
                raise LLCError(f"output '{t}': not a tensor of the graph")

        order, last_use = self._plan(outs, capture)
        start = 0
        if resume is not None:
            if capture or tuple(resume.outputs) != outs:
                raise LLCError("resume: snapshots are for an uncaptured run of the same outputs "
                               f"{list(resume.outputs)}; run without resume=")
            hooked = [n.index for k in (*weight_fns, *input_fns) for n in self._by_key[k]]
            first = min((self._position(outs, i) for i in hooked), default=len(order))
            start, saved = resume.before(first)
            if start:
                for name in self.input_names:
                    if name in saved and not torch.equal(saved[name], env[name]):
                        raise LLCError(f"resume: input '{name}' differs from the run the snapshots were taken of; "
                                       "snapshots belong to one batch")
                env = dict(saved)
        cap_set = set(capture)
        keep = set(self.input_names)
        captured: dict[str, tuple[Tensor, Tensor]] = {}
        grad_on = torch.is_grad_enabled()
        params, consts = self.params, self.consts

        def get(name: str) -> Tensor | None:
            if not name:
                return None
            if name in env:
                return env[name]
            if name in params:
                return params[name]
            return consts[name]

        for pos in range(start, len(order)):
            n = order[pos]
            if _record is not None and pos in _record[0]:
                _record[1][pos] = dict(env)  # the live values (dead ones are deleted as the run goes)
            try:
                xs = [get(i) for i in n.inputs]
            except KeyError as e:
                raise LLCError(f"node '{n.key}' (op {n.op}): input {e} is not produced by any node") from None
            key = n.key
            if key in weight_fns or key in input_fns or key in cap_set:
                wi, xi = n.w_idx, n.x_idx
                if key in weight_fns:
                    xs[wi] = weight_fns[key](xs[wi])
                if key in input_fns:
                    xs[xi] = input_fns[key](xs[xi])
                if key in cap_set:
                    w, x = _alias(xs[wi], grad_on), _alias(xs[xi], grad_on)
                    xs[wi], xs[xi] = w, x
                    captured[key] = (w, x)
            try:
                res = _OPS[n.op](_Ctx(self, n), xs)
            except LLCError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised with the node named
                shapes = [tuple(x.shape) if x is not None else None for x in xs]
                raise LLCError(
                    f"node '{n.key}' (op {n.op}): failed on input shapes {shapes}: {type(e).__name__}: {e}"
                ) from e
            del xs
            if isinstance(res, Tensor):
                env[n.outputs[0]] = res
            else:
                for o, r in zip(n.outputs, res):
                    if o:
                        env[o] = r
            for t in n.inputs:
                if t and last_use.get(t) == pos and t in env and t not in keep:
                    del env[t]
            for o in n.outputs:  # outputs nobody reads
                if o and o not in last_use and o in env:
                    del env[o]
        result = {t: get(t) for t in outs}
        return result, captured

    def _position(self, outs: tuple[str, ...], index: int) -> int:
        """Position of the node with graph index ``index`` in the uncaptured plan for ``outs`` (past the end
        when that plan does not run it)."""
        if outs not in self._positions:
            order, _ = self._plan(outs, ())
            self._positions[outs] = {n.index: p for p, n in enumerate(order)}
        return self._positions[outs].get(index, len(self._plan(outs, ())[0]))

    @torch.no_grad()
    def snapshot(self, feeds: dict[str, np.ndarray | Tensor], at: Iterable[str], *,
                 outputs: Iterable[str] | None = None, max_bytes: int | None = None
                 ) -> tuple[dict[str, Tensor], Snapshots]:
        """Run the graph without hooks and keep, just before each node of ``at``, the values live at that point
        (the prefix a later hooked run can skip). Returns ``(outputs, snapshots)``. With ``max_bytes``, snapshots
        are thinned evenly (every 2nd, 4th, ... kept) until their distinct tensors fit; a hooked node then
        resumes from the nearest earlier snapshot."""
        outs = tuple(self.output_names if outputs is None else outputs)
        order, _ = self._plan(outs, ())
        want = set()
        for k in at:
            if k not in self._by_key:
                raise LLCError(f"snapshot: node '{k}' is not in the graph; use a node name from the model")
            want.update(self._position(outs, n.index) for n in self._by_key[k])
        want.discard(len(order))
        want.discard(0)  # resuming at the top is an ordinary run
        record: dict[int, dict[str, Tensor]] = {}
        result, _ = self.run(feeds, outputs=outs, _record=(want, record))
        snaps = Snapshots(outs, sorted(record), [record[p] for p in sorted(record)])
        step = 1
        while max_bytes is not None and snaps.positions and snaps.nbytes() > max_bytes:
            step *= 2
            keep = sorted(record)[step - 1::step]
            snaps = Snapshots(outs, keep, [record[p] for p in keep])
        return result, snaps


@dataclass
class Snapshots:
    """Live values of one unhooked run just before chosen positions of its execution order (see
    :meth:`TorchGraph.snapshot`). Tensors are shared, never modified: the interpreter's ops do not write
    into their inputs."""

    outputs: tuple[str, ...]
    positions: list[int]  # ascending
    envs: list[dict[str, Tensor]]

    def before(self, pos: int) -> tuple[int, dict[str, Tensor]]:
        """(position, values) of the last snapshot at or before ``pos``; (0, {}) when there is none."""
        i = bisect.bisect_right(self.positions, pos) - 1
        return (self.positions[i], self.envs[i]) if i >= 0 else (0, {})

    def nbytes(self) -> int:
        """Bytes of the distinct tensors held (shared tensors counted once)."""
        seen, total = set(), 0
        for env in self.envs:
            for t in env.values():
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                if key not in seen:
                    seen.add(key)
                    total += key[1]
        return total


def _alias(t: Tensor, grad_on: bool) -> Tensor:
    if grad_on and t.is_floating_point() and not t.requires_grad:
        return t.detach().requires_grad_(True)
    return t.view_as(t)
