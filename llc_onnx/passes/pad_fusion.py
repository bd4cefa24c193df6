"""Fold a zero ``Pad`` into the ``Conv`` that reads it (exact): ``Conv(Pad(x, p), W, pads=c)`` becomes
``Conv(x, W, pads=c + p)``.

Why the ORT CPU target needs it: ONNX Runtime folds such a Pad into the float Conv itself (its ``PadFusion``),
so the float model never runs it; once a W8A8 plan puts ``QuantizeLinear → DequantizeLinear`` between the Pad
and the Conv, that fusion no longer matches and the Pad runs in float between two integer convs (measured on
EfficientNet-Lite0, whose TF-style "same" padding is an explicit Pad before each strided and depthwise conv:
17 float Pads, each with its own Q/DQ pair; the W8A8 model ran at 0.75× FP32 speed instead of 1.7×). Writing
the padding into the Conv before the Q/DQ are placed keeps the integer chain unbroken.

A Pad is folded when: mode ``constant`` (the default), constant value absent or 0, ``pads`` (and ``axes``)
computed from constants only (initializers, ``Constant`` nodes, or a constant subgraph such as the
Shape-free ConstantOfShape/Concat/Slice/Transpose/Cast chains exporters write — evaluated with ONNX's
reference implementation), no padding of the batch and channel axes, no negative padding (cropping), the
Pad's only consumer is an ONNX-domain ``Conv`` reading it as its data input, with ``auto_pad`` NOTSET and
the Pad output not a graph output. Zero padding commutes with quantization whenever 0 is exactly
representable (every ONNX Q/DQ with an integer zero point), so a W8A8 input quantizer measured on the Pad's
output is the same quantizer on its input. Like the other passes it leaves what it replaced in the graph (the
pads' constant subgraph): :func:`~llc_onnx.passes.common.apply_passes` removes what nothing reads.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from llc_onnx.passes import common

__all__ = ["FusePadIntoConvPass", "fuse_pad_into_conv"]

_MAX_EVAL_DEPTH = 32


def _constant(value: ir.Value | None, opset: int, depth: int = 0) -> np.ndarray | None:
    """The value of ``value`` when constants alone compute it (None otherwise)."""
    if value is None:
        return None
    t = ir.convenience.get_const_tensor(value)
    if t is not None:
        return np.asarray(t.numpy())
    node = value.producer()
    if node is None or depth > _MAX_EVAL_DEPTH or node.domain not in ("", "ai.onnx") or node.op_type in (
            "QuantizeLinear", "DequantizeLinear", "Shape", "Size") or any(
            isinstance(a.value, ir.Graph) or a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()):
        return None
    feeds = {}
    for i, v in enumerate(node.inputs):
        if v is None:
            continue
        a = _constant(v, opset, depth + 1)
        if a is None:
            return None
        feeds[v.name or f"in{i}"] = a
    from onnx.reference import ReferenceEvaluator

    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend([(v.name or f"in{i}") if v is not None else "" for i, v in enumerate(node.inputs)])
    try:
        outs = ReferenceEvaluator(proto, opsets={"": opset}).run(None, feeds)
    except Exception:  # noqa: BLE001 - not foldable here: the Pad stays (ORT may still fold it)
        return None
    idx = list(node.outputs).index(value)
    return np.asarray(outs[idx])


def _foldable(pad: ir.Node, opset: int) -> tuple[ir.Node, np.ndarray] | None:
    """(the Conv, the spatial pads [begin..., end...]) when ``pad`` can be folded into its consumer."""
    if pad.domain not in ("", "ai.onnx") or len(pad.inputs) < 2:
        return None
    mode = pad.attributes.get("mode")
    if mode is not None and mode.as_string() != "constant":
        return None
    out = pad.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    conv, idx = uses[0].node, uses[0].idx
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or idx != 0:
        return None
    auto_pad = conv.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
        return None
    cval = pad.inputs[2] if len(pad.inputs) > 2 else None
    if cval is not None:
        c = _constant(cval, opset)
        if c is None or c.size != 1 or float(c.reshape(-1)[0]) != 0.0:
            return None
    pads = _constant(pad.inputs[1], opset)
    rank = len(conv.inputs[1].shape) if conv.inputs[1] is not None and conv.inputs[1].shape is not None else None
    if pads is None or rank is None:
        return None
    pads = pads.astype(np.int64).reshape(-1)
    axes_v = pad.inputs[3] if len(pad.inputs) > 3 else None
    if axes_v is not None:
        axes = _constant(axes_v, opset)
        if axes is None:
            return None
        axes = [int(a) % rank for a in axes.reshape(-1)]
        full = np.zeros(2 * rank, np.int64)
        for k, a in enumerate(axes):
            full[a], full[a + rank] = pads[k], pads[k + len(axes)]
        pads = full
    if pads.size != 2 * rank or (pads < 0).any() or pads[[0, 1, rank, rank + 1]].any():
        return None
    return conv, np.concatenate([pads[2:rank], pads[rank + 2:]])


class FusePadIntoConvPass(ir.passes.InPlacePass):
    """Fold zero Pads into the Conv they feed (module docstring). ``fused`` lists (pad, conv) names."""

    def __init__(self):
        super().__init__()
        self.fused: list[tuple[str, str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = common.default_opset(model) or 21
        for pad in [n for n in graph if n.op_type == "Pad"]:
            found = _foldable(pad, opset)
            if found is None:
                continue
            conv, extra = found
            k = extra.size // 2
            old = conv.attributes.get("pads")
            base = np.zeros(2 * k, np.int64) if old is None else np.asarray(old.as_ints(), np.int64)
            conv.attributes["pads"] = ir.AttrInt64s("pads", [int(v) for v in base + extra])
            conv.replace_input_with(0, pad.inputs[0])
            graph.remove(pad, safe=True)
            self.fused.append((pad.name, conv.name))
        return ir.passes.PassResult(model, modified=bool(self.fused))


def fuse_pad_into_conv(model: onnx.ModelProto) -> onnx.ModelProto:
    """:class:`FusePadIntoConvPass` on a copy of ``model`` (the constants only the Pads read are removed)."""
    return common.apply_passes(model, [FusePadIntoConvPass()])
