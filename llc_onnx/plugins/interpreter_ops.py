"""Interpreter ops that run the weight-only formats through :mod:`llc_onnx.plugins.triton.dispatch`.

* ``com.microsoft::MatMulNBits``: registered only when the interpreter has no implementation yet. The
  built-in one in ``interpreter/ops/contrib.py`` wins; for CUDA to run the kernels its body should be::

      from ...plugins.triton import dispatch  # inside the function: keeps the interpreter import light
      return dispatch.matmul_nbits(xs[0], xs[1], xs[2], K=ctx.a("K"), N=ctx.a("N"), bits=ctx.a("bits", 4),
                                   block_size=ctx.a("block_size"), zero_points=xs[3] if len(xs) > 3 else None,
                                   g_idx=xs[4] if len(xs) > 4 else None, bias=xs[5] if len(xs) > 5 else None)

* ``llc_onnx::SeriesMatMulNBits``: the fused series node of :mod:`llc_onnx.plugins.series`.

:func:`register_interpreter_ops` is idempotent.
"""

from __future__ import annotations

from ..interpreter import lookup, register_op
from .series import MS_DOMAIN, SERIES_DOMAIN, SERIES_OP


def _input(xs, i):
    return xs[i] if len(xs) > i else None


def matmul_nbits_op(ctx, xs):
    """``com.microsoft::MatMulNBits`` (inputs A, B, scales, zero_points?, g_idx?, bias?)."""
    from .triton import dispatch

    return dispatch.matmul_nbits(xs[0], xs[1], xs[2], K=int(ctx.a("K")), N=int(ctx.a("N")), bits=int(ctx.a("bits", 4)),
                                 block_size=int(ctx.a("block_size")), zero_points=_input(xs, 3),
                                 g_idx=_input(xs, 4), bias=_input(xs, 5))


def series_matmul_op(ctx, xs):
    """``llc_onnx::SeriesMatMulNBits`` (inputs x, B, scales, bias?)."""
    from .triton import dispatch

    return dispatch.series_matmul(xs[0], xs[1], xs[2], K=int(ctx.a("K")), N=int(ctx.a("N")), bits=int(ctx.a("bits")),
                                  block_size=int(ctx.a("block_size")), terms=int(ctx.a("terms")),
                                  bias=_input(xs, 3))


def register_interpreter_ops() -> list[str]:
    """Register the ops that are missing; returns the ``domain::op`` names registered by this call."""
    done = []
    if lookup("MatMulNBits", MS_DOMAIN, 1) is None:
        register_op("MatMulNBits", domain=MS_DOMAIN)(matmul_nbits_op)
        done.append(f"{MS_DOMAIN}::MatMulNBits")
    if lookup(SERIES_OP, SERIES_DOMAIN, 1) is None:
        register_op(SERIES_OP, domain=SERIES_DOMAIN)(series_matmul_op)
        done.append(f"{SERIES_DOMAIN}::{SERIES_OP}")
    return done
