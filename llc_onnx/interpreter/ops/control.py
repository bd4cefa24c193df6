"""Control flow: If and Loop, run eagerly (the condition and the trip count are read at run time, so any
value works, constant or not); gradients flow through the branch taken and every iteration.

Subgraphs read values of the enclosing graph by name (ONNX's outer scope): the executor passes them after
the node's own inputs (:meth:`~llc_onnx.interpreter.registry.OpContext.outer_scope`). Loop-carried and
scan values must be tensors (sequence values are not supported).
"""

from __future__ import annotations

import torch

from ..registry import register_ops
from ..tensors import scalar


def _handles_subgraphs(fn):
    fn.handles_subgraphs = True
    return fn


@register_ops("If")
@_handles_subgraphs
def _if(ctx, xs):
    """``then_branch`` when ``cond`` is true, else ``else_branch``; outputs are the branch's outputs."""
    cond = bool(scalar(xs[0]))
    body = ctx.subgraph("then_branch" if cond else "else_branch")
    return body.run([], ctx.outer_scope(xs))


@register_ops("Loop")
@_handles_subgraphs
def _loop(ctx, xs):
    """ONNX Loop: inputs ``(M, cond, v_initial...)`` (M and cond optional), body ``(iter_num, cond_in, v_in...)
    -> (cond_out, v_out..., scan_out...)``. Runs while ``i < M`` (when M is given) and ``cond`` (when given).
    Outputs: the final loop-carried values, then each scan output stacked along a new axis 0."""
    n = ctx.node.n_explicit
    outer = ctx.outer_scope(xs)
    trip = int(scalar(xs[0])) if n > 0 and xs[0] is not None else None
    cond = bool(scalar(xs[1])) if n > 1 and xs[1] is not None else True
    carried = list(xs[2:n])
    body = ctx.subgraph("body")
    n_scan = len(body.output_names) - 1 - len(carried)
    if n_scan < 0:
        raise ctx.fail(f"the body has {len(body.output_names)} outputs for {len(carried)} loop-carried values; "
                       "it needs cond_out plus one output per loop-carried value")
    scans: list[list[torch.Tensor]] = [[] for _ in range(n_scan)]
    i = 0
    while (trip is None or i < trip) and cond:
        it = torch.tensor(i, dtype=torch.int64, device=ctx.device)
        c = torch.tensor(cond, dtype=torch.bool, device=ctx.device)
        outs = body.run([it, c, *carried], outer)
        cond = bool(scalar(outs[0]))
        carried = list(outs[1:1 + len(carried)])
        for acc, v in zip(scans, outs[1 + len(carried):]):
            acc.append(v)
        i += 1
    stacked = [torch.stack(acc) if acc else torch.zeros((0,), dtype=ctx.dtype, device=ctx.device) for acc in scans]
    return carried + stacked
