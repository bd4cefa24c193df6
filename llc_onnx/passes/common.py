"""Helpers shared by the graph-rewriting passes (``passes/qdq.py``, ``passes/lowrank.py``).

Everything here works on :mod:`onnx_ir` objects. Nodes are identified by their (unique) name, as
produced by ``model_io.prepare_model``; only nodes of the main graph are rewritten.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from llc_onnx.errors import LLCError

#: op types the passes know how to rewrite, and the input index that holds the weight.
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}

_FLOAT_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
    ir.DataType.DOUBLE: np.float64,
}


def default_opset(model: ir.Model) -> int:
    """Version of the default ("" / "ai.onnx") opset of ``model``."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def set_default_opset(model: ir.Model, version: int, ir_version: int) -> None:
    """Relabel the default opset to ``version`` (never lowers it) and raise the IR version to at
    least ``ir_version``. Also updates ``model.graph.opset_imports`` (serialised from the model)."""
    key = "ai.onnx" if "ai.onnx" in model.opset_imports and "" not in model.opset_imports else ""
    if default_opset(model) < version:
        model.opset_imports[key] = version
        model.graph.opset_imports[key] = version
    if model.ir_version < ir_version:
        model.ir_version = ir_version


def nodes_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    """Main-graph nodes by name (raises on duplicate names: run ``prepare_model`` first)."""
    out: dict[str, ir.Node] = {}
    for node in graph:
        if not node.name:
            continue
        if node.name in out:
            raise LLCError(
                f"node '{node.name}': the name is used by two nodes; run model_io.prepare_model first"
            )
        out[node.name] = node
    return out


def find_nodes(graph: ir.Graph, names: Iterable[str], what: str) -> list[ir.Node]:
    """The main-graph nodes named in ``names``, in graph (topological) order."""
    wanted = set(names)
    by_name = nodes_by_name(graph)
    missing = sorted(wanted - by_name.keys())
    if missing:
        raise LLCError(
            f"node '{missing[0]}': {what} names a node that is not in the main graph "
            f"({len(missing)} missing); use the node names of the prepared model"
        )
    return [n for n in graph if n.name in wanted]


def weight_value(node: ir.Node) -> tuple[int, ir.Value, np.ndarray]:
    """(input index, value, float array) of the initializer weight of a MatMul/Gemm/Conv node."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_INPUT:
        raise LLCError(
            f"node '{node.name}' (op {node.op_type}): not a compressible op; only MatMul, Gemm and Conv "
            "weights can be rewritten"
        )
    idx = WEIGHT_INPUT[node.op_type]
    value = node.inputs[idx] if len(node.inputs) > idx else None
    if value is None or value.const_value is None or not value.is_initializer():
        raise LLCError(
            f"node '{node.name}' (op {node.op_type}): input {idx} is not an initializer; only nodes "
            "with a constant weight can be compressed"
        )
    if value.is_graph_input():
        raise LLCError(
            f"node '{node.name}': weight '{value.name}' is also a graph input (it can be overridden at "
            "run time); remove it from the graph inputs first"
        )
    dtype = value.const_value.dtype
    if dtype not in _FLOAT_DTYPES:
        raise LLCError(
            f"node '{node.name}': weight '{value.name}' has type {dtype.name}; only float weights can be "
            "compressed"
        )
    return idx, value, value.const_value.numpy()


def np_float_dtype(dtype: ir.DataType | None) -> type:
    """Numpy float type for an IR float data type (float32 when unknown)."""
    return _FLOAT_DTYPES.get(dtype, np.float32) if dtype is not None else np.float32


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


class Names:
    """Fresh, readable names for new values/nodes: the preferred name when free, else the fallbacks,
    else ``<preferred>_<k>``."""

    def __init__(self, graph: ir.Graph):
        self.used: set[str] = set()
        for g in (graph, *graph.subgraphs()):
            for v in (*g.inputs, *g.outputs, *g.initializers.values()):
                if v.name:
                    self.used.add(v.name)
            for node in g:
                if node.name:
                    self.used.add(node.name)
                for v in node.outputs:
                    if v.name:
                        self.used.add(v.name)

    def fresh(self, preferred: str, *fallbacks: str) -> str:
        for name in (preferred, *fallbacks):
            if name not in self.used:
                self.used.add(name)
                return name
        k = 1
        while f"{preferred}_{k}" in self.used:
            k += 1
        name = f"{preferred}_{k}"
        self.used.add(name)
        return name


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(tensor.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> bool:
    """Remove initializer ``value`` when no node (in any subgraph) uses it and it is not a graph
    output. Returns whether it was removed."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return False
    if graph.initializers.get(value.name) is value:
        del graph.initializers[value.name]
        return True
    return False


def run_on_proto(model: onnx.ModelProto, make_pass: Callable[[], ir.passes.PassBase]) -> onnx.ModelProto:
    """Apply an in-place onnx-ir pass to a copy of ``model`` and return the new ModelProto.
    The input proto is never modified."""
    if not isinstance(model, onnx.ModelProto):
        raise LLCError(f"expected an onnx.ModelProto, got {type(model).__name__}; load the model first")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ir_model = ir.serde.deserialize_model(copy)
    result = make_pass()(ir_model)
    return ir.serde.serialize_model(result.model)
