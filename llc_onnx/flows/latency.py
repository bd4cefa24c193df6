"""Latency as a budget: per-(node, format) latencies measured on the deployment target, and the end-to-end
latency of the float and the final model.

The latency table (``targets.latency``) holds, at the calibration batch's input shapes and at batch 1, the
latency of every offered format of every node as a one-node micro-benchmark in the target's session, and the
float model's end-to-end latency. A plan's end-to-end latency is predicted as the float model's plus the sum of
its nodes' changes; ``target.latency_budget`` F bounds that prediction at the **calibration batch** by
F × the float model's end-to-end latency: the knapsack's second constraint (``solvers.knapsack.
solve_constrained``, which states its method and optimality gap). The table is kept in the cache directory
(``--cache``) when one is given.
"""

from __future__ import annotations

import numpy as np

from ..targets.latency import measure_end_to_end, measure_latency_table


def feeds_at(ctx) -> dict[str, dict[str, np.ndarray]]:
    """Inputs at the calibration batch's shape and at batch 1 (labels "<n>" and "1")."""
    b = ctx.calib.batches[0]
    out = {str(b.size): dict(b.inputs)}
    if b.size != 1 and not ctx.calib.fixed_batch:
        out["1"] = {k: v[:1] for k, v in b.inputs.items()}
    return out


def latency_model(ctx, formats):
    """(delta(node, level) -> ms at the calibration batch, info for the report)."""
    feeds = feeds_at(ctx)
    batch = next(iter(feeds))
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
