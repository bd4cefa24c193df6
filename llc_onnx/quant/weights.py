"""Symmetric weight quantizers (numpy, float64 inside) with loss-aware (LLC) rounding.

Layouts
-------
* **Per output channel** (``spec.block_size is None``): one scale per index of ``out_axis``;
  ``scale.shape == (w.shape[out_axis],)`` and ``QuantizedWeight.axis == out_axis``.  Used for 8/16 bit.
* **Blocked** (``spec.block_size = bs``): the reduce axis (length K) is cut into ``ceil(K / bs)``
  consecutive blocks (the last one may be partial); every block of every other index gets its own
  scale, so ``scale.shape == w.shape`` with ``shape[reduce_axis] -> ceil(K / bs)`` and
  ``QuantizedWeight.axis == reduce_axis``.  This is the ONNX ``DequantizeLinear`` blocked layout.
* **Blocked convolution** (``spec.block_size = bs`` and ``w.ndim ≥ 3``, i.e. a Conv weight
  ``[O, C/g, k1, …]`` with ``out_axis=0``, ``reduce_axis=1``): a convolution reduces over
  ``R = C/g·k1·…`` (all axes but the output one; per group it is the same thing, since W holds one
  group's channels), so the blocks run over that flattened reduction: the weight is viewed as the
  matrix ``W2 = w.reshape(O, R)`` and blocked along its axis 1.  ``q`` and ``scale`` are returned
  in that **matrix layout** — ``q.shape == (O, R)``, ``scale.shape == (O, ceil(R / bs))``,
  ``axis == 1`` — because ONNX ``DequantizeLinear`` blocks along one axis only; the graph writes
  codes ``[O, R]`` → ``DequantizeLinear(axis=1, block_size=bs)`` → ``Reshape`` to ``w.shape`` → Conv
  (``passes/qdq.py``).  ``dequant`` is always in the ONNX weight shape (``w.shape``):
  ``dequant == (q * scale broadcast).reshape(w.shape)``.  Without this a depthwise ``(32, 1, 3, 3)``
  weight at 4 bits had one scale per 1-element block (1,296 B, more than its 1,152 B float32);
  with it, 32 scales (272 B).

Both layouts are handled the same way internally: the weight is rearranged into a 2-D matrix of
*groups* (one row per scale); blocked rows are zero-padded to ``bs`` (zeros quantize to exactly 0,
have zero gradient and never change any statistic except the ACIQ mean, which is masked).

Integers are b-bit signed, zero point 0: ``q ∈ [qmin, qmax] = [-2^(b-1), 2^(b-1)-1]``.  The scale is
chosen for the symmetric range ``[-qmax, qmax]`` (``scale = clip / qmax``), so ``qmin`` is only reached
by weights beyond the clipping threshold; nothing is ever produced outside ``[qmin, qmax]``.
Scales are rounded to their stored type (``spec.float_type``: float32, or the float16 / bfloat16 of a
half-precision model, whose DequantizeLinear / MatMulNBits scales have the weight's type) *before* rounding
the weights, so the decisions are made against the exact scale the graph will use, and
``dequant = float32(q) * scale`` is what DequantizeLinear computes (in float32; a float16 DequantizeLinear
also rounds its output to float16, ≤ half an fp16 ulp per weight, which MatMulNBits does not).

Scale methods
-------------
* ``"minmax"``: ``scale = absmax / qmax`` (no clipping).
* ``"mse"``: grid search over clipping ratios ``r ∈ linspace(0.3, 1, 100)`` (1.0 included, so it is
  never worse than minmax), per group, minimising ``‖w − dq‖²`` with nearest rounding.
* ``"aciq"``: analytical clipping of Banner, Nahshan & Soudry, "Post training 4-bit quantization of
  convolutional networks for rapid-deployment" (ACIQ, NeurIPS 2019).  Assuming the weights of a
  group are Laplace(μ, b), the MSE-optimal clipping value is ``alpha = c_bits · b`` with
  ``c = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}`` and ``b = mean|w − mean(w)|``
  (the Laplace maximum-likelihood scale).  Clip at ``min(alpha, absmax)``; above 8 bits ``minmax``.
* ``"hqq"``: half-quadratic search of the scale under an lp<1 error (Badri & Shaji 2023), see
  :mod:`llc_onnx.quant.hqq`.

Rounding
--------
With ``x = w / scale`` (after the scale is fixed):

* ``"nearest"``: ``np.rint`` — round half to even.
* ``"up"`` / ``"down"``: ``ceil(x)`` / ``floor(x)`` (clamped to the range, so beyond the clipping
  threshold ``up`` may be below w and ``down`` above it).
* ``"llc"``: loss-aware, sign-directed rounding.  Let ``g`` be the mean gradient of the loss w.r.t. w
  over calibration data.  To first order the loss changes by ``ΔL ≈ Σ g·δ`` with ``δ = dq − w``.
  Per group (channel or block) we require ``S = Σ_group g·δ ≤ 0`` while keeping ``‖δ‖`` small:

  1. start from nearest rounding ``q⁰`` (the smallest possible ``‖δ‖``); if ``S(q⁰) ≤ 0`` stop.
  2. every element with ``floor(x) ≠ ceil(x)`` (both inside the range) can move to the other
     neighbour ``q'``; this changes ``S`` by ``Δᵢ = gᵢ·scale·(q'ᵢ − q⁰ᵢ)`` and ``‖δ‖²`` by
     ``cᵢ = scale²·(1 − 2fᵢ) ≥ 0`` where ``fᵢ = |xᵢ − q⁰ᵢ| ≤ ½``.  Only flips with ``Δᵢ < 0`` (the ones
     that move against the gradient) are candidates.
  3. take candidates in increasing order of ``cᵢ / |Δᵢ|`` (most reduction of ``S`` per unit of added
     squared error — the greedy for the fractional knapsack; ties keep element order, stable sort)
     while ``S > 0``.

  The set flipped is a subset of what pure sign rounding (up where g < 0, down where g > 0) would
  flip, so ``‖δ_llc‖ ≤ ‖δ_sign‖``, and since pure sign rounding has every ``gᵢ·δᵢ ≤ 0``, the greedy
  always reaches ``S ≤ 0`` when nothing is clipped.  Clipped elements (``|x| > qmax``) cannot move;
  if their contribution alone is positive the group ends with every useful flip taken and ``S``
  as small as it can be made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llc_onnx.axes import norm_axis
from llc_onnx.errors import LLCError

SCALE_METHODS = ("minmax", "mse", "aciq", "hqq")
ROUNDINGS = ("nearest", "up", "down", "llc")

# Banner et al. (ACIQ) optimal clipping for Laplace(b): alpha = c[bits] * b.
ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
MSE_RATIOS = np.linspace(0.3, 1.0, 100)

_F32_TINY = float(np.finfo(np.float32).tiny)
#: elements per chunk of rows in :func:`quantize_weight` (each row is decided alone: the chunking changes no value)
ROW_CHUNK_ELEMENTS = 1 << 20
#: stored scale types: name -> numpy type (bfloat16 from ml_dtypes) and bytes per scale
FLOAT_TYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class WeightQuantSpec:
    bits: int                 # 2, 4, 8, 16 (any 2..16 accepted)
    block_size: int | None    # None => per output channel; else blocked along reduce_axis
    scale_method: str = "minmax"   # "minmax" | "mse" | "aciq"
    rounding: str = "nearest"      # "nearest" | "up" | "down" | "llc"
    float_type: str = "float32"    # type the scales are stored in (the model's float type): FLOAT_TYPES


@dataclass
class QuantizedWeight:
    """Exactly what DequantizeLinear needs (zero point always 0); layouts in the module docstring.

    ``q`` and ``scale`` are what the DequantizeLinear reads: in the weight's shape, except for blocked
    weights of rank ≥ 3 (Conv), which are in the matrix layout ``[O, R]`` (see :func:`is_matrix_layout`).
    ``dequant`` is always in the weight's (ONNX) shape."""

    q: np.ndarray             # int32, values in [-2^(b-1), 2^(b-1)-1]; w.shape, or (O, R) for blocked Conv
    scale: np.ndarray         # float32; per-channel [C] (axis=out_axis) or blocked (axis=reduce_axis, or 1)
    axis: int
    block_size: int | None
    bits: int
    dequant: np.ndarray       # float32, q * scale broadcast, in w.shape
    nbytes: int               # ceil(bits * numel / 8) + scale bytes (4, or 2 for float16/bfloat16) * scale.size


def conv_matrix_shape(shape) -> tuple[int, int]:
    """``(O, R)``: the matrix a Conv weight ``[O, C/g, k1, …]`` is blocked as (``R = C/g·k1·…``)."""
    shape = tuple(int(d) for d in shape)
    return shape[0], math.prod(shape[1:])


def is_matrix_layout(weight_shape, q_shape) -> bool:
    """True when codes of shape ``q_shape`` are the blocked-Conv matrix layout of a weight of
    ``weight_shape`` (rank ≥ 3 weight, rank-2 codes ``(O, R)``)."""
    weight_shape, q_shape = tuple(int(d) for d in weight_shape), tuple(int(d) for d in q_shape)
    return len(weight_shape) >= 3 and q_shape == conv_matrix_shape(weight_shape)


def dominated_levels(sizes_by_level) -> set:
    """Levels that cost as many or more bytes than a higher-fidelity level of the same node.

    ``sizes_by_level``: level -> bytes, levels given as bits (2, 4, 8, 16, or ``"int4"``-style names) and
    0 or ``"float"`` for the float weight (the highest fidelity); more bits = higher fidelity.  A level is
    dominated when some higher-fidelity level costs ≤ its bytes: offering it can only lose (more error,
    no saving).  Returns the set of dominated levels (as given)."""
    def fidelity(level):
        if level in (0, "float", None):
            return math.inf
        return int(level[3:]) if isinstance(level, str) and level.startswith("int") else int(level)

    ordered = sorted(sizes_by_level.items(), key=lambda kv: fidelity(kv[0]), reverse=True)
    out, best = set(), math.inf  # fewest bytes among the higher-fidelity levels seen so far
    for level, nbytes in ordered:
        if nbytes >= best:
            out.add(level)
        best = min(best, nbytes)
    return out


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a b-bit signed integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# ----------------------------------------------------------------------------------------- checks
def _check_spec(spec: WeightQuantSpec) -> None:
    if not isinstance(spec.bits, (int, np.integer)) or not 2 <= int(spec.bits) <= 16:
        raise LLCError(f"weight quant spec: bits={spec.bits!r} is not supported; use an integer in 2..16 "
                       "(2, 4, 8 or 16 map to ONNX integer types)")
    if spec.block_size is not None and (not isinstance(spec.block_size, (int, np.integer))
                                        or int(spec.block_size) < 1):
        raise LLCError(f"weight quant spec: block_size={spec.block_size!r} must be a positive integer "
                       "(e.g. 32, 64, 128) or None for per-channel")
    if spec.scale_method not in SCALE_METHODS:
        raise LLCError(f"weight quant spec: scale_method={spec.scale_method!r} is unknown; "
                       f"use one of {', '.join(SCALE_METHODS)}")
    if spec.float_type not in FLOAT_TYPES:
        raise LLCError(f"weight quant spec: float_type={spec.float_type!r} is unknown; use one of "
                       f"{', '.join(FLOAT_TYPES)}")
    if spec.rounding not in ROUNDINGS:
        raise LLCError(f"weight quant spec: rounding={spec.rounding!r} is unknown; "
                       f"use one of {', '.join(ROUNDINGS)}")


def _infer_out_axis(ndim: int, reduce_axis: int) -> int:
    if ndim == 2:
        return 1 - reduce_axis
    return 0


# ------------------------------------------------------------------------------- group layout
class _Groups:
    """Rearrange a weight into rows (one row per scale) and back."""

    def __init__(self, shape: tuple[int, ...], block_size: int | None, out_axis: int, reduce_axis: int):
        self.shape = tuple(int(d) for d in shape)
        self.block_size = block_size
        if block_size is None:
            self.axis = out_axis
            moved = (self.shape[out_axis],) + tuple(d for i, d in enumerate(self.shape) if i != out_axis)
            self.moved = moved
            self.n_rows = moved[0]
            self.row_len = int(np.prod(moved[1:], dtype=np.int64))
            self.scale_shape = (self.shape[out_axis],)
            self.pad = 0
        else:
            self.axis = reduce_axis
            k = self.shape[reduce_axis]
            rest = tuple(d for i, d in enumerate(self.shape) if i != reduce_axis)
            self.k = k
            self.rest = rest
            self.nb = -(-k // block_size) if k > 0 else 0
            self.pad = self.nb * block_size - k
            self.n_rows = int(np.prod(rest, dtype=np.int64)) * self.nb
            self.row_len = block_size
            ss = list(self.shape)
            ss[reduce_axis] = self.nb
            self.scale_shape = tuple(ss)

    def to_rows(self, a: np.ndarray) -> np.ndarray:
        if self.block_size is None:
            return np.moveaxis(a, self.axis, 0).reshape(self.n_rows, self.row_len)
        t = np.moveaxis(a, self.axis, -1)
        if self.pad:
            t = np.concatenate([t, np.zeros(t.shape[:-1] + (self.pad,), dtype=t.dtype)], axis=-1)
        return t.reshape(self.n_rows, self.row_len)

    def mask(self) -> np.ndarray | None:
        """Valid (non-padding) entries of the rows, or None when there is no padding."""
        if self.block_size is None or not self.pad:
            return None
        m = np.ones(self.nb * self.block_size, dtype=bool)
        m[self.k:] = False
        m = np.broadcast_to(m, self.rest + (m.size,))
        return m.reshape(self.n_rows, self.row_len)

    def from_rows(self, r: np.ndarray) -> np.ndarray:
        if self.block_size is None:
            return np.moveaxis(r.reshape(self.moved), 0, self.axis)
        t = r.reshape(self.rest + (self.nb * self.block_size,))[..., : self.k]
        return np.moveaxis(t, -1, self.axis)

    def scale_from_rows(self, s: np.ndarray) -> np.ndarray:
        if self.block_size is None:
            return s.reshape(self.scale_shape)
        return np.moveaxis(s.reshape(self.rest + (self.nb,)), -1, self.axis)


# ------------------------------------------------------------------------------------- scales
def float_type_of(name: str):
    """The numpy type of a stored float type name (``FLOAT_TYPES``)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name).type


def scale_bytes(float_type: str) -> int:
    """Bytes of one stored scale."""
    return 4 if float_type == "float32" else 2


def _to_f32_scale(s64: np.ndarray, float_type: str = "float32") -> np.ndarray:
    """Scales as float32 holding values of the stored type ``float_type``, strictly positive (all-zero
    groups get 1.0: their q is 0 anyway; a scale below the type's smallest positive value gets that value)."""
    s32 = s64.astype(np.float32)
    s32 = np.where(s64 > 0, np.maximum(s32, np.float32(_F32_TINY)), np.float32(1.0))
    if float_type != "float32":
        t = float_type_of(float_type)
        import ml_dtypes

        tiny = np.float32(float(ml_dtypes.finfo(t).smallest_subnormal))
        s32 = np.maximum(s32, tiny).astype(t).astype(np.float32)
    return s32.astype(np.float32)


def _round_nearest(rows: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    return np.clip(np.rint(rows / s[:, None]), qmin, qmax)


def _scales(rows: np.ndarray, mask: np.ndarray | None, spec: WeightQuantSpec) -> np.ndarray:
    bits = int(spec.bits)
    qmin, qmax = qrange(bits)
    absmax = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    method = spec.scale_method
    if method == "aciq" and bits not in ACIQ_LAPLACE:
        method = "minmax"
    ft = spec.float_type
    if method == "minmax":
        return _to_f32_scale(absmax / qmax, ft)
    if method == "hqq":  # data-free half-quadratic search (llc_onnx.quant.hqq)
        from .hqq import hqq_scales
        return _to_f32_scale(hqq_scales(rows, bits).astype(np.float64), ft)
    if method == "aciq":
        if mask is None:
            n = np.full(rows.shape[0], rows.shape[1], dtype=np.float64)
            mean = rows.mean(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
            dev = np.abs(rows - mean[:, None]).sum(axis=1)
        else:
            n = mask.sum(axis=1).astype(np.float64)
            mean = rows.sum(axis=1) / np.maximum(n, 1)
            dev = np.where(mask, np.abs(rows - mean[:, None]), 0.0).sum(axis=1)
        b_lap = dev / np.maximum(n, 1)
        alpha = ACIQ_LAPLACE[bits] * b_lap
        clip = np.where(alpha > 0, np.minimum(alpha, absmax), absmax)
        return _to_f32_scale(clip / qmax, ft)
    # mse: grid search over clipping ratios, one pass over the weight per ratio
    best_err = np.full(rows.shape[0], np.inf)
    best = _to_f32_scale(absmax / qmax, ft)
    buf = np.empty_like(rows)
    for r in MSE_RATIOS[::-1]:            # ratio 1.0 first: ties keep the larger (unclipped) scale
        s32 = _to_f32_scale(r * absmax / qmax, ft)
        s = s32.astype(np.float64)[:, None]
        np.divide(rows, s, out=buf)       # in place: one buffer, a few passes per ratio
        np.rint(buf, out=buf)
        np.clip(buf, qmin, qmax, out=buf)
        np.multiply(buf, s, out=buf)
        np.subtract(buf, rows, out=buf)
        err = np.einsum("ij,ij->i", buf, buf)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, s32, best)
    return best.astype(np.float32)


# ----------------------------------------------------------------------------------- rounding
def _llc_round(rows: np.ndarray, grows: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Greedy loss-aware rounding (see module docstring). Returns float64 integer-valued rows."""
    x = rows / s[:, None]
    r = np.rint(x)
    x = np.where(np.abs(x - r) <= 1e-6, r, x)            # a weight already on the grid (up to float error) stays
    lo = np.clip(np.floor(x), qmin, qmax)
    hi = np.clip(np.ceil(x), qmin, qmax)
    q = np.clip(np.rint(x), qmin, qmax)
    sc = s[:, None]
    d0 = q * sc - rows                                   # δ of nearest rounding
    S = (grows * d0).sum(axis=1)                         # first-order loss change per group
    S = np.where(S > 1e-12 * np.abs(grows * sc).sum(axis=1), S, 0.0)   # float-rounding-level S counts as 0
    if not np.any(S > 0):
        return q
    other = np.where(q == lo, hi, lo)                    # the other neighbour (== q if not flippable)
    d1 = other * sc - rows
    gain = -grows * (other - q) * sc                     # decrease of S if flipped (>0 for candidates)
    cand = (gain > 0) & (S[:, None] > 0)
    extra = np.maximum(np.square(d1) - np.square(d0), 0.0)   # added squared error, ≥ 0
    with np.errstate(divide="ignore", invalid="ignore"):
        key = np.where(cand, extra / np.where(cand, gain, 1.0), np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    g_sorted = np.take_along_axis(np.where(cand, gain, 0.0), order, axis=1)
    c_sorted = np.take_along_axis(cand, order, axis=1)
    before = np.cumsum(g_sorted, axis=1) - g_sorted      # S reduction achieved before this element
    take_sorted = c_sorted & ((S[:, None] - before) > 0)
    take = np.empty_like(take_sorted)
    np.put_along_axis(take, order, take_sorted, axis=1)
    return np.where(take, other, q)


def _round(rows, grows, s, spec) -> np.ndarray:
    qmin, qmax = qrange(int(spec.bits))
    if spec.rounding == "nearest":
        return _round_nearest(rows, s, qmin, qmax)
    x = rows / s[:, None]
    if spec.rounding == "up":
        return np.clip(np.ceil(x), qmin, qmax)
    if spec.rounding == "down":
        return np.clip(np.floor(x), qmin, qmax)
    return _llc_round(rows, grows, s, qmin, qmax)


# --------------------------------------------------------------------------------------- API
def _checked_weight(w, out_axis: int, reduce_axis: int, who: str, min_ndim: int) -> tuple[np.ndarray, int, int]:
    """(w as an array, out_axis, reduce_axis in [0, ndim)) after checking that ``w`` is a finite float array with
    at least ``min_ndim`` dimensions; errors start with ``who``."""
    w = np.asarray(w)
    if w.ndim < min_ndim or not np.issubdtype(w.dtype, np.floating):
        raise LLCError(f"{who}: expected a floating-point weight with at least {min_ndim} dimension"
                       f"{'s' if min_ndim > 1 else ''}, got dtype {w.dtype} shape {w.shape}")
    out_axis = norm_axis(out_axis, w.ndim, "out_axis", who)
    reduce_axis = norm_axis(reduce_axis, w.ndim, "reduce_axis", who)
    if not np.all(np.isfinite(w)):
        raise LLCError(f"{who}: weight of shape {w.shape} contains NaN or Inf; fix the model's initializer before "
                       "compressing")
    return w, out_axis, reduce_axis


def quantize_weight(w: np.ndarray, spec: WeightQuantSpec, out_axis: int, reduce_axis: int,
                    grad: np.ndarray | None = None) -> QuantizedWeight:
    """Quantize ``w`` symmetrically per ``spec``; ``grad`` (same shape) is required for ``"llc"``.
    A blocked weight of rank ≥ 3 (Conv, ``out_axis=0, reduce_axis=1``) is blocked over its flattened
    reduction and returned in the matrix layout (module docstring)."""
    _check_spec(spec)
    w, out_axis, reduce_axis = _checked_weight(w, out_axis, reduce_axis, "weight quant", min_ndim=1)
    w64 = np.asarray(w, dtype=np.float64)  # no copy of a float64 weight (a large one is not held twice)
    if spec.rounding == "llc":
        if grad is None:
            raise LLCError("weight quant: rounding='llc' needs the loss gradient of the weight (grad=...); "
                           "collect gradients first or use rounding='nearest'")
        grad = np.asarray(grad, dtype=np.float64)
        if grad.shape != w.shape:
            raise LLCError(f"weight quant: grad shape {grad.shape} does not match weight shape {w.shape}")
        if not np.all(np.isfinite(grad)):
            raise LLCError("weight quant: grad contains NaN or Inf; check the calibration loss")
    bs = None if spec.block_size is None else int(spec.block_size)
    shape = w64.shape
    matrix = bs is not None and w64.ndim >= 3
    if matrix:  # Conv: blocks over the flattened reduction C/g·k1·… (module docstring)
        if out_axis != 0 or reduce_axis != 1:
            raise LLCError(f"weight quant: a blocked rank-{w64.ndim} weight is a Conv weight [O, C/g, k…] with "
                           f"out_axis=0, reduce_axis=1 (got {out_axis}, {reduce_axis}); pass those axes")
        w64 = w64.reshape(conv_matrix_shape(shape))
        grad = grad.reshape(w64.shape) if grad is not None and spec.rounding == "llc" else grad
        out_axis, reduce_axis = 0, 1
    lay = _Groups(w64.shape, bs, out_axis, reduce_axis)
    rows = lay.to_rows(w64)
    grows = lay.to_rows(grad) if spec.rounding == "llc" else None
    mask = lay.mask()
    # every scale and rounding decision is one row's (a channel or block): done in chunks of rows, whose float64
    # temporaries stay small (LLC rounding holds ~15 row-sized arrays: 3.5 GB at once for a 28 M-weight lm_head)
    s32 = np.empty(rows.shape[0], dtype=np.float32)
    q_rows = np.empty(rows.shape, dtype=np.int32)
    dq_rows = np.empty(rows.shape, dtype=np.float32)
    step = max(1, ROW_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for a in range(0, rows.shape[0], step):
        c = slice(a, a + step)
        s32[c] = _scales(rows[c], None if mask is None else mask[c], spec)
        qc = _round(rows[c], None if grows is None else grows[c], s32[c].astype(np.float64), spec)
        q_rows[c] = qc
        dq_rows[c] = q_rows[c].astype(np.float32) * s32[c, None]  # from the integers: a code 0 gives +0, never −0
    del rows, grows
    q = np.ascontiguousarray(lay.from_rows(q_rows))
    dequant = np.ascontiguousarray(lay.from_rows(dq_rows).reshape(shape)).astype(np.float32, copy=False)
    scale = np.ascontiguousarray(lay.scale_from_rows(s32)).astype(np.float32, copy=False)
    nbytes = -(-int(spec.bits) * int(w.size) // 8) + scale_bytes(spec.float_type) * int(scale.size)
    return QuantizedWeight(q=q, scale=scale, axis=lay.axis, block_size=bs, bits=int(spec.bits),
                           dequant=dequant, nbytes=nbytes)


def dequantize(q: np.ndarray, scale: np.ndarray, block_size: int | None, out_axis: int, reduce_axis: int,
               shape: tuple[int, ...]) -> np.ndarray:
    """The float32 weight of ``shape`` that codes ``q`` and scales ``scale`` (a :class:`QuantizedWeight`'s layout)
    stand for: ``float32(q) · scale`` per group, the same float32 products :func:`quantize_weight` and GPTQ
    (``quant.gptq``) form, so the result equals their ``dequant`` bit for bit."""
    shape = tuple(int(d) for d in shape)
    if block_size is not None and len(shape) >= 3:  # Conv: the matrix layout [O, R] (module docstring)
        out_axis, reduce_axis = 0, 1
    lay = _Groups(q.shape, block_size, out_axis, reduce_axis)
    s = np.asarray(scale, dtype=np.float32)
    s_rows = s.reshape(-1) if block_size is None else np.moveaxis(s, lay.axis, -1).reshape(-1)
    dq_rows = lay.to_rows(np.asarray(q)).astype(np.float32) * s_rows[:, None]
    return np.ascontiguousarray(lay.from_rows(dq_rows).reshape(shape)).astype(np.float32, copy=False)


def weight_nbytes(shape, spec: WeightQuantSpec, reduce_axis: int, out_axis: int | None = None) -> int:
    """Bytes ``quantize_weight`` would report for a weight of ``shape`` (no quantization done).

    ``out_axis`` only matters per-channel; when omitted it is the other axis of a 2-D weight and 0
    otherwise (Conv), which matches every CompressibleNode layout.
    """
    _check_spec(spec)
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    reduce_axis = norm_axis(reduce_axis, ndim, "reduce_axis", "weight quant")
    numel = math.prod(shape)
    if spec.block_size is None:
        oa = (_infer_out_axis(ndim, reduce_axis) if out_axis is None
              else norm_axis(out_axis, ndim, "out_axis", "weight quant"))
        n_scales = shape[oa]
    elif ndim >= 3:  # Conv: blocks over the flattened reduction (module docstring)
        o, r = conv_matrix_shape(shape)
        n_scales = o * -(-r // int(spec.block_size)) if r else 0
    else:
        n_scales = numel // shape[reduce_axis] * -(-shape[reduce_axis] // int(spec.block_size)) \
            if shape[reduce_axis] else 0
    return -(-int(spec.bits) * numel // 8) + scale_bytes(spec.float_type) * n_scales
