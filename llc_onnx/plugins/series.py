"""The series pattern in ONNX and its fused node.

ONNX Runtime runs a series weight ``W ≈ Σ_t W_t`` (T low-bit terms, :mod:`llc_onnx.plugins.layout`) as
``MatMulNBits(Concat(x, …, x; axis=-1), B)`` with ``K_node = T·K``: the input tiled T times meets the T terms
stacked along K. A GPU series kernel reads the same bytes and the *untiled* input, so for GPU execution the
pair becomes one node ``llc_onnx::SeriesMatMulNBits(x, B, scales[, bias])`` with attributes ``K`` (one
term), ``N``, ``bits``, ``block_size``, ``terms``. The rewrite never touches the input model.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from ..errors import LLCError
from ..model_io import infer_shapes

MS_DOMAIN = "com.microsoft"
SERIES_DOMAIN = "llc_onnx"
SERIES_OP = "SeriesMatMulNBits"


@dataclass(frozen=True)
class SeriesMatch:
    """A ``MatMulNBits`` node fed by ``Concat`` of ``terms`` copies of ``input`` along the last axis."""

    node: str        # MatMulNBits node name
    concat: str      # Concat node name
    input: str       # the untiled activation
    terms: int
    K: int           # reduction length of one term


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Known tensor ranks (graph inputs/outputs, value_info, after shape inference on a copy)."""
    try:
        inferred = infer_shapes(model)
    except Exception:  # noqa: BLE001 - ranks are a convenience; without them only axis=-1 matches
        inferred = model
    g = inferred.graph
    out = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def _optional(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def find_series(model: onnx.ModelProto) -> list[SeriesMatch]:
    """Every fusable series pattern (graph order). A MatMulNBits with zero points or ``g_idx`` is not a
    series (the format is symmetric) and is left alone."""
    producers = {o: n for n in model.graph.node for o in n.output}
    ranks = None
    found = []
    for n in model.graph.node:
        if n.op_type != "MatMulNBits" or n.domain != MS_DOMAIN:
            continue
        if _optional(n, 3) or _optional(n, 4):
            continue
        c = producers.get(n.input[0])
        if c is None or c.op_type != "Concat" or c.domain not in ("", "ai.onnx") or len(c.input) < 2:
            continue
        if len(set(c.input)) != 1:
            continue
        axis = _attrs(c).get("axis")
        if axis != -1:
            ranks = _ranks(model) if ranks is None else ranks
            if axis is None or ranks.get(c.input[0]) != axis + 1:
                continue
        a = _attrs(n)
        terms, kt, bs = len(c.input), int(a["K"]), int(a["block_size"])
        if kt % terms or (kt // terms) % bs:
            continue
        found.append(SeriesMatch(node=n.name, concat=c.name, input=c.input[0], terms=terms, K=kt // terms))
    return found


def fuse_series(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with each :func:`find_series` pattern replaced by one ``llc_onnx::SeriesMatMulNBits``
    node (same name and output; a Concat left without consumers is removed). Nodes must be named
    (``model_io.prepare_model`` names them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    matches = {m.node: m for m in find_series(out)}
    if not matches:
        return out
    if any(not n.name for n in out.graph.node if n.op_type == "MatMulNBits"):
        raise LLCError("model: MatMulNBits nodes without names; name them first (llc_onnx.model_io.prepare_model)")
    nodes = []
    for n in out.graph.node:
        m = matches.get(n.name)
        if m is None:
            nodes.append(n)
            continue
        a = _attrs(n)
        inputs = [m.input, n.input[1], n.input[2]]
        bias = _optional(n, 5)
        if bias:
            inputs.append(bias)
        nodes.append(helper.make_node(SERIES_OP, inputs, list(n.output), name=n.name, domain=SERIES_DOMAIN,
                                      K=m.K, N=int(a["N"]), bits=int(a.get("bits", 4)),
                                      block_size=int(a["block_size"]), terms=m.terms))
    used = {i for n in nodes for i in n.input} | {o.name for o in out.graph.output}
    nodes = [n for n in nodes if not (n.op_type == "Concat" and n.name in {m.concat for m in matches.values()}
                                      and not any(o in used for o in n.output))]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(o.domain == SERIES_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(SERIES_DOMAIN, 1))
    return out
