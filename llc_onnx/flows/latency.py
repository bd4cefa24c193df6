"""Latency as a budget: per-(node, format) latencies measured on the deployment target, and the end-to-end
latency of the float and the final model.

The latency table (``targets.latency``) holds, at the calibration batch's input shapes and at batch 1, the
latency of every offered format of every node as a one-node micro-benchmark in the target's session, and the
float model's end-to-end latency. A plan's end-to-end latency is predicted as the float model's plus the sum of
its nodes' changes; ``target.latency_budget`` F bounds that prediction at the **calibration batch** by
F × the float model's end-to-end latency: the knapsack's second constraint (``solvers.knapsack.
solve_constrained``, which states its method and optimality gap). The table is kept in the cache directory
(``--cache``) when one is given.

**The budget is then met on the written model, measured** (:func:`fit_measured`). The sum of one-unit
changes is right when nodes do not interact (MatMulNBits, and a model quantized whole: EfficientNet-Lite0 at
batch 32 with every Conv W8A8, predicted 0.53× FP32, measured 0.53×) and wrong for a mix of float and integer
Convs: every float↔integer boundary costs ORT a QuantizeLinear or DequantizeLinear, a layout Transpose
(integer Convs run NHWC) and a reorder of the float Convs' blocked layout, on whole activation tensors
(measured there: the lossless plan, 35 of 50 Convs W8A8 with 24 Transposes left, predicted 0.54×, measured
0.88×; the first four Convs float and the rest integer, predicted 0.49×, measured 0.68×). Those costs belong
to pairs of neighbouring choices, not to one node, so the knapsack cannot hold them. Instead the solver's
plan is written and timed end to end against the float model, interleaved, at the calibration batch; while
its fraction of FP32 exceeds the budget, rounds move the remaining nodes to their fastest quantized format,
cheapest predicted loss increase first, in equal shares (so the last round is every node at its fastest
format); then the one-unit table's fastest plan and the float plan are tried, and a budget none of them meets
is refused with the measured fraction. When the one-unit prediction calls the budget infeasible, the solve
starts from the plan without it (the prediction over-counts the boundaries of a whole-integer model).
With ``--latency-batches`` (``target.latency_batches``) the budget holds at every listed batch size: each plan
is timed at each (inputs stacked from the calibration samples) and its fraction is the largest; the one-unit
prediction is made at the largest of them. Heuristic: the kept plan meets the budget as measured here; a
cheaper plan meeting it may exist. Back-off on
the validation split raises only nodes whose raise keeps the plan within the budget, timed
(:func:`admissible`, ``verify._raise_nodes``); when the final timing of the kept model is over the budget
anyway (timings move), the summary says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from ..errors import LLCError
from ..targets.latency import measure_end_to_end, measure_latency_table, time_sessions


def batch_labels(ctx) -> list[str]:
    """The timed batches' labels ("<n>"): the sizes of ``--latency-batches`` when given, else the calibration
    batch's and batch 1 (only the calibration batch when the model's batch is fixed)."""
    sizes = ctx.config.target.latency_batches
    if sizes:
        return [str(n) for n in sizes]
    b = ctx.calib.batches[0]
    return [str(b.size)] + (["1"] if b.size != 1 and not ctx.calib.fixed_batch else [])


def feeds_at(ctx) -> dict[str, dict[str, np.ndarray]]:
    """Inputs per timed batch (:func:`batch_labels`): stacked from the calibration samples for
    ``--latency-batches``, else the calibration batch's and its first sample."""
    if ctx.config.target.latency_batches:
        return {label: batch_inputs(ctx.calib, int(label)) for label in batch_labels(ctx)}
    b = ctx.calib.batches[0]
    return {label: dict(b.inputs) if int(label) == b.size else {k: v[:1] for k, v in b.inputs.items()}
            for label in batch_labels(ctx)}


def budget_batches(ctx) -> list[str]:
    """The batch labels the latency budget must hold at: every ``--latency-batches`` size, else the
    calibration batch."""
    return batch_labels(ctx)[: None if ctx.config.target.latency_batches else 1]


def batch_inputs(data, n: int) -> dict[str, np.ndarray]:
    """``n`` samples' inputs from the calibration batches in order (repeated when there are fewer), for timing
    at batch ``n``. The samples only set shapes and value ranges: a latency does not depend on which."""
    first = data.batches[0]
    if not first.size:
        raise LLCError("--latency-batches: the calibration data has no samples to time with")
    if data.fixed_batch and n != first.size:
        raise LLCError(f"--latency-batches {n}: the model's batch dimension is fixed at {first.size}; time it at "
                       f"batch {first.size}")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in first.inputs}
    have = 0
    while have < n:
        for b in data.batches:
            for k, v in b.inputs.items():
                if k in parts:
                    parts[k].append(np.asarray(v))
            have += b.size
            if have >= n:
                break
    try:
        return {k: np.concatenate(v)[:n] for k, v in parts.items()}
    except ValueError:
        shapes = sorted({tuple(a.shape[1:]) for v in parts.values() for a in v})
        raise LLCError(f"--latency-batches {n}: the calibration batches' inputs differ in shape beyond the batch "
                       f"dimension ({shapes[:3]}), so they cannot be stacked into one batch; give batch sizes of "
                       "one calibration batch or less") from None


def latency_model(ctx, formats):
    """(delta(node, level) -> ms at the prediction's batch — the calibration batch, or the largest of
    ``--latency-batches`` — info for the report)."""
    feeds = feeds_at(ctx)
    batch = max(budget_batches(ctx), key=int)   # the prediction's batch: the largest the budget holds at
    fmts = {n: list(o.formats) for n, o in formats.offers.items()}
    ctx.restore_weights()  # the micro-benchmarks read the nodes' weights from the model
    table = measure_latency_table(ctx.target, ctx.model, feeds, fmts, threads=ctx.config.device.threads,
                                  cache_dir=ctx.config.cache_dir)
    e2e = table.end_to_end[batch].min_ms
    budget_ms = (ctx.config.target.latency_budget - 1.0) * e2e

    def delta(node: str, level: str) -> float:
        return 0.0 if level == "float" else table.delta_ms(batch, node, level)

    info = {"batch": batch, "float_ms": e2e, "budget_fraction": ctx.config.target.latency_budget,
            "budget_ms": budget_ms, "table": table.key, "threads": ctx.config.device.threads}
    ctx._latency_table = table
    return delta, info


def end_to_end(ctx, reference, final, plan_levels: dict[str, str] | None = None) -> dict:
    """Measured end-to-end latency (ms, min and median of interleaved rounds) and throughput of the float and
    the final model at the calibration batch and at batch 1, in the target's session; with a latency table
    also the predicted latency of the final plan."""
    out = {}
    for label, feeds in feeds_at(ctx).items():
        t = measure_end_to_end(ctx.target, reference, feeds, threads=ctx.config.device.threads,
                               others={"compressed": final})
        ref, cmp = t["model"], t["compressed"]
        row = {"float_ms": ref.min_ms, "compressed_ms": cmp.min_ms, "float_median_ms": ref.median_ms,
               "compressed_median_ms": cmp.median_ms, "speedup": ref.min_ms / cmp.min_ms if cmp.min_ms else None,
               "throughput_float": int(label) / ref.min_ms * 1e3, "throughput_compressed": int(label) / cmp.min_ms * 1e3}
        table = getattr(ctx, "_latency_table", None)
        if table is not None and plan_levels is not None and label in table.end_to_end:
            row["predicted_ms"] = table.predict(plan_levels, label).ms
        out[label] = row
    return out


#: at most this many plans moved towards their fastest formats after the solver's plan, each timed end to end
FIT_ROUNDS = 4
#: interleaved rounds per end-to-end timing of a plan against the float model (the fastest round counts)
FIT_TIMING_ROUNDS = 15


def fastest_levels(ladders: Mapping[str, list], latency: Callable[[str, str], float]) -> dict[str, int]:
    """Per node the ladder index of its fastest quantized format by the one-unit table (float when the node
    has none): inside an integer region a node's own unit time is what remains of it."""
    out = {}
    for n, ladder in ladders.items():
        quant = [i for i, c in enumerate(ladder) if not c.reference]
        out[n] = min(quant, key=lambda i: (latency(n, ladder[i].level), i)) if quant else \
            next(i for i, c in enumerate(ladder) if c.reference)
    return out


def fit_measured(ladders: Mapping[str, list], choice: Mapping[str, int], fastest: Mapping[str, int],
                 measure: Callable[[dict[str, int]], float], budget: float, *, rounds: int = FIT_ROUNDS,
                 batch: str = "", unit_fastest: Mapping[str, int] | None = None) -> tuple[dict[str, int], list[dict]]:
    """Meet the latency budget on the written model (module doc). ``measure(choice)`` → the plan's latency as a
    fraction of the float model's, timed; ``budget`` that fraction's bound. Returns the plan and one row per
    timed plan (round, fraction, nodes moved). When every node at its fastest quantized format is still over
    budget, ``unit_fastest`` (per node the one-unit table's fastest level, float included: where integer
    kernels do not pay off at all, as on small layers) is timed, then the float plan (fraction 1 without a
    timing: it is the float model); raises when none of them meets the budget."""
    cur = dict(choice)
    rows: list[dict] = []
    for r in range(rounds + 1):
        frac = float(measure(cur))
        rows.append({"round": r, "fraction": frac, "moved": rows[-1]["moved_next"] if rows else [],
                     "moved_next": []})
        if frac <= budget:
            break
        movable = [n for n in sorted(cur) if cur[n] != fastest[n]]
        if not movable or r == rounds:
            best = frac
            floats = {n: next(i for i, c in enumerate(ladders[n]) if c.reference) for n in ladders}
            tried = [dict(choice), dict(cur)]
            for name, alt in (("one-unit fastest", dict(unit_fastest or {})), ("float", floats)):
                if not alt or alt in tried:
                    continue
                tried.append(alt)
                f = float(measure(alt))
                best = min(best, f)
                rows.append({"round": rows[-1]["round"] + 1, "fraction": f, "moved_next": [], "plan": name,
                             "moved": sorted(n for n in alt if alt[n] != cur[n])})
                if f <= budget:
                    cur = alt
                    break
            if cur in tried[2:]:
                break
            raise LLCError(f"latency budget {budget:g}: the fastest plans tried (every node at its fastest format) "
                           f"measured {best:.3f}× the float model's latency at batch {batch or '?'} "
                           "here — raise the latency budget (or time it on the deployment machine)")
        k = max(1, math.ceil(len(movable) / (rounds - r)))

        def extra(n: str) -> float:
            a, b = ladders[n][fastest[n]].cost, ladders[n][cur[n]].cost
            return (a or 0.0) - (b or 0.0)

        moved = sorted(movable, key=lambda n: (extra(n), n))[:k]
        for n in moved:
            cur[n] = fastest[n]
        rows[-1]["moved_next"] = moved
    for row in rows:
        row.pop("moved_next")
    return cur, rows


def unit_fastest_levels(ladders: Mapping[str, list], latency: Callable[[str, str], float]) -> dict[str, int]:
    """Per node the ladder index of the one-unit table's fastest level, float (change 0) included."""
    return {n: min(range(len(ladder)), key=lambda i: (0.0 if ladder[i].reference else latency(n, ladder[i].level),
                                                       not ladder[i].reference, i))
            for n, ladder in ladders.items()}


def plan_fraction(ctx, build: Callable[[dict[str, int]], object], batches: list[str], ladders: Mapping[str, list],
                  rounds: int = FIT_TIMING_ROUNDS) -> Callable[[dict[str, int]], float]:
    """``measure`` for :func:`fit_measured`: the plan written and timed against the float model, interleaved,
    in the target's session at each of ``batches`` (the fastest round of each); its fraction is the largest
    over the batches (the budget holds at every one). The float model's session is made once, at the first
    timing, and reused by every later one. The all-float plan is the float model: 1 by definition, not timed
    (a timing of it is 1 ± noise)."""
    feeds = feeds_at(ctx)
    settings, threads = ctx.target.session(), ctx.config.device.threads
    float_session: list = []

    def measure(choice: dict[str, int]) -> float:
        if all(ladders[n][i].reference for n, i in choice.items()):
            return 1.0
        if not float_session:
            ctx.restore_weights()
            float_session.append(settings.make_session(ctx.model, intra_op_num_threads=threads))
        plan = settings.make_session(build(choice), intra_op_num_threads=threads)
        fractions = []
        for b in batches:
            t = time_sessions({"model": float_session[0], "plan": plan}, feeds[b], rounds=rounds)
            fractions.append(t["plan"].min_ms / t["model"].min_ms)
        return max(fractions)
    return measure


def admissible(measure: Callable[[dict[str, int]], float], budget: float, log: list[dict]
               ) -> Callable[[dict[str, int]], bool]:
    """Back-off's test under a latency budget (``verify.select_plan``): the plan timed (``measure``, each plan
    once) within ``budget``; every timing appended to ``log`` for the report."""
    seen: dict[tuple, float] = {}

    def ok(choice: dict[str, int]) -> bool:
        key = tuple(sorted(choice.items()))
        if key not in seen:
            seen[key] = float(measure(dict(choice)))
            log.append({"fraction": seen[key], "within": seen[key] <= budget})
        return seen[key] <= budget
    return ok
