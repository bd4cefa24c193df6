"""Data-free half-quadratic scale search (HQQ) for symmetric, zero-point-0 groups.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (Mobius Labs, 2023). HQQ fits the
quantization parameters of a group w to the sparsity-promoting error ‖w − Q⁻¹(Q(w))‖_p^p, p < 1 (large
errors on a few weights cost less than under ‖·‖², so the grid is not dragged towards outliers), by
half-quadratic splitting: with an auxiliary error e,

    min_{s, e}  ‖e‖_p^p + β/2 ‖e − (w − s·q(s))‖²,   q(s) = clip(round(w / s), qmin, qmax),

solved by alternating (β ← κβ after every round):

1. q = clip(round(w / s)),  r = w − s·q                                   (codes for the current scale);
2. e = shrink_p(r, β) = sign(r) · max(|r| − |r|^(p−1)/β, 0)                (generalised soft threshold);
3. s = ⟨w − e, q⟩ / ⟨q, q⟩                                                 (least squares in s for fixed q, e).

The reference (``mobiusml/hqq``, ``optimize_weights_proximal``) keeps the scale fixed and solves step 3 for an
affine zero point; our format has zero point 0 and a free scale, so step 3 is the closed-form least-squares
*scale* instead — the same splitting on the parameter our format has. As there: p = 0.7, β = 10, κ = 1.01,
up to 20 rounds, in the weight's own units (β acts on absolute errors). With weights of typical size (~0.02)
the threshold |r|^(p−1)/β exceeds every rounding error r, so e = 0 and step 3 is the plain least-squares scale
for the current codes (a Lloyd step) — in the reference too, where it is the least-squares zero point.

Deviation: the monitored criterion is the lp error itself (the reference monitors mean |w − ŵ|); each group
keeps the best scale seen (never worse than its start), and every group runs all rounds (the reference stops
early; a stop on "no group improved" would make a group's scale depend on the groups quantized with it).

Start. ``start="minmax"`` (default, the reference's start) makes it a local refinement of the min-max scale:
it clips little, and its L2 error stays close to the MSE grid search. ``start="grid"`` starts from the best of a
coarse grid of clipping ratios r ∈ linspace(0.3, 1, 15) under the lp error: a global search of the lp objective
(from min-max the alternation stops in the nearest local minimum; on Gaussian blocks of 32 the grid start
reaches a lower lp error than the min-max start or the MSE search), but lp < 1 then clips outliers hard, the
L2 error grows (4-bit: ×1.4 over the MSE search) and so does the layer-output error and the loss: on the
bundled example's Gemm at 2 bits, layer-output error 0.33 (grid start) vs 0.24 (min-max start) vs 0.23 (MSE
grid), ΔL +0.116 vs +0.054 vs +0.050 (``bench/exp_gptq.py``).

Because the format is symmetric, an asymmetric grid's advantages are out of reach here: a zero point lets the
2^b levels cover [min, max] of a skewed block instead of [−max|w|, max|w|] (one level of 2^b, −2^(b−1), is
only reached by clipping), which is worth up to a bit of resolution on one-sided blocks.
"""

from __future__ import annotations

import numpy as np

from ..errors import LLCError
from .weights import _to_f32_scale, qrange

__all__ = ["HQQ_BETA", "HQQ_ITERS", "HQQ_KAPPA", "HQQ_LP_NORM", "HQQ_START_RATIOS", "hqq_scales", "lp_error"]

HQQ_LP_NORM = 0.7
HQQ_BETA = 10.0
HQQ_KAPPA = 1.01
HQQ_ITERS = 20
HQQ_START_RATIOS = np.linspace(0.3, 1.0, 15)


def _shrink_lp(r: np.ndarray, beta: float, p: float) -> np.ndarray:
    """sign(r) · max(|r| − |r|^(p−1)/β, 0); the proximal step of |·|^p (p = 1: ordinary soft threshold)."""
    a = np.abs(r)
    if p == 1:
        thr = np.full_like(a, 1.0 / beta)
    else:
        with np.errstate(divide="ignore"):
            thr = np.power(a, p - 1) / beta           # |r| = 0 -> inf -> shrinks to 0
    return np.sign(r) * np.maximum(a - thr, 0.0)


def lp_error(rows: np.ndarray, scale: np.ndarray, bits: int, p: float = HQQ_LP_NORM) -> np.ndarray:
    """Σ_row |w − s·clip(round(w/s))|^p per row (float64; ``scale`` per row)."""
    qmin, qmax = qrange(int(bits))
    s = np.asarray(scale, dtype=np.float64)[:, None]
    q = np.clip(np.rint(rows / s), qmin, qmax)
    return np.power(np.abs(rows - q * s), p).sum(axis=1)


def hqq_scales(rows: np.ndarray, bits: int, *, lp_norm: float = HQQ_LP_NORM, beta: float = HQQ_BETA,
               kappa: float = HQQ_KAPPA, iters: int = HQQ_ITERS, start: str = "minmax") -> np.ndarray:
    """Float32 scale per row of ``rows`` [R, L] (one row per group; zero padding is harmless: a zero weight has
    code 0 and adds nothing to any sum) by the half-quadratic search of the module docstring, started from the min-max scale
    (``start="minmax"``) or from the best ratio of a coarse lp grid (``start="grid"``)."""
    if start not in ("grid", "minmax"):
        raise LLCError(f"hqq: start={start!r} is unknown; use 'grid' or 'minmax'")
    w = np.asarray(rows, dtype=np.float64)
    qmin, qmax = qrange(int(bits))
    absmax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0])
    best = _to_f32_scale(absmax / qmax)
    if not w.size:
        return best
    best_err = lp_error(w, best, bits, lp_norm)
    for r in (HQQ_START_RATIOS[::-1][1:] if start == "grid" else ()):                 # ratio 1.0 is the min-max start above
        s32 = _to_f32_scale(r * absmax / qmax)
        err = lp_error(w, s32, bits, lp_norm)
        better = err < best_err
        best, best_err = np.where(better, s32, best), np.where(better, err, best_err)
    s32 = best
    for _ in range(int(iters)):
        s = s32.astype(np.float64)
        q = np.clip(np.rint(w / s[:, None]), qmin, qmax)
        e = _shrink_lp(w - q * s[:, None], beta, lp_norm)
        num = ((w - e) * q).sum(axis=1)
        den = (q * q).sum(axis=1)
        ok = (den > 0) & (num > 0)
        s32 = _to_f32_scale(np.where(ok, num / np.where(ok, den, 1.0), s) * (absmax > 0))
        beta *= kappa
        err = lp_error(w, s32, bits, lp_norm)
        # every row runs all iterations and keeps its best (no early stop when no row improves: that would make
        # a row's scale depend on the other rows quantized with it, e.g. on quantize_weight's chunks of rows)
        better = err < best_err
        best, best_err = np.where(better, s32, best), np.where(better, err, best_err)
    return best.astype(np.float32)
