"""Triton weight-only matmul kernels on MatMulNBits bytes: GEMV (split-K) and tiled GEMM, plain and series.

Both kernels compute ``y[m, n] = Σ_k x[m, k] · W[k, n]`` with ``W[k, n] = Σ_t (u_t[n, k] − 2^(bits−1)) ·
s_t[n, k // bs]`` (T = ``TERMS`` low-bit terms; T = 1 is the plain weight-only matmul). The weights arrive as
the int32 view of ORT's MatMulNBits bytes (:mod:`llc_onnx.plugins.layout`): row n of term t is the run of
words ``[t·row_words, (t+1)·row_words)`` of row n, ``row_words = ceil(K/bs)·bs·bits/32``; word w holds the
codes of ``k = PER·w + j`` (``PER = 32/bits``) at bits ``[j·bits, (j+1)·bits)``. Scales (fp32, fp16 or bf16:
ORT stores them in the activation dtype) are ``[N, T·ceil(K/bs)]`` (blocked) or ``[N, T]`` (``PER_CHANNEL``)
and are used in fp32. Activations fp16 / bf16 / fp32, fp32 accumulation, output in the activations' dtype.

* ``wo_gemv_kernel`` (small M; grid ``(cdiv(N, BLOCK_N), SPLIT_K, M)``): a program owns ``BLOCK_N`` output
  columns of one row ``m`` and every ``SPLIT_K``-th chunk of ``BLOCK_K`` inputs. It loads the words as a
  ``[BLOCK_N, BLOCK_K/PER]`` tile (contiguous along K), expands them in registers to
  ``[BLOCK_N, BLOCK_K/PER, PER]`` codes and reduces against the input chunk read as ``[BLOCK_K/PER, PER]``
  (also contiguous), so neither side is reordered. Scales multiply the per-word partial sums, not every
  code (T·BLOCK_N·BLOCK_K/PER products instead of T·BLOCK_N·BLOCK_K).
* ``wo_gemm_kernel`` (larger M; grid ``(cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N), SPLIT_K)``, grouped ordering for
  L2 reuse): a ``[BLOCK_K/PER, BLOCK_N]`` word tile is expanded to ``[BLOCK_K/PER, PER, BLOCK_N]`` and
  reshaped (order kept) to the ``[BLOCK_K, BLOCK_N]`` operand of ``tl.dot``. Small tiles (``BLOCK_M ≤ 32``)
  with ``BLOCK_K ≤ bs`` and one term put the integer codes into the dot (exact in fp16/bf16) and scale its
  fp32 result (one scale per column covers the step); per-channel scales are applied once at the end.
  Otherwise the codes are dequantized in fp32 registers, ``Σ_t (u_t − zp)·s_t`` block by block, rounded to
  the activation dtype (the precision of fp16/bf16 weights) and one dot is issued: T terms cost one MMA.
* Codes become floats without an int -> float conversion (a quarter-rate instruction): ``u | 0x4B000000``
  read as float32 is ``2^23 + u`` exactly, so one OR and one subtraction give ``u − zp``.
* With ``SPLIT_K > 1`` each split writes fp32 partials ``[SPLIT_K, M, N]`` and ``splitk_reduce_kernel`` sums
  them in a fixed order (deterministic; no atomics, no zero-filled buffer).

Kernel parameters follow TensorRT's AOT plugin convention ``(input pointers…, int32 scalars…, output
pointers…)``, so the same compiled PTX serves the torch ops and the TensorRT plugins. Offsets are int32:
tensors up to 2^31 elements.
"""

# no ``from __future__ import annotations``: Triton reads the ``tl.constexpr`` annotations as objects
import triton
import triton.language as tl


@triton.jit
def wo_gemv_kernel(x_ptr, w_ptr, s_ptr, M, N, K, y_ptr,
                   BITS: tl.constexpr, BS: tl.constexpr, TERMS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    BLOCK_KW: tl.constexpr = BLOCK_K // PER
    ZP: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    MAGIC: tl.constexpr = 0x4B000000     # float32 bits of 2^23: (u | MAGIC) as float32 is 2^23 + u
    MAGIC_F: tl.constexpr = 8388608.0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    nblk = (K + BS - 1) // BS
    row_words = nblk * (BS // PER)
    kw_total = (K + PER - 1) // PER
    j = tl.arange(0, PER)
    shifts = j * BITS

    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kw0 in range(pid_k * BLOCK_KW, kw_total, SPLIT_K * BLOCK_KW):
        kw = kw0 + tl.arange(0, BLOCK_KW)
        kw_ok = kw < row_words  # not kw_total: a bound that is a multiple of BS/PER keeps the loads vectorized
        k = kw[:, None] * PER + j[None, :]
        xv = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)
        wmask = n_ok[:, None] & kw_ok[None, :]
        for t in tl.static_range(TERMS):
            words = tl.load(w_ptr + n[:, None] * (TERMS * row_words) + t * row_words + kw[None, :],
                            mask=wmask, other=0)
            u = (words[:, :, None] >> shifts[None, None, :]) & MASK
            q = (u | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + ZP)  # u - zp, exact, no int->float cvt
            d = tl.sum(q * xv[None, :, :], axis=2)
            if PER_CHANNEL:
                s = tl.load(s_ptr + n * TERMS + t, mask=n_ok, other=0.0)
                acc += tl.sum(d, axis=1) * s
            else:
                blk = (kw * PER) // BS
                s = tl.load(s_ptr + n[:, None] * (TERMS * nblk) + t * nblk + blk[None, :], mask=wmask, other=0.0)
                acc += tl.sum(d * s, axis=1)

    if SPLIT_K == 1:
        tl.store(y_ptr + m * N + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(y_ptr + (pid_k * M + m) * N + n, acc, mask=n_ok)


@triton.jit
def wo_gemm_kernel(x_ptr, w_ptr, s_ptr, M, N, K, y_ptr,
                   BITS: tl.constexpr, BS: tl.constexpr, TERMS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    BLOCK_KW: tl.constexpr = BLOCK_K // PER
    ZP: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    MAGIC: tl.constexpr = 0x4B000000
    MAGIC_F: tl.constexpr = 8388608.0
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    nblk = (K + BS - 1) // BS
    row_words = nblk * (BS // PER)
    shifts = tl.arange(0, PER) * BITS
    dt = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :], other=0.0)
        kw = k0 // PER + tl.arange(0, BLOCK_KW)
        wmask = (kw < row_words)[:, None] & n_ok[None, :]
        if TERMS == 1:
            words = tl.load(w_ptr + rn[None, :] * row_words + kw[:, None], mask=wmask, other=0)
            u = (words[:, None, :] >> shifts[None, :, None]) & MASK
            q = (u | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + ZP)
            if PER_CHANNEL:
                acc = tl.dot(a, tl.reshape(q, [BLOCK_K, BLOCK_N]).to(dt), acc)
            elif BLOCK_K <= BS:
                s = tl.load(s_ptr + rn * nblk + k0 // BS, mask=n_ok, other=0.0)
                if BLOCK_M <= 32:
                    # small tile: exact integer codes into the dot, one scale per column after it
                    acc += tl.dot(a, tl.reshape(q, [BLOCK_K, BLOCK_N]).to(dt)) * s[None, :]
                else:
                    # large tile: a second [BLOCK_M, BLOCK_N] fp32 temporary would spill; dequantize first
                    w = tl.reshape(q, [BLOCK_K, BLOCK_N]) * s[None, :]
                    acc = tl.dot(a, w.to(dt), acc)
            else:
                sb = k0 // BS + tl.arange(0, BLOCK_K // BS)
                s = tl.load(s_ptr + rn[None, :] * nblk + sb[:, None],
                            mask=(sb < nblk)[:, None] & n_ok[None, :], other=0.0)
                w = tl.reshape(q, [BLOCK_K // BS, BS, BLOCK_N]) * s[:, None, :]
                acc = tl.dot(a, tl.reshape(w, [BLOCK_K, BLOCK_N]).to(dt), acc)
        else:
            wsum = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            for t in tl.static_range(TERMS):
                words = tl.load(w_ptr + rn[None, :] * (TERMS * row_words) + t * row_words + kw[:, None],
                                mask=wmask, other=0)
                u = (words[:, None, :] >> shifts[None, :, None]) & MASK
                q = (u | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + ZP)
                if PER_CHANNEL:
                    s = tl.load(s_ptr + rn * TERMS + t, mask=n_ok, other=0.0)
                    wsum += tl.reshape(q, [BLOCK_K, BLOCK_N]) * s[None, :]
                elif BLOCK_K <= BS:
                    s = tl.load(s_ptr + rn * (TERMS * nblk) + t * nblk + k0 // BS, mask=n_ok, other=0.0)
                    wsum += tl.reshape(q, [BLOCK_K, BLOCK_N]) * s[None, :]
                else:
                    sb = k0 // BS + tl.arange(0, BLOCK_K // BS)
                    s = tl.load(s_ptr + rn[None, :] * (TERMS * nblk) + t * nblk + sb[:, None],
                                mask=(sb < nblk)[:, None] & n_ok[None, :], other=0.0)
                    w = tl.reshape(q, [BLOCK_K // BS, BS, BLOCK_N]) * s[:, None, :]
                    wsum += tl.reshape(w, [BLOCK_K, BLOCK_N])
            acc = tl.dot(a, wsum.to(dt), acc)

    if PER_CHANNEL and TERMS == 1:
        s = tl.load(s_ptr + rn, mask=n_ok, other=0.0)
        acc = acc * s[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)


@triton.jit
def splitk_reduce_kernel(ws_ptr, b_ptr, MN, N, y_ptr,
                         SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``y = Σ_s ws[s] (+ bias[n])`` over the SPLIT_K fp32 partials, cast to y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)
