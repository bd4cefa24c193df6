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

The grouped knapsack then minimises Σ cost under a size budget, or finds the smallest plan with Σ cost ≤ 0
(lossless). What the solver sees (:meth:`CostTable.solver_inputs`) is stricter than the raw costs:

* gain credit  a measured *gain* (negative cost) is a fitted effect selected from many noisy candidates; it
  counts ``gain_credit`` × its value (default ½) when it pays for other nodes' costs, so a plan cannot rest
  on gains alone (seen: many int8 "gains" of −0.1 buying an int2 output projection costing +1.26);
* node bound   in lossless mode a level whose cost alone exceeds ``max_node_cost`` (an absolute loss change)
  is not offered, whatever gains elsewhere could pay for it;
* dominance    a level that costs as many or more bytes than a higher-fidelity level of the same node is
  never offered (it would only be picked by noise).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
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
    rounding: str = ""  # how the weight was rounded ("llc", "nearest", "gptq", "cet"; "" where it does not apply)
    info: dict = field(default_factory=dict)  # e.g. CET rounding: codes changed, short-axis projection

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

    def solver_inputs(self, gain_credit: float = 1.0, max_node_cost: float | None = None, fidelity=None
                      ) -> tuple[list[str], list[list[Candidate]], list[list[float]], list[list[int]]]:
        """Nodes, the offered candidates per node, their solver costs and sizes (see the module doc): dropped
        levels removed, levels over ``max_node_cost`` removed (the reference level always stays), dominated
        levels removed (``fidelity(c)`` orders a node's levels, fewest bits / lowest rank first; default: by
        size), gains scaled by ``gain_credit``."""
        nodes, kept, costs, sizes = [], [], [], []
        for node, group in self.groups.items():
            g = [c for c in group if c.cost is not None and
                 (c.reference or max_node_cost is None or c.cost <= max_node_cost)]
            g = undominated(g, fidelity)
            nodes.append(node)
            kept.append(g)
            costs.append([float(c.cost) if c.cost >= 0 else gain_credit * float(c.cost) for c in g])
            sizes.append([int(c.nbytes) for c in g])
        return nodes, kept, costs, sizes

    def rows(self) -> list[dict]:
        return [c.to_dict() for g in self.groups.values() for c in g]


def undominated(cands: list[Candidate], fidelity=None) -> list[Candidate]:
    """``cands`` without the levels that take as many or more bytes than a *strictly* higher-fidelity level
    (``fidelity`` orders levels from lowest to highest fidelity; default: by size, where nothing is dominated).
    Levels that tie on the fidelity key (e.g. static and dynamic W8A8: same bits, same bytes) all stay: they
    differ in loss and time, which the solver weighs, not in what this order sees."""
    key = fidelity or (lambda c: c.nbytes)
    tiers = [list(g) for _, g in itertools.groupby(sorted(cands, key=key), key=key)]
    keep: list[Candidate] = []
    smallest_above = math.inf      # fewest bytes among strictly higher-fidelity levels
    for tier in reversed(tiers):   # highest fidelity first
        keep += [c for c in tier if c.nbytes < smallest_above]
        smallest_above = min(smallest_above, *(c.nbytes for c in tier))
    kept = {id(c) for c in keep}
    return [c for c in cands if id(c) in kept]


def plan_costs(chosen: list[Candidate], gain_credit: float) -> dict:
    """How much of a plan rests on measured gains: the summed positive costs, the summed gains (raw and as
    credited to the solver) and the predicted total the solver saw."""
    pos = sum(c.cost for c in chosen if c.cost is not None and c.cost > 0)
    gains = sum(c.cost for c in chosen if c.cost is not None and c.cost < 0)
    return {"costs": pos, "gains": gains, "credited_gains": gain_credit * gains,
            "predicted_total": pos + gain_credit * gains,
            "gain_share": (-gains / pos) if pos > 0 else (0.0 if gains == 0 else float("inf"))}
