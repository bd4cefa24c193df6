"""Tensor and shape ops: constants, shapes, reshapes, gather/scatter, slicing, padding, ranges, Einsum,
ArgMax/ArgMin."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import register_ops
from ..tensors import Tensor, as_ints, is_float, norm_axis, np_to_torch, scalar

@register_ops("Constant")
def _constant(ctx, xs):
    a = ctx.attrs
    if "value" in a:
        return np_to_torch(a["value"], ctx.dtype, ctx.device)
    if "value_float" in a:
        return torch.tensor(a["value_float"], dtype=ctx.dtype, device=ctx.device)
    if "value_floats" in a:
        return torch.tensor(list(a["value_floats"]), dtype=ctx.dtype, device=ctx.device)
    if "value_int" in a:
        return torch.tensor(a["value_int"], dtype=torch.int64, device=ctx.device)
    if "value_ints" in a:
        return torch.tensor(list(a["value_ints"]), dtype=torch.int64, device=ctx.device)
    raise ctx.fail("only value/value_float(s)/value_int(s) Constants are supported")


@register_ops("ConstantOfShape")
def _const_of_shape(ctx, xs):
    shape = as_ints(xs[0])
    value = ctx.a("value")
    if value is None:
        return torch.zeros(shape, dtype=ctx.dtype, device=ctx.device)
    v = np_to_torch(np.asarray(value).reshape(-1)[:1], ctx.dtype, ctx.device)
    return v.reshape(()).expand(shape).contiguous() if shape else v.reshape(())


@register_ops("Shape")
def _shape(ctx, xs):
    shape = list(xs[0].shape)
    start, end = ctx.a("start", 0), ctx.a("end", None)
    shape = shape[start:end] if end is not None else shape[start:]
    return torch.tensor(shape, dtype=torch.int64, device=ctx.device)


@register_ops("Size")
def _size(ctx, xs):
    return torch.tensor(xs[0].numel(), dtype=torch.int64, device=ctx.device)


@register_ops("Reshape")
def _reshape(ctx, xs):
    x, shape = xs[0], as_ints(xs[1])
    if not ctx.a("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@register_ops("Flatten")
def _flatten(ctx, xs):
    x = xs[0]
    axis = ctx.a("axis", 1)                    # ONNX: axis in [-r, r]; axis = r flattens everything into dim 0
    axis = x.dim() if axis == x.dim() else norm_axis(axis, x.dim())
    lead = math.prod(x.shape[:axis])
    return x.reshape(lead, math.prod(x.shape[axis:]))


@register_ops("Transpose")
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
        return as_ints(xs[idx])
    return None


@register_ops("Squeeze")
def _squeeze(ctx, xs):
    x = xs[0]
    axes = _axes_from(ctx, xs)
    if axes is None:
        return x.reshape([d for d in x.shape if d != 1])
    axes = {norm_axis(a, x.dim()) for a in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])


@register_ops("Unsqueeze")
def _unsqueeze(ctx, xs):
    x = xs[0]
    axes = _axes_from(ctx, xs)
    rank = x.dim() + len(axes)
    axes = sorted(norm_axis(a, rank) for a in axes)
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return x.reshape(shape)


@register_ops("Concat")
def _concat(ctx, xs):
    xs = [x for x in xs if x is not None]
    axis = ctx.a("axis")
    return torch.cat(xs, dim=norm_axis(axis, xs[0].dim()))


@register_ops("Split")
def _split(ctx, xs):
    x = xs[0]
    axis = norm_axis(ctx.a("axis", 0), x.dim())
    n_out = len(ctx.node.outputs)
    split = None
    if "split" in ctx.attrs:
        split = list(ctx.attrs["split"])
    elif len(xs) > 1 and xs[1] is not None:
        split = as_ints(xs[1])
    if split is None:
        dim = x.shape[axis]
        n = ctx.a("num_outputs", n_out)
        chunk = -(-dim // n)
        split = [min(chunk, dim - i * chunk) for i in range(n)]
    return list(torch.split(x, split, dim=axis))


def _fix_index(idx: Tensor, dim: int) -> Tensor:
    return torch.where(idx < 0, idx + dim, idx)


@register_ops("Gather")
def _gather(ctx, xs):
    x, idx = xs
    axis = norm_axis(ctx.a("axis", 0), x.dim())
    idx = _fix_index(idx.to(torch.int64), x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1 :]))


@register_ops("GatherElements")
def _gather_elements(ctx, xs):
    x, idx = xs
    axis = norm_axis(ctx.a("axis", 0), x.dim())
    return torch.gather(x, axis, _fix_index(idx.to(torch.int64), x.shape[axis]))


@register_ops("GatherND")
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


@register_ops("ScatterND")
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


@register_ops("ScatterElements")
def _scatter_elements(ctx, xs):
    data, idx, upd = xs
    axis = norm_axis(ctx.a("axis", 0), data.dim())
    idx = _fix_index(idx.to(torch.int64), data.shape[axis])
    red = ctx.a("reduction", "none")
    if red == "none":
        return data.scatter(axis, idx, upd)
    mode = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(red)
    if mode is None:
        raise ctx.fail(f"reduction '{red}' is not supported")
    return data.scatter_reduce(axis, idx, upd, reduce=mode, include_self=True)


@register_ops("Expand")
def _expand(ctx, xs):
    x, shape = xs[0], as_ints(xs[1])
    out_shape = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(out_shape)


@register_ops("Tile")
def _tile(ctx, xs):
    return xs[0].repeat(*as_ints(xs[1]))


@register_ops("Slice")
def _slice(ctx, xs):
    x = xs[0]
    if "starts" in ctx.attrs:  # opset 1
        starts, ends = list(ctx.attrs["starts"]), list(ctx.attrs["ends"])
        axes = list(ctx.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = as_ints(xs[1]), as_ints(xs[2])
        axes = as_ints(xs[3]) if len(xs) > 3 and xs[3] is not None else list(range(len(starts)))
        steps = as_ints(xs[4]) if len(xs) > 4 and xs[4] is not None else [1] * len(starts)
    out = x
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = norm_axis(axis, x.dim())
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


@register_ops("Pad")
def _pad(ctx, xs):
    x = xs[0]
    mode = ctx.a("mode", "constant")
    if "pads" in ctx.attrs:  # opset < 11
        pads = list(ctx.attrs["pads"])
        value = ctx.a("value", 0.0)
        axes = None
    else:
        pads = as_ints(xs[1])
        value = scalar(xs[2]) if len(xs) > 2 and xs[2] is not None else 0
        axes = as_ints(xs[3]) if len(xs) > 3 and xs[3] is not None else None
    r = x.dim()
    if axes is None:
        axes = list(range(r))
    axes = [norm_axis(a, r) for a in axes]
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


@register_ops("Range")
def _range(ctx, xs):
    start, limit, delta = xs
    if is_float(start):
        s, l_, d = float(scalar(start)), float(scalar(limit)), float(scalar(delta))
        n = max(int(math.ceil((l_ - s) / d)), 0)
        return s + torch.arange(n, dtype=ctx.dtype, device=ctx.device) * d
    s, l_, d = int(scalar(start)), int(scalar(limit)), int(scalar(delta))
    return torch.arange(s, l_, d, dtype=start.dtype, device=ctx.device)


@register_ops("Trilu")
def _trilu(ctx, xs):
    x = xs[0]
    k = int(scalar(xs[1])) if len(xs) > 1 and xs[1] is not None else 0
    return torch.triu(x, k) if ctx.a("upper", 1) else torch.tril(x, k)


@register_ops("CumSum")
def _cumsum(ctx, xs):
    x = xs[0]
    axis = norm_axis(int(scalar(xs[1])), x.dim())
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


@register_ops("Einsum")
def _einsum(ctx, xs):
    return torch.einsum(ctx.a("equation").replace(" ", ""), *xs)


@register_ops("ArgMax", "ArgMin")
def _argmax(ctx, xs):
    x = xs[0]
    axis = norm_axis(ctx.a("axis", 0), x.dim())
    keep = bool(ctx.a("keepdims", 1))
    if ctx.a("select_last_index", 0):
        x = x.flip(axis)
        fn = torch.argmax if ctx.node.op == "ArgMax" else torch.argmin
        out = x.shape[axis] - 1 - fn(x, dim=axis, keepdim=keep)
        return out
    fn = torch.argmax if ctx.node.op == "ArgMax" else torch.argmin
    return fn(x, dim=axis, keepdim=keep)


def _topk(x: Tensor, k: int, axis: int, largest: bool) -> list[Tensor]:
    """The k largest (smallest) values along ``axis`` and their int64 indices, sorted; equal values keep
    the lower index first (ONNX's rule), hence a stable sort rather than torch.topk."""
    values, idx = torch.sort(x, dim=axis, descending=largest, stable=True)
    return [values.narrow(axis, 0, k), idx.narrow(axis, 0, k)]


@register_ops("TopK")
def _topk_v1(ctx, xs):
    """Opset 1: ``k`` attribute, largest first."""
    x = xs[0]
    return _topk(x, int(ctx.a("k")), norm_axis(ctx.a("axis", -1), x.dim()), True)


@register_ops("TopK", since_version=10)
def _topk_v10(ctx, xs):
    """Opset 10: K as an input; opset 11 adds ``largest`` and ``sorted`` (results are always sorted, which
    is one valid order for ``sorted=0``)."""
    x = xs[0]
    k = int(scalar(xs[1]))
    return _topk(x, k, norm_axis(ctx.a("axis", -1), x.dim()), bool(ctx.a("largest", 1)))
