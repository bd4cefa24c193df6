"""CET rounding: quantization whose error avoids the short axes of the node's Hessian block.

Setting. A node's weight w (n entries) is quantized on the grid of :func:`quantize_weight` (its scales s and
layout — per output channel or blocked — unchanged). Each weight j keeps one of its two grid neighbours
⌊x_j⌋, ⌈x_j⌉ (x = w / s): a *rounding direction*. Nearest rounding q⁰ gives the error δ⁰ = s·q⁰ − w of the
least norm. CET (the error-theoretical analysis) says where that error costs: with the node's curvature model
(``solvers.cet.NodeCurvature``: eigenpairs (λ_i, v_i) of H_ii, rows V, and the mean remaining curvature ρ)

    f(δ) = γ·g·δ + ½ Σ_i λ_i (v_i·δ)² + ½ ρ ‖δ⊥‖² = γ·g·δ + ½ pᵀ D p + ½ ρ ‖δ‖²,
    p = V δ,  D = diag(λ_i − ρ),  ‖δ⊥‖² = ‖δ‖² − ‖p‖²,

the predicted loss change (γ = 1 with a gradient ``grad``, else 0: pure CET). On the *short axes* (λ_i ≫ ρ)
error costs λ_i per unit², elsewhere ρ; so the ideal error has v_i·δ = 0 on them — an underdetermined linear
system (k equations, n unknowns) — and, where λ_i < 0 (a saddle), a large |v_i·δ| (D_i < 0 rewards it).
CET rounding solves it inside the grid by choosing rounding directions, as the least change from nearest
rounding that the model pays for: it minimises f over the 2ⁿ directions, starting from q⁰.

Why greedy flips, not an integer least-squares solver. Minimising f over binary directions is a box-
constrained binary quadratic program (NP-hard in general; n up to millions). But H is low rank plus ρ·I
here, so the effect of flipping weight j (step τ_j = ±s_j) is exact and cheap:

    Δf_j = τ_j (γ g_j + ρ δ_j + (Vᵀ D p)_j) + ½ τ_j² (ρ + Σ_i D_i V_ij²),

all j at once in O(k n), and a flip updates p by τ_j V[:, j] in O(k). Each round takes the ``batch`` most
negative Δf_j and applies them one at a time, each re-evaluated with the current p and applied only if it
still lowers f (so f decreases strictly and the search ends at a point no single flip improves —
a 1-flip local optimum). The ½ρ‖δ‖² term prices each flip away from nearest at ½ρ s_j²(1 − 2f_j) (f_j the
rounding distance): the search stops moving weights once the projection left is worth less than the added
error. That is "reduce ‖Vδ‖² per unit of added ‖δ‖²" with the curvatures as the exchange rate. Where ρ is
not positive (a noisy trace estimate) it is floored at ``1e-3·max λ``, so a flip never comes for free.

Negative axes: trusted within a radius. On a hyperbolic paraboloid the model is unbounded below along
v_i (λ_i < 0); only the grid box stops the push, which then flips up to half the weights — far outside the
region where a quadratic model of the loss can be believed. So the reward along a negative axis is capped:
its term is ½ λ_i min(p_i², R_i²) with R_i = ``negative_radius`` · sqrt(Σ_j V_ij² s_j² / 12), i.e. that many
times the RMS projection of a uniform rounding error on v_i; beyond R_i the axis costs ρ like the bulk.
``negative_radius=None`` believes the model everywhere; the capped term is evaluated exactly per flip too.

Weights whose two neighbours coincide (on the grid, or clipped at the range) cannot move; codes stay in
[qmin, qmax] by construction. Works for every layout :func:`quantize_weight` supports (MatMul/Gemm/Conv,
per channel or blocked), because it only reads that function's public result (codes, scales, axis, block).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ..errors import LLCError
from .weights import QuantizedWeight, WeightQuantSpec, conv_matrix_shape, is_matrix_layout, qrange, quantize_weight

if TYPE_CHECKING:  # only the attributes are read: eigenvalues, eigenvectors, remainder, shape, node
    from ..solvers.cet import NodeCurvature

__all__ = ["CETRounding", "cet_round", "element_scale"]

RHO_FLOOR = 1e-3  # ρ used ≥ RHO_FLOOR · max(λ): every flip away from nearest must pay for itself


@dataclass
class CETRounding:
    """Result of :func:`cet_round` for one node at one level.

    ``weight`` the quantized weight (same scales as nearest rounding); ``changed`` codes that differ from
    nearest rounding; ``movable`` weights with two distinct in-range neighbours; ``projection_*`` ‖V₊δ‖ on
    the kept positive (short) axes and ``negative_*`` ‖V₋δ‖ on the kept negative ones, for nearest rounding
    (before) and CET rounding (after); ``objective_*`` the model value f(δ) minimised (module doc; with the
    negative-axis cap, which :func:`solvers.cet.cet_predict` does not apply); ``rounds`` of the search."""

    weight: QuantizedWeight
    changed: int
    movable: int
    projection_before: float
    projection_after: float
    negative_before: float
    negative_after: float
    objective_before: float
    objective_after: float
    rounds: int


def element_scale(qw: QuantizedWeight, shape: tuple[int, ...]) -> np.ndarray:
    """The scale of every weight (float32, weight shape) from a :class:`QuantizedWeight`'s public layout:
    per channel, ``scale[c]`` along ``axis``; blocked, ``scale`` repeated ``block_size`` times along ``axis``
    (the last block cut to the weight's length)."""
    scale = np.asarray(qw.scale, dtype=np.float32)
    if is_matrix_layout(shape, np.shape(qw.q)):  # blocked Conv: blocks over C/g·kh·kw of the [O, R] matrix
        return element_scale(qw, conv_matrix_shape(shape)).reshape(shape)
    if qw.block_size is None:
        view = [1] * len(shape)
        view[qw.axis] = shape[qw.axis]
        return np.broadcast_to(scale.reshape(view), shape)
    rep = np.repeat(scale, int(qw.block_size), axis=qw.axis)
    return np.take(rep, np.arange(shape[qw.axis]), axis=qw.axis)


def cet_round(w: np.ndarray, spec: WeightQuantSpec, out_axis: int, reduce_axis: int, curvature: "NodeCurvature",
              *, grad: np.ndarray | None = None, use_negative: bool = True, negative_radius: float | None = 2.0,
              batch: int = 64, max_rounds: int = 10_000) -> CETRounding:
    """Quantize ``w`` at ``spec``'s level (scales and layout of :func:`quantize_weight`; ``spec.rounding`` is
    ignored) with CET rounding from ``curvature`` (module doc). ``grad`` (∂L/∂W of the fit data) adds the
    first-order term γ = 1; without it the rounding only shapes the error against the curvature (measured
    out of sample on the Fashion-MNIST CNN the gradient term makes it much worse: it flips thousands of
    weights along g, where the curvature beyond the kept axes is far above ρ; see bench/exp_cet.py).
    ``use_negative=False`` ignores the kept negative eigenpairs (their axes then cost ρ like the rest);
    ``negative_radius`` bounds the push along them (module doc; None: unbounded)."""
    w = np.asarray(w)
    shape = tuple(w.shape)
    if tuple(curvature.shape) != shape:
        raise LLCError(f"node '{curvature.node}': curvature for a weight of shape {tuple(curvature.shape)}, "
                       f"weight has shape {shape}; compute the curvature of this node's weight")
    if grad is not None and np.shape(grad) != shape:
        raise LLCError(f"node '{curvature.node}': grad shape {np.shape(grad)} does not match weight shape "
                       f"{shape}; pass the node's ∂L/∂W")
    nearest = quantize_weight(w, replace(spec, rounding="nearest"), out_axis, reduce_axis)
    qmin, qmax = qrange(nearest.bits)
    s32 = element_scale(nearest, shape)
    s = s32.astype(np.float64).reshape(-1)
    w64 = w.astype(np.float64).reshape(-1)
    q0 = nearest.q.reshape(-1).astype(np.int64)
    x = w64 / s
    r = np.rint(x)
    x = np.where(np.abs(x - r) <= 1e-6, r, x)  # a weight already on the grid (up to float error) stays
    lo = np.clip(np.floor(x), qmin, qmax).astype(np.int64)
    hi = np.clip(np.ceil(x), qmin, qmax).astype(np.int64)
    alt = np.where(q0 == lo, hi, lo)
    movable = alt != q0
    step = (alt - q0) * s  # δ change when weight j leaves nearest rounding

    lam = np.asarray(curvature.eigenvalues, dtype=np.float64)
    Vt = np.ascontiguousarray(np.asarray(curvature.eigenvectors, dtype=np.float64).T)  # n × k
    pos = lam > 0
    if not use_negative:
        Vt, lam = Vt[:, pos], lam[pos]
        pos = pos[pos]
    lam_max = float(lam.max(initial=0.0))
    rho = max(float(curvature.remainder), RHO_FLOOR * lam_max)
    Vp, Dp = np.ascontiguousarray(Vt[:, pos]), lam[pos] - rho  # quadratic axes
    Vn, Dn = np.ascontiguousarray(Vt[:, ~pos]), lam[~pos] - rho  # negative axes, capped reward
    if negative_radius is None:
        R2 = np.full(Dn.size, np.inf)
    else:
        R2 = float(negative_radius) ** 2 * ((Vn * Vn).T @ (s * s)) / 12.0
    hjj = rho + (Vp * Vp) @ Dp  # the quadratic part's diagonal: ρ + Σ_i D_i V_ij²
    gamma_g = np.zeros_like(w64) if grad is None else np.asarray(grad, dtype=np.float64).reshape(-1)

    def capped(pn):  # Σ_neg ½ D_i min(p_i², R_i²), for a vector or rows of a matrix
        return 0.5 * np.minimum(pn * pn, R2) @ Dn

    def objective(d):
        pp, pn = d @ Vp, d @ Vn
        return float(gamma_g @ d + 0.5 * pp @ (Dp * pp) + 0.5 * rho * (d @ d) + capped(pn))

    delta0 = q0 * s - w64
    delta = delta0.copy()
    pp, pn = delta @ Vp, delta @ Vn
    f0 = objective(delta)
    tol = 1e-12 * (abs(f0) + 0.5 * (abs(rho) + float(np.abs(lam).max(initial=0.0))) * float(delta0 @ delta0)) \
        + 1e-300
    flipped = np.zeros(w64.size, dtype=bool)
    idx = np.flatnonzero(movable)
    rounds = 0
    while idx.size and rounds < max_rounds:
        rounds += 1
        tau = np.where(flipped[idx], -step[idx], step[idx])
        df = tau * (gamma_g[idx] + rho * delta[idx] + Vp[idx] @ (Dp * pp)) + 0.5 * tau * tau * hjj[idx]
        if Dn.size:
            df += capped(pn[None, :] + tau[:, None] * Vn[idx]) - capped(pn)
        neg = df < -tol
        if not neg.any():
            break
        m = min(int(batch), int(neg.sum()))
        short = np.argpartition(df, m - 1)[:m] if m < df.size else np.arange(df.size)
        short = short[np.argsort(df[short], kind="stable")]
        applied = 0
        for loc in short:
            j = idx[loc]
            t = -step[j] if flipped[j] else step[j]
            dfj = t * (gamma_g[j] + rho * delta[j] + Vp[j] @ (Dp * pp)) + 0.5 * t * t * hjj[j]
            if Dn.size:
                dfj += capped(pn + t * Vn[j]) - capped(pn)
            if dfj < -tol:
                delta[j] += t
                pp += t * Vp[j]
                pn += t * Vn[j]
                flipped[j] = not flipped[j]
                applied += 1
        if not applied:
            break

    q = np.where(flipped, alt, q0).reshape(np.shape(nearest.q))  # the quantizer's layout (Conv blocks: [O, R])
    dequant = (q.reshape(shape).astype(np.float32) * s32).astype(np.float32)
    weight = QuantizedWeight(q=q.astype(np.int32), scale=nearest.scale, axis=nearest.axis,
                             block_size=nearest.block_size, bits=nearest.bits, dequant=dequant, nbytes=nearest.nbytes)
    d_after = dequant.astype(np.float64).reshape(-1) - w64
    d_before = nearest.dequant.astype(np.float64).reshape(-1) - w64
    return CETRounding(weight=weight, changed=int(flipped.sum()), movable=int(movable.sum()),
                       projection_before=float(np.linalg.norm(d_before @ Vp)),
                       projection_after=float(np.linalg.norm(d_after @ Vp)),
                       negative_before=float(np.linalg.norm(d_before @ Vn)),
                       negative_after=float(np.linalg.norm(d_after @ Vn)),
                       objective_before=objective(d_before), objective_after=objective(d_after), rounds=rounds)
