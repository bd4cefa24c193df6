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
*scale* instead — the same splitting on the parameter our format has. As there, the defaults are p = 0.7,
β = 10, κ = 1.01, 20 rounds, started from the min-max scale, in the weight's own units (β acts on absolute
errors), and the criterion that is monitored is the mean absolute error mean|w − s·q|: each group keeps its best
scale under it (so never worse than min-max there), and the rounds stop when no group improved.

Because the format is symmetric, an asymmetric grid's advantages are out of reach here: a zero point lets the
2^b levels cover [min, max] of a skewed block instead of [−max|w|, max|w|] (one level of 2^b, −2^(b−1), is
only reached by clipping), which is worth up to a bit of resolution on one-sided blocks.
"""

from __future__ import annotations

import numpy as np

from .weights import _to_f32_scale, qrange

__all__ = ["HQQ_LP_NORM", "HQQ_BETA", "HQQ_KAPPA", "HQQ_ITERS", "hqq_scales"]

HQQ_LP_NORM = 0.7
HQQ_BETA = 10.0
HQQ_KAPPA = 1.01
HQQ_ITERS = 20


def _shrink_lp(r: np.ndarray, beta: float, p: float) -> np.ndarray:
    """sign(r) · max(|r| − |r|^(p−1)/β, 0); the proximal step of |·|^p (p = 1: ordinary soft threshold)."""
    a = np.abs(r)
    if p == 1:
        thr = np.full_like(a, 1.0 / beta)
    else:
        with np.errstate(divide="ignore"):
            thr = np.power(a, p - 1) / beta           # |r| = 0 -> inf -> shrinks to 0
    return np.sign(r) * np.maximum(a - thr, 0.0)


def hqq_scales(rows: np.ndarray, bits: int, *, lp_norm: float = HQQ_LP_NORM, beta: float = HQQ_BETA,
               kappa: float = HQQ_KAPPA, iters: int = HQQ_ITERS) -> np.ndarray:
    """Float32 scale per row of ``rows`` [R, L] (one row per group; zero padding is harmless: a zero weight has
    code 0 and adds nothing to any sum) by the half-quadratic search of the module docstring."""
    w = np.asarray(rows, dtype=np.float64)
    qmin, qmax = qrange(int(bits))
    absmax = np.abs(w).max(axis=1) if w.shape[1] else np.zeros(w.shape[0])
    best = _to_f32_scale(absmax / qmax)
    if not w.size:
        return best

    def l1(s32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = s32.astype(np.float64)[:, None]
        q = np.clip(np.rint(w / s), qmin, qmax)
        return q, np.abs(w - q * s).sum(axis=1)

    s32, best_err = best, None
    for it in range(int(iters) + 1):
        q, err = l1(s32)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            if not better.any():
                break
            best = np.where(better, s32, best)
            best_err = np.where(better, err, best_err)
        if it == int(iters):
            break
        s = s32.astype(np.float64)
        e = _shrink_lp(w - q * s[:, None], beta, lp_norm)
        num = ((w - e) * q).sum(axis=1)
        den = (q * q).sum(axis=1)
        ok = (den > 0) & (num > 0)
        s32 = _to_f32_scale(np.where(ok, num / np.where(ok, den, 1.0), s) * (absmax > 0))
        beta *= kappa
    return best.astype(np.float32)
