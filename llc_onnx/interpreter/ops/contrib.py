"""ONNX Runtime contrib ops (domain ``com.microsoft``) that its transformer optimizer, quantizers and
exporters emit: fused GELU and layer norms, BERT embeddings, Attention, MultiHeadAttention,
GroupQueryAttention, RotaryEmbedding and MatMulNBits (:func:`matmul_nbits_reference`, the reference a GPU
kernel can stand in for). Semantics follow ORT 1.31's operator schemas and are checked against ORT itself
(tests/test_interpreter_contrib.py); options ORT offers for serving only (shared KV buffers, quantized KV
caches, packed batching) are refused with a one-line error."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import register_ops
from ..tensors import Tensor
from .nn import rms_norm, rotary

MS = "com.microsoft"


@register_ops("FastGelu", domain=MS)
def _fast_gelu(ctx, xs):
    x = xs[0] if len(xs) < 2 or xs[1] is None else xs[0] + xs[1]
    return F.gelu(x, approximate="tanh")


@register_ops("BiasGelu", domain=MS)
def _bias_gelu(ctx, xs):
    return F.gelu(xs[0] + xs[1])


@register_ops("SimplifiedLayerNormalization")  # ORT registers it in the ONNX domain
@register_ops("SimplifiedLayerNormalization", domain=MS)
def _simplified_ln(ctx, xs):
    y, inv = rms_norm(ctx, xs)
    return [y, inv]


@register_ops("SkipSimplifiedLayerNormalization", domain=MS)
def _skip_simplified_ln(ctx, xs):
    s = xs[0] + xs[1]
    if len(xs) > 3 and xs[3] is not None:
        s = s + xs[3]
    y, inv = rms_norm(ctx, [s, xs[2]])
    return [y, inv, inv, s]  # (output, mean (unused), inv_std_var, input_skip_bias_sum)


# ---------------------------------------------------------------------------------------- layer norms
def _layer_norm_last(x: Tensor, gamma: Tensor, beta: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, inv_std) of a layer norm over the last axis."""
    mean = x.mean(dim=-1, keepdim=True)
    d = x - mean
    inv = torch.rsqrt((d * d).mean(dim=-1, keepdim=True) + eps)
    y = d * inv * gamma
    return (y + beta if beta is not None else y), mean, inv


@register_ops("SkipLayerNormalization", domain=MS)
def _skip_ln(ctx, xs):
    """s = input + skip (+ bias); LayerNorm(s) over the last axis · gamma (+ beta). Outputs (y, mean, inv_std,
    s)."""
    s = xs[0] + xs[1]
    beta = xs[3] if len(xs) > 3 else None
    if len(xs) > 4 and xs[4] is not None:
        s = s + xs[4]
    y, mean, inv = _layer_norm_last(s, xs[2], beta, ctx.a("epsilon", 1e-12))
    return [y, mean, inv, s]


@register_ops("EmbedLayerNormalization", domain=MS)
def _embed_ln(ctx, xs):
    """BERT embeddings: word[input_ids] + position[position_ids or 0..S-1] (+ segment[segment_ids]), layer
    normalised. Outputs (y, mask_index = number of non-zero mask entries per row (int32), embedding sum)."""
    ids, seg, word, pos, seg_emb, gamma, beta = (xs + [None] * 9)[:7]
    mask = xs[7] if len(xs) > 7 else None
    pos_ids = xs[8] if len(xs) > 8 else None
    b, s = ids.shape
    if pos_ids is None:
        pos_ids = torch.arange(s, device=ids.device).reshape(1, s)
    e = word[ids.long()] + pos[pos_ids.long()].expand(b, s, -1)
    if seg is not None and seg_emb is not None:
        e = e + seg_emb[seg.long()]
    y, _, _ = _layer_norm_last(e, gamma, beta, ctx.a("epsilon", 1e-12))
    if mask is not None:
        mask_index = (mask != 0).sum(dim=1).to(torch.int32)
    else:
        mask_index = torch.full((b,), s, dtype=torch.int32, device=ids.device)
    return [y, mask_index, e]


# ---------------------------------------------------------------------------------------- attention
def _heads(t: Tensor, n: int) -> Tensor:
    """[B, S, N·H] -> [B, N, S, H]."""
    b, s, d = t.shape
    return t.reshape(b, s, n, d // n).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """[B, N, S, H] -> [B, S, N·H]."""
    b, n, s, h = t.shape
    return t.transpose(1, 2).reshape(b, s, n * h)


def _additive_mask(mask: Tensor | None, b: int, s: int, total: int, past: int, filter_value: float,
                   causal: bool, dtype, device) -> Tensor | None:
    """[B, 1, S, T] additive mask (``filter_value`` where a query may not attend) from ORT's mask formats:
    key lengths [B]; ends and starts [2B]; 0/1 key padding [B, T]; 0/1 per query [B, S, T]; and causal
    (query s sees keys ≤ past + s)."""
    out = None
    keys = torch.arange(total, device=device)
    if mask is not None and mask.numel():
        if mask.dim() == 1 and mask.shape[0] == b:
            allowed = keys.reshape(1, 1, total) < mask.reshape(b, 1, 1).long()
        elif mask.dim() == 1 and mask.shape[0] == 2 * b:
            end, start = mask[:b].reshape(b, 1, 1).long(), mask[b:].reshape(b, 1, 1).long()
            allowed = (keys.reshape(1, 1, total) < end) & (keys.reshape(1, 1, total) >= start)
        elif mask.dim() == 2:
            allowed = (mask != 0).reshape(b, 1, mask.shape[-1])[..., -total:]
        elif mask.dim() == 3:
            allowed = mask != 0
        else:
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not supported")
        out = torch.where(allowed, 0.0, filter_value).to(dtype).reshape(b, 1, -1, total)
    if causal:
        q = torch.arange(s, device=device).reshape(s, 1) + past
        future = torch.where(keys.reshape(1, total) > q, filter_value, 0.0).to(dtype).reshape(1, 1, s, total)
        out = future if out is None else out + future
    return out


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, add: Tensor | None) -> Tensor:
    """softmax(q·kᵀ·scale + add)·v on [B, N, S, H] tensors."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if add is not None:
        scores = scores + add
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _attend(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, attn_bias: Tensor | None, past: int) -> Tensor:
    """Attention and MultiHeadAttention on [B, N, S, H] heads: :func:`_sdpa` scaled by ``scale`` (1/√H), with the
    additive mask of ``mask_index`` / ``unidirectional`` (``mask_filter_value``) plus ``attention_bias``."""
    b, s, total = q.shape[0], q.shape[2], k.shape[2]
    scale = ctx.a("scale", 1.0 / math.sqrt(q.shape[-1]))
    add = _additive_mask(mask, b, s, total, past, ctx.a("mask_filter_value", -10000.0),
                         bool(ctx.a("unidirectional", 0)), q.dtype, q.device)
    if attn_bias is not None:
        add = attn_bias if add is None else add + attn_bias
    return _sdpa(q, k, v, scale, add)


@register_ops("Attention", domain=MS)
def _attention(ctx, xs):
    """ORT's fused self-attention: [Q | K | V] = input·weights + bias (split by ``qkv_hidden_sizes``),
    ``num_heads`` heads, scores scaled by ``scale`` (1/√head_size), ``mask_index`` and ``unidirectional`` as an
    additive ``mask_filter_value`` mask, ``attention_bias`` added; ``past`` [2, B, N, P, H] is prepended to
    K/V and ``present`` returned."""
    x, w = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    mask = xs[3] if len(xs) > 3 else None
    past = xs[4] if len(xs) > 4 else None
    attn_bias = xs[5] if len(xs) > 5 else None
    if ctx.a("do_rotary", 0) or ctx.a("past_present_share_buffer", 0):
        raise ctx.fail("do_rotary / past_present_share_buffer are not supported")
    n = int(ctx.a("num_heads"))
    sizes = ctx.a("qkv_hidden_sizes") or [w.shape[1] // 3] * 3
    qkv = torch.matmul(x, w)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = (_heads(t, n) for t in torch.split(qkv, list(sizes), dim=-1))
    p = 0
    if past is not None and past.numel():
        p = past.shape[3]
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    out = _merge_heads(_attend(ctx, q, k, v, mask, attn_bias, p))
    return [out, torch.stack([k, v])]


@register_ops("MultiHeadAttention", domain=MS)
def _mha(ctx, xs):
    """ORT's MultiHeadAttention (projections done outside): query [B, S, D] with key/value [B, L, D] (plus the
    optional ``bias`` [D + D + Dv]), packed KV [B, L, N, 2, H], packed QKV [B, S, N, 3, H], or key/value
    already in heads [B, N, L, H] (cross-attention cache, used as given). ``key_padding_mask``,
    ``unidirectional`` and ``attention_bias`` as in Attention; ``past_key``/``past_value`` [B, N, P, H] are
    prepended; outputs (output, present_key, present_value)."""
    get = (xs + [None] * 10).__getitem__
    q, k, v, bias, mask, attn_bias, past_k, past_v = (get(i) for i in range(8))
    if get(8) is not None or get(9) is not None:
        raise ctx.fail("past_sequence_length / cache_indirection (shared KV buffers) are not supported")
    n = int(ctx.a("num_heads"))
    if q.dim() == 5:  # packed QKV [B, S, N, 3, H]
        q, k, v = (q[:, :, :, i].transpose(1, 2) for i in range(3))
    else:
        hidden = q.shape[-1]
        if bias is not None:
            q = q + bias[:hidden]
        q = _heads(q, n)
        if k.dim() == 5:  # packed KV [B, L, N, 2, H]
            k, v = k[:, :, :, 0].transpose(1, 2), k[:, :, :, 1].transpose(1, 2)
        elif k.dim() == 3:
            if bias is not None:
                k, v = k + bias[hidden:2 * hidden], v + bias[2 * hidden:]
            k, v = _heads(k, n), _heads(v, n)
        # k.dim() == 4: already [B, N, L, H]
    p = 0
    if past_k is not None and past_k.numel():
        p = past_k.shape[2]
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    return [_merge_heads(_attend(ctx, q, k, v, mask, attn_bias, p)), k, v]


@register_ops("RotaryEmbedding", domain=MS)
def _rotary_ms(ctx, xs):
    """ORT's RotaryEmbedding: input [B, S, N·H] or [B, N, S, H], position_ids [B, S] (or [1]: an offset added
    to 0..S-1), cos/sin caches [max_pos, R/2]; ``rotary_embedding_dim`` R (default: the head size),
    ``num_heads`` (default: hidden / head size with head size 2·cache width), ``interleaved``."""
    x, pos, cos_cache, sin_cache = xs[:4]
    if ctx.a("is_packed_batching", 0) or ctx.a("scale", 1.0) != 1.0:
        raise ctx.fail("is_packed_batching / scale ≠ 1 are not supported")
    interleaved = bool(ctx.a("interleaved", 0))
    pos = pos.long()
    if x.dim() == 4:
        b, _, s, h = x.shape
        heads = x
    else:
        b, s, d = x.shape
        n = int(ctx.a("num_heads", 0)) or d // (2 * cos_cache.shape[1])
        heads = _heads(x, n)
    if pos.dim() == 1 or pos.numel() == 1:
        pos = pos.reshape(-1)[:1] + torch.arange(s, device=x.device).reshape(1, s)
    pos = pos.expand(b, s)
    rd = int(ctx.a("rotary_embedding_dim", 0)) or heads.shape[-1]
    cos, sin = cos_cache[pos][..., : rd // 2].unsqueeze(1), sin_cache[pos][..., : rd // 2].unsqueeze(1)
    y = rotary(heads, cos, sin, interleaved)
    return y if x.dim() == 4 else _merge_heads(y)


@register_ops("GroupQueryAttention", domain=MS)
def _gqa(ctx, xs):
    """ORT's GroupQueryAttention, causal, with a KV cache (not shared, not quantized): query [B, S, N·H] (or
    packed [Q | K | V] when key is absent), key/value [B, S, Nkv·H], past_key/past_value [B, Nkv, P, H]
    prepended; ``seqlens_k`` [B] = valid total length − 1 (keys past it are padding); a prompt (no past)
    puts the new tokens at positions 0..S-1, a later step at P..P+S-1. ``do_rotary`` rotates Q and K with the
    cos/sin caches at those positions (or ``position_ids``); ``local_window_size``, ``softcap``,
    ``smooth_softmax``/``head_sink`` and ``attention_bias`` as ORT defines them. Each group of N/Nkv query
    heads shares a K/V head. Outputs (output, present_key, present_value)."""
    get = (xs + [None] * 12).__getitem__
    q, k, v, past_k, past_v, seqlens, _total = (get(i) for i in range(7))
    cos_cache, sin_cache, pos_ids, attn_bias, head_sink = (get(i) for i in range(7, 12))
    if len(xs) > 12 and any(t is not None for t in xs[12:]):
        raise ctx.fail("quantized KV caches and q/k norms are not supported")
    if ctx.a("sliding_window_cache", 0) or ctx.a("qk_output", 0):
        raise ctx.fail("sliding_window_cache / qk_output are not supported")
    n, nkv = int(ctx.a("num_heads")), int(ctx.a("kv_num_heads"))
    b, s = q.shape[0], q.shape[1]
    if k is None:  # packed QKV
        h = q.shape[-1] // (n + 2 * nkv)
        q, k, v = torch.split(q, [n * h, nkv * h, nkv * h], dim=-1)
    q, k, v = _heads(q, n), _heads(k, nkv), _heads(v, nkv)
    p = past_k.shape[2] if past_k is not None and past_k.numel() else 0
    if ctx.a("do_rotary", 0):
        if pos_ids is not None:
            pos = pos_ids.long().expand(b, s)
        else:
            pos = (torch.arange(s, device=q.device) + p).reshape(1, s).expand(b, s)
        half = cos_cache.shape[-1]
        cos, sin = cos_cache[pos][..., :half].unsqueeze(1), sin_cache[pos][..., :half].unsqueeze(1)
        inter = bool(ctx.a("rotary_interleaved", 0))
        q, k = rotary(q, cos, sin, inter), rotary(k, cos, sin, inter)
    if p:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    present_k, present_v = k, v
    total = k.shape[2]
    keys = torch.arange(total, device=q.device).reshape(1, 1, 1, total)
    qpos = (torch.arange(s, device=q.device) + p).reshape(1, 1, s, 1)
    allowed = keys <= qpos
    if seqlens is not None:
        allowed = allowed & (keys <= seqlens.long().reshape(b, 1, 1, 1))
    window = int(ctx.a("local_window_size", -1))
    if window > 0:
        allowed = allowed & (keys > qpos - window)
    if not ctx.a("causal", 1):
        allowed = torch.ones_like(allowed) if seqlens is None else keys <= seqlens.long().reshape(b, 1, 1, 1)
    group = n // nkv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * ctx.a("scale", 1.0 / math.sqrt(q.shape[-1]))
    cap = ctx.a("softcap", 0.0)
    if cap:
        scores = cap * torch.tanh(scores / cap)
    if attn_bias is not None:
        scores = scores + attn_bias
    scores = scores.masked_fill(~allowed, -math.inf)
    if head_sink is not None or ctx.a("smooth_softmax", 0):
        sink = head_sink.reshape(1, n, 1, 1) if head_sink is not None else torch.zeros((1, n, 1, 1), dtype=q.dtype, device=q.device)
        sink = sink.expand(b, n, s, 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return [_merge_heads(torch.matmul(probs, v)), present_k, present_v]


# ---------------------------------------------------------------------------------------- MatMulNBits
def _unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """uint8 [..., n] -> codes [..., n·8/bits], low bits first within each byte."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def dequantize_nbits(b: Tensor, scales: Tensor, zero_points: Tensor | None, K: int, N: int, bits: int,
                     block_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The [N, K] weight a MatMulNBits computes with: ``(u − zp)·scale`` per block of ``block_size`` along K;
    ``b`` uint8 [N, ceil(K/bs), bs·bits/8] (codes u low bits first), ``scales`` [N·nb] or [N, nb],
    ``zero_points`` packed uint8 [N, ceil(nb·bits/8)] (or [N·ceil(..)]), float [N, nb], or None
    (zp = 2^(bits−1))."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits}: MatMulNBits has 2-, 4- and 8-bit codes here")
    nb = -(-K // block_size)
    codes = _unpack_bits(b.reshape(N, -1), bits)[:, : nb * block_size].to(dtype)
    s = scales.reshape(N, nb).to(dtype)
    if zero_points is None:
        zp = torch.full((N, nb), float(1 << (bits - 1)), dtype=dtype, device=b.device)
    elif zero_points.is_floating_point():
        zp = zero_points.reshape(N, nb).to(dtype)
    else:
        zp = _unpack_bits(zero_points.reshape(N, -1), bits)[:, :nb].to(dtype)
    w = (codes.reshape(N, nb, block_size) - zp.unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(N, nb * block_size)[:, :K]


def matmul_nbits_reference(x: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None, K: int, N: int,
                           bits: int, block_size: int) -> Tensor:
    """``x·dequantize_nbits(...)ᵀ``: ONNX Runtime's ``com.microsoft::MatMulNBits`` without its bias (the format
    in notes/formats.md). ``x`` [..., K] float; gradients flow to ``x`` and float ``scales``/zero points. A GPU
    kernel reading the same bytes can take its place (same arguments, same result)."""
    w = dequantize_nbits(b, scales, zero_points, K, N, bits, block_size, dtype=x.dtype)
    return torch.matmul(x, w.transpose(0, 1))


@register_ops("MatMulNBits", domain=MS)
def _matmul_nbits(ctx, xs):
    """Y = A·dequant(B)ᵀ (+ bias): see :func:`matmul_nbits_reference`; ``g_idx`` (deprecated) is not supported."""
    x, b, scales = xs[0], xs[1], xs[2]
    zp = xs[3] if len(xs) > 3 else None
    if len(xs) > 4 and xs[4] is not None:
        raise ctx.fail("the g_idx input (deprecated) is not supported; re-quantize without act_order")
    bias = xs[5] if len(xs) > 5 else None
    if x.is_cuda:  # the Triton kernel reads the same bytes (llc_onnx.plugins.triton)
        from ...plugins.triton import dispatch

        return dispatch.matmul_nbits(x, b, scales, K=int(ctx.a("K")), N=int(ctx.a("N")), bits=int(ctx.a("bits", 4)),
                                     block_size=int(ctx.a("block_size")), zero_points=zp, bias=bias)
    y = matmul_nbits_reference(x, b, scales, zp, int(ctx.a("K")), int(ctx.a("N")), int(ctx.a("bits", 4)),
                               int(ctx.a("block_size")))
    return y + bias if bias is not None else y
