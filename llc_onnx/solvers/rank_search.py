"""Per-node rank candidates from one SVD, with the first-order loss term of every truncation.

Every weight is viewed as a matrix M[K, N] (input features × outputs): MatMul W as is, Gemm with transB the
transpose, Conv W[O, I, kh, kw] as reshape(O, I·kh·kw)ᵀ. With the SVD  M = Σ_k s_k u_k v_kᵀ  and the
gradient G of the loss in the same view, let  c_k = s_k · u_kᵀ G v_k  (so  G·M = Σ_k c_k). For the truncation
M_r = Σ_{k≤r} s_k u_k v_kᵀ scaled by α, the noise is δ = α M_r − M and

    first-order term   G·δ = α Σ_{k≤r} c_k − Σ_k c_k
    noise norm        ‖δ‖² = (α − 1)² Σ_{k≤r} s_k² + Σ_{k>r} s_k²

for *every* rank at once from cumulative sums (no reconstruction). α = 1 is plain truncation. The loss-aware
refinement is a trust-region step on α: minimise the first-order term subject to staying inside the
neighbourhood ‖δ‖ ≤ ρ — the minimiser moves α away from 1 against the sign of  a = Σ_{k≤r} c_k  until
‖δ‖ = ρ, i.e.  α = 1 − sign(a)·sqrt((ρ² − Σ_{k>r} s_k²) / Σ_{k≤r} s_k²)  when the truncation itself is
inside (otherwise α = 1). This makes G·δ more negative without leaving the neighbourhood.

Only ranks that save parameters are candidates:  r·(K + N) < K·N. Ranks are scanned upwards with early
stopping (the papers' Algorithm 2): once the relative error  ‖M − M_r‖/‖M‖  falls below ``negligible``, higher
ranks change nothing measurable and the scan stops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..compressible import CompressibleNode


def matrix_view(w: np.ndarray, node: CompressibleNode) -> np.ndarray:
    """The weight as M[K, N] (reduction × output)."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1).T
    return w if node.out_axis == w.ndim - 1 else w.T


def from_matrix(m: np.ndarray, node: CompressibleNode) -> np.ndarray:
    """Inverse of :func:`matrix_view`."""
    if node.op_type == "Conv":
        return m.T.reshape(node.weight_shape)
    return m if node.out_axis == len(node.weight_shape) - 1 else m.T


def factor_params(k: int, n: int, r: int) -> int:
    """Parameters of the two factors L[K, r], R[r, N] of a rank-r M[K, N]: r·(K + N). For a weight's shape,
    (K, N) is ``passes.lowrank.matrix_dims(shape, kind)``."""
    return r * (k + n)


def useful_ranks(k: int, n: int) -> list[int]:
    """Ranks whose two factors hold fewer parameters than the matrix: r·(K+N) < K·N."""
    return [r for r in range(1, min(k, n) + 1) if r * (k + n) < k * n]


@dataclass
class RankRow:
    rank: int
    params: int
    rel_error: float  # ‖δ‖ / ‖M‖ (with α)
    alpha: float
    predicted: float  # G·δ (with α)


@dataclass
class NodeSVD:
    """One SVD of a node's weight and the per-rank first-order table."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    c: np.ndarray  # c_k = s_k u_kᵀ G v_k with the gradient that chooses α
    norm: float
    c_eval: np.ndarray | None = None  # the same with the gradient that predicts (default: c)

    @classmethod
    def of(cls, m: np.ndarray, g: np.ndarray, g_eval: np.ndarray | None = None) -> "NodeSVD":
        """SVD of M with the first-order coefficients of ``g`` (chooses α) and ``g_eval`` (predicts G·δ)."""
        u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)

        def coeffs(grad):  # s_k · u_kᵀ G v_k for every k
            return s * np.sum((u.T @ grad.astype(np.float64)) * vt, axis=1)

        c = coeffs(g)
        return cls(u, s, vt, c, float(np.sqrt((s ** 2).sum())) or 1.0, None if g_eval is None else coeffs(g_eval))

    def rows(self, ranks: list[int], radius: float | None = None, negligible: float = 1e-7) -> list[RankRow]:
        """Table for ``ranks`` (ascending); with ``radius`` (the absolute neighbourhood bound on ‖δ‖), α takes
        the trust-region step for every truncation that lies inside it."""
        k, n = self.u.shape[0], self.vt.shape[1]
        s2 = self.s ** 2
        head = np.cumsum(s2)  # Σ_{k≤r} s_k²
        tail = s2.sum() - head  # Σ_{k>r} s_k²
        chead = np.cumsum(self.c)
        ce = self.c if self.c_eval is None else self.c_eval
        ehead, etotal = np.cumsum(ce), ce.sum()
        out = []
        for r in ranks:
            h, t, a = head[r - 1], max(tail[r - 1], 0.0), chead[r - 1]
            alpha = 1.0
            if radius is not None and h > 0:
                room = radius ** 2 - t
                if room > 0 and a != 0:
                    alpha = 1.0 - np.sign(a) * np.sqrt(room / h)
            err = np.sqrt((alpha - 1) ** 2 * h + t) / self.norm
            out.append(RankRow(r, factor_params(k, n, r), float(err), float(alpha),
                               float(alpha * ehead[r - 1] - etotal)))
            if np.sqrt(t) / self.norm < negligible:
                break  # Algorithm 2: the truncation error is negligible from here on
        return out

    def factors(self, r: int, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """L[K, r], R[r, N] with  α M_r = L R,  the singular values split evenly between the two."""
        root = np.sqrt(self.s[:r])
        return (self.u[:, :r] * root * alpha), (root[:, None] * self.vt[:r])

    def reconstruct(self, r: int, alpha: float = 1.0) -> np.ndarray:
        left, right = self.factors(r, alpha)
        return left @ right
