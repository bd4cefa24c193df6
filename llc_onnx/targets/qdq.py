"""Portable Q/DQ (``--target qdq``): today's llc-onnx output, for any runtime that reads ONNX Q/DQ.

Every level of every compressible node is written as a weight-only ``DequantizeLinear`` feeding the node
(:mod:`llc_onnx.passes.qdq`): INT8/INT16 per output channel, INT4/INT2 blocked along the reduction axis
(opset 21; 25 when INT2 is used). Activations stay float. Nothing is refused: the format says what the
numbers are, not how fast a runtime runs them (on ORT's CPU provider these models are smaller but slower
than float: use ``ort-cpu`` to ship there).

Series terms (``Format("series", b, block, terms=T)``, :mod:`llc_onnx.series`): every node, every b and T,
written by :mod:`llc_onnx.passes.series` in the standard form (T terms stacked along K behind one blocked
``DequantizeLinear``, the input tiled T times; 2/4-bit terms blocked along K, 8-bit per output channel) or,
with ``series_form="custom"``, as ``ai.llc_onnx::SeriesMatMul/SeriesConv`` nodes with model-local function
bodies in standard ops.

Session of the verdict: ONNX Runtime CPU with ``session.qdq_matmulnbits_accuracy_level=0``, so that a
blocked DQ+MatMul that ORT fuses into MatMulNBits keeps float activations: the verdict is on the exact
ONNX semantics of the Q/DQ graph, which is what a portable model promises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from llc_onnx.compressible import CompressibleNode
from llc_onnx.errors import LLCError
from llc_onnx.passes.qdq import QDQPass
from llc_onnx.passes.series import SeriesPass
from llc_onnx.targets.base import (
    FLOAT,
    LEVELS,
    Format,
    GraphContext,
    NodePlan,
    Offer,
    Rewrite,
    SessionSettings,
    Target,
    apply_passes,
)

__all__ = ["QdqTarget"]


class QdqTarget(Target):
    """Weight-only Q/DQ for every level (see module docstring); with ``activations=True`` each node's input
    gets a per-tensor symmetric Q/DQ pair too (int16 with 16-bit weights, int8 otherwise)."""

    def __init__(self, activations: bool = False, series_form: str = "standard"):
        self.activations = bool(activations)
        if series_form not in ("standard", "custom"):
            raise LLCError(f"qdq target: series_form='{series_form}' is unknown; use standard or custom")
        self.series_form = series_form

    name = "qdq"
    summary = "portable ONNX Q/DQ: weight-only DequantizeLinear, activations float"
    table = {
        "MatMul/Gemm/Conv": [
            ("INT8 / INT16 per output channel + DequantizeLinear", "levels 8, 16"),
            ("INT4 / INT2 blocked along K + DequantizeLinear (block_size attribute)", "levels 2, 4"),
            ("series: T terms of 2/4 (blocked) or 8 bits (per channel) stacked along K + one DequantizeLinear, "
             "input tiled T times (or SeriesMatMul/SeriesConv with function bodies)", "series b, T"),
        ],
    }

    def offer(self, node: CompressibleNode, context: GraphContext, *, levels: Sequence[int | str] = LEVELS,
              block_size: int = 32) -> Offer:
        formats = [FLOAT]
        for lv in levels:
            if lv == "float":
                continue
            block = block_size if lv in (2, 4) else None
            acts = ("int16" if lv == 16 else "int8") if self.activations else None
            formats.append(Format("qdq", int(lv), block, activations=acts))
        return Offer(node.name, tuple(formats))

    def offer_series(self, node: CompressibleNode, context: GraphContext, *, bits: Sequence[int] = (2, 4, 8),
                     terms: Sequence[int] = (1, 2, 3, 4), block_size: int = 32) -> Offer:
        formats = [FLOAT] + [Format("series", int(b), block_size if int(b) < 8 else None, terms=int(t))
                             for b in bits for t in terms]
        return Offer(node.name, tuple(formats))

    def session(self) -> SessionSettings:
        return SessionSettings(
            providers=(("CPUExecutionProvider", ()),),
            config=(("session.qdq_matmulnbits_accuracy_level", "0"),),
            description="ONNX Runtime CPU with session.qdq_matmulnbits_accuracy_level=0 (exact Q/DQ semantics)",
        )

    def rewrite(self, model: onnx.ModelProto, plans: Mapping[str, NodePlan]) -> Rewrite:
        self.check_plans(plans, ("float", "qdq", "series"))
        weights = {n: p.weight for n, p in plans.items() if p.format.kind == "qdq"}
        acts = {n: p.input for n, p in plans.items() if p.format.kind == "qdq" and p.format.activations}
        series = {n: p.weight for n, p in plans.items() if p.format.kind == "series"}
        qdq = QDQPass(weights, acts)
        series_pass = SeriesPass(series, form=self.series_form)
        out = apply_passes(model, [qdq, series_pass], replaced=[*weights, *series])
        notes = qdq.result.notes() + series_pass.result.notes()
        return Rewrite(model=out, written={n: f.name for n, f in ((n, p.format) for n, p in plans.items())
                                           if f.kind != "float"}, notes=notes)
