"""The LLC cost model: one row per (node, level) with predicted and measured Δloss and size.

For node i at level j (a weight quantizer, a rank, ...) with weight noise δ_ij:

* predicted  p_ij = Σ g_w,i · δ_ij  (+ Σ g_x·ε for an input quantizer): the first-order term;
* measured   m_ij = L(only node i at level j) − L(original), on the calibration split;
* inside     |m_ij − p_ij| ≤ error_max  (or ≤ error_max·|L| with ``relative``): the node-level check that
  the first-order term describes the effect, i.e. the level lies in the first-order neighbourhood;
* cost       p_ij inside the neighbourhood; outside it either m_ij (``outside="measured"``) or the level is
  dropped (``outside="drop"``, cost ``None``). The reference level (float, full rank) always costs 0.
* CET        with no measurement but a second-order estimate  s_ij = p_ij + ½ δᵀH_ii δ  (``solvers.hessian``),
  the check is |s_ij − p_ij| ≤ error_max (the curvature term is negligible) and outside it the cost is s_ij.
* margin     with ``margin_z`` > 0 the cost is raised by z·SE_ij, the paired standard error of m_ij over the
  calibration samples (``calib.noise``): a level whose measured gain is within noise is not counted as a
  gain, which is what makes a calibration-side "ΔL ≤ 0" likely to hold on held-out data. z = 0 is the
  papers' plain rule.

The grouped knapsack then minimises Σ cost under a size budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass
class Candidate:
    node: str
    level: str  # "float", "int8", "rank 12", ...
    nbytes: int  # storage of this node's weight at this level (scales/factors included)
    predicted: float  # first-order Σ g·δ
    measured: float | None  # measured ΔL on the calibration split (None: not measured)
    rel_noise: float  # ‖δ‖ / ‖W‖
    inside: bool  # |measured − predicted| ≤ error_max
    cost: float | None  # what the solver minimises; None = dropped
    reference: bool = False  # the unmodified level (float / full rank)
    se: float = 0.0  # paired standard error of ``measured``
    second_order: float | None = None  # p + ½ δᵀHδ (CET mode, instead of a measurement)

    def to_dict(self) -> dict:
        return asdict(self)


def classify(cand: Candidate, error_max: float, base_loss: float, relative: bool, outside: str,
             margin_z: float = 0.0) -> Candidate:
    """Set ``inside`` and ``cost`` of a candidate from its predicted/measured Δloss (see module doc)."""
    if cand.reference:
        cand.inside, cand.cost = True, 0.0
        return cand
    if outside not in ("measured", "drop"):
        raise ValueError(f"--outside must be 'measured' or 'drop', not {outside!r}")
    tol = error_max * abs(base_loss) if relative else error_max
    actual = cand.measured if cand.measured is not None else cand.second_order
    if actual is None:
        cand.inside, cand.cost = True, cand.predicted
        return cand
    cand.inside = abs(actual - cand.predicted) <= tol
    if cand.inside:
        cand.cost = cand.predicted
    else:
        cand.cost = actual if outside == "measured" else None
    if cand.cost is not None:
        cand.cost += margin_z * cand.se
    return cand


@dataclass
class CostTable:
    """Candidates grouped by node, in node order; each group's levels sorted from smallest to largest."""

    groups: dict[str, list[Candidate]]

    @classmethod
    def from_candidates(cls, cands: Iterable[Candidate]) -> "CostTable":
        groups: dict[str, list[Candidate]] = {}
        for c in cands:
            groups.setdefault(c.node, []).append(c)
        for g in groups.values():
            g.sort(key=lambda c: c.nbytes)
        return cls(groups)

    def solver_inputs(self) -> tuple[list[str], list[list[Candidate]], list[list[float]], list[list[int]]]:
        """Nodes, the kept candidates per node (dropped ones removed), their costs and sizes."""
        nodes, kept, costs, sizes = [], [], [], []
        for node, group in self.groups.items():
            g = [c for c in group if c.cost is not None]
            nodes.append(node)
            kept.append(g)
            costs.append([float(c.cost) for c in g])
            sizes.append([int(c.nbytes) for c in g])
        return nodes, kept, costs, sizes

    def rows(self) -> list[dict]:
        return [c.to_dict() for g in self.groups.values() for c in g]
