"""QuantizeLinear / DequantizeLinear: per tensor, per axis and blocked (``block_size``), with zero points."""

from __future__ import annotations

import onnx
import torch

from ..registry import register_ops
from ..tensors import INT_TYPES, Tensor, norm_axis


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


# ONNX integer type -> (min, max) of its values (torch stores INT4/INT2 in int8, UINT16 in int32, ...)
_QRANGE = {
    onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.UINT4: (0, 15), onnx.TensorProto.INT4: (-8, 7),
    onnx.TensorProto.UINT2: (0, 3), onnx.TensorProto.INT2: (-2, 1),
    onnx.TensorProto.INT32: (-(2 ** 31), 2 ** 31 - 1),
}


def _q_type(ctx, zp) -> int:
    """ONNX type of QuantizeLinear's output: the zero point's type when there is one, else ``output_dtype``
    (opset 21), else UINT8 (the ONNX default)."""
    names = ctx.node.inputs
    if zp is not None:
        onnx_type = ctx.g.elem_types.get(names[2]) if len(names) > 2 else None
        if onnx_type is not None:
            return onnx_type
        inverse = {torch.uint8: onnx.TensorProto.UINT8, torch.int8: onnx.TensorProto.INT8,
                   torch.int16: onnx.TensorProto.INT16, torch.int32: onnx.TensorProto.INT32}
        return inverse.get(zp.dtype, onnx.TensorProto.UINT8)
    return int(ctx.a("output_dtype", 0)) or onnx.TensorProto.UINT8


@register_ops("QuantizeLinear")
def _quant(ctx, xs):
    x, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 else None
    q_type = _q_type(ctx, zp)
    if q_type not in _QRANGE:
        raise ctx.fail(f"quantizing to {onnx.TensorProto.DataType.Name(q_type)} is not supported; "
                       "use an integer output type")
    lo, hi = _QRANGE[q_type]
    q = torch.round(x / _q_broadcast(ctx, scale, x))
    if zp is not None:
        q = q + _q_broadcast(ctx, zp.to(ctx.dtype), x)
    return torch.clamp(q, lo, hi).to(INT_TYPES[q_type])


@register_ops("DynamicQuantizeLinear")
def _dynamic_quant(ctx, xs):
    """uint8 codes, scale and zero point of the whole tensor (:func:`llc_onnx.quant.activations.dynamic_uint8_codes`,
    the arithmetic the candidates are measured with)."""
    from ...quant.activations import dynamic_uint8_codes

    q, s, z = dynamic_uint8_codes(xs[0])
    return [q.to(torch.uint8), s.to(torch.float32), z.to(torch.uint8)]


@register_ops("MatMulInteger")
def _matmul_integer(ctx, xs):
    """(A − a_zero_point) · (B − b_zero_point) in int32 (per-row A / per-column B zero points broadcast);
    computed in int64, exact for the 8-bit inputs the op takes."""
    a, b = xs[0].to(torch.int64), xs[1].to(torch.int64)
    if len(xs) > 2 and xs[2] is not None:
        za = xs[2].to(torch.int64)
        a = a - (za.reshape(-1, 1) if za.dim() == 1 and za.numel() > 1 else za.reshape(()))
    if len(xs) > 3 and xs[3] is not None:
        zb = xs[3].to(torch.int64)
        b = b - (zb.reshape(()) if zb.numel() == 1 else zb)
    return torch.matmul(a, b).to(torch.int32)
