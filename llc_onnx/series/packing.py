"""The stored layout of a series expansion: T terms stacked along the reduction axis.

In the matrix view M[N, K] (N outputs, K reduction; see :mod:`llc_onnx.series.expansion`) term t is
``Q_t[N, K]`` with scales over blocks of ``block`` consecutive elements along K. Stacking the terms along K
gives one weight of reduction length ``K' = T·K_pad`` that a single matmul on the input tiled T times computes::

    Y = [X, X, …, X] · [s_0·Q_0; s_1·Q_1; …]ᵀ = Σ_t X·(s_t·Q_t)ᵀ

* ``block`` (the *stacked* block size): the term's block size when K > block size, else K (a single block per
  row: the same scales as a partial block, with no padding); K for per-channel terms (8 bit).
* ``K_pad = nb·block`` with ``nb = ceil(K / block)``: each term is padded with zero codes to whole blocks so that
  no block straddles two terms (no padding when block divides K).
* Bytes: ``ceil(bits·N·T·K_pad / 8)`` for the codes plus 4 per scale (``N·T·nb`` scales), what the standard
  ONNX form stores.

MatMulNBits layout (``com.microsoft::MatMulNBits``, the ORT CPU format, and the GPU series kernels): ``B`` uint8
``[N, T·nb, blob]`` with ``blob = ceil(block·bits/8)``, codes along K, low bits first within a byte, unsigned
``u = q + 2^(bits−1)`` (no zero_points input: ORT's default zero point is 2^(bits−1)); ``scales`` float
``[N·T·nb]`` (n-major). With ``K = T·K_pad`` and the tiled input ORT's MatMulNBits computes the series
exactly (checked in tests/test_series_packing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llc_onnx.errors import LLCError

__all__ = ["StackedTerms", "stack_terms", "stacked_nbytes", "stacked_block", "pack_nbits", "unpack_nbits"]


@dataclass(frozen=True)
class StackedTerms:
    """Codes and scales of T terms in the matrix view, stacked along K (module doc)."""

    codes: np.ndarray   # int8 [N, T, K_pad] signed codes, 0 in the padding
    scales: np.ndarray  # float32 [N, T, nb]
    bits: int
    block: int          # stacked block size (elements of K per scale)
    k: int              # reduction length of one term (unpadded)

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def terms(self) -> int:
        return int(self.codes.shape[1])

    @property
    def k_pad(self) -> int:
        return int(self.codes.shape[2])

    @property
    def nb(self) -> int:
        return int(self.scales.shape[2])

    @property
    def nbytes(self) -> int:
        return -(-self.bits * self.codes.size // 8) + 4 * self.scales.size

    def dequant(self) -> np.ndarray:
        """float32 [N, T, K]: s_t·Q_t of every term in the matrix view (padding dropped)."""
        full = np.repeat(self.scales, self.block, axis=2)
        return (self.codes.astype(np.float32) * full)[:, :, : self.k]


def stacked_block(k: int, block_size: int | None) -> int:
    """Stacked block size for reduction length ``k`` (module doc)."""
    if block_size is None or k <= int(block_size):
        return max(int(k), 1)
    return int(block_size)


def stacked_nbytes(sw, order: int | None = None) -> int:
    """Bytes the standard ONNX form stores for the first ``order`` terms of ``sw`` (module doc)."""
    t = sw.order if order is None else int(order)
    k, n = sw.k, sw.n
    block = stacked_block(k, sw.block_size)
    nb = -(-k // block)
    return -(-sw.bits * n * t * nb * block // 8) + 4 * n * t * nb


def _matrix(a: np.ndarray, out_axis: int) -> np.ndarray:
    """A 2-D array of the view as [N, K] (outputs first)."""
    return a if out_axis == 0 else a.T


def stack_terms(sw, order: int | None = None) -> StackedTerms:
    """The first ``order`` terms of a :class:`~llc_onnx.series.SeriesWeight` as :class:`StackedTerms`.

    Reads each term's ``q`` and ``scale`` per the QuantizedWeight contract of a 2-D weight: per channel ``scale[N]``
    along the out axis; blocked ``scale`` = the view's shape with K -> ceil(K / block_size) along the reduce axis.
    """
    order = sw.order if order is None else int(order)
    if order < 1:
        raise LLCError("series stack: an expansion with no terms has nothing to store; keep at least one term")
    k, n, oa = sw.k, sw.n, sw.view_out_axis
    block = stacked_block(k, sw.block_size)
    nb = -(-k // block)
    codes = np.zeros((n, order, nb * block), dtype=np.int8)
    scales = np.empty((n, order, nb), dtype=np.float32)
    for t, term in enumerate(sw.terms[:order]):
        q = _matrix(np.asarray(term.q), oa)
        if q.shape != (n, k):
            raise LLCError(f"series stack: term {t} codes have shape {q.shape}, expected [N, K] = [{n}, {k}]")
        codes[:, t, :k] = q
        s = np.asarray(term.scale, dtype=np.float32)
        if term.block_size is None:
            if s.shape != (n,):
                raise LLCError(f"series stack: term {t} per-channel scale has shape {s.shape}, expected ({n},)")
            scales[:, t, 0] = s
        else:
            s = _matrix(s, oa)
            if s.shape != (n, nb):
                raise LLCError(f"series stack: term {t} blocked scale has shape {s.shape}, expected [{n}, {nb}]")
            scales[:, t, :] = s
    return StackedTerms(codes=codes, scales=scales, bits=int(sw.bits), block=block, k=k)


# ------------------------------------------------------------------------------ MatMulNBits bytes
def pack_nbits(st: StackedTerms) -> tuple[np.ndarray, np.ndarray]:
    """(B uint8 [N, T·nb, blob], scales float32 [N·T·nb]) in the MatMulNBits layout (module doc)."""
    bits = st.bits
    per = 8 // bits
    u = (st.codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)      # [N, T, K_pad]
    u = u.reshape(st.n, st.terms * st.nb, st.block)
    blob = -(-st.block * bits // 8)
    if blob * per != st.block:
        u = np.concatenate([u, np.zeros(u.shape[:2] + (blob * per - st.block,), np.uint8)], axis=2)
    u = u.reshape(st.n, st.terms * st.nb, blob, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    b = np.bitwise_or.reduce(np.left_shift(u, shifts), axis=3).astype(np.uint8)
    return np.ascontiguousarray(b), np.ascontiguousarray(st.scales.reshape(-1))


def unpack_nbits(b: np.ndarray, scales: np.ndarray, *, k: int, n: int, bits: int, block: int,
                 terms: int) -> StackedTerms:
    """Inverse of :func:`pack_nbits`."""
    if bits not in (2, 4, 8):
        raise LLCError(f"series unpack: bits={bits}; MatMulNBits-layout terms have 2, 4 or 8 bits")
    per = 8 // bits
    nb = -(-k // block)
    blob = -(-block * bits // 8)
    b = np.asarray(b, dtype=np.uint8)
    if b.shape != (n, terms * nb, blob):
        raise LLCError(f"series unpack: B has shape {b.shape}, expected {(n, terms * nb, blob)}")
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    u = (b[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    u = u.reshape(n, terms * nb, blob * per)[:, :, :block]
    codes = (u.astype(np.int16) - (1 << (bits - 1))).astype(np.int8).reshape(n, terms, nb * block)
    s = np.asarray(scales, dtype=np.float32).reshape(n, terms, nb)
    return StackedTerms(codes=codes, scales=s.copy(), bits=bits, block=block, k=k)
