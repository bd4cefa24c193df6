"""LLC mixed-precision quantization for a deployment target: measure every format the target runs fast, then
offer the plans the validation split chooses between.

Stages (each timed):
  0. formats     the target (``llc_onnx.targets``) maps the requested levels (``quant.bits``) of each node to
                 the formats it executes fast (e.g. ORT CPU: MatMulNBits 2/4/8-bit, W8A8 Q/DQ), and says why
                 the others are not offered; activation ranges are calibrated where a format quantizes
                 activations (``calib.activation_ranges``: min-max, percentile or entropy);
  1. gradients   one forward+backward pass over the calibration split (``calib.gradients``), accumulated
                 separately for its fit part and its measure part (``flows.context``), with the first-order
                 prediction Σ g_x·ε of each format's activation quantizer;
  2. candidates  every node in every offered format: quantize with LLC sign-directed rounding from the fit
                 gradient (inside the neighbourhood), predict ΔL = Σ g·δ (+ Σ g_x·ε) with the measure
                 gradient, and measure ΔL on the measure part with the node as the target computes it — the
                 weight, and the input / output quantizers the written node applies (``targets.base``
                 hooks) — out of sample for the rounding;
  3. solve       grouped knapsack over the cost table (``solvers.knapsack``): a byte budget, a latency budget
                 (``target.latency_budget``, with per-format latencies measured on the target,
                 ``targets.latency``), or lossless (the smallest size whose total cost ≤ 0), with gains
                 discounted and single-node costs bounded (``solvers.cost_model``). The outcome offers the
                 solver's plan, the solver's plan without gain credit, and uniform levels;
                 ``verify.select_plan`` measures them jointly on the validation split, in the target's session,
                 and backs off; the target's rewrite builds each plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch

from ..calib.activation_ranges import collect_activation_ranges, qparams
from ..calib.gradients import GradientPass, collect_ranges
from ..calib.noise import constant
from ..compressible import CompressibleNode
from ..config import QuantConfig
from ..errors import LLCError
from ..quant import ActivationQuant, WeightQuantSpec, activation_scale, quantize_weight
from ..solvers import knapsack
from ..solvers.cost_model import Candidate, CostTable, classify, plan_costs
from ..solvers.hessian import quadratic_term
from ..targets.base import Format, NodePlan, input_hook, output_hook
from .context import FlowContext
from .outcome import MethodOutcome

log = logging.getLogger(__name__)

FLOAT = 0  # the "bits" value that means: keep the node in float


def format_bits(fmt: Format) -> int:
    """Bits per stored weight code of a format (0 for float)."""
    return FLOAT if fmt.kind == "float" else int(fmt.bits)


def candidate_settings(ctx: FlowContext) -> dict:
    """The settings a candidate depends on (the cache key); the criterion and the budget only re-classify or
    re-solve the same candidates."""
    cfg, t = ctx.config.quant, ctx.config.target
    return {"bits": sorted(cfg.levels()), "block_size": cfg.block_size, "scale_method": cfg.scale,
            "rounding": cfg.rounding, "llc_radius": cfg.llc_radius, "activations": cfg.activations,
            "cost": cfg.cost, "target": t.name, "calibration": t.calibration, "percentile": t.percentile,
            "plugins": t.plugins}


def spec_of(cfg: QuantConfig, fmt: Format, rounding: str | None = None) -> WeightQuantSpec:
    """The quantizer spec of a format's stored codes with the configured scales and rounding."""
    return WeightQuantSpec(bits=int(fmt.code_bits or fmt.bits), block_size=fmt.block_size, scale_method=cfg.scale,
                           rounding=rounding or cfg.rounding, float_type=fmt.float_type)


def quantize_node(w: np.ndarray, node: CompressibleNode, fmt: Format, cfg: QuantConfig, grad: np.ndarray):
    """Quantize one node's weight in ``fmt``'s layout; LLC rounding only inside the neighbourhood (nearest
    rounding's relative noise ≤ ``llc_radius``), nearest beyond it (measured out of sample, LLC rounding helps
    at 8 bits in 7 of 9 nodes and loses at 4 bits in 7 of 9; see bench/RESULTS.md)."""
    if cfg.rounding != "llc":
        return quantize_weight(w, spec_of(cfg, fmt), node.out_axis, node.reduce_axis, grad=grad)
    nearest = quantize_weight(w, spec_of(cfg, fmt, "nearest"), node.out_axis, node.reduce_axis)
    rel = float(np.linalg.norm(nearest.dequant.astype(np.float64) - w)) / (float(np.linalg.norm(w)) or 1.0)
    if rel > cfg.llc_radius:
        return nearest
    return quantize_weight(w, spec_of(cfg, fmt), node.out_axis, node.reduce_axis, grad=grad)


@dataclass
class Formats:
    """The offered formats of every node and what their activation quantizers need."""

    by_level: dict[tuple[str, str], Format]  # (node, format name) -> format
    offers: dict  # node -> targets.Offer
    acts: dict[tuple[str, str], tuple]  # (node, format name) -> (input params, output params)

    def plan(self, node: str, fmt: Format, weight=None) -> NodePlan:
        inp, out = self.acts.get((node, fmt.name), (None, None))
        return NodePlan(format=fmt, weight=weight, input=inp, output=out)

    def refused(self) -> list[dict]:
        return [{"node": n, "level": lv, "reason": why} for n, o in self.offers.items() for lv, why in o.refused]


def offered_formats(ctx: FlowContext) -> Formats:
    """Stage 0: the target's offer for every node, and the activation parameters of the formats that need them
    (calibrated on the calibration split)."""
    cfg, tcfg = ctx.config.quant, ctx.config.target
    offers = ctx.target.offers(ctx.model, ctx.nodes, levels=cfg.bits, block_size=cfg.block_size)
    if FLOAT not in cfg.levels():  # float was not asked for: keep it only where nothing else is offered
        from ..targets.base import Offer

        offers = {n: o if len(o.formats) == 1 else
                  Offer(n, tuple(f for f in o.formats if f.kind != "float"), o.refused) for n, o in offers.items()}
    by_level = {(n, f.name): f for n, o in offers.items() for f in o.formats}
    acts: dict = {}
    w8 = [(n, f) for (n, _), f in by_level.items() if f.kind == "w8a8"]
    if w8:
        need = {(n, f.name): ctx.target.tensors_to_calibrate(ctx.model, n, f) for n, f in w8}
        tensors = sorted({t for pair in need.values() for t in pair if t})
        with ctx.timer.stage("ranges"):
            ranges = collect_activation_ranges(ctx.graph, ctx.calib, tensors, method=tcfg.calibration,
                                               percentile=tcfg.percentile, symmetric=True)
        for (n, name), (x, y) in need.items():
            f = by_level[(n, name)]
            acts[(n, name)] = (qparams(ranges[x], f.activations), qparams(ranges[y], f.activations) if y else None)
    qdq_acts = [(n, f) for (n, _), f in by_level.items() if f.kind == "qdq" and f.activations]
    if qdq_acts:
        with ctx.timer.stage("ranges"), ctx.progress.task("activation ranges", len(ctx.calib.batches)) as advance:
            absmax = collect_ranges(ctx.graph, ctx.calib, ctx.nodes, advance)
        for n, f in qdq_acts:
            bits = 16 if f.activations == "int16" else 8
            acts[(n, f.name)] = (ActivationQuant(scale=activation_scale(absmax[n], bits), bits=bits), None)
    return Formats(by_level, offers, acts)


def _hooks(formats: Formats, node: str, fmt: Format):
    """(input_fns, output_fns) that reproduce the written node's activation quantizers in the interpreter."""
    plan = formats.plan(node, fmt)
    i, o = input_hook(plan), output_hook(plan)
    return ({node: i} if i else None), ({node: o} if o else None)


def measure_candidate(ctx: FlowContext, formats: Formats, grads: GradientPass, grads_m: GradientPass,
                      node: CompressibleNode, fmt: Format) -> Candidate:
    """One raw candidate: ``node`` quantized in ``fmt`` (rounding from the fit gradient ``grads``), its
    predicted ΔL from the measure-part gradient ``grads_m`` and its measured ΔL on the measure part."""
    cfg = ctx.config.quant
    w = ctx.weight_array(node)
    if fmt.kind == "float":
        return Candidate(node.name, fmt.name, fmt.nbytes(node), 0.0, 0.0, 0.0, True, 0.0, reference=True)
    stats, stats_m = grads.nodes[node.name], grads_m.nodes[node.name]
    qw = quantize_node(w, node, fmt, cfg, stats.grad_w)
    delta = qw.dequant.astype(np.float64) - w
    predicted = float((stats_m.grad_w * delta).sum()) + stats_m.act_pred.get(fmt.name, 0.0)
    rel = float(np.linalg.norm(delta)) / (float(np.linalg.norm(w)) or 1.0)
    nbytes = int(fmt.nbytes(node))
    if fmt.kind == "qdq" and fmt.bits == 2 and fmt.activations == "int8" and node.op_type == "MatMul":
        # passes.qdq stores these codes as INT4 (ORT 1.31 rejects INT2 MatMul + int8 activations)
        nbytes += -(-w.size // 4)
    if cfg.cost == "cet":  # second-order estimate instead of a measurement (weight noise only)
        q2 = quadratic_term(ctx.graph, ctx.measure_data, ctx.loss, node.name, delta)
        return Candidate(node.name, fmt.name, nbytes, predicted, None, rel, True, None, second_order=predicted + q2)
    weight_fns = {node.name: constant(torch.as_tensor(qw.dequant, dtype=ctx.graph.dtype, device=ctx.graph.device))}
    input_fns, output_fns = _hooks(formats, node.name, fmt)
    measured, se = ctx.measure(weight_fns, input_fns, output_fns).delta(ctx.base())
    return Candidate(node.name, fmt.name, nbytes, predicted, measured, rel, True, None, se=se)


def build_candidates(ctx: FlowContext, formats: Formats, grads: GradientPass, grads_m: GradientPass
                     ) -> list[Candidate]:
    """Every node in every offered format (:func:`measure_candidate`), in node and offer order. The
    measurements go through ``ctx.executor`` (one process, or shards across workers gathered in this same
    order, so the result does not depend on how many workers measured it)."""
    if ctx.config.quant.cost == "measured":
        ctx.base()
    tasks = [(node, fmt) for node in ctx.nodes for fmt in formats.offers[node.name].formats]
    with ctx.progress.task("measuring candidates", sum(f.kind != "float" for _, f in tasks)) as advance:
        def one(task):
            node, fmt = task
            cand = measure_candidate(ctx, formats, grads, grads_m, node, fmt)
            if fmt.kind != "float":
                advance(1)
            return cand

        return ctx.executor.map(one, tasks)


def classify_all(ctx: FlowContext, cands: list[Candidate]) -> CostTable:
    """Inside/outside the neighbourhood and the cost (with the margin) of every raw candidate."""
    crit = ctx.config.criterion
    base = ctx.base().mean if crit.relative else float("nan")
    return CostTable.from_candidates(classify(replace(c), crit.error_max, base, crit.relative, crit.outside,
                                              crit.margin_z) for c in cands)


def budget_bytes(cfg: QuantConfig, ctx: FlowContext) -> int | None:
    if cfg.budget is not None:
        return int(cfg.budget * ctx.float_bytes())
    if cfg.avg_bits is not None:
        return int(cfg.avg_bits / 8 * sum(ctx.weight_array(n).size for n in ctx.nodes))
    return None


def max_node_cost(ctx: FlowContext) -> float | None:
    """The lossless bound on one node's cost (``criterion.max_node_cost`` × the float calibration loss), or
    None in budget mode; with the fidelity objective (whose float loss is 0) the tolerance bounds it."""
    cfg, crit = ctx.config.quant, ctx.config.criterion
    if not cfg.lossless:
        return None
    if ctx.objective == "fidelity":
        return crit.verdict_tolerance("fidelity")
    return crit.max_node_cost * abs(ctx.calib_fp.loss)


class Solver:
    """The knapsack over one cost table: lossless, byte budget and/or latency budget (see the module doc)."""

    def __init__(self, ctx: FlowContext, table: CostTable, formats: Formats, latency=None):
        self.ctx, self.table, self.formats, self.latency = ctx, table, formats, latency
        self.bound = max_node_cost(ctx)
        crit = ctx.config.criterion
        self.tol = crit.verdict_tolerance("fidelity") if ctx.objective == "fidelity" else 0.0
        self.ladders = {n: sorted(k, key=self.fidelity) for n, k in
                        zip(*table.solver_inputs(1.0, self.bound, self.fidelity)[:2])}

    def fidelity(self, c: Candidate) -> tuple:
        """Order of a ladder: fewest bits first, then the smaller format, float last (back-off moves up)."""
        return (c.reference, format_bits(self.formats.by_level[(c.node, c.level)]), c.nbytes)

    def solve(self, budget: int | None, gain_credit: float, latency_budget: float | None = None) -> dict[str, int]:
        """Ladder index per node: the knapsack under ``budget`` bytes and/or ``latency_budget`` ms of predicted
        latency change, or the smallest plan whose solver cost ≤ the tolerance (lossless)."""
        nodes, kept, costs, sizes = self.table.solver_inputs(gain_credit, self.bound, self.fidelity)
        if budget is None and latency_budget is None:
            costs = [[c - self.tol / len(costs) for c in g] for g in costs]
        try:
            if latency_budget is None:
                pick = knapsack.solve_lossless(costs, sizes) if budget is None else \
                    knapsack.solve_budget(costs, sizes, budget)
            else:
                lat = [[self.latency(n, c.level) for c in k] for n, k in zip(nodes, kept)]
                pick = knapsack.solve_constrained(costs, sizes, lat, byte_budget=budget, latency_budget=latency_budget,
                                                  lossless=budget is None and self.ctx.config.quant.lossless).choice
        except ValueError as exc:
            what = "latency budget" if latency_budget is not None else "lossless solve" if budget is None else \
                "size budget"
            raise LLCError(f"{what}: {exc}") from None
        return {n: self.ladders[n].index(kept[i][j]) for i, (n, j) in enumerate(zip(nodes, pick))}

    def uniform_plans(self, levels: tuple[int, ...]) -> list[tuple[str, dict[str, int]]]:
        """For each quantized level L: every node at its smallest offered format of ≥ L bits."""
        out, seen = [], set()
        for bits in levels:
            if bits == FLOAT:
                continue
            choice = {}
            for n, ladder in self.ladders.items():
                ok = [i for i, c in enumerate(ladder)
                      if c.reference or format_bits(self.formats.by_level[(n, c.level)]) >= bits]
                choice[n] = ok[0] if ok else len(ladder) - 1  # none that wide (float not asked for): its widest
            key = tuple(sorted(choice.items()))
            if all(self.ladders[n][i].reference for n, i in choice.items()):
                continue  # nothing offered at ≥ this level: the float model, which back-off reaches anyway
            if key not in seen:  # a level no node offers gives the same plan as the next one up
                seen.add(key)
                exact = all(format_bits(self.formats.by_level[(n, self.ladders[n][i].level)]) == bits
                            for n, i in choice.items())
                out.append((f"uniform int{bits}" if exact else f"uniform ≥ int{bits}", choice))
        return out

    def frontier(self, gain_credit: float) -> list[dict]:
        """The solver's predicted total cost at 25 byte budgets from the smallest to the largest plan."""
        _, _, costs, sizes = self.table.solver_inputs(gain_credit, self.bound, self.fidelity)
        lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
        return [{"budget_bytes": b, "bytes": size, "predicted": cost} for b, _, cost, size in
                knapsack.pareto_sweep(costs, sizes, sorted({int(x) for x in np.linspace(lo, hi, 25)}))]


def measure_costs(ctx: FlowContext, formats: Formats) -> tuple[GradientPass, list[Candidate]]:
    """Stages 1–2: the gradient pass (with each format's activation-noise prediction) and the raw candidates."""
    act_cands = {}
    for (n, name), f in formats.by_level.items():
        i, _ = _hooks(formats, n, f)
        if i:
            act_cands.setdefault(n, {})[name] = i[n]
    with ctx.timer.stage("gradients"), ctx.progress.task("gradients", len(ctx.calib.batches)) as advance:
        grads, grads_m = ctx.gradients(act_cands, advance)
    with ctx.timer.stage("candidates"):
        cands = build_candidates(ctx, formats, grads, grads_m)
    return grads, cands


_MEASURE_STAGES = ("gradients", "candidates")


def cached_costs(ctx: FlowContext, formats: Formats) -> tuple[GradientPass, list[Candidate], dict]:
    """:func:`measure_costs` through the cache directory: a hit returns the stored raw candidates; a miss
    measures and stores. An unreadable entry is reported (a warning) and recomputed."""
    from . import cost_cache

    with ctx.timer.stage("cache"):
        key = cost_cache.cache_key(ctx, candidate_settings(ctx))
        try:
            hit = cost_cache.load(ctx.config.cache_dir, key, [n.name for n in ctx.nodes])
        except LLCError as exc:
            log.warning("%s; measuring again", exc)
            hit = None
        if hit is not None:
            return hit.grads, hit.candidates, {"entry": hit.path, "hit": True, "seconds": hit.seconds}
    before = sum(ctx.timer.seconds.get(k, 0.0) for k in _MEASURE_STAGES)
    grads, cands = measure_costs(ctx, formats)
    seconds = sum(ctx.timer.seconds.get(k, 0.0) for k in _MEASURE_STAGES) - before
    with ctx.timer.stage("cache"):
        path = cost_cache.save(ctx.config.cache_dir, key, cands, {}, grads, seconds)
    return grads, cands, {"entry": path, "hit": False, "seconds": seconds}


def run(ctx: FlowContext) -> MethodOutcome:
    """Stages 0–3 (module doc): the cost table, the ladders and the plans to measure on validation."""
    cfg, crit = ctx.config.quant, ctx.config.criterion
    formats = offered_formats(ctx)
    cache = None
    if ctx.config.cache_dir:
        grads, cands, cache = cached_costs(ctx, formats)
    else:
        grads, cands = measure_costs(ctx, formats)
    table = classify_all(ctx, cands)
    latency, lat_info = None, None
    if ctx.config.target.latency_budget is not None:
        from .latency import latency_model

        with ctx.timer.stage("latency"):
            latency, lat_info = latency_model(ctx, formats)
    with ctx.timer.stage("solve"):
        solver = Solver(ctx, table, formats, latency)
        budget = budget_bytes(cfg, ctx)
        lat_budget = lat_info["budget_ms"] if lat_info else None
        primary = solver.solve(budget, crit.gain_credit, lat_budget)
        plans = [("solver", primary)]
        if crit.gain_credit > 0:
            plans.append(("solver, gains not credited", solver.solve(budget, 0.0, lat_budget)))
        if lat_budget is None:
            plans += solver.uniform_plans(cfg.levels())
        frontier = solver.frontier(crit.gain_credit)
    ladders = solver.ladders
    memo: dict = {}

    def build(ch: dict[str, int]) -> onnx.ModelProto:
        plans_ = {}
        for n, i in ch.items():
            cand = ladders[n][i]
            fmt = formats.by_level[(n, cand.level)]
            key = (n, cand.level)
            if fmt.kind != "float" and key not in memo:
                node = ctx.node(n)
                qw = quantize_node(ctx.weight_array(node), node, fmt, cfg, grads.nodes[n].grad_w)
                # the passes read codes and scales only: codes in the smallest integer type, no float copy
                memo[key] = replace(qw, q=qw.q.astype(np.int8 if qw.bits <= 8 else np.int16), dequant=None)
            plans_[n] = formats.plan(n, fmt, memo.get(key))
        return ctx.target.rewrite(ctx.model, plans_).model

    sweep = []
    for frac in cfg.sweep:
        try:
            sweep.append((frac, solver.solve(int(frac * ctx.float_bytes()), crit.gain_credit), None))
        except LLCError as exc:  # an infeasible budget is a result of the sweep, not a failure
            sweep.append((frac, None, str(exc)))
    settings = {**candidate_settings(ctx), "budget_bytes": budget,
                "objective": "lossless" if budget is None else "budget", "gain_credit": crit.gain_credit,
                "max_node_cost": solver.bound, "refused": formats.refused(), "latency": lat_info,
                "formats": {n: [f.name for f in o.formats] for n, o in formats.offers.items()}}
    return MethodOutcome("quant", table, ladders, plans, build, budget, settings,
                         plan_costs([ladders[n][i] for n, i in primary.items()], crit.gain_credit), cache=cache,
                         sweep=sweep, frontier=frontier)
