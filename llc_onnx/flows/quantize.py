"""LLC mixed-precision quantization: measure, then offer the plans the validation split chooses between.

Stages (each timed):
  1. gradients   one forward+backward pass over the calibration split (``calib.gradients``), accumulated
                 separately for its fit part and its measure part (``flows.context``);
  2. candidates  every node at every level of ``quant.bits``: quantize with LLC sign-directed rounding from the
                 fit gradient, predict ΔL = Σ g·δ (+ Σ g_x·ε) with the measure gradient, and measure ΔL with
                 only that node quantized on the measure part (``calib.noise``) — out of sample for the rounding;
  3. solve       grouped knapsack over the cost table (``solvers.knapsack``): a byte budget, or lossless (the
                 smallest size whose total cost ≤ 0), with gains discounted and single-node costs bounded
                 (``solvers.cost_model``). The outcome offers the solver's plan, the solver's plan without gain
                 credit, and uniform levels; ``verify.select_plan`` measures them jointly on the validation
                 split and backs off; the QDQ rewrite (``passes.qdq``) builds each plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import onnx
import torch

from ..calib.gradients import GradientPass, collect_ranges
from ..calib.noise import constant
from ..compressible import CompressibleNode
from ..config import QuantConfig
from ..errors import LLCError
from ..passes.qdq import apply_qdq
from ..quant import ActivationQuant, WeightQuantSpec, activation_scale, fake_quant_activation, quantize_weight
from ..solvers import knapsack
from ..solvers.cost_model import Candidate, CostTable, classify, plan_costs
from ..solvers.hessian import quadratic_term
from .context import FlowContext
from .outcome import MethodOutcome

log = logging.getLogger(__name__)

FLOAT = 0  # the "bits" value that means: keep the node in float


def level_name(bits: int) -> str:
    return "float" if bits == FLOAT else f"int{bits}"


def level_bits(level: str) -> int:
    return int(level[3:]) if level.startswith("int") else FLOAT


def spec_of(cfg: QuantConfig, bits: int, rounding: str | None = None) -> WeightQuantSpec:
    block = cfg.block_size if bits <= 4 else None
    return WeightQuantSpec(bits=bits, block_size=block, scale_method=cfg.scale, rounding=rounding or cfg.rounding)


def act_bits(cfg: QuantConfig, bits: int) -> int | None:
    """Activation bits that go with weight ``bits`` under ``--activations``: 16 with 16-bit weights, else 8."""
    if not cfg.activations or bits == FLOAT:
        return None
    return 16 if bits == 16 else 8


def candidate_settings(cfg: QuantConfig) -> dict:
    """The settings a candidate depends on (the cache key); the criterion and the budget only re-classify or
    re-solve the same candidates."""
    return {"bits": sorted(cfg.levels()), "block_size": cfg.block_size, "scale_method": cfg.scale,
            "rounding": cfg.rounding, "llc_radius": cfg.llc_radius, "activations": cfg.activations,
            "cost": cfg.cost}


def quantize_node(w: np.ndarray, node: CompressibleNode, bits: int, cfg: QuantConfig, grad: np.ndarray):
    """Quantize one node's weight at ``bits``; LLC rounding only inside the neighbourhood (nearest rounding's
    relative noise ≤ ``llc_radius``), nearest beyond it (measured out of sample, LLC rounding helps at
    8 bits in 7 of 9 nodes and loses at 4 bits in 7 of 9; see bench/RESULTS.md)."""
    if cfg.rounding != "llc":
        return quantize_weight(w, spec_of(cfg, bits), node.out_axis, node.reduce_axis, grad=grad)
    nearest = quantize_weight(w, spec_of(cfg, bits, "nearest"), node.out_axis, node.reduce_axis)
    rel = float(np.linalg.norm(nearest.dequant.astype(np.float64) - w)) / (float(np.linalg.norm(w)) or 1.0)
    if rel > cfg.llc_radius:
        return nearest
    return quantize_weight(w, spec_of(cfg, bits), node.out_axis, node.reduce_axis, grad=grad)


def _plan(ctx: FlowContext, cfg: QuantConfig, grads: GradientPass, ranges: dict[str, float],
          chosen: dict[str, Candidate], memo: dict | None = None):
    """Weight and activation plans for the QDQ pass from the chosen candidates (re-quantized, deterministic).
    ``memo`` keeps each (node, level)'s codes between plans, which differ in a few nodes each: without it
    every plan re-quantizes the whole model (~5 min a plan on SmolLM2)."""
    weights, acts = {}, {}
    for name, cand in chosen.items():
        bits = level_bits(cand.level)
        if bits == FLOAT:
            continue
        key = (name, cand.level)
        if memo is not None and key in memo:
            weights[name] = memo[key]
        else:
            node = ctx.node(name)
            qw = quantize_node(ctx.weight_array(node), node, bits, cfg, grads.nodes[name].grad_w)
            # the QDQ pass reads codes and scales only: keep codes in the smallest integer type, no float copy
            weights[name] = replace(qw, q=qw.q.astype(np.int8 if bits <= 8 else np.int16), dequant=None)
            if memo is not None:
                memo[key] = weights[name]
        ab = act_bits(cfg, bits)
        if ab is not None:
            acts[name] = ActivationQuant(scale=activation_scale(ranges[name], ab), bits=ab)
    return weights, acts


def build_candidates(ctx: FlowContext, cfg: QuantConfig, grads: GradientPass, grads_m: GradientPass,
                     ranges: dict[str, float]) -> list[Candidate]:
    """Quantize every node at every level (rounding from the fit gradient ``grads``); predicted ΔL from the
    measure-part gradient ``grads_m`` and measured ΔL on the measure part. Raw candidates (not classified)."""
    base_samples = ctx.base() if cfg.cost == "measured" else None
    cands: list[Candidate] = []
    levels = cfg.levels()
    quant_levels = [b for b in levels if b != FLOAT]
    with ctx.progress.task("measuring candidates", len(ctx.nodes) * len(quant_levels)) as advance:
        for node in ctx.nodes:
            w = ctx.weight_array(node)
            stats, stats_m = grads.nodes[node.name], grads_m.nodes[node.name]
            wnorm = float(np.linalg.norm(w)) or 1.0
            if FLOAT in levels:
                cands.append(Candidate(node.name, "float", 4 * w.size, 0.0, 0.0, 0.0, True, 0.0, reference=True))
            for bits in quant_levels:
                qw = quantize_node(w, node, bits, cfg, stats.grad_w)
                delta = qw.dequant.astype(np.float64) - w
                predicted = float((stats_m.grad_w * delta).sum())
                weight_fns = {node.name: constant(torch.as_tensor(qw.dequant, dtype=ctx.graph.dtype,
                                                                  device=ctx.graph.device))}
                input_fns = None
                ab = act_bits(cfg, bits)
                if ab is not None:
                    predicted += stats_m.act_pred.get(ab, 0.0)
                    aq = ActivationQuant(scale=activation_scale(ranges[node.name], ab), bits=ab)
                    input_fns = {node.name: lambda x, aq=aq: fake_quant_activation(x, aq)}
                rel = float(np.linalg.norm(delta)) / wnorm
                nbytes = int(qw.nbytes)
                if bits == 2 and ab == 8 and node.op_type == "MatMul":
                    # passes.qdq stores these codes as INT4 (ORT 1.31 rejects INT2 MatMul + int8 activations)
                    nbytes += -(-w.size // 4)
                if cfg.cost == "cet":  # second-order estimate instead of a measurement (weight noise only)
                    q2 = quadratic_term(ctx.graph, ctx.measure_data, ctx.loss, node.name, delta)
                    cand = Candidate(node.name, level_name(bits), nbytes, predicted, None, rel, True, None,
                                     second_order=predicted + q2)
                else:
                    measured, se = ctx.measure(weight_fns, input_fns).delta(base_samples)
                    cand = Candidate(node.name, level_name(bits), nbytes, predicted, measured, rel, True,
                                     None, se=se)
                cands.append(cand)
                advance(1)
    return cands


def classify_all(ctx: FlowContext, cands: list[Candidate]) -> CostTable:
    """Inside/outside the neighbourhood and the cost (with the margin) of every raw candidate."""
    crit = ctx.config.criterion
    base = ctx.base().mean if crit.relative else float("nan")
    return CostTable.from_candidates(classify(replace(c), crit.error_max, base, crit.relative, crit.outside,
                                              crit.margin_z) for c in cands)


def _fidelity(c: Candidate) -> tuple:
    """Order of a quantization ladder: fewest bits first, float last (back-off moves up this order)."""
    return (c.reference, level_bits(c.level))


def budget_bytes(cfg: QuantConfig, ctx: FlowContext) -> int | None:
    if cfg.budget is not None:
        return int(cfg.budget * ctx.float_bytes())
    if cfg.avg_bits is not None:
        return int(cfg.avg_bits / 8 * sum(ctx.weight_array(n).size for n in ctx.nodes))
    return None


def max_node_cost(ctx: FlowContext) -> float | None:
    """The lossless bound on one node's cost (``criterion.max_node_cost`` × the float calibration loss), or
    None in budget mode or with the fidelity objective (where the float loss is 0: the tolerance bounds it)."""
    cfg, crit = ctx.config.quant, ctx.config.criterion
    if not cfg.lossless:
        return None
    if ctx.objective == "fidelity":
        return crit.verdict_tolerance("fidelity")
    return crit.max_node_cost * abs(ctx.calib_fp.loss)


def solve(table: CostTable, budget: int | None, gain_credit: float, bound: float | None,
          tolerance: float = 0.0) -> dict[str, Candidate]:
    """The candidate per node: knapsack under ``budget`` bytes, or the smallest plan whose solver cost ≤
    ``tolerance`` (0 for the task objective) when ``budget`` is None."""
    nodes, kept, costs, sizes = table.solver_inputs(gain_credit, bound, _fidelity)
    try:
        if budget is None:
            pick = knapsack.solve_lossless([[c - tolerance / len(costs) for c in g] for g in costs], sizes)
        else:
            pick = knapsack.solve_budget(costs, sizes, budget)
    except ValueError as exc:
        raise LLCError(f"{'lossless solve' if budget is None else 'size budget'}: {exc}") from None
    return {n: kept[i][j] for i, (n, j) in enumerate(zip(nodes, pick))}


def ladders_of(table: CostTable, bound: float | None) -> dict[str, list[Candidate]]:
    """Each node's offered candidates (any gain credit: it only changes costs) in fidelity order."""
    nodes, kept, _, _ = table.solver_inputs(1.0, bound, _fidelity)
    return {n: sorted(k, key=_fidelity) for n, k in zip(nodes, kept)}


def uniform_plans(ladders: dict[str, list[Candidate]], levels: tuple[int, ...]) -> list[tuple[str, dict[str, int]]]:
    """For each quantized level L: every node at L, or at its next offered level above L."""
    out, seen = [], set()
    for bits in levels:
        if bits == FLOAT:
            continue
        choice = {}
        for n, ladder in ladders.items():
            ok = [i for i, c in enumerate(ladder) if c.reference or level_bits(c.level) >= bits]
            choice[n] = ok[0]
        key = tuple(sorted(choice.items()))
        if key not in seen:  # a level no node offers gives the same plan as the next one up
            seen.add(key)
            out.append((f"uniform {level_name(bits)}" if all(level_bits(ladders[n][i].level) == bits
                                                             for n, i in choice.items())
                        else f"uniform ≥ {level_name(bits)}", choice))
    return out


def measure_costs(ctx: FlowContext, cfg: QuantConfig) -> tuple[GradientPass, dict[str, float], list[Candidate]]:
    """Stages 1–2: activation ranges (with ``--activations``), the gradient pass and the raw candidates."""
    ranges: dict[str, float] = {}
    act_cands = {}
    if cfg.activations:
        with ctx.timer.stage("ranges"), ctx.progress.task("activation ranges", len(ctx.calib.batches)) as advance:
            ranges = collect_ranges(ctx.graph, ctx.calib, ctx.nodes, advance)
        for node in ctx.nodes:
            act_cands[node.name] = {}
            for ab in {act_bits(cfg, b) for b in cfg.levels()} - {None}:
                aq = ActivationQuant(scale=activation_scale(ranges[node.name], ab), bits=ab)
                act_cands[node.name][ab] = lambda x, aq=aq: fake_quant_activation(x, aq)
    with ctx.timer.stage("gradients"), ctx.progress.task("gradients", len(ctx.calib.batches)) as advance:
        grads, grads_m = ctx.gradients(act_cands, advance)
    with ctx.timer.stage("candidates"):
        cands = build_candidates(ctx, cfg, grads, grads_m, ranges)
    return grads, ranges, cands


_MEASURE_STAGES = ("ranges", "gradients", "candidates")


def cached_costs(ctx: FlowContext, cfg: QuantConfig) -> tuple[GradientPass, dict[str, float], list[Candidate], dict]:
    """:func:`measure_costs` through the cache directory: a hit returns the stored raw candidates; a miss
    measures and stores. An unreadable entry is reported (a warning) and recomputed."""
    from . import cost_cache

    with ctx.timer.stage("cache"):
        key = cost_cache.cache_key(ctx, candidate_settings(cfg))
        try:
            hit = cost_cache.load(ctx.config.cache_dir, key, [n.name for n in ctx.nodes])
        except LLCError as exc:
            log.warning("%s; measuring again", exc)
            hit = None
        if hit is not None:
            return hit.grads, hit.ranges, hit.candidates, {"entry": hit.path, "hit": True, "seconds": hit.seconds}
    before = sum(ctx.timer.seconds.get(k, 0.0) for k in _MEASURE_STAGES)
    grads, ranges, cands = measure_costs(ctx, cfg)
    seconds = sum(ctx.timer.seconds.get(k, 0.0) for k in _MEASURE_STAGES) - before
    with ctx.timer.stage("cache"):
        path = cost_cache.save(ctx.config.cache_dir, key, cands, ranges, grads, seconds)
    return grads, ranges, cands, {"entry": path, "hit": False, "seconds": seconds}


def run(ctx: FlowContext) -> MethodOutcome:
    """Stages 1–3 (module doc): the cost table, the ladders and the plans to measure on validation."""
    cfg, crit = ctx.config.quant, ctx.config.criterion
    cache = None
    if ctx.config.cache_dir:
        grads, ranges, cands, cache = cached_costs(ctx, cfg)
    else:
        grads, ranges, cands = measure_costs(ctx, cfg)
    table = classify_all(ctx, cands)
    with ctx.timer.stage("solve"):
        budget = budget_bytes(cfg, ctx)
        bound = max_node_cost(ctx)
        tol = crit.verdict_tolerance(ctx.objective) if ctx.objective == "fidelity" else 0.0
        picked = solve(table, budget, crit.gain_credit, bound, tol)
        ladders = ladders_of(table, bound)
        solver = {n: ladders[n].index(c) for n, c in picked.items()}
        plans = [("solver", solver)]
        if crit.gain_credit > 0:
            strict = solve(table, budget, 0.0, bound, tol)
            plans.append(("solver, gains not credited", {n: ladders[n].index(c) for n, c in strict.items()}))
        plans += uniform_plans(ladders, cfg.levels())
    memo: dict = {}

    def build(ch: dict[str, int]) -> onnx.ModelProto:
        weights, acts = _plan(ctx, cfg, grads, ranges, {n: ladders[n][i] for n, i in ch.items()}, memo)
        return apply_qdq(ctx.model, weights, acts)

    sweep = []
    for frac in cfg.sweep:
        try:
            p = solve(table, int(frac * ctx.float_bytes()), crit.gain_credit, bound)
            sweep.append((frac, {n: ladders[n].index(c) for n, c in p.items()}, None))
        except LLCError as exc:  # an infeasible budget is a result of the sweep, not a failure
            sweep.append((frac, None, str(exc)))
    frontier = []
    nodes_, kept_, costs_, sizes_ = table.solver_inputs(crit.gain_credit, bound, _fidelity)
    lo, hi = sum(min(s) for s in sizes_), sum(max(s) for s in sizes_)
    for b, _, cost, size in knapsack.pareto_sweep(costs_, sizes_, sorted({int(x) for x in np.linspace(lo, hi, 25)})):
        frontier.append({"budget_bytes": b, "bytes": size, "predicted": cost})
    settings = {**candidate_settings(cfg), "budget_bytes": budget,
                "objective": "lossless" if budget is None else "budget", "gain_credit": crit.gain_credit,
                "max_node_cost": bound}
    return MethodOutcome("quant", table, ladders, plans, build, budget, settings,
                         plan_costs([ladders[n][i] for n, i in solver.items()], crit.gain_credit), cache=cache,
                         sweep=sweep, frontier=frontier)
