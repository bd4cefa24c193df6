"""LLC mixed-precision quantization for a deployment target: measure every format the target runs fast, then
offer the plans the validation split chooses between.

Stages (each timed):
  0. formats     the target (``llc_onnx.targets``) maps the requested levels (``quant.bits``) of each node to
                 the formats it executes fast (e.g. ORT CPU: MatMulNBits 2/4/8-bit, W8A8 Q/DQ), and says why
                 the others are not offered; with the ``series`` family (``--method series`` or
                 ``quant,series``) also the series formats (T b-bit basis terms, ``flows.series``: one
                 expansion per node and bit-width, nearest rounding), which join the same cost table and
                 knapsack; activation ranges are calibrated where a format quantizes activations
                 (``calib.activation_ranges``: min-max, percentile or entropy);
  1. gradients   one forward+backward pass over the calibration split (``calib.gradients``), accumulated
                 separately for its fit part and its measure part (``flows.context``), with the first-order
                 prediction Σ g_x·ε of each format's activation quantizer;
  2. candidates  every node in every offered format: quantize with LLC sign-directed rounding from the fit
                 gradient (inside the neighbourhood), predict ΔL = Σ g·δ (+ Σ g_x·ε) with the measure
                 gradient, and measure ΔL on the measure part with the node as the target computes it — the
                 weight, and the input / output quantizers the written node applies (``targets.base``
                 hooks) — out of sample for the rounding; outside the neighbourhood each rounding of
                 ``quant.auto_roundings`` on at most ``quant.rounding_probe`` nodes per level, the level's
                 choice on the others (``flows.roundings``);
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
import math
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import torch

from ..calib.activation_ranges import collect_activation_ranges, qparams
from ..calib.gradients import GradientPass, collect_ranges
from ..calib.noise import constant
from ..compressible import CompressibleNode
from ..config import QuantConfig
from ..errors import LLCError
from ..quant import ActivationQuant, activation_scale
from ..solvers import knapsack
from ..solvers.cost_model import Candidate, CostTable, classify
from ..targets.base import Format, NodePlan, input_hook, output_hook
from ..memory import Spill, drop, drop_mapped_pages, release
from .context import SPILL_BYTES, FlowContext
from .outcome import MethodOutcome
from .roundings import CET_MODEL_VERSION, Rounder, after_probes, choose_per_level, probe_split

log = logging.getLogger(__name__)

FLOAT = 0  # the "bits" value that means: keep the node in float


def format_bits(fmt: Format) -> int:
    """Bits per stored weight code of a format (0 for float)."""
    return FLOAT if fmt.kind == "float" else int(fmt.bits)


def families(ctx: FlowContext) -> tuple[str, ...]:
    """The format families this stage offers: ``quant`` and/or ``series`` (``config.method``)."""
    return tuple(m for m in ctx.config.method if m in ("quant", "series")) or ("quant",)


def candidate_settings(ctx: FlowContext) -> dict:
    """The settings a candidate depends on (the cache key); the criterion and the budget only re-classify or
    re-solve the same candidates."""
    cfg, t = ctx.config.quant, ctx.config.target
    out = {"bits": sorted(cfg.levels()), "block_size": cfg.block_size, "scale_method": cfg.scale,
            "rounding": cfg.rounding, "auto_roundings": list(cfg.auto_roundings), "llc_radius": cfg.llc_radius,
            "gptq": [cfg.gptq_act_order, cfg.gptq_damp],
            "cet": [CET_MODEL_VERSION, cfg.cet_curvature, cfg.cet_k, cfg.cet_samples, cfg.cet_steps, cfg.compare_cet],
            "activations": cfg.activations, "cost": cfg.cost, "target": t.name, "calibration": t.calibration,
            "percentile": t.percentile, "plugins": t.plugins}
    if cfg.rounding == "auto" and len(cfg.auto_roundings) > 1 and 0 < cfg.rounding_probe < len(ctx.nodes):
        out["rounding_probe"] = cfg.rounding_probe  # only where it can change the candidates: other keys stay
    if t.w8a8_codes != 7:  # only then, so that the keys of runs with the default codes stay as they were
        out["w8a8_codes"] = t.w8a8_codes
    acts = getattr(ctx.target, "w8a8_activations", "static")
    if acts != "static":  # only then, so that the keys of runs without dynamic W8A8 stay as they were
        out["w8a8_activations"] = acts
    if "series" in families(ctx):  # only then, so that quantization-only cache keys stay as they were
        sc = ctx.config.series
        out.update(families=list(families(ctx)), series={"bits": list(sc.bits), "terms": list(sc.terms),
                                                          "block_size": sc.block_size, "form": sc.form})
    return out


@dataclass
class Formats:
    """The offered formats of every node and what their activation quantizers need."""

    by_level: dict[tuple[str, str], Format]  # (node, format name) -> format
    offers: dict  # node -> targets.Offer
    acts: dict[tuple[str, str], tuple]  # (node, format name) -> (input params, output params)
    expansions: dict = field(default_factory=dict)  # series: one expansion per (weight, bits, block)

    def plan(self, node: str, fmt: Format, weight=None) -> NodePlan:
        inp, out = self.acts.get((node, fmt.name), (None, None))
        return NodePlan(format=fmt, weight=weight, input=inp, output=out)

    def refused(self) -> list[dict]:
        return [{"node": n, "level": lv, "reason": why} for n, o in self.offers.items() for lv, why in o.refused]


def offered_formats(ctx: FlowContext) -> Formats:
    """Stage 0: the target's offer for every node, and the activation parameters of the formats that need them
    (calibrated on the calibration split)."""
    cfg, tcfg = ctx.config.quant, ctx.config.target
    fams = families(ctx)
    offers = ctx.target.offers(ctx.model, ctx.nodes, levels=cfg.bits, block_size=cfg.block_size) \
        if "quant" in fams else {}
    if "series" in fams:
        from ..targets.base import Offer

        sc = ctx.config.series
        more = ctx.target.series_offers(ctx.model, ctx.nodes, bits=sc.bits, terms=sc.terms, block_size=sc.block_size)
        offers = {n: Offer(n, tuple(dict.fromkeys((*offers[n].formats, *o.formats))) if n in offers else o.formats,
                           (*offers[n].refused, *o.refused) if n in offers else o.refused) for n, o in more.items()}
    if FLOAT not in cfg.levels() and "quant" in fams:  # float not asked for: keep it only where nothing else is
        from ..targets.base import Offer

        offers = {n: o if len(o.formats) == 1 else
                  Offer(n, tuple(f for f in o.formats if f.kind != "float"), o.refused) for n, o in offers.items()}
    by_level = {(n, f.name): f for n, o in offers.items() for f in o.formats}
    acts: dict = {}
    w8 = [(n, f) for (n, _), f in by_level.items() if f.kind == "w8a8" and not f.dynamic]
    if w8:
        need = dict(zip([(n, f.name) for n, f in w8], ctx.target.tensors_to_calibrate_all(ctx.model, w8)))
        tensors = sorted({t for pair in need.values() for t in pair if t})
        with ctx.timer.stage("ranges"):
            ranges = collect_activation_ranges(ctx.graph, ctx.calib, tensors, method=tcfg.calibration,
                                               percentile=tcfg.percentile, symmetric=True,
                                               observed=[i.name for i in ctx.model.graph.input])
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


def stored_weight(ctx: FlowContext, formats: Formats, rounder: Rounder, w: np.ndarray, node: CompressibleNode,
                  fmt: Format, rounding: str):
    """(weight, info): what ``fmt`` stores for ``node`` — ``rounder.quantize``'s QuantizedWeight, or for a series
    format the SeriesWeight of its T nearest-rounded terms (``flows.series.expansion``: one expansion per node
    and bit-width, truncated)."""
    if fmt.kind == "series":
        from .series import expansion

        return expansion(w, node, fmt, scale_method=ctx.config.quant.scale, max_terms=max(ctx.config.series.terms),
                         memo=formats.expansions), {}
    return rounder.quantize(w, node, fmt, rounding)


def measure_candidate(ctx: FlowContext, formats: Formats, rounder: Rounder, grads_m: GradientPass,
                      node: CompressibleNode, fmt: Format, rounding: str) -> Candidate:
    """One raw candidate: ``node`` quantized in ``fmt`` with ``rounding`` (``flows.roundings``; chosen from the
    fit part), its predicted ΔL from the measure-part gradient ``grads_m`` (first order, and with ``--cost cet``
    the CET second-order estimate instead of a measurement) and its measured ΔL on the measure part."""
    cfg = ctx.config.quant
    w = ctx.weight_array(node)
    if fmt.kind == "float":
        return Candidate(node.name, fmt.name, fmt.nbytes(node), 0.0, 0.0, 0.0, True, 0.0, reference=True)
    stats_m = grads_m.nodes[node.name]
    from .series import values

    qw, info = stored_weight(ctx, formats, rounder, w, node, fmt, rounding)
    dequant = values(qw)
    g_delta, delta_sq = _delta_sums(stats_m.grad_w, dequant, w)
    predicted = g_delta + stats_m.act_pred.get(fmt.name, 0.0)
    rel = float(np.sqrt(delta_sq)) / (float(np.linalg.norm(w)) or 1.0)
    nbytes = int(fmt.nbytes(node))
    if fmt.kind == "qdq" and fmt.bits == 2 and fmt.activations == "int8" and node.op_type == "MatMul":
        # passes.qdq stores these codes as INT4 (ORT 1.31 rejects INT2 MatMul + int8 activations)
        nbytes += -(-w.size // 4)
    def cet_estimate() -> float:  # from the cached eigenpairs: no pass over data per candidate
        from ..solvers.cet import cet_predict

        curv = rounder.prediction_curvature()[node.name]
        delta = dequant.astype(np.float64) - w
        return float(cet_predict(curv, delta, grad=stats_m.grad_w).total[0]) + stats_m.act_pred.get(fmt.name, 0.0)

    if cfg.cost == "cet":
        return Candidate(node.name, fmt.name, nbytes, predicted, None, rel, True, None, second_order=cet_estimate(),
                         rounding=rounding, info=info)
    weight_fns = {node.name: constant(torch.as_tensor(dequant, dtype=ctx.graph.dtype, device=ctx.graph.device))}
    input_fns, output_fns = _hooks(formats, node.name, fmt)
    measured, se = ctx.measure(weight_fns, input_fns, output_fns).delta(ctx.base())
    # --compare-cet: reported and plotted next to the measurement; the measurement decides
    second = cet_estimate() if cfg.compare_cet else None
    return Candidate(node.name, fmt.name, nbytes, predicted, measured, rel, True, None, se=se, rounding=rounding,
                     info=info, second_order=second)


#: elements per chunk of :func:`_delta_sums` (bounds its float64 temporaries to a few MB)
DELTA_CHUNK = 1 << 19


def _delta_sums(grad: np.ndarray, dequant: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(Σ g·δ, Σ δ²) of the weight error δ = dequant − w (float64), over fixed chunks of the flattened arrays: a
    large node (SmolLM2's lm_head: 28 M weights) then needs no weight-sized float64 copies of δ and g·δ. The
    chunks depend on the size only, so the sums are the same on every run."""
    g, q, x = grad.reshape(-1), dequant.reshape(-1), w.reshape(-1)
    g_delta = delta_sq = 0.0
    for i in range(0, x.size, DELTA_CHUNK):
        d = q[i:i + DELTA_CHUNK].astype(np.float64) - x[i:i + DELTA_CHUNK]
        g_delta += float((g[i:i + DELTA_CHUNK] * d).sum())  # numpy's pairwise sums, not BLAS: the same
        delta_sq += float((d * d).sum())                    # result whatever the thread count
    return g_delta, delta_sq


def build_candidates(ctx: FlowContext, formats: Formats, rounder: Rounder, grads_m: GradientPass
                     ) -> list[Candidate]:
    """Every node in every offered format with every rounding ``rounder.choices`` names
    (:func:`measure_candidate`), in node, offer and rounding order — except that with probing
    (``flows.roundings.probe_split``) the probes are measured first, each level's rounding is chosen from them
    (``choose_per_level``), and the level's other nodes are measured in that rounding only. The measurements go
    through ``ctx.executor`` (one process, or shards across workers gathered in this same order, so the result
    does not depend on how many workers measured it)."""
    chosen = _rounding_choices(ctx, formats, rounder)
    tasks = []
    for node in ctx.nodes:
        for fmt in formats.offers[node.name].formats:
            for rounding in ([""] if fmt.kind == "float" else ["nearest"] if fmt.kind == "series" else
                             chosen[(node.name, fmt.name)]):
                tasks.append((node, fmt, rounding))
    if any(r == "gptq" for _, _, r in tasks):
        rounder.grams()  # its forward passes before the snapshots of the unmodified run are held (SmolLM2: 0.9 GB)
    if ctx.config.quant.cost == "measured":
        ctx.base()
    probe, rest = probe_split(tasks, ctx.config.quant.rounding_probe)
    if not rest:
        return _measure_tasks(ctx, formats, rounder, grads_m, tasks, "measuring candidates")
    got = dict(zip(probe, _measure_tasks(ctx, formats, rounder, grads_m, [tasks[i] for i in probe],
                                         "measuring candidates (rounding probes)", later=[tasks[i] for i in rest])))
    _, per_level = choose_per_level(list(got.values()), ctx.config.quant.auto_roundings)
    keep = after_probes(tasks, rest, {lv: info["chosen"] for lv, info in per_level.items()})
    got.update(zip(keep, _measure_tasks(ctx, formats, rounder, grads_m, [tasks[i] for i in keep],
                                        "measuring candidates")))
    return [got[i] for i in sorted(got)]


def _rounding_choices(ctx: FlowContext, formats: Formats, rounder: Rounder) -> dict[tuple[str, str], list[str]]:
    """(node, format) → the roundings measured there (``Rounder.choices``: whether nearest rounding is inside the
    neighbourhood, an MSE scale search where min-max rounding does not already decide it), for every quantized
    format, through ``ctx.executor``: with several workers each decides its share (the answers are the same)."""
    pairs = [(i, j) for i, node in enumerate(ctx.nodes) for j, fmt in enumerate(formats.offers[node.name].formats)
             if fmt.kind not in ("float", "series")]

    with ctx.progress.task("rounding choices", len(pairs)) as advance:
        def one(pair):
            node = ctx.nodes[pair[0]]
            out = rounder.choices(ctx.weight_array(node), node, formats.offers[node.name].formats[pair[1]])
            advance(1)
            return out

        got = ctx.executor.map(one, pairs)
    return {(ctx.nodes[i].name, formats.offers[ctx.nodes[i].name].formats[j].name): r
            for (i, j), r in zip(pairs, got)}


def _measure_tasks(ctx: FlowContext, formats: Formats, rounder: Rounder, grads_m: GradientPass, tasks: list,
                   title: str, later: list = ()) -> list[Candidate]:
    """:func:`measure_candidate` of every (node, format, rounding) of ``tasks`` through ``ctx.executor``, in
    order; the snapshots before the first node of the tasks left (these and ``later``'s) are dropped as it goes."""
    pos = {n.name: ctx.graph.position((ctx.loss.output,), n.name) for n in ctx.nodes}
    first_later = min((t[0].name for t in later), key=pos.__getitem__, default=None)
    # the node of the remaining tasks that comes first in the graph: snapshots before it are read by no later task
    # (tasks are in node order, so this moves forward; each rank of a parallel executor runs a subsequence)
    first_left, first = [""] * len(tasks), first_later
    for i in range(len(tasks) - 1, -1, -1):
        name = tasks[i][0].name
        if first is None or pos[name] < pos[first]:
            first = name
        first_left[i] = first
    with ctx.progress.task(title, sum(f.kind != "float" for _, f, _ in tasks)) as advance:
        def one(task):
            i, (node, fmt, rounding) = task
            ctx.forget_snapshots_before(first_left[i])
            cand = measure_candidate(ctx, formats, rounder, grads_m, node, fmt, rounding)
            if fmt.kind != "float":
                advance(1)
            return cand

        return ctx.executor.map(one, list(enumerate(tasks)))


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


#: resolution of the latency constraint: 100 steps per ms (10 µs)
LATENCY_STEPS_PER_MS = 100


class Solver:
    """The knapsack over one cost table: lossless, byte budget and/or latency budget (see the module doc)."""

    def __init__(self, ctx: FlowContext, table: CostTable, formats: Formats, latency=None):
        self.ctx, self.table, self.formats, self.latency = ctx, table, formats, latency
        self.by_error = {n for (n, _), f in formats.by_level.items() if f.kind == "series"}
        self.bound = max_node_cost(ctx)
        crit = ctx.config.criterion
        self.tol = crit.verdict_tolerance("fidelity") if ctx.objective == "fidelity" else 0.0
        self.ladders = {n: sorted(k, key=self.fidelity) for n, k in
                        zip(*table.solver_inputs(1.0, self.bound, self.fidelity)[:2])}

    def fidelity(self, c: Candidate) -> tuple:
        """Order of a ladder: fewest bits first, then the smaller format, float last (back-off moves up). A node
        with series candidates orders its whole ladder by the weight's relative error ‖δ‖/‖W‖ instead, largest
        first (then bytes): b-bit T-term options sit between the single levels (4-bit T=2 is finer than int4,
        coarser or finer than int8 by node), and the exact weight error is what orders them; a level costing
        as many bytes as a finer one is then dominated and dropped."""
        if c.node in self.by_error:
            return (c.reference, -c.rel_noise, c.nbytes)
        return (c.reference, format_bits(self.formats.by_level[(c.node, c.level)]), c.nbytes)

    def solve(self, budget: int | None, gain_credit: float, latency_budget: float | None = None) -> dict[str, int]:
        """Ladder index per node: the knapsack under ``budget`` bytes and/or ``latency_budget`` ms of predicted
        latency change, or the smallest plan whose solver cost ≤ the tolerance (lossless)."""
        nodes, kept, costs, sizes = self.table.solver_inputs(gain_credit, self.bound, self.fidelity)
        # only the ladders' candidates: a joint re-solve re-prices candidates in place, and a level that was
        # dominated (or over the bound) when the ladders were built can become undominated; back-off and the
        # plans index the ladders, so such a level stays out
        for i, n in enumerate(nodes):
            on = {id(c) for c in self.ladders[n]}
            keep = [j for j, c in enumerate(kept[i]) if id(c) in on]
            if len(keep) < len(kept[i]):
                kept[i], costs[i], sizes[i] = ([seq[j] for j in keep] for seq in (kept[i], costs[i], sizes[i]))
        lossless = budget is None and (latency_budget is None or self.ctx.config.quant.lossless)
        if lossless:
            costs = [[c - self.tol / len(costs) for c in g] for g in costs]
        try:
            if latency_budget is None:
                pick = knapsack.solve_lossless(costs, sizes) if budget is None else \
                    knapsack.solve_budget(costs, sizes, budget)
            else:
                # latencies in whole steps of 1/LATENCY_STEPS_PER_MS ms (far below timing noise): integers, so the
                # knapsack's latency grid is exact and the float plan (every change 0) is feasible at a budget ≥ 0
                lat = [[round(self.latency(n, c.level) * LATENCY_STEPS_PER_MS) for c in k] for n, k in zip(nodes, kept)]
                span = sum(max(g) - min(g) for g in lat)
                pick = knapsack.solve_constrained(
                    costs, sizes, lat, byte_budget=budget,
                    latency_budget=math.floor(latency_budget * LATENCY_STEPS_PER_MS + 1e-9),
                    lossless=lossless, units=int(min(max(20000, span), 200000))).choice
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
                      if c.reference or (self.formats.by_level[(n, c.level)].kind != "series" and
                                         format_bits(self.formats.by_level[(n, c.level)]) >= bits)]
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

    def uniform_series_plans(self, bits: tuple[int, ...], terms: tuple[int, ...]) -> list[tuple[str, dict[str, int]]]:
        """For each (b, T): every node at its b-bit T-term format where its ladder holds it, else float (the
        data-free configurations, measured on validation beside the solver's plan)."""
        out, seen = [], set()
        for b in bits:
            for t in terms:
                choice = {}
                for n, ladder in self.ladders.items():
                    hit = [i for i, c in enumerate(ladder) if not c.reference and
                           (f := self.formats.by_level[(n, c.level)]).kind == "series" and (f.bits, f.terms) == (b, t)]
                    choice[n] = hit[0] if hit else len(ladder) - 1
                key = tuple(sorted(choice.items()))
                if key not in seen and not all(self.ladders[n][i].reference for n, i in choice.items()):
                    seen.add(key)
                    out.append((f"uniform series int{b}x{t}", choice))
        return out

    def frontier(self, gain_credit: float) -> list[dict]:
        """The solver's predicted total cost at 25 byte budgets from the smallest to the largest plan."""
        _, _, costs, sizes = self.table.solver_inputs(gain_credit, self.bound, self.fidelity)
        lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
        return [{"budget_bytes": b, "bytes": size, "predicted": cost} for b, _, cost, size in
                knapsack.pareto_sweep(costs, sizes, sorted({int(x) for x in np.linspace(lo, hi, 25)}))]


def measure_costs(ctx: FlowContext, formats: Formats, store=None) -> tuple[Rounder, list[Candidate]]:
    """Stages 1–2: the gradient pass (with each format's activation-noise prediction), what the roundings need
    (Gram matrices, curvature) and the raw candidates; ``store`` (``flows.code_store``) keeps the rounded
    weights."""
    act_cands = {}
    for (n, name), f in formats.by_level.items():
        i, _ = _hooks(formats, n, f)
        if i:
            act_cands.setdefault(n, {})[name] = i[n]
    with ctx.timer.stage("gradients"), ctx.progress.task("gradients", len(ctx.calib.batches)) as advance:
        grads, grads_m = ctx.gradients(act_cands, advance)
    rounder = Rounder(ctx, grads, store)
    if "curvature" in rounder.needs():
        rounder.ensure_curvature()
    if "prediction curvature" in rounder.needs():
        rounder.prediction_curvature()
    if "gram" in rounder.needs() and getattr(ctx.executor, "size", 1) > 1:
        rounder.grams(sharded=True)  # before the map: shared across the ranks, not repeated by each inside a task
    with ctx.timer.stage("candidates"):
        cands = build_candidates(ctx, formats, rounder, grads_m)
    return rounder, cands


_MEASURE_STAGES = ("gradients", "gram", "curvature", "candidates")


def cached_costs(ctx: FlowContext, formats: Formats) -> tuple[Rounder, list[Candidate], dict]:
    """:func:`measure_costs` through the cache directory: a hit returns the stored raw candidates (and the
    curvature); a miss measures and stores. An unreadable entry is reported (a warning) and recomputed."""
    from . import cost_cache
    from .code_store import CodeStore

    with ctx.timer.stage("cache"):
        key = cost_cache.cache_key(ctx, candidate_settings(ctx))
        store = CodeStore.for_entry(ctx.config.cache_dir, key, reserve=ctx.float_bytes()) \
            if ctx.config.cache_codes else None  # (the entry's gradients: about the float weights' bytes)
        try:
            hit = cost_cache.load(ctx.config.cache_dir, key, [n.name for n in ctx.nodes], spill=ctx.out_of_core())
        except LLCError as exc:
            log.warning("%s; measuring again", exc)
            hit = None
        if hit is not None:
            rounder = Rounder(ctx, hit.grads, store)
            rounder.load_curvature(hit.arrays)
            return rounder, hit.candidates, {"entry": hit.path, "hit": True, "seconds": hit.seconds}
    before = sum(ctx.timer.seconds.get(k, 0.0) for k in _MEASURE_STAGES)
    rounder, cands = measure_costs(ctx, formats, store)
    seconds = sum(ctx.timer.seconds.get(k, 0.0) for k in _MEASURE_STAGES) - before
    with ctx.timer.stage("cache"):
        try:
            path = cost_cache.save(ctx.config.cache_dir, key, cands, {}, rounder.grads, seconds,
                                   rounder.curvature_arrays())
        except OSError as exc:  # a full disk: this run's measurements are in memory, only later runs lose them
            log.warning("cache entry for %s not written (%s); this run goes on, a later one measures again",
                        ctx.config.cache_dir, exc)
            path = None
        release()  # the file-backed gradients the entry was written from: their pages out again
    return rounder, cands, {"entry": path, "hit": False, "seconds": seconds}


def joint_resolve(ctx: FlowContext, solver: "Solver", formats: Formats, rounder: Rounder, budget, gain_credit,
                  lat_budget, memo: dict) -> tuple[dict[str, int], list[dict]]:
    """Per-node costs are measured one node at a time; far from the first-order neighbourhood they stop adding
    up. Measure the solver's plan with all its nodes compressed at once (interpreter, calibration measure part),
    attribute the gap ``joint − Σ costs`` to the plan's compressed nodes in proportion to their |first-order
    prediction| (each node's share of the plan's predicted effect), add it to those candidates' costs and
    re-solve; at most ``quant.joint_rounds`` times, stopping when the plan repeats. Returns the final plan and
    one row per round (bytes, predicted sum, joint measurement ± SE) for the report."""
    rows, seen = [], set()
    choice = solver.solve(budget, gain_credit, lat_budget)
    for r in range(ctx.config.quant.joint_rounds + 1):
        chosen = {n: solver.ladders[n][i] for n, i in choice.items()}
        weight_fns, input_fns, output_fns = {}, {}, {}
        passed = _PassedPages()
        for n, c in chosen.items():
            fmt = formats.by_level[(n, c.level)]
            if fmt.kind == "float":
                continue
            qw = _weight(ctx, formats, rounder, n, c, fmt, memo, dequant=True)
            weight_fns[n] = passed.hook(qw, torch.as_tensor(qw, dtype=ctx.graph.dtype, device=ctx.graph.device))
            i, o = _hooks(formats, n, fmt)
            input_fns.update(i or {})
            output_fns.update(o or {})
        predicted = sum(c.cost for c in chosen.values() if c.cost is not None)
        joint, se = ctx.measure(weight_fns, input_fns, output_fns).delta(ctx.base()) if weight_fns else (0.0, 0.0)
        rows.append({"round": r, "bytes": sum(c.nbytes for c in chosen.values()), "predicted": predicted,
                     "joint": joint, "se": se})
        seen.add(tuple(sorted(choice.items())))
        gap = joint - predicted
        movers = [c for c in chosen.values() if not c.reference]
        if r == ctx.config.quant.joint_rounds or gap <= 0 or not movers:
            break
        weight = sum(abs(c.predicted) for c in movers) or float(len(movers))
        for c in movers:  # the candidates are the table's own objects: the penalty stays for later solves
            c.cost += gap * ((abs(c.predicted) / weight) if weight != len(movers) or any(c.predicted for c in movers)
                             else 1.0 / len(movers))
        try:
            new = solver.solve(budget, gain_credit, lat_budget)
        except LLCError:
            if lat_budget is None:
                raise
            break  # the penalised costs leave no lossless plan within the predicted latency: keep this one
        if tuple(sorted(new.items())) in seen:
            break
        choice = new
    return choice, rows


class CodeMemo(dict):
    """(node, level) → (codes and scales as the passes read them, the dequantized float weight or None): each
    node's weight at each level is rounded once per run (:func:`_weight`). Codes are kept in the smallest integer
    type; the float weight only while the joint re-solve asks for it. On a large model (float weights ≥
    ``context.SPILL_BYTES``) the codes go to files mapped back read-only (``memory.Spill``, the same values):
    validation builds every plan from them, and the uniform plans alone touch every node at every level (SmolLM2:
    4 levels × 134 M codes). ``build`` drops the pages it read after each plan (``memory.drop_mapped_pages``)."""

    def __init__(self, spill: bool = False):
        super().__init__()
        self.spill = Spill() if spill else None

    def codes(self, q: np.ndarray) -> np.ndarray:
        """``q`` as the memo keeps it: in a file mapped back read-only when this memo spills and it is not tiny."""
        return self.spill.put(q) if self.spill is not None and q.nbytes >= SPILL_MIN_BYTES else q

    def floats(self, w: np.ndarray) -> np.ndarray:
        """A dequantized weight as the memo keeps it: like :meth:`codes`, mapped back copy-on-write (torch reads it
        without a copy; nothing writes it). The joint measurement reads every compressed node's (SmolLM2: 0.54 GB
        of float32 at once before); :func:`joint_resolve` drops each one's pages once the forward has passed it."""
        return self.spill.put(w, mode="c") if self.spill is not None and w.nbytes >= SPILL_MIN_BYTES else w


#: a spilling :class:`CodeMemo` keeps code arrays smaller than this in memory
SPILL_MIN_BYTES = 64 << 10


class _PassedPages:
    """Weight hooks for a measurement whose replacement weights are file maps (``CodeMemo.floats``): when a node's
    hook runs, the pages of the weight the previous hook handed out leave the process's memory (``memory.drop``;
    that node's op has run: the interpreter runs nodes one at a time), so a forward holds one replaced weight
    resident instead of all of them. Ordinary arrays: a plain :func:`constant` hook."""

    def __init__(self):
        self.last = None

    def hook(self, arr: np.ndarray, value: torch.Tensor):
        if not isinstance(arr, np.memmap):
            return constant(value)

        def fn(_w):
            if self.last is not None and self.last is not arr:
                drop(self.last)
            self.last = arr
            return value
        return fn


def _weight(ctx, formats, rounder, n, cand, fmt, memo: CodeMemo, dequant=False):
    """The codes (or dequantized weight) of node ``n`` at ``cand``'s level and rounding, computed once."""
    key = (n, cand.level)
    if key not in memo or (dequant and memo[key][1] is None):
        node = ctx.node(n)
        kept = None if dequant or fmt.kind == "series" else rounder.kept_codes(node, fmt, cand.rounding or "nearest")
        qw = kept[0] if kept is not None else \
            stored_weight(ctx, formats, rounder, ctx.weight_array(node), node, fmt, cand.rounding or "nearest")[0]
        if key in memo:  # the codes were kept without the float weight: keep them, add the float weight
            codes = memo[key][0]
        elif fmt.kind == "series":  # the passes read codes and scales only: codes in the smallest integer type
            from .series import compact

            terms = compact(qw).terms
            codes = replace(qw, terms=tuple(replace(t, q=memo.codes(t.q)) for t in terms), target=None)
        else:
            codes = replace(qw, q=memo.codes(np.asarray(qw.q, dtype=np.int8 if qw.bits <= 8 else np.int16)),
                            dequant=None)
        memo[key] = (codes, memo.floats(qw.dequant() if fmt.kind == "series" else qw.dequant) if dequant else None)
    return memo[key][1] if dequant else memo[key][0]


def run(ctx: FlowContext) -> MethodOutcome:
    """Stages 0–3 (module doc): the cost table, the ladders and the plans to measure on validation."""
    cfg, crit = ctx.config.quant, ctx.config.criterion
    formats = offered_formats(ctx)
    cache = None
    if ctx.config.cache_dir:
        rounder, cands, cache = cached_costs(ctx, formats)
    else:
        rounder, cands = measure_costs(ctx, formats)
    cands, per_level = choose_per_level(cands, cfg.auto_roundings)
    table = classify_all(ctx, cands)
    latency, lat_info = None, None
    if ctx.config.target.latency_budget is not None:
        from .latency import latency_model

        with ctx.timer.stage("latency"):
            latency, lat_info = latency_model(ctx, formats)
    memo = CodeMemo(spill=ctx.float_bytes() >= SPILL_BYTES)
    with ctx.timer.stage("solve"):
        solver = Solver(ctx, table, formats, latency)
        budget = budget_bytes(cfg, ctx)
        lat_budget = lat_info["budget_ms"] if lat_info else None
        try:
            first = solver.solve(budget, crit.gain_credit, lat_budget)
        except LLCError as exc:
            if lat_budget is None or not str(exc).startswith("latency budget"):
                raise
            # the one-unit sum over-counts a whole-integer model's boundaries: start from the plan without the
            # latency constraint, the measured fit below meets it (flows.latency)
            lat_info["predicted_infeasible"] = str(exc)
            lat_budget = None
            first = solver.solve(budget, crit.gain_credit, lat_budget)
        strict = solver.solve(budget, 0.0, lat_budget) if crit.gain_credit > 0 and lat_info is None else None
        frontier = solver.frontier(crit.gain_credit)
    with ctx.timer.stage("joint"):
        primary, joint = joint_resolve(ctx, solver, formats, rounder, budget, crit.gain_credit, lat_budget, memo)
    for key, (codes, _) in memo.items():  # the builds below read codes and scales: drop the float weights
        memo[key] = (codes, None)
    plans = [("solver", primary)]   # with a latency budget, replaced by the plan timed within it (below)
    if lat_info is None:
        if primary != first:
            plans.append(("solver before joint re-solve", first))
        if strict is not None:
            plans.append(("solver, gains not credited", strict))
        if "quant" in families(ctx):
            plans += solver.uniform_plans(cfg.levels())
        if "series" in families(ctx) and budget is not None:
            # the data-free configurations as alternatives at a budget; lossless runs leave them out: none is
            # lossless by construction, and with many noisy alternatives one passes or "wins" by chance
            plans += solver.uniform_series_plans(ctx.config.series.bits, ctx.config.series.terms)
    ladders = solver.ladders
    rewrite_notes: dict[tuple, list[str]] = {}

    def build(ch: dict[str, int]) -> onnx.ModelProto:
        plans_ = {}
        for n, i in ch.items():
            cand = ladders[n][i]
            fmt = formats.by_level[(n, cand.level)]
            weight = None if fmt.kind == "float" else _weight(ctx, formats, rounder, n, cand, fmt, memo)
            plans_[n] = formats.plan(n, fmt, weight)
        rw = ctx.target.rewrite(ctx.model, plans_)
        drop_mapped_pages()  # the spilled codes this build read leave the process's memory again
        rewrite_notes[tuple(sorted(ch.items()))] = [f"node '{n}': {note}" for n, note in rw.notes]
        return ctx.complete(rw.model)  # (written from the structure while the weights are held)

    within = None
    if lat_info is not None:
        from .latency import (admissible, budget_batches, fastest_levels, fit_measured, plan_fraction,
                              unit_fastest_levels)

        batches = budget_batches(ctx)
        lat_info["timed_batches"] = batches
        timed = plan_fraction(ctx, build, batches, ladders)
        with ctx.timer.stage("latency"):
            fitted, rows = fit_measured(ladders, primary, fastest_levels(ladders, latency), timed,
                                        ctx.config.target.latency_budget, batch=",".join(batches),
                                        unit_fastest=unit_fastest_levels(ladders, latency))
        lat_info["measured"] = rows
        lat_info["backoff_timings"] = []
        within = admissible(timed, ctx.config.target.latency_budget, lat_info["backoff_timings"])
        plans = [("solver" if fitted == primary else f"solver, latency round {rows[-1]['round']}", fitted)]
    sweep = []
    for frac in cfg.sweep:
        try:
            sweep.append((frac, solver.solve(int(frac * ctx.float_bytes()), crit.gain_credit), None))
        except LLCError as exc:  # an infeasible budget is a result of the sweep, not a failure
            sweep.append((frac, None, str(exc)))
    settings = {**candidate_settings(ctx), "budget_bytes": budget,
                "objective": "lossless" if budget is None else "budget", "gain_credit": crit.gain_credit,
                "max_node_cost": solver.bound, "refused": formats.refused(), "latency": lat_info,
                "formats": {n: [f.name for f in o.formats] for n, o in formats.offers.items()},
                "rounding_per_level": per_level, "joint": joint, "curvature": rounder.curvature_info}
    return MethodOutcome("+".join(families(ctx)), table, ladders, plans, build, budget, settings,
                         cache=cache, sweep=sweep, frontier=frontier,
                         notes=lambda ch: rewrite_notes.get(tuple(sorted(ch.items())), []),
                         admissible=within)
