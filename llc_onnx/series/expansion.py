"""Series expansion of one weight into low-bit basis terms (FP = xINT).

The method
----------
A float weight W is expanded greedily into T terms of b-bit integers::

    R₀ = W,   Q_t = Q_b(R_t) with scale s_t,   R_{t+1} = R_t − s_t·Q_t,   W ≈ Σ_{t<T} s_t·Q_t

where ``Q_b`` is :func:`llc_onnx.quant.quantize_weight` (symmetric, zero point 0, MSE-optimal clipping per
block or channel by default), so the first term is exactly what the single-level quantizer gives for the same
arguments and T = 1 *is* the existing quantizer, bit for bit. With nearest rounding every element of the
residual is non-increasing (``|r − s·round(r/s)| ≤ min(|r|, s/2)`` at the min-max scale, and the MSE scale is
never worse than min-max), so ‖R_t‖ decreases with t.

Layout (the *matrix view*)
--------------------------
Terms are computed on the node's weight as a matrix: a 2-D weight as it is (MatMul [K, N], Gemm [K, N] or
[N, K]); a weight of rank > 2 (Conv [O, C/g, kH, kW], ``out_axis=0, reduce_axis=1``) as
``W.reshape(O, C/g·kH·kW)`` with ``reduce_axis=1``: blocked scales run over C/g·kH·kW (the im2col reduction
axis, the layout of GEMM kernels and of ``MatMulNBits``). Per-channel terms are the same either way. Only the
public contract of ``quantize_weight`` on 2-D weights and ``QuantizedWeight.dequant`` are relied on.

Algebra (the paper's abelian structure on expansions)
------------------------------------------------------
The *value* of an expansion is Σ_t s_t·Q_t. :func:`abelian_add` concatenates the terms of two expansions of
the same weight layout (value a + b), :func:`abelian_mul` scales every s_t by c (value c·a),
:func:`identity` is the empty expansion (value 0) and :func:`inverse` is ``abelian_mul(-1, a)``. Addition is
associative with identity exactly (as term sequences); commutativity, inverses and distributivity hold for the
values (term order only changes float summation order). Negative scales are allowed in the algebra (the ONNX
forms compute (q)·s for any s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llc_onnx.axes import norm_axis
from llc_onnx.errors import LLCError
from llc_onnx.quant import QuantizedWeight, WeightQuantSpec, quantize_weight

__all__ = ["SeriesWeight", "expand_weight", "expand_options", "abelian_add", "abelian_mul", "identity", "inverse",
           "default_block_size", "SERIES_BITS"]

#: bit-widths the ONNX forms can store (INT2/INT4/INT8 DequantizeLinear, MatMulNBits 2/4/8)
SERIES_BITS = (2, 4, 8)


def default_block_size(bits: int) -> int | None:
    """Block size used when none is given: 32 along the reduction axis for 2/4 bits, per channel (None) for 8."""
    return None if int(bits) >= 8 else 32


@dataclass(frozen=True, eq=False)
class SeriesWeight:
    """W ≈ Σ_{t<T} s_t·Q_t: the terms of one weight, each a :class:`QuantizedWeight` of the matrix view.

    ``shape`` is the weight's own (ONNX) shape; ``view_shape`` the 2-D matrix view the terms live in, with
    ``view_out_axis`` / ``view_reduce_axis``. ``target`` is the float weight expanded (None after algebra on
    expansions without one); ``residual_norms[t] = ‖target − Σ_{s≤t} s_s·Q_s‖₂`` (float64), empty without target.
    """

    terms: tuple[QuantizedWeight, ...]
    shape: tuple[int, ...]
    out_axis: int
    reduce_axis: int
    bits: int
    block_size: int | None
    target: np.ndarray | None = field(default=None, repr=False)
    residual_norms: tuple[float, ...] = ()

    # ------------------------------------------------------------------------------- layout
    @property
    def order(self) -> int:
        """Number of terms T."""
        return len(self.terms)

    @property
    def view_shape(self) -> tuple[int, int]:
        return _view_shape(self.shape)

    @property
    def view_out_axis(self) -> int:
        return self.out_axis if len(self.shape) == 2 else 0

    @property
    def view_reduce_axis(self) -> int:
        return 1 - self.view_out_axis

    @property
    def k(self) -> int:
        """Reduction length K of the matrix view (C/g·kH·kW for Conv)."""
        return self.view_shape[self.view_reduce_axis]

    @property
    def n(self) -> int:
        """Output channels N."""
        return self.view_shape[self.view_out_axis]

    @property
    def weight_norm(self) -> float:
        return float(np.linalg.norm(np.asarray(self.target, dtype=np.float64))) if self.target is not None else 0.0

    # ------------------------------------------------------------------------------- values
    def dequant(self, order: int | None = None) -> np.ndarray:
        """Σ_{t<order} s_t·Q_t in the weight's shape (summed in float64, returned as float32); all terms by default."""
        order = self._order(order)
        acc = np.zeros(self.view_shape, dtype=np.float64)
        for term in self.terms[:order]:
            acc += term.dequant
        return acc.astype(np.float32).reshape(self.shape)

    def truncate(self, order: int) -> SeriesWeight:
        """The first ``order`` terms (a valid, smaller expansion of the same weight)."""
        order = self._order(order)
        return SeriesWeight(self.terms[:order], self.shape, self.out_axis, self.reduce_axis, self.bits,
                            self.block_size, self.target, self.residual_norms[:order])

    def term(self, t: int) -> SeriesWeight:
        """The basis expansion holding only term ``t`` (no target: it expands nothing by itself)."""
        if not 0 <= t < self.order:
            raise LLCError(f"series weight: term {t} does not exist (T={self.order})")
        return SeriesWeight((self.terms[t],), self.shape, self.out_axis, self.reduce_axis, self.bits,
                            self.block_size)

    def _order(self, order: int | None) -> int:
        if order is None:
            return self.order
        if not isinstance(order, (int, np.integer)) or not 0 <= int(order) <= self.order:
            raise LLCError(f"series weight: order={order!r} must be an integer in 0..{self.order}")
        return int(order)

    # ------------------------------------------------------------------------------- bytes
    def nbytes(self, order: int | None = None) -> int:
        """Bytes of the stored terms (standard ONNX form): packed codes of every term, padded per term to a whole
        number of blocks, plus 4 bytes per scale. See :mod:`llc_onnx.series.packing`."""
        from llc_onnx.series.packing import stacked_nbytes

        return stacked_nbytes(self, self._order(order))

    # ------------------------------------------------------------------------------- operators
    def __add__(self, other: SeriesWeight) -> SeriesWeight:
        return abelian_add(self, other)

    def __mul__(self, c: float) -> SeriesWeight:
        return abelian_mul(c, self)

    __rmul__ = __mul__

    def __neg__(self) -> SeriesWeight:
        return inverse(self)

    def same_terms(self, other: SeriesWeight) -> bool:
        """Structural equality: same layout and the same terms (codes and scales) in the same order."""
        if (self.shape, self.out_axis, self.reduce_axis, self.bits, self.block_size, self.order) != \
                (other.shape, other.out_axis, other.reduce_axis, other.bits, other.block_size, other.order):
            return False
        return all(np.array_equal(a.q, b.q) and np.array_equal(a.scale, b.scale)
                   for a, b in zip(self.terms, other.terms))


def _view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return (int(shape[0]), int(shape[1]))
    return (int(shape[0]), int(np.prod(shape[1:], dtype=np.int64)))


def _residual_norms(target: np.ndarray | None, terms: Sequence[QuantizedWeight], view_shape) -> tuple[float, ...]:
    if target is None:
        return ()
    r = np.asarray(target, dtype=np.float64).reshape(view_shape).copy()
    out = []
    for term in terms:
        r -= term.dequant
        out.append(float(np.linalg.norm(r)))
    return tuple(out)


def _check_axes(shape: tuple[int, ...], out_axis: int, reduce_axis: int) -> tuple[int, int]:
    nd = len(shape)
    if nd < 2:
        raise LLCError(f"series expansion: weight of shape {shape} has rank {nd}; MatMul/Gemm/Conv weights have rank ≥ 2")
    out_axis = norm_axis(out_axis, nd, "out_axis", "series expansion")
    reduce_axis = norm_axis(reduce_axis, nd, "reduce_axis", "series expansion")
    if nd == 2 and out_axis == reduce_axis:
        raise LLCError(f"series expansion: out_axis and reduce_axis are both {out_axis}; give the two axes of the matrix")
    if nd > 2 and (out_axis, reduce_axis) != (0, 1):
        raise LLCError(f"series expansion: a rank-{nd} weight must be a Conv weight [O, C/g, k...] "
                       f"(out_axis=0, reduce_axis=1), got out_axis={out_axis}, reduce_axis={reduce_axis}")
    return out_axis, reduce_axis


def expand_weight(w: np.ndarray, *, bits: int, terms: int, out_axis: int, reduce_axis: int,
                  block_size: int | None | str = "default", scale_method: str = "mse",
                  rounding: str = "nearest", grad: np.ndarray | None = None, keep_target: bool = True) -> SeriesWeight:
    """Expand ``w`` into ``terms`` b-bit basis terms (module doc). ``block_size="default"``: 32 for 2/4 bits,
    per channel for 8. ``rounding``/``grad`` are passed to every term (``"llc"`` uses the weight's loss gradient,
    the same for every term to first order). ``keep_target=False`` does not keep a copy of ``w`` (the residual
    norms are still reported; sums of such expansions report none)."""
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        raise LLCError(f"series expansion: weight dtype {w.dtype} is not floating point; only float weights expand")
    shape = tuple(int(d) for d in w.shape)
    out_axis, reduce_axis = _check_axes(shape, out_axis, reduce_axis)
    if int(bits) not in SERIES_BITS:
        raise LLCError(f"series expansion: bits={bits!r}; use one of {', '.join(map(str, SERIES_BITS))}")
    if not isinstance(terms, (int, np.integer)) or int(terms) < 1:
        raise LLCError(f"series expansion: terms={terms!r} must be an integer ≥ 1")
    bs = default_block_size(bits) if block_size == "default" else block_size
    spec = WeightQuantSpec(bits=int(bits), block_size=bs, scale_method=scale_method, rounding=rounding)
    vshape = _view_shape(shape)
    v_out, v_red = (out_axis, reduce_axis) if len(shape) == 2 else (0, 1)
    view = w.reshape(vshape)
    g = None if grad is None else np.asarray(grad).reshape(vshape)
    out: list[QuantizedWeight] = []
    resid = view.astype(np.float64)
    norms = []
    for t in range(int(terms)):
        # term 0 sees the weight exactly as given (bit-identical to quantize_weight(w, ...))
        qw = quantize_weight(view if t == 0 else resid, spec, v_out, v_red, grad=g)
        out.append(qw)
        resid = resid - qw.dequant
        norms.append(float(np.linalg.norm(resid)))
    return SeriesWeight(tuple(out), shape, out_axis, reduce_axis, int(bits), bs, w.copy() if keep_target else None,
                        tuple(norms))


def expand_options(w: np.ndarray, *, out_axis: int, reduce_axis: int, bits: Sequence[int] = (2, 4, 8),
                   terms: Sequence[int] = (1, 2, 3, 4), **kwargs) -> dict[tuple[int, int], SeriesWeight]:
    """Layer granularity: every (bits, T) option of one weight, ``{(b, T): SeriesWeight}``. One expansion per
    bit-width at max(terms), truncated for the smaller T (the greedy expansion's first T terms *are* the T-term
    expansion, so this equals calling :func:`expand_weight` per option). ``kwargs`` go to :func:`expand_weight`."""
    ts = sorted({int(t) for t in terms})
    out: dict[tuple[int, int], SeriesWeight] = {}
    for b in dict.fromkeys(int(b) for b in bits):
        full = expand_weight(w, bits=b, terms=ts[-1], out_axis=out_axis, reduce_axis=reduce_axis, **kwargs)
        for t in ts:
            out[(b, t)] = full.truncate(t)
    return out


# ------------------------------------------------------------------------------------------ algebra
def _check_same_layout(a: SeriesWeight, b: SeriesWeight) -> None:
    la = (a.shape, a.out_axis, a.reduce_axis, a.bits, a.block_size)
    lb = (b.shape, b.out_axis, b.reduce_axis, b.bits, b.block_size)
    if la != lb:
        raise LLCError(f"series add: expansions of different layouts (shape, out, reduce, bits, block) {la} and {lb}; "
                       "only expansions of the same weight layout add")


def abelian_add(a: SeriesWeight, b: SeriesWeight) -> SeriesWeight:
    """AbelianAdd: the expansion with a's terms followed by b's (value a + b; target a.target + b.target)."""
    _check_same_layout(a, b)
    target = None
    if a.target is not None and b.target is not None:
        target = np.asarray(a.target, dtype=np.float64) + np.asarray(b.target, dtype=np.float64)
    elif a.order == 0 and b.target is not None:
        target = b.target
    elif b.order == 0 and a.target is not None:
        target = a.target
    terms = a.terms + b.terms
    return SeriesWeight(terms, a.shape, a.out_axis, a.reduce_axis, a.bits, a.block_size, target,
                        _residual_norms(target, terms, a.view_shape))


def _scaled(term: QuantizedWeight, c: np.float32) -> QuantizedWeight:
    scale = (term.scale * c).astype(np.float32)
    if term.block_size is None:  # per channel: scale along axis
        shp = [1] * term.q.ndim
        shp[term.axis] = -1
        full = scale.reshape(shp)
    else:
        full = np.repeat(scale, term.block_size, axis=term.axis)
        full = np.take(full, np.arange(term.q.shape[term.axis]), axis=term.axis)
    dequant = (term.q.astype(np.float32) * full).astype(np.float32)
    return QuantizedWeight(q=term.q, scale=scale, axis=term.axis, block_size=term.block_size, bits=term.bits,
                           dequant=dequant, nbytes=term.nbytes)


def abelian_mul(c: float, a: SeriesWeight) -> SeriesWeight:
    """AbelianMul: every scale times c (rounded to float32), codes unchanged (value c·a)."""
    c32 = np.float32(c)
    if not np.isfinite(c32):
        raise LLCError(f"series scale: factor {c!r} is not finite in float32")
    terms = tuple(_scaled(t, c32) for t in a.terms)
    target = None if a.target is None else np.asarray(a.target, dtype=np.float64) * float(c32)
    return SeriesWeight(terms, a.shape, a.out_axis, a.reduce_axis, a.bits, a.block_size, target,
                        _residual_norms(target, terms, a.view_shape))


def identity(like: SeriesWeight) -> SeriesWeight:
    """The empty expansion of ``like``'s layout (value 0): the identity of :func:`abelian_add`."""
    return SeriesWeight((), like.shape, like.out_axis, like.reduce_axis, like.bits, like.block_size)


def inverse(a: SeriesWeight) -> SeriesWeight:
    """The additive inverse: ``abelian_mul(-1, a)`` (a + inverse(a) has value 0)."""
    return abelian_mul(-1.0, a)
