"""How a candidate's weight is rounded onto its format's grid, and which roundings are measured.

Every rounding keeps the format's scales and layout (``quant.quantize_weight``) and only chooses each code:

* ``llc``      sign-directed: per channel/block the first-order change Σ g·δ ≤ 0 with the fewest moves from
               nearest rounding (``quant.weights``; g from the calibration *fit* part). Trustworthy only inside
               the first-order neighbourhood: measured out of sample it helps at 8 bits and hurts at 4.
* ``nearest``  round to nearest.
* ``gptq``     GPTQ (``quant.gptq``): column by column with error feedback onto the not yet quantized columns,
               minimising the layer-output error ‖X(W − Ŵ)‖ over the node's input Gram XᵀX (``calib.gram``,
               fit part).
* ``cet``      CET (``quant.cet``): the error δ kept off the top eigen-directions (short axes) of the node's
               Hessian block, from Lanczos on the fit part (``solvers.cet``).

``quant.rounding``: one of those everywhere, or ``auto`` (the default): ``llc`` where nearest rounding's
relative error ‖δ‖/‖W‖ ≤ ``llc_radius`` (inside the neighbourhood), and elsewhere each rounding of
``auto_roundings`` is measured and, **per level** (format), one is kept for the nodes outside the neighbourhood
(:func:`choose_per_level`) — one choice per level, not per node, so a rounding is not picked for a node by the
noise of that node's own measurement. The choice starts from a prior, the first measured rounding of
:data:`PRIOR` (GPTQ: measured on the test split at uniform int4 it beats nearest rounding on every bench model —
Fashion-MNIST 0.2506 / 0.2723, EfficientNet-Lite0 1.718 / 5.900 in bench/RESULTS.md; MiniLM's summed KL to float
0.0042 / 0.0136), and another rounding replaces it only when its summed ΔL is lower by more than ``z`` =
:data:`CHOICE_Z` standard errors of the difference (√(SE_a² + SE_b²), the sums' SEs from the per-node paired SEs; conservative, the two
are measured on the same samples). Seen without that rule: on MiniLM's task loss nearest "won" int4 by 0.8 SE,
on EfficientNet-Lite0 by 0.3 SE, and both budget plans then carried nearest-rounded int4 nodes.

**Probing** (``quant.rounding_probe`` = N, default 32): a level with more than N such nodes has every rounding
measured on N of them only, spread evenly through the graph (:func:`probe_split`); the choice is made from those
N, and the level's other nodes are measured in the chosen rounding alone. The rule is the same; its sums run over
fewer nodes, so another rounding needs a larger effect to replace the prior. On SmolLM2 with ``--bits 4,float``
(211 MatMuls outside at int4) it measures 243 candidates instead of 422, and the same bytes (bench/RESULTS.md,
seventeenth stop). ``0`` measures every rounding on every node.

The Gram matrices and the curvature are computed once, only when a rounding (or ``quant.cost == "cet"``) needs
them; the curvature is kept with the cost cache (``flows.cost_cache``) so a cached run rebuilds the same codes.
With ``--cache`` the rounded weights themselves are kept too (``flows.code_store``, :attr:`Rounder.store`): the
stages after the candidates, and later runs on the same entry, read them instead of rounding again (and a
GPTQ-rounded node read back needs no Gram matrices).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np

from ..quant import WeightQuantSpec, quantize_weight
from ..solvers.cost_model import Candidate

__all__ = ["Rounder", "after_probes", "choose_per_level", "probe_split"]


#: bumped when what a CET curvature is computed from changes (part of the cost-cache key)
CET_MODEL_VERSION = 2

#: the order in which ``auto`` trusts the roundings before measuring (module doc)
PRIOR = ("gptq", "cet", "nearest", "llc", "up", "down")
#: standard errors by which a measured sum must beat the prior rounding's (module doc)
CHOICE_Z = 2.0


class Rounder:
    """Quantizes one node's weight in a format with a named rounding (see the module doc)."""

    def __init__(self, ctx, grads, store=None):
        self.ctx, self.grads = ctx, grads
        self.cfg = ctx.config.quant
        self._grams = None
        self.curvature = None  # node -> solvers.cet.NodeCurvature, when computed or loaded from the cache
        self.pred_curvature = None  # the one ``--cost cet`` / ``--compare-cet`` predict with (prediction_curvature)
        self.curvature_info: dict | None = None  # source, part, samples, passes, k, seconds of each pass (report)
        #: where rounded weights are kept and read back (``flows.code_store``; with ``--cache``), or None
        self.store = store

    # -- what is measured ------------------------------------------------------------------------
    def spec(self, fmt, rounding: str = "nearest") -> WeightQuantSpec:
        return WeightQuantSpec(bits=int(fmt.code_bits or fmt.bits), block_size=fmt.block_size,
                               scale_method=self.cfg.scale, rounding=rounding, float_type=fmt.float_type)

    def inside(self, w: np.ndarray, node, fmt) -> bool:
        """Nearest rounding's relative error ≤ ``llc_radius``: the first-order neighbourhood. With ``mse`` scales
        min-max rounding is tried first: the MSE search's grid holds the min-max scale (ratio 1), so MSE's error is
        at most min-max's, and a node min-max rounding already puts inside (by :data:`INSIDE_MARGIN`, for the
        float32 rounding of the dequantized weight) is inside without the search (100 passes over the weight; at
        8 bits most nodes are decided so). The same answer as the search, faster."""
        spec = self.spec(fmt)
        if spec.scale_method == "mse" and _relative_error(w, replace(spec, scale_method="minmax"), node) <= \
                self.cfg.llc_radius * (1 - INSIDE_MARGIN) - INSIDE_FLOOR:
            return True
        return _relative_error(w, spec, node) <= self.cfg.llc_radius

    def choices(self, w: np.ndarray, node, fmt) -> list[str]:
        """The roundings measured for ``node`` in ``fmt`` (module doc)."""
        r = self.cfg.rounding
        if r == "llc":
            return ["llc" if self.inside(w, node, fmt) else "nearest"]
        if r == "auto":
            return ["llc"] if self.inside(w, node, fmt) else list(self.cfg.auto_roundings)
        return [r]

    def needs(self) -> set[str]:
        """Which expensive inputs the configured roundings and cost need: "gram", "curvature" (CET rounding's,
        from the fit part), "prediction curvature" (``--cost cet``'s and ``--compare-cet``'s:
        :meth:`prediction_curvature`)."""
        used = {self.cfg.rounding} | (set(self.cfg.auto_roundings) if self.cfg.rounding == "auto" else set())
        out = {"gram"} if "gptq" in used else set()
        if "cet" in used:
            out.add("curvature")
        if self.cfg.cost == "cet" or self.cfg.compare_cet:
            out.add("prediction curvature")
        return out

    # -- the expensive inputs --------------------------------------------------------------------
    def grams(self, sharded: bool = False):
        """The input Gram matrices of every node (``calib.gram``), computed once. ``sharded``: across the
        workers' ranks (``ctx.executor``; every rank must call it at the same point, outside a task): rank r
        collects the nodes r, r + N, ... in its own forward passes and all ranks gather them — each node's
        matrix is summed exactly as in one pass, so the values, and the output bytes, do not depend on N."""
        if self._grams is None:
            from ..calib.gram import collect_grams

            ctx = self.ctx
            size = getattr(ctx.executor, "size", 1) if sharded else 1
            with ctx.timer.stage("gram"), ctx.progress.task("input Gram matrices", len(ctx.fit_data.batches)) as adv:
                if size > 1:
                    names = [n.name for n in ctx.nodes]
                    parts = ctx.executor.map(lambda group: collect_grams(ctx.model, ctx.graph, ctx.fit_data, ctx.nodes,
                                                                         names=group),
                                             [names[r::size] for r in range(size)])
                    merged = {k: v for part in parts for k, v in part.items()}
                    grams = {n: merged[n] for n in names}
                    self._grams = _spilled_grams(grams)
                else:
                    spill = _gram_spill(ctx)
                    grams = collect_grams(ctx.model, ctx.graph, ctx.fit_data, ctx.nodes, progress=adv, spill=spill)
                    self._grams = _GramDict(grams, spill) if spill is not None else _spilled_grams(grams)
        return self._grams

    def _curvature(self, part: str):
        """The CET curvature of every node on a seeded sub-sample (``--cet-samples``) of the calibration ``part``
        ("fit", "measure" or "calibration", the two together): ``solvers.cet.fisher_curvature`` (one pass) or
        ``node_curvature`` (Lanczos,
        ``--cet-steps`` passes), per ``--cet-curvature``; and what the report says about it."""
        from ..calib.data import sample_subset
        from ..solvers.cet import default_steps, fisher_curvature, node_curvature

        ctx, cfg = self.ctx, self.cfg
        source = {"fit": ctx.fit_data, "measure": ctx.measure_data, "calibration": ctx.calib}[part]
        data = sample_subset(source, cfg.cet_samples, ctx.config.data.seed)
        seed, k = ctx.config.data.seed, self.cet_k()
        before = ctx.timer.seconds.get("curvature", 0.0)
        if cfg.cet_curvature == "fisher":
            passes = 1
            with ctx.timer.stage("curvature"), ctx.progress.task(f"curvature (sampled Fisher, {part} part)", 1) as adv:
                curv = fisher_curvature(ctx.model, ctx.graph, data, ctx.loss, ctx.nodes, k=k, seed=seed)
                adv(1)
        else:
            passes = cfg.cet_steps or default_steps(k)
            with ctx.timer.stage("curvature"), ctx.progress.task(f"curvature (Lanczos, {part} part)",
                                                                 passes + 1) as adv:
                curv = node_curvature(ctx.graph, data, ctx.loss, ctx.nodes, k=k, iters=passes, seed=seed,
                                      progress=adv)
        source = next(iter(curv.values())).source if curv else cfg.cet_curvature
        info = {"source": source, "part": part, "samples": data.n_samples, "passes": passes, "k": k,
                "seconds": round(ctx.timer.seconds.get("curvature", 0.0) - before, 3)}
        return curv, info

    def cet_k(self) -> int:
        """Eigenpairs per node: ``--cet-k``, or 32 for the Fisher curvature (its eigenpairs are free) and 8 for
        Lanczos (each costs passes)."""
        return self.cfg.cet_k or (32 if self.cfg.cet_curvature == "fisher" else 8)

    def ensure_curvature(self):
        """The curvature CET rounding reads: from the fit part (the part the roundings are chosen on)."""
        if self.curvature is None:
            self.curvature, info = self._curvature("fit")
            self.curvature_info = {**(self.curvature_info or {}), "rounding": info}
        return self.curvature

    def prediction_curvature(self):
        """The curvature ``--cost cet`` predicts with. With CET rounding in use: from the measure part, so that a
        rounding fitted to the fit part's curvature is predicted out of sample (as the first-order term uses the
        measure part's gradient). Otherwise from the whole calibration split: no rounding was fitted to a
        curvature, and a curvature estimate from few samples is noisy (on EfficientNet-Lite0 the measure part
        holds 32 views of 2 photos). The fit part's own when the two parts coincide (one batch of data)."""
        if self.pred_curvature is None:
            if self.ctx.in_sample:
                self.pred_curvature = self.ensure_curvature()
                self.curvature_info = {**(self.curvature_info or {}), "prediction": "the rounding's (in sample)"}
            else:
                part = "measure" if "curvature" in self.needs() else "calibration"
                self.pred_curvature, info = self._curvature(part)
                self.curvature_info = {**(self.curvature_info or {}), "prediction": info}
        return self.pred_curvature

    def curvature_arrays(self) -> dict[str, np.ndarray]:
        """The curvatures as plain arrays for the cost cache (empty when none was computed)."""
        out = {}
        pred = None if self.pred_curvature is self.curvature else self.pred_curvature  # in sample: stored once
        for prefix, curv in (("cet", self.curvature), ("cetp", pred)):
            for i, n in enumerate(self.ctx.nodes):
                if curv and n.name in curv:
                    out.update(curv[n.name].to_arrays(f"{prefix}{i}_"))
        if out and self.curvature_info:
            out["cetinfo"] = np.array(json.dumps(self.curvature_info))
        return out

    def load_curvature(self, arrays: dict | None) -> None:
        from ..solvers.cet import NodeCurvature

        if not arrays:
            return
        for prefix, attr in (("cet", "curvature"), ("cetp", "pred_curvature")):
            got = {n.name: NodeCurvature.from_arrays(arrays, f"{prefix}{i}_")
                   for i, n in enumerate(self.ctx.nodes) if f"{prefix}{i}_meta" in arrays}
            if got:
                setattr(self, attr, got)
        if self.pred_curvature is None and self.curvature is not None and self.ctx.in_sample:
            self.pred_curvature = self.curvature
        if "cetinfo" in arrays:
            self.curvature_info = {**json.loads(str(arrays["cetinfo"])), "cached": True}

    # -- quantizing ------------------------------------------------------------------------------
    def quantize(self, w: np.ndarray, node, fmt, rounding: str):
        """(QuantizedWeight, info) of ``node`` in ``fmt`` rounded by ``rounding``: read from :attr:`store` when it
        holds them (the same codes: ``flows.code_store``), else rounded (and kept there)."""
        if self.store is not None:
            got = self.store.get(node, fmt.name, rounding)
            if got is not None:
                return got
        qw, info = self._round(w, node, fmt, rounding)
        if self.store is not None:
            self.store.put(node, fmt.name, rounding, qw, info)
        return qw, info

    def kept_codes(self, node, fmt, rounding: str):
        """(QuantizedWeight without ``dequant``, info) from :attr:`store`, or None: codes and scales for a build,
        without reading the node's float weight."""
        return self.store.get(node, fmt.name, rounding, dequant=False) if self.store is not None else None

    def _round(self, w: np.ndarray, node, fmt, rounding: str):
        grad = self.grads.nodes[node.name].grad_w
        if rounding == "gptq":
            from ..quant.gptq import quantize_weight_gptq

            qw = quantize_weight_gptq(w, self.grams()[node.name].gram, self.spec(fmt), node.out_axis,
                                      node.reduce_axis, damp=self.cfg.gptq_damp, act_order=self.cfg.gptq_act_order)
            return qw, {}
        if rounding == "cet":
            from ..quant.cet import cet_round

            r = cet_round(w, self.spec(fmt), node.out_axis, node.reduce_axis, self.ensure_curvature()[node.name])
            return r.weight, {"codes_changed": r.changed, "projection_before": r.projection_before,
                              "projection_after": r.projection_after}
        qw = quantize_weight(w, self.spec(fmt, rounding), node.out_axis, node.reduce_axis,
                             grad=grad if rounding == "llc" else None)
        return qw, {}


def choose_per_level(cands: list[Candidate], outside_roundings: tuple[str, ...]) -> tuple[list[Candidate], dict]:
    """Keep one rounding per (node, level): where several were measured (outside the neighbourhood, ``auto``),
    per level the prior rounding unless another's summed ΔL over the level's such nodes is lower by more than
    :data:`CHOICE_Z` standard errors of the difference (module doc). Returns the kept candidates (in input order)
    and, per level, the sums, their standard errors, how many nodes they sum over and the choice, for the report."""
    by_key: dict[tuple[str, str], list[Candidate]] = {}
    for c in cands:
        by_key.setdefault((c.node, c.level), []).append(c)
    sums: dict[str, dict[str, float]] = {}
    var: dict[str, dict[str, float]] = {}
    nodes: dict[str, int] = {}
    for (_, level), group in by_key.items():
        if len(group) > 1:
            nodes[level] = nodes.get(level, 0) + 1
            for c in group:
                value = c.measured if c.measured is not None else c.second_order
                if value is not None:
                    sums.setdefault(level, {}).setdefault(c.rounding, 0.0)
                    sums[level][c.rounding] += value
                    var.setdefault(level, {}).setdefault(c.rounding, 0.0)
                    var[level][c.rounding] += float(c.se) ** 2 if c.measured is not None else 0.0

    def rank(r: str) -> tuple:
        return (PRIOR.index(r) if r in PRIOR else len(PRIOR),
                outside_roundings.index(r) if r in outside_roundings else 99, r)

    choice = {}
    for lv, s in sums.items():
        prior = min(s, key=rank)
        beats = [r for r in s if s[r] + CHOICE_Z * float(np.sqrt(var[lv][r] + var[lv][prior])) < s[prior]]
        choice[lv] = min(beats, key=lambda r: (s[r], rank(r))) if beats else prior
    kept = [c for c in cands if len(by_key[(c.node, c.level)]) == 1 or c.rounding == choice.get(c.level)]
    return [replace(c) for c in kept], {lv: {"sums": sums[lv], "se": {r: float(np.sqrt(v)) for r, v in var[lv].items()},
                                             "chosen": choice[lv], "nodes": nodes[lv]} for lv in sums}


#: relative margin by which min-max rounding must be inside the neighbourhood to skip the MSE search
#: (Rounder.inside), and an absolute floor for small radii: the search compares float64 errors, the answer reads
#: the float32 dequantized weight, which moves ‖δ‖/‖W‖ by at most ~2⁻²⁴·(1 + ‖δ‖/‖W‖)
INSIDE_MARGIN = 1e-4
INSIDE_FLOOR = 2.0 ** -20


def _relative_error(w: np.ndarray, spec: WeightQuantSpec, node) -> float:
    """‖δ‖/‖W‖ of ``w`` rounded per ``spec`` (float64)."""
    q = quantize_weight(w, spec, node.out_axis, node.reduce_axis)
    return float(np.linalg.norm(q.dequant.astype(np.float64) - w)) / (float(np.linalg.norm(w)) or 1.0)


def probe_split(tasks: list[tuple], n_probe: int) -> tuple[list[int], list[int]]:
    """(probe, rest): indices into ``tasks`` — (node, format, rounding) in node order — split for probing (module
    doc). A (node, level) with several roundings is a probe when its level has at most ``n_probe`` such nodes, or
    it is one of the ``n_probe`` at positions ⌊(i + ½)·m / n_probe⌋ of the level's first m = n − 1 such nodes in
    node order: the last is never a probe, so the graph's last node (often the largest: a language model's
    lm_head) is measured after the snapshots before it are dropped, as without probing. ``rest`` is empty when no
    level has more than ``n_probe`` (every task is measured at once, as without probing); otherwise ``probe``
    holds every task of the probes and ``rest`` the others."""
    by_level: dict[str, list[str]] = {}
    for (node, level), k in _rounds(tasks).items():  # Counter keeps insertion order: node order
        if k > 1:
            by_level.setdefault(level, []).append(node)
    probes: set[tuple[str, str]] = set()
    split = False
    for level, nodes in by_level.items():
        n = len(nodes)
        if not n_probe or n <= n_probe:
            probes.update((node, level) for node in nodes)
            continue
        split = True
        m = n - 1  # ≥ n_probe
        probes.update((nodes[(2 * i + 1) * m // (2 * n_probe)], level) for i in range(n_probe))
    if not split:
        return list(range(len(tasks))), []
    probe = [i for i, (node, fmt, _) in enumerate(tasks) if (node.name, fmt.name) in probes]
    chosen = set(probe)
    return probe, [i for i in range(len(tasks)) if i not in chosen]


def after_probes(tasks: list[tuple], rest: list[int], chosen: dict[str, str]) -> list[int]:
    """The indices of ``rest`` (:func:`probe_split`) still measured once the probes chose ``chosen`` (level →
    rounding): a (node, level) with one rounding as it is, one with several in the level's chosen rounding only
    (all of them where the probes chose nothing for the level)."""
    rounds = _rounds(tasks)
    return [i for i in rest for n, f, r in (tasks[i],)
            if rounds[(n.name, f.name)] == 1 or f.name not in chosen or r == chosen[f.name]]


def _rounds(tasks: list[tuple]) -> Counter:
    """(node, level) → how many roundings ``tasks`` measure it in."""
    return Counter((node.name, fmt.name) for node, fmt, _ in tasks)


def _gram_spill(ctx):
    """A :class:`memory.Spill` for the Gram pass's accumulators when the model is large
    (:meth:`FlowContext.out_of_core`), else None."""
    from ..memory import Spill

    return Spill() if ctx.out_of_core() else None


def _spilled_grams(grams: dict) -> dict:
    """``grams`` with their matrices in files mapped back read-only (``memory.Spill``; the same float64 values)
    when they are large: the candidate stage reads one node's at a time (SmolLM2: 0.8 GB of K×K matrices), and
    the executors drop the touched pages after each task. Nodes sharing one result share one file."""
    from .context import SPILL_BYTES

    unique = {id(g): g for g in grams.values()}
    if sum(g.gram.nbytes for g in unique.values()) < SPILL_BYTES:
        return grams
    from ..memory import Spill, release

    spill = Spill()
    for g in unique.values():
        g.gram = spill.put(g.gram)
    release()
    return _GramDict(grams, spill)


class _GramDict(dict):
    """The node → InputGram mapping, keeping the files of its spilled matrices alive as long as it lives."""

    def __init__(self, grams: dict, spill):
        super().__init__(grams)
        self.spill = spill
