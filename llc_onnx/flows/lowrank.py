"""LLC low-rank factorisation with a rank chosen per node, in two modes.

Per node, one SVD gives every truncation's first-order term G·δ and noise norm (``solvers.rank_search``);
the α step is chosen with the fit-part gradient and G·δ predicted with the measure-part gradient, on whose
batches the candidates are also measured (``flows.context``).

* ``lossless``: the candidates of a node are the useful ranks with G·δ < 0 inside the neighbourhood
  ‖δ‖ ≤ γ (absolute, or γ·‖W‖ with ``gamma_relative``), the scale α refined by the trust-region step. Each is
  measured (loss with only that node factored, calibration split) and the node keeps its lowest-loss one.
  Globally, nodes are added in order of their measured ΔL and the prefix with the lowest calibration loss
  (at least one node, so the model still compresses) is kept.
* ``compact``: each node gets a grid of useful ranks (fractions of the largest useful rank) plus the
  unfactored weight; costs from the LLC cost model (predicted inside the neighbourhood, else measured) go into
  the grouped knapsack with parameters as weight, and the budget is bisected for the smallest one whose
  calibration loss (all chosen nodes factored together) is ≤ the float model's calibration loss.

Both hand the chosen plan to ``verify.select_plan``, which measures it jointly on the validation split and
backs off (the worst nodes move one rank up, eventually back to unfactored).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ..calib.gradients import GradientPass
from ..calib.noise import constant
from ..config import CriterionConfig, LowRankConfig
from ..errors import LLCError
from ..passes.lowrank import apply_lowrank
from ..solvers import knapsack
from ..solvers.cost_model import Candidate, CostTable, classify
from ..solvers.rank_search import NodeSVD, from_matrix, matrix_view, useful_ranks
from .context import FlowContext, float_itemsize
from .outcome import MethodOutcome

FULL = "full"
MAX_CANDIDATES = 8  # measured ranks per node (lossless)
NEGLIGIBLE = 1e-7  # relative truncation error below which higher ranks are not scanned (Algorithm 2)
BISECTION_STEPS = 10  # compact mode: budget bisection steps


def _radius(cfg: LowRankConfig, svd: NodeSVD) -> float:
    """The neighbourhood bound on ‖δ‖ for this node: γ, or γ·‖W‖ with ``gamma_relative``."""
    return cfg.gamma * svd.norm if cfg.gamma_relative else cfg.gamma


class _Ranks:
    """SVDs and rank candidates of all nodes, with what is needed to rebuild each candidate."""

    def __init__(self, ctx: FlowContext, grads: GradientPass, grads_m: GradientPass):
        self.ctx = ctx
        self.svd: dict[str, NodeSVD] = {}  # nodes that can be factored (grouped Conv cannot: kept whole)
        self.spec: dict[tuple[str, str], tuple[int, float]] = {}  # (node, level) -> (rank, alpha)
        with ctx.progress.task("SVD", len(ctx.nodes)) as advance:
            for node in ctx.nodes:
                if node.group != 1:
                    advance(1)
                    continue
                w = ctx.weight_array(node)
                g, gm = grads.nodes[node.name].grad_w, grads_m.nodes[node.name].grad_w
                self.svd[node.name] = NodeSVD.of(matrix_view(w, node), matrix_view(g, node), matrix_view(gm, node))
                advance(1)

    def weight(self, name: str, level: str) -> np.ndarray:
        r, alpha = self.spec[(name, level)]
        node = self.ctx.node(name)
        return from_matrix(self.svd[name].reconstruct(r, alpha), node)

    def hook(self, name: str, level: str):
        return constant(torch.as_tensor(self.weight(name, level), dtype=self.ctx.graph.dtype,
                                        device=self.ctx.graph.device))

    def factors(self, choice: dict[str, Candidate]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for name, cand in choice.items():
            if cand.reference:
                continue
            r, alpha = self.spec[(name, cand.level)]
            left, right = self.svd[name].factors(r, alpha)  # matrix view, which passes.lowrank takes for every op
            out[name] = (left.astype(np.float32), right.astype(np.float32))
        return out

    def candidate(self, name: str, row, crit: CriterionConfig) -> Candidate:
        """Measure node ``name`` factored at ``row``'s rank (alone) and cost it."""
        level = f"rank {row.rank}"
        self.spec[(name, level)] = (row.rank, row.alpha)
        measured, se = _measure(self.ctx, {name: self.hook(name, level)})
        cand = Candidate(name, level, float_itemsize(self.ctx.model, self.ctx.node(name)) * row.params, row.predicted, measured, row.rel_error, True, None, se=se)
        return classify(cand, crit.error_max, self.ctx.base().mean, crit.relative, crit.outside, crit.margin_z)


def _reference(ctx: FlowContext, name: str) -> Candidate:
    return Candidate(name, FULL, float_itemsize(ctx.model, ctx.node(name)) * ctx.weight_array(ctx.node(name)).size, 0.0, 0.0, 0.0, True, 0.0, reference=True)


def _measure(ctx: FlowContext, fns) -> tuple[float, float]:
    """(ΔL, SE) on the measurement data with the weight hooks ``fns`` applied together."""
    return ctx.measure(fns).delta(ctx.base())


def _lossless(ctx: FlowContext, cfg: LowRankConfig, crit: CriterionConfig, ranks: _Ranks):
    cands: list[Candidate] = []
    best: dict[str, Candidate] = {}
    plan = []
    for node in ctx.nodes:
        svd = ranks.svd.get(node.name)
        if svd is None:
            plan.append((node, []))
            continue
        k, n = svd.u.shape[0], svd.vt.shape[1]
        radius = _radius(cfg, svd)
        rows = svd.rows(useful_ranks(k, n), radius=radius, negligible=NEGLIGIBLE)
        inside = [r for r in rows if r.predicted < 0 and r.rel_error * svd.norm <= radius * (1 + 1e-9)]
        if len(inside) > MAX_CANDIDATES:  # spread the measured candidates over the set, smallest rank first
            idx = np.unique(np.linspace(0, len(inside) - 1, MAX_CANDIDATES).round().astype(int))
            inside = [inside[i] for i in idx]
        plan.append((node, inside))
    total = sum(len(p[1]) for p in plan)
    with ctx.progress.task("measuring ranks", total) as advance:
        for node, rows in plan:
            cands.append(_reference(ctx, node.name))
            for row in rows:
                c = ranks.candidate(node.name, row, crit)
                cands.append(c)
                if c.cost is not None and (node.name not in best or c.measured < best[node.name].measured):
                    best[node.name] = c
                advance(1)
    table = CostTable.from_candidates(cands)
    if not best:
        raise LLCError(f"{ctx.source}: no rank of any node lies inside the neighbourhood ‖δ‖ ≤ {cfg.gamma}"
                       f"{' ·‖W‖' if cfg.gamma_relative else ''} with G·δ < 0, so lossless low-rank cannot compress this "
                       "model; try a larger lowrank.gamma (--gamma) with lowrank.gamma_relative (--gamma-relative), or "
                       "lowrank.mode compact (--mode compact)")
    order = sorted(best, key=lambda n: (best[n].measured, n))
    search, fns, best_k, best_loss = [], {}, 1, float("inf")
    with ctx.progress.task("choosing the combination", len(order)) as advance:
        for k, name in enumerate(order, 1):
            fns[name] = ranks.hook(name, best[name].level)
            dl, se = _measure(ctx, dict(fns))
            search.append({"nodes": k, "added": name, "calib_delta": dl, "se": se})
            if dl < best_loss:
                best_k, best_loss = k, dl
            advance(1)
    chosen = {n: best[n] for n in order[:best_k]}
    return table, chosen, search


def _grid_rows(svd: NodeSVD, cfg: LowRankConfig):
    """Compact-mode candidates: the ranks round(f·r_max) for f in ``cfg.grid``."""
    k, n = svd.u.shape[0], svd.vt.shape[1]
    useful = useful_ranks(k, n)
    if not useful:
        return []
    rmax = useful[-1]
    grid = sorted({min(rmax, max(1, int(round(f * rmax)))) for f in cfg.rank_grid})
    # the α step is only taken where the truncation is inside the neighbourhood; elsewhere α = 1
    return svd.rows(grid, radius=_radius(cfg, svd), negligible=NEGLIGIBLE)


def _compact(ctx: FlowContext, cfg: LowRankConfig, crit: CriterionConfig, ranks: _Ranks):
    plan = [(node, _grid_rows(ranks.svd[node.name], cfg) if node.name in ranks.svd else []) for node in ctx.nodes]
    cands: list[Candidate] = []
    tolerance = crit.verdict_tolerance(ctx.objective)
    with ctx.progress.task("measuring ranks", sum(len(r) for _, r in plan)) as advance:
        for node, rows in plan:
            cands.append(_reference(ctx, node.name))
            for row in rows:
                cands.append(ranks.candidate(node.name, row, crit))
                advance(1)
    table = CostTable.from_candidates(cands)
    names, kept, costs, sizes = table.solver_inputs()
    lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    search = []

    def attempt(budget: int):
        pick = knapsack.solve_budget(costs, sizes, budget)
        chosen = {n: kept[i][j] for i, (n, j) in enumerate(zip(names, pick))}
        fns = {n: ranks.hook(n, c.level) for n, c in chosen.items() if not c.reference}
        dl, se = _measure(ctx, fns) if fns else (0.0, 0.0)
        search.append({"budget_bytes": budget, "bytes": sum(c.nbytes for c in chosen.values()), "calib_delta": dl,
                       "se": se})
        return chosen, dl + crit.margin_z * se

    best = {n: kept[i][-1] for i, n in enumerate(names)}  # unfactored: always "no worse"
    with ctx.progress.task("budget search", BISECTION_STEPS) as advance:
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) // 2
            chosen, dl = attempt(mid)
            if dl <= tolerance:
                best, hi = chosen, mid
            else:
                lo = mid + 1
            advance(1)
            if lo >= hi:
                break
    return table, best, search


def run(ctx: FlowContext) -> MethodOutcome:
    """SVDs, measured rank candidates and the chosen combination (module doc), as a plan for validation."""
    cfg, crit = ctx.config.lowrank, ctx.config.criterion
    with ctx.timer.stage("gradients"), ctx.progress.task("gradients", len(ctx.calib.batches)) as advance:
        grads, grads_m = ctx.gradients(None, advance)
    with ctx.timer.stage("candidates"):
        ranks = _Ranks(ctx, grads, grads_m)
        table, chosen, search = (_lossless if cfg.mode == "lossless" else _compact)(ctx, cfg, crit, ranks)
    # Ladders: each node's candidates by size, unfactored last; nodes not chosen stay unfactored.
    ladders, choice = {}, {}
    for name, group in table.groups.items():
        ladder = [c for c in group if c.cost is not None or c.reference]
        ladder.sort(key=lambda c: (c.reference, c.nbytes))
        ladders[name] = ladder
        pick = chosen.get(name)
        choice[name] = ladder.index(pick) if pick is not None and pick in ladder else len(ladder) - 1

    def build(ch: dict[str, int]) -> onnx.ModelProto:
        return ctx.complete(apply_lowrank(ctx.model, ranks.factors({n: ladders[n][i] for n, i in ch.items()})))

    settings = {"mode": cfg.mode, "gamma": cfg.gamma, "gamma_relative": cfg.gamma_relative}
    return MethodOutcome("lowrank", table, ladders, [("solver", choice)], build, None, settings, search=search)
