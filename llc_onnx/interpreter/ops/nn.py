"""Neural-network ops: activations, softmax, normalizations, MatMul/Gemm, convolution and pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import register_op, register_ops
from ..tensors import Tensor, norm_axis

@register_ops("Gelu")
def _gelu(ctx, xs):
    return F.gelu(xs[0], approximate=ctx.a("approximate", "none"))


@register_ops("LeakyRelu")
def _leaky(ctx, xs):
    return F.leaky_relu(xs[0], ctx.a("alpha", 0.01))


@register_ops("PRelu")
def _prelu(ctx, xs):
    x, s = xs
    return torch.where(x < 0, x * s, x)


@register_ops("Elu")
def _elu(ctx, xs):
    return F.elu(xs[0], ctx.a("alpha", 1.0))


@register_ops("Selu")
def _selu(ctx, xs):
    x = xs[0]
    alpha, gamma = ctx.a("alpha", 1.67326319217681884765625), ctx.a("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register_ops("HardSigmoid")
def _hard_sigmoid(ctx, xs):
    return torch.clamp(ctx.a("alpha", 0.2) * xs[0] + ctx.a("beta", 0.5), 0.0, 1.0)


@register_ops("HardSwish")
def _hard_swish(ctx, xs):
    x = xs[0]
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@register_ops("Clip")
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


def _softmax_v1(fn):
    """Opsets 1–12: the input is coerced to 2-D at ``axis`` (default 1) and normalised over the second dim."""
    def impl(ctx, xs):
        x = xs[0]
        axis = norm_axis(ctx.a("axis", 1), x.dim())
        shape = x.shape
        y = x.reshape(math.prod(shape[:axis]), math.prod(shape[axis:]))
        return fn(y, dim=1).reshape(shape)

    return impl


def _softmax_v13(fn):
    """Opset 13 on: normalised over ``axis`` alone (default -1)."""
    return lambda ctx, xs: fn(xs[0], dim=norm_axis(ctx.a("axis", -1), xs[0].dim()))


for _op_type, _fn in (("Softmax", torch.softmax), ("LogSoftmax", torch.log_softmax)):
    register_op(_op_type)(_softmax_v1(_fn))
    register_op(_op_type, since_version=13)(_softmax_v13(_fn))


@register_ops("LayerNormalization")
def _layer_norm(ctx, xs):
    x = xs[0]
    scale = xs[1] if len(xs) > 1 else None
    bias = xs[2] if len(xs) > 2 else None
    axis = norm_axis(ctx.a("axis", -1), x.dim())
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


def rms_norm(ctx, xs, default_axis: int = -1):
    x = xs[0]
    scale = xs[1] if len(xs) > 1 else None
    axis = norm_axis(ctx.a("axis", default_axis), x.dim())
    eps = ctx.a("epsilon", 1e-5)
    dims = list(range(axis, x.dim()))
    inv = torch.rsqrt((x * x).mean(dim=dims, keepdim=True) + eps)
    y = x * inv
    if scale is not None:
        y = y * scale
    return y, inv


@register_ops("RMSNormalization")
def _rms_norm(ctx, xs):
    return rms_norm(ctx, xs)[0]


@register_ops("BatchNormalization")
def _batch_norm(ctx, xs):
    x, scale, b, mean, var = xs[:5]
    if ctx.a("training_mode", 0):
        raise ctx.fail("training_mode=1 is not supported; export the model in eval mode")
    eps = ctx.a("epsilon", 1e-5)
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = torch.rsqrt(var + eps).reshape(shape)
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + b.reshape(shape)


@register_ops("InstanceNormalization")
def _instance_norm(ctx, xs):
    x, scale, b = xs
    dims = list(range(2, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    d = x - mean
    inv = torch.rsqrt((d * d).mean(dim=dims, keepdim=True) + ctx.a("epsilon", 1e-5))
    shape = [1, -1] + [1] * (x.dim() - 2)
    return d * inv * scale.reshape(shape) + b.reshape(shape)


@register_ops("Dropout")
def _dropout(ctx, xs):
    x = xs[0]
    outs = [x]
    if len(ctx.node.outputs) > 1 and ctx.node.outputs[1]:
        outs.append(torch.ones_like(x, dtype=torch.bool))
    return outs


# linear algebra ---------------------------------------------------------------------------------


@register_ops("MatMul")
def _matmul(ctx, xs):
    return torch.matmul(xs[0], xs[1])


@register_ops("Gemm")
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


@register_ops("Conv")
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


@register_ops("ConvTranspose")
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


@register_ops("MaxPool")
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


@register_ops("AveragePool")
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


@register_ops("GlobalAveragePool")
def _gap(ctx, xs):
    x = xs[0]
    return x.mean(dim=list(range(2, x.dim())), keepdim=True)


@register_ops("GlobalMaxPool")
def _gmp(ctx, xs):
    x = xs[0]
    return x.amax(dim=list(range(2, x.dim())), keepdim=True)


@register_ops("Celu")
def _celu(ctx, xs):
    """max(0, x) + min(0, α·(exp(x/α) − 1))."""
    return F.celu(xs[0], ctx.a("alpha", 1.0))


def _group_norm(ctx, xs, per_channel: bool):
    """x [N, C, ...] normalised over each of ``num_groups`` groups of C/G channels (and all spatial
    positions), then scaled and shifted: per channel (opset 21, scale/bias [C]) or per group (opset 18,
    scale/bias [G], each channel taking its group's)."""
    x, scale, bias = xs[0], xs[1], xs[2]
    g = int(ctx.a("num_groups"))
    n, c = x.shape[0], x.shape[1]
    y = x.reshape(n, g, -1)
    mean = y.mean(dim=2, keepdim=True)
    d = y - mean
    y = (d * torch.rsqrt((d * d).mean(dim=2, keepdim=True) + ctx.a("epsilon", 1e-5))).reshape(x.shape)
    if not per_channel:
        scale, bias = scale.repeat_interleave(c // g), bias.repeat_interleave(c // g)
    shape = [1, c] + [1] * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


register_op("GroupNormalization", since_version=18)(lambda ctx, xs: _group_norm(ctx, xs, per_channel=False))
register_op("GroupNormalization", since_version=21)(lambda ctx, xs: _group_norm(ctx, xs, per_channel=True))


@register_ops("LpNormalization")
def _lp_norm(ctx, xs):
    """x / ‖x‖_p along ``axis`` (p = 1 or 2); a zero norm leaves the zeros as they are."""
    x = xs[0]
    axis = norm_axis(ctx.a("axis", -1), x.dim())
    p = int(ctx.a("p", 2))
    if p not in (1, 2):
        raise ctx.fail(f"p={p}: LpNormalization takes p = 1 or 2")
    norm = x.abs().sum(dim=axis, keepdim=True) if p == 1 else torch.sqrt((x * x).sum(dim=axis, keepdim=True))
    return torch.where(norm == 0, x, x / torch.where(norm == 0, torch.ones_like(norm), norm))


def _one_hot_max(x: Tensor, dim: int) -> Tensor:
    idx = torch.argmax(x, dim=dim, keepdim=True)  # first occurrence of the maximum, as ONNX says
    return torch.zeros_like(x).scatter(dim, idx, 1.0)


@register_ops("Hardmax")
def _hardmax_v1(ctx, xs):
    """Opsets 1–12: 1 at the first maximum of each row of x coerced to 2-D at ``axis`` (default 1)."""
    x = xs[0]
    axis = norm_axis(ctx.a("axis", 1), x.dim())
    y = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return _one_hot_max(y, 1).reshape(x.shape)


@register_ops("Hardmax", since_version=13)
def _hardmax_v13(ctx, xs):
    """Opset 13 on: 1 at the first maximum along ``axis`` (default -1), 0 elsewhere."""
    x = xs[0]
    return _one_hot_max(x, norm_axis(ctx.a("axis", -1), x.dim()))


# attention (ONNX domain, opset 23 on; torch.onnx writes it for scaled_dot_product_attention) ------------------
def _to_heads(t: Tensor, n: int | None) -> Tensor:
    """[B, S, N·H] -> [B, N, S, H]; 4-D inputs are already in heads."""
    if t.dim() == 4:
        return t
    b, s, d = t.shape
    return t.reshape(b, s, n, d // n).transpose(1, 2)


@register_ops("Attention", since_version=23)
def _attention23(ctx, xs):
    """softmax(softcap(Q·Kᵀ·scale) + mask)·V over [B, N, S, H] heads (3-D inputs split by ``q_num_heads`` /
    ``kv_num_heads``), K/V heads repeated for grouped queries. ``past_key``/``past_value`` are prepended
    (outputs ``present_*``). ``attn_mask``: boolean (True = attend) or additive, right-padded with "masked"
    to the key length. ``is_causal``: query i sees keys j ≤ i + offset (offset = past length, or
    ``nonpad_kv_seqlen`` − S); ``nonpad_kv_seqlen`` (opset 24) masks keys past each row's length;
    ``left/right_window_size`` (opset 25) bound |i + offset − j|. A row with no key left gives 0. The 4th
    output is Q·Kᵀ (mode 0), after softcap (1), with the mask (2) or after softmax (3)."""
    get = (xs + [None] * 7).__getitem__
    q, k, v, mask, past_k, past_v, nonpad = (get(i) for i in range(7))
    three_d = q.dim() == 3
    q = _to_heads(q, ctx.a("q_num_heads"))
    k, v = _to_heads(k, ctx.a("kv_num_heads")), _to_heads(v, ctx.a("kv_num_heads"))
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    present_k, present_v = k, v
    b, n, s, h = q.shape
    total = k.shape[2]
    scale = ctx.a("scale", 1.0 / math.sqrt(h))
    ninf = -math.inf
    bias = torch.zeros((s, total), dtype=q.dtype, device=q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, ninf).to(q.dtype)
        if mask.shape[-1] < total:
            mask = F.pad(mask, (0, total - mask.shape[-1]), value=ninf)
        bias = bias + mask
    if nonpad is not None and past_k is None:
        offset = (nonpad.long() - s).reshape(-1, 1, 1, 1)
    else:
        offset = torch.tensor(past_k.shape[2] if past_k is not None else 0, device=q.device)
    qi = torch.arange(s, device=q.device).reshape(s, 1)
    kj = torch.arange(total, device=q.device).reshape(1, total)
    if ctx.a("is_causal", 0):
        bias = bias + torch.where(kj <= qi + offset, 0.0, ninf).to(q.dtype)
    left, right = ctx.a("left_window_size", -1), ctx.a("right_window_size", -1)
    if left >= 0 or right >= 0:
        diff = qi + offset - kj
        allowed = torch.ones_like(diff, dtype=torch.bool)
        if left >= 0:
            allowed = allowed & (diff <= left)
        if right >= 0:
            allowed = allowed & (-diff <= right)
        bias = bias + torch.where(allowed, 0.0, ninf).to(q.dtype)
    if nonpad is not None:
        bias = bias + torch.where(kj.reshape(1, 1, 1, total) < nonpad.long().reshape(-1, 1, 1, 1), 0.0, ninf).to(q.dtype)
    if n != k.shape[1]:
        k, v = k.repeat_interleave(n // k.shape[1], dim=1), v.repeat_interleave(n // v.shape[1], dim=1)
    root = math.sqrt(scale)
    qk = torch.matmul(q * root, (k * root).transpose(-1, -2))
    mode = int(ctx.a("qk_matmul_output_mode", 0))
    cap = ctx.a("softcap", 0.0)
    if cap and cap > 0:
        qk = cap * torch.tanh(qk / cap)
    scores = qk + bias
    masked_row = torch.isneginf(bias.amax(dim=-1, keepdim=True))
    safe = torch.where(masked_row, torch.zeros_like(scores), scores)
    probs = torch.where(masked_row, torch.zeros_like(scores), torch.softmax(safe, dim=-1))
    y = torch.matmul(probs, v)
    if three_d:
        y = y.transpose(1, 2).reshape(b, s, -1)
    qk_out = {0: qk, 1: qk, 2: scores, 3: probs}.get(mode, qk)
    return [y, present_k, present_v, qk_out]


def rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate the first ``2·cos.shape[-1]`` features of ``x`` [..., S, H] by the angles whose cos/sin are
    ``cos``/``sin`` [..., S, R/2]: halves (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin), or the same on the
    (even, odd) pairs when ``interleaved``; features past R pass through."""
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


@register_ops("RotaryEmbedding", since_version=23)
def _rotary23(ctx, xs):
    """ONNX RotaryEmbedding: X [B, S, N·H] (``num_heads``) or [B, N, S, H]; cos/sin caches [max_pos, R/2]
    indexed by ``position_ids`` [B, S], or already [B, S, R/2] without them; the first R =
    ``rotary_embedding_dim`` (default H) features of each head rotated, halves or ``interleaved`` pairs."""
    x, cos, sin = xs[0], xs[1], xs[2]
    pos = xs[3] if len(xs) > 3 else None
    if pos is not None:
        cos, sin = cos[pos.long()], sin[pos.long()]
    heads = _to_heads(x, ctx.a("num_heads"))  # [B, N, S, H]
    rd = int(ctx.a("rotary_embedding_dim", 0)) or heads.shape[-1]
    y = rotary(heads, cos[..., : rd // 2].unsqueeze(1), sin[..., : rd // 2].unsqueeze(1), bool(ctx.a("interleaved", 0)))
    if x.dim() == 4:
        return y
    return y.transpose(1, 2).reshape(x.shape)
