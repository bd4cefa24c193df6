"""ONNX Runtime contrib ops (domain ``com.microsoft``) that its transformer optimizer and exporters emit."""

from __future__ import annotations

import torch.nn.functional as F

from ..registry import register_ops
from .nn import rms_norm

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
