"""Per-tensor symmetric activation quantization (Q/DQ pair on a node input).

The scale comes from calibration ranges: ``scale = absmax / qmax`` with ``qmax = 2^(b-1) - 1``, zero
point 0, signed integers.  :func:`fake_quant_activation` reproduces what ONNX
``QuantizeLinear -> DequantizeLinear`` computes (``round_half_to_even(x / scale)``, saturate to
``[-2^(b-1), 2^(b-1)-1]``, multiply back) and passes gradients straight through (identity), so the
loss gradient w.r.t. the activation is available with the quantizer in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llc_onnx.errors import LLCError

ACTIVATION_BITS = (8, 16)


@dataclass
class ActivationQuant:
    """Per-tensor activation Q/DQ pair on a node input."""

    scale: float
    bits: int                 # 8 or 16 (signed, zero point 0)


def _check_bits(bits) -> int:
    if int(bits) != bits or int(bits) not in ACTIVATION_BITS:
        raise LLCError(f"activation quant: bits={bits!r} is not supported; use 8 or 16")
    return int(bits)


def activation_scale(absmax: float, bits: int) -> float:
    """Symmetric per-tensor scale ``absmax / qmax`` (1.0 for an all-zero activation).

    The result is rounded to float32, the precision the Q/DQ nodes store.
    """
    bits = _check_bits(bits)
    absmax = float(absmax)
    if not math.isfinite(absmax) or absmax < 0:
        raise LLCError(f"activation quant: calibration absmax={absmax!r} must be finite and >= 0; "
                       "check the calibration data for NaN/Inf activations")
    qmax = (1 << (bits - 1)) - 1
    s = float(torch.tensor(absmax / qmax, dtype=torch.float32, device="cpu"))
    if s <= 0.0:
        s = 1.0 if absmax == 0.0 else float(torch.finfo(torch.float32).tiny)
    return s


class _RoundClampSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, qmin, qmax):
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None, None, None


def fake_quant_activation(x: torch.Tensor, aq: ActivationQuant) -> torch.Tensor:
    """Quantize-dequantize ``x`` (round half to even, clamp); straight-through gradient."""
    bits = _check_bits(aq.bits)
    if not (aq.scale > 0 and math.isfinite(aq.scale)):
        raise LLCError(f"activation quant: scale={aq.scale!r} must be positive and finite")
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    scale = torch.tensor(aq.scale, dtype=torch.float32, device=x.device).to(dtype=x.dtype)
    return _RoundClampSTE.apply(x, scale, qmin, qmax)


def dynamic_uint8_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``DynamicQuantizeLinear`` (ONNX spec; ORT's fused ``DynamicQuantizeMatMul`` quantizes its input the same
    way), in float32: over the whole tensor lo = min(x, 0), hi = max(x, 0), scale s = (hi − lo) / 255, zero point
    z = clip(round(−lo / s), 0, 255), codes q = clip(round(x / s) + z, 0, 255) (round half to even). Returns
    (q, s, z) as float tensors; an all-zero tensor (s = 0) has codes and zero point 0."""
    xf = x.detach().float()
    lo, hi = torch.clamp(xf.min(), max=0.0), torch.clamp(xf.max(), min=0.0)
    s = (hi - lo) / 255.0
    if float(s) == 0.0:
        return torch.zeros_like(xf), s, torch.zeros_like(s)
    z = torch.clamp(torch.round(-lo / s), 0, 255)
    return torch.clamp(torch.round(xf / s) + z, 0, 255), s, z


def dynamic_uint8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """What ``DynamicQuantizeLinear`` followed by its dequantization computes, per tensor and per run
    (:func:`dynamic_uint8_codes`, then (q − z)·s). Straight-through gradient. An all-zero tensor passes
    unchanged."""
    with torch.no_grad():
        q, s, z = dynamic_uint8_codes(x)
        if float(s) == 0.0:
            return x
        dq = ((q - z) * s).to(x.dtype)
    return x + (dq - x).detach()
