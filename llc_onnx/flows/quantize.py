"""LLC mixed-precision quantization: measure, decide one bit-width per node, rewrite, verify.

Stages (each timed):
  1. gradients   one forward+backward pass over the calibration split (``calib.gradients``), accumulated
                 separately for its fit part and its measure part (``flows.context``);
  2. candidates  every node at every level of ``bits``: quantize with LLC sign-directed rounding from the fit
                 gradient, predict ΔL = Σ g·δ (+ Σ g_x·ε) with the measure gradient, and measure ΔL with only
                 that node quantized on the measure part (``calib.noise``) — out of sample for the rounding;
  3. solve       grouped knapsack over the cost table (``solvers.knapsack``): a byte budget, or ``lossless``
                 (the smallest size whose predicted total ΔL ≤ 0);
  4. verify      QDQ rewrite (``passes.qdq``), held-out loss in ONNX Runtime, back-off (``verify``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch

from ..calib.gradients import GradientPass, collect_ranges
from ..calib.noise import constant
from ..compressible import CompressibleNode
from ..errors import LLCError
from ..passes.qdq import apply_qdq
from ..progress import task
from ..report import print_line
from ..quant import ActivationQuant, WeightQuantSpec, activation_scale, fake_quant_activation, quantize_weight
from ..solvers import knapsack
from ..solvers.hessian import quadratic_term
from ..solvers.cost_model import Candidate, CostTable, classify
from ..verify import VerifiedResult, verify_with_backoff
from .context import FlowContext

FLOAT = 0  # the "bits" value that means: keep the node in float


def level_name(bits: int) -> str:
    return "float" if bits == FLOAT else f"int{bits}"


@dataclass
class QuantConfig:
    bits: tuple[int, ...] = (2, 4, 8, 16, FLOAT)
    block_size: int = 32  # blocked quantization along the reduction axis for ≤ 4 bits
    scale_method: str = "mse"
    rounding: str = "llc"
    llc_radius: float = 0.05  # LLC rounding only where nearest rounding's ‖δ‖/‖W‖ ≤ this (the neighbourhood)
    activations: bool = False  # also quantize node inputs (8-bit, 16-bit with 16-bit weights)
    error_max: float = 1e-4
    relative: bool = False
    outside: str = "measured"
    cost: str = "measured"  # "measured" (loss with the node quantized) or "cet" (g·δ + ½δᵀHδ, no measurement)
    margin_z: float = 1.0  # cost margin in standard errors of the measured ΔL (0 = the papers' plain rule)
    budget: float | None = None  # fraction of the float weight bytes
    avg_bits: float | None = None
    tolerance: float = 0.0
    max_rounds: int = 8
    sweep: tuple[float, ...] = ()
    cache_dir: str | None = None  # reuse gradients + candidates across runs (``flows.cost_cache``)

    def candidate_settings(self) -> dict:
        """The settings a candidate depends on (the cache key); error_max, margin_z, outside and the budget
        only re-classify or re-solve the same candidates."""
        return {"bits": sorted(self.bits), "block_size": self.block_size, "scale_method": self.scale_method,
                "rounding": self.rounding, "llc_radius": self.llc_radius, "activations": self.activations,
                "cost": self.cost}

    def spec(self, bits: int, rounding: str | None = None) -> WeightQuantSpec:
        block = self.block_size if bits <= 4 else None
        return WeightQuantSpec(bits=bits, block_size=block, scale_method=self.scale_method,
                               rounding=rounding or self.rounding)

    def act_bits(self, bits: int) -> int | None:
        if not self.activations or bits == FLOAT:
            return None
        return 16 if bits == 16 else 8


@dataclass
class QuantResult:
    """The cost table, each node's ladder and the verified plan (``result.choice``; round 0 of
    ``result.rounds`` is the solver's plan before back-off)."""

    table: CostTable
    ladders: dict[str, list[Candidate]]
    result: VerifiedResult
    budget_bytes: int | None
    sweep: list[dict] = field(default_factory=list)
    cache: dict | None = None  # {"entry": path, "hit": bool, "seconds": measurement seconds} with --cache


def quantize_node(w: np.ndarray, node: CompressibleNode, bits: int, cfg: QuantConfig, grad: np.ndarray):
    """Quantize one weight at ``bits``. With ``rounding="llc"`` the sign-directed rounding is used only where
    the level stays in the first-order neighbourhood — nearest rounding's relative noise ‖δ‖/‖W‖ ≤
    ``llc_radius`` — and nearest rounding elsewhere: outside it the extra flips cost more through the
    curvature than they save in Σ g·δ (measured out of sample on the Fashion-MNIST CNN: LLC beats nearest at
    8 bits in 7 of 9 nodes and loses at 4 bits in 7 of 9; see bench/RESULTS.md)."""
    if cfg.rounding != "llc":
        return quantize_weight(w, cfg.spec(bits), node.out_axis, node.reduce_axis, grad=grad)
    nearest = quantize_weight(w, cfg.spec(bits, "nearest"), node.out_axis, node.reduce_axis)
    rel = float(np.linalg.norm(nearest.dequant.astype(np.float64) - w)) / (float(np.linalg.norm(w)) or 1.0)
    if rel > cfg.llc_radius:
        return nearest
    return quantize_weight(w, cfg.spec(bits), node.out_axis, node.reduce_axis, grad=grad)


def _plan(ctx: FlowContext, cfg: QuantConfig, grads: GradientPass, ranges: dict[str, float],
          chosen: dict[str, Candidate], memo: dict | None = None):
    """Weight and activation plans for the QDQ pass from the chosen candidates (re-quantized, deterministic).
    ``memo`` keeps each (node, level)'s codes between back-off rounds, which change a few nodes each: without
    it every round re-quantizes the whole model (~5 min a round on SmolLM2)."""
    weights, acts = {}, {}
    for name, cand in chosen.items():
        bits = int(cand.level[3:]) if cand.level.startswith("int") else FLOAT
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
        ab = cfg.act_bits(bits)
        if ab is not None:
            acts[name] = ActivationQuant(scale=activation_scale(ranges[name], ab), bits=ab)
    return weights, acts


def build_candidates(ctx: FlowContext, cfg: QuantConfig, grads: GradientPass, grads_m: GradientPass,
                     ranges: dict[str, float]) -> CostTable:
    """Quantize every node at every level (rounding from the fit gradient ``grads``); predicted ΔL from the
    measure-part gradient ``grads_m`` and measured ΔL on the measure part; neighbourhood check."""
    if cfg.cost not in ("measured", "cet"):
        raise LLCError(f"--cost must be 'measured' or 'cet', not {cfg.cost!r}")
    base_samples = ctx.base() if cfg.cost == "measured" else None
    base = ctx.base().mean if cfg.relative or cfg.cost == "measured" else float("nan")
    cands: list[Candidate] = []
    levels = sorted(set(cfg.bits), key=lambda b: (b == FLOAT, b))
    quant_levels = [b for b in levels if b != FLOAT]
    with task("measuring candidates", len(ctx.nodes) * len(quant_levels)) as advance:
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
                weight_fns = {node.name: constant(torch.as_tensor(qw.dequant, dtype=ctx.graph.dtype))}
                input_fns = None
                ab = cfg.act_bits(bits)
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
                cands.append(classify(cand, cfg.error_max, base, cfg.relative, cfg.outside, cfg.margin_z))
                advance(1)
    return CostTable.from_candidates(cands)


def _budget_bytes(cfg: QuantConfig, ctx: FlowContext, table: CostTable) -> int | None:
    if cfg.budget is not None:
        return int(cfg.budget * ctx.float_bytes())
    if cfg.avg_bits is not None:
        return int(cfg.avg_bits / 8 * sum(ctx.weight_array(n).size for n in ctx.nodes))
    return None


def _fidelity(c: Candidate) -> tuple:
    """Order of a quantization ladder: fewest bits first, float last (back-off moves up this order)."""
    return (c.reference, int(c.level[3:]) if c.level.startswith("int") else 0)


def ladders_of(table: CostTable) -> dict[str, list[Candidate]]:
    """Each node's kept candidates in fidelity order."""
    _, kept, _, _ = table.solver_inputs()
    return {n: sorted(k, key=_fidelity) for n, k in zip(table.groups, kept)}


def solve(table: CostTable, budget: int | None) -> dict[str, Candidate]:
    """The candidate per node: knapsack under ``budget`` bytes, or lossless (smallest size with Σ cost ≤ 0)
    when ``budget`` is None."""
    nodes, kept, costs, sizes = table.solver_inputs()
    try:
        pick = knapsack.solve_lossless(costs, sizes) if budget is None else knapsack.solve_budget(costs, sizes, budget)
    except ValueError as exc:
        raise LLCError(f"{'lossless solve' if budget is None else 'size budget'}: {exc}") from None
    return {n: kept[i][j] for i, (n, j) in enumerate(zip(nodes, pick))}


def measure_costs(ctx: FlowContext, cfg: QuantConfig) -> tuple[GradientPass, dict[str, float], CostTable]:
    """Stages 1–2: activation ranges (with ``--activations``), the gradient pass and the cost table."""
    ranges: dict[str, float] = {}
    act_cands = {}
    if cfg.activations:
        with ctx.timer.stage("ranges"), task("activation ranges", len(ctx.calib.batches)) as advance:
            ranges = collect_ranges(ctx.graph, ctx.calib, ctx.nodes, advance)
        for node in ctx.nodes:
            act_cands[node.name] = {}
            for ab in {cfg.act_bits(b) for b in cfg.bits} - {None}:
                aq = ActivationQuant(scale=activation_scale(ranges[node.name], ab), bits=ab)
                act_cands[node.name][ab] = lambda x, aq=aq: fake_quant_activation(x, aq)
    with ctx.timer.stage("gradients"), task("gradients", len(ctx.calib.batches)) as advance:
        grads, grads_m = ctx.gradients(act_cands, advance)
    with ctx.timer.stage("candidates"):
        table = build_candidates(ctx, cfg, grads, grads_m, ranges)
    return grads, ranges, table


_MEASURE_STAGES = ("ranges", "gradients", "candidates")


def cached_costs(ctx: FlowContext, cfg: QuantConfig) -> tuple[GradientPass, dict[str, float], CostTable, dict]:
    """:func:`measure_costs` through the ``--cache`` directory: a hit re-classifies the stored candidates with
    the current criterion settings; a miss measures and stores. An unreadable entry is reported and
    recomputed."""
    from . import cost_cache

    with ctx.timer.stage("cache"):
        key = cost_cache.cache_key(ctx, cfg.candidate_settings())
        try:
            hit = cost_cache.load(cfg.cache_dir, key, [n.name for n in ctx.nodes])
        except LLCError as exc:
            print_line(f"warning: {exc}; measuring again", file=sys.stderr, style="yellow")
            hit = None
        if hit is not None:
            base = ctx.base().mean if cfg.relative else float("nan")
            cands = [classify(c, cfg.error_max, base, cfg.relative, cfg.outside, cfg.margin_z)
                     for c in hit.candidates]
            return hit.grads, hit.ranges, CostTable.from_candidates(cands), \
                {"entry": hit.path, "hit": True, "seconds": hit.seconds}
    before = sum(ctx.timer.seconds.get(k, 0.0) for k in _MEASURE_STAGES)
    grads, ranges, table = measure_costs(ctx, cfg)
    seconds = sum(ctx.timer.seconds.get(k, 0.0) for k in _MEASURE_STAGES) - before
    with ctx.timer.stage("cache"):
        path = cost_cache.save(cfg.cache_dir, key, [c for g in table.groups.values() for c in g], ranges, grads,
                               seconds)
    return grads, ranges, table, {"entry": path, "hit": False, "seconds": seconds}


def run(ctx: FlowContext, cfg: QuantConfig) -> QuantResult:
    cache = None
    if cfg.cache_dir:
        grads, ranges, table, cache = cached_costs(ctx, cfg)
    else:
        grads, ranges, table = measure_costs(ctx, cfg)
    with ctx.timer.stage("solve"):
        budget = _budget_bytes(cfg, ctx, table)
        picked = solve(table, budget)
    ladders = ladders_of(table)
    choice = {n: ladders[n].index(c) for n, c in picked.items()}

    memo: dict = {}

    def build(ch: dict[str, int]) -> onnx.ModelProto:
        weights, acts = _plan(ctx, cfg, grads, ranges, {n: ladders[n][i] for n, i in ch.items()}, memo)
        return apply_qdq(ctx.model, weights, acts)

    with ctx.timer.stage("verify"), task("verifying on held-out", cfg.max_rounds + 1) as advance:
        result = verify_with_backoff(build, ladders, choice, ctx.held, ctx.loss, ctx.held_fp, cfg.tolerance,
                                     cfg.max_rounds, advance, max_bytes=budget)
    sweep = []
    if cfg.sweep:
        with ctx.timer.stage("sweep"), task("sweep", len(cfg.sweep)) as advance:
            for frac in cfg.sweep:
                try:
                    picked = solve(table, int(frac * ctx.float_bytes()))
                except LLCError as exc:  # an infeasible budget is a result of the sweep, not a failure
                    sweep.append({"budget": frac, "bytes": None, "held_loss": None, "held_metrics": {},
                                  "note": str(exc)})
                    advance(1)
                    continue
                ch = {n: ladders[n].index(c) for n, c in picked.items()}
                sweep.append(ctx.sweep_point(frac, build(ch), sum(c.nbytes for c in picked.values())))
                advance(1)
    return QuantResult(table, ladders, result, budget, sweep, cache)
