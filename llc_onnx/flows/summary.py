"""The result of a flow as one plain dict: what the terminal table, ``--json`` and ``--report`` all show."""

from __future__ import annotations

from collections import Counter

from ..ort_eval import Evaluation, evaluate
from ..solvers.cost_model import Candidate, CostTable
from ..verify import VerifiedResult
from .context import FlowContext


def _ev(e: Evaluation) -> dict:
    return {"loss": e.loss, "metrics": dict(e.metrics)}


def build_report(ctx: FlowContext, method: str, table: CostTable, ladders: dict[str, list[Candidate]],
                 result: VerifiedResult, settings: dict, sweep: list[dict] | None = None,
                 output: str | None = None) -> dict:
    """Everything the user needs to trust (or not) the compressed model, both splits measured in ORT."""
    calib_c = evaluate(result.model, ctx.calib, ctx.loss)
    chosen = {n: ladders[n][i] for n, i in result.choice.items()}
    ref_bytes = ctx.float_bytes()
    new_bytes = sum(c.nbytes for c in chosen.values())
    nodes = []
    for node in ctx.nodes:
        c = chosen[node.name]
        nodes.append({"node": node.name, "op": node.op_type, "shape": "x".join(map(str, node.weight_shape)),
                      "level": c.level, "bytes": c.nbytes, "predicted": c.predicted, "measured": c.measured,
                      "inside": c.inside, "rel_noise": c.rel_noise})
    return {
        "method": method,
        "model": ctx.model_path,
        "output": output,
        "verified": result.verified,
        "tolerance": result.tolerance,
        **settings,
        "measurement": ctx.measurement_info(),
        "calibration": {"n": ctx.calib_fp.n, "reference": _ev(ctx.calib_fp), "compressed": _ev(calib_c)},
        "held": {"n": ctx.held_fp.n, "reference": _ev(ctx.held_fp), "compressed": _ev(result.evaluation)},
        "bytes": {"reference": ref_bytes, "compressed": new_bytes,
                  "reduction": 1.0 - new_bytes / ref_bytes if ref_bytes else 0.0},
        "levels": dict(sorted(Counter(c.level for c in chosen.values()).items())),
        "nodes": nodes,
        "skipped": [{"node": n, "reason": r} for n, r in ctx.skipped],
        "candidates": table.rows(),
        "rounds": [r.to_dict() for r in result.rounds],
        "sweep": sweep or [],
        "seconds": dict(ctx.timer.seconds),
    }
