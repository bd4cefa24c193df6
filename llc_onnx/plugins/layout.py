"""ONNX Runtime ``com.microsoft::MatMulNBits`` weight bytes: the one packed layout every kernel here reads.

``Y = A · W (+ bias)`` with ``A`` of shape ``[..., K]`` and ``W`` of shape ``[K, N]`` stored as

* ``B``: uint8 ``[N, n_blk, blob]`` with ``n_blk = ceil(K / bs)`` and ``blob = bs·bits/8``: row ``n`` holds the
  codes of column ``n`` of ``W`` along K, ``8/bits`` codes per byte, the lower bits first; the last block
  is padded (padding codes never meet a non-zero input);
* ``scales``: float ``[N · n_blk]`` (row-major ``[N, n_blk]``);
* unsigned codes ``u`` and ``W[k, n] = (u[n, k] − zp) · scales[n, k // bs]`` with ``zp = 2^(bits−1)`` when
  there is no ``zero_points`` input. llc-onnx's symmetric signed code ``q ∈ [−2^(b−1), 2^(b−1)−1]`` is
  stored as ``u = q + 2^(bits−1)`` with no zero points, so ORT and the GPU kernels read the same bytes.
* optional ``zero_points``: uint8 ``[N · ceil(n_blk·bits/8)]`` (packed like ``B``, per row) or float like
  ``scales``.

Series (``W ≈ Σ_t W_t``, T low-bit terms of one weight): the terms are stacked along K,
``K' = T·K`` (``K`` a multiple of ``bs``, so no block straddles two terms); ORT multiplies the input tiled T
times along its last axis, a series kernel reads the same bytes and the untiled input.

Since ``blob`` is a multiple of 4 bytes for every legal (bits, bs), ``B`` can be viewed as little-endian
int32 words ``[N, n_blk·blob/4]`` without copying: word ``w`` of a row holds codes ``32/bits·w …``, low bits
first. The Triton kernels and the TensorRT plugins take that int32 view.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import LLCError

BITS = (2, 4, 8)


def n_blocks(K: int, block_size: int) -> int:
    """Blocks per row: ``ceil(K / block_size)``."""
    return -(-int(K) // int(block_size))


def check_format(K: int, N: int, bits: int, block_size: int, where: str = "MatMulNBits") -> None:
    """LLCError unless (K, N, bits, block_size) is a layout ORT's MatMulNBits accepts (bits 2/4/8, block a
    power of two ≥ 16)."""
    if bits not in BITS:
        raise LLCError(f"{where}: bits={bits} is not supported; use 2, 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise LLCError(f"{where}: block_size={block_size} must be a power of two ≥ 16")
    if K < 1 or N < 1:
        raise LLCError(f"{where}: K={K}, N={N} must be positive")


def pack(q: np.ndarray, scale: np.ndarray, *, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits ``(B, scales)`` of the signed codes ``q`` ``[K, N]`` (``W = q · scale``).

    ``scale``: ``[ceil(K/bs), N]`` (blocked along K, the layout of :class:`~llc_onnx.quant.QuantizedWeight`
    for a MatMul weight) or ``[N]`` (per output channel, repeated in every block)."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise LLCError(f"codes: shape {q.shape} must be [K, N]")
    K, N = q.shape
    check_format(K, N, bits, block_size, "codes")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.size and (q.min() < lo or q.max() > hi):
        raise LLCError(f"codes: values in [{q.min()}, {q.max()}] do not fit {bits} signed bits [{lo}, {hi}]")
    nblk = n_blocks(K, block_size)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.shape == (N,):
        scale = np.broadcast_to(scale[None, :], (nblk, N))
    if scale.shape != (nblk, N):
        raise LLCError(f"scales: shape {scale.shape} must be [{nblk}, {N}] (blocked) or [{N}] (per channel)")
    per = 8 // bits
    u = np.full((N, nblk * block_size), 1 << (bits - 1), dtype=np.uint8)  # padding: code of zero
    u[:, :K] = (q.T.astype(np.int64) + (1 << (bits - 1))).astype(np.uint8)
    u = u.reshape(N, -1, per)
    b = np.zeros(u.shape[:2], dtype=np.uint8)
    for j in range(per):
        b |= (u[:, :, j] << (j * bits)).astype(np.uint8)
    blob = block_size * bits // 8
    return b.reshape(N, nblk, blob), np.ascontiguousarray(scale.T).reshape(-1)


def unpack_codes(b: np.ndarray, K: int, bits: int) -> np.ndarray:
    """Unsigned codes ``u`` ``[N, K]`` (uint8) of MatMulNBits bytes ``b`` ``[N, n_blk, blob]``."""
    b = np.asarray(b, dtype=np.uint8)
    N = b.shape[0]
    per = 8 // bits
    flat = b.reshape(N, -1)
    u = np.empty((N, flat.shape[1], per), dtype=np.uint8)
    for j in range(per):
        u[:, :, j] = (flat >> (j * bits)) & ((1 << bits) - 1)
    u = u.reshape(N, -1)
    if u.shape[1] < K:
        raise LLCError(f"B: {u.shape[1]} codes per row, fewer than K={K}")
    return u[:, :K]


def _zero_points(zero_points, N: int, nblk: int, bits: int) -> np.ndarray:
    """Zero points as float ``[N, nblk]``: ``2^(bits-1)`` when absent, unpacked when uint8, as given when float."""
    if zero_points is None:
        return np.full((N, nblk), float(1 << (bits - 1)))
    zp = np.asarray(zero_points)
    if zp.dtype == np.uint8:
        per = 8 // bits
        row = -(-nblk // per)
        flat = zp.reshape(N, row)
        out = np.empty((N, row * per))
        for j in range(per):
            out[:, j::per] = (flat >> (j * bits)) & ((1 << bits) - 1)
        return out[:, :nblk]
    return zp.astype(np.float64).reshape(N, nblk)


def dequantize(b: np.ndarray, scales: np.ndarray, *, K: int, N: int, bits: int, block_size: int,
               zero_points: np.ndarray | None = None) -> np.ndarray:
    """``W`` ``[K, N]`` (float32) that MatMulNBits multiplies by: ``(u − zp) · scale`` per block (numpy,
    float64 inside)."""
    check_format(K, N, bits, block_size)
    nblk = n_blocks(K, block_size)
    u = unpack_codes(b, K, bits).astype(np.float64)
    s = np.asarray(scales, dtype=np.float64).reshape(N, nblk)
    zp = _zero_points(zero_points, N, nblk, bits)
    blk = np.arange(K) // block_size
    w = (u - zp[:, blk]) * s[:, blk]
    return np.ascontiguousarray(w.T).astype(np.float32)


def stack_series(terms: Sequence[tuple[np.ndarray, np.ndarray]], *, bits: int, block_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits ``(B, scales)`` of a series ``W = Σ_t q_t · scale_t`` stacked along K (``K' = T·K``).
    Each term is ``(q [K, N], scale)`` as for :func:`pack`; ``K`` must be a multiple of ``block_size``."""
    if not terms:
        raise LLCError("series: no terms")
    K, N = np.asarray(terms[0][0]).shape
    if K % block_size:
        raise LLCError(f"series: K={K} is not a multiple of block_size={block_size}; a block would straddle "
                       "two terms, pick a block size that divides K")
    packed = [pack(q, s, bits=bits, block_size=block_size) for q, s in terms]
    if any(p[0].shape != packed[0][0].shape for p in packed):
        raise LLCError("series: terms have different shapes")
    nblk = n_blocks(K, block_size)
    b = np.concatenate([p[0] for p in packed], axis=1)                      # [N, T·nblk, blob]
    s = np.concatenate([p[1].reshape(N, nblk) for p in packed], axis=1)    # [N, T·nblk]
    return b, s.reshape(-1)


def per_channel_scales(scales: np.ndarray, N: int, nblk: int, terms: int = 1) -> np.ndarray | None:
    """Scales ``[N·terms]`` (same dtype) when every block of a (row, term) has the same scale (an 8-bit
    per-channel weight written as MatMulNBits repeats it per block), else None."""
    s = np.asarray(scales).reshape(N, terms, nblk)
    if np.array_equal(s, np.broadcast_to(s[:, :, :1], s.shape)):
        return np.ascontiguousarray(s[:, :, 0]).reshape(-1)
    return None
