"""Which nodes of a model can be compressed, and why the others cannot.

A node is compressible when it is a ``MatMul``, ``Gemm`` or ``Conv`` in the main graph whose weight is a
float initializer (FLOAT, FLOAT16, BFLOAT16: the types DequantizeLinear and MatMulNBits produce; a DOUBLE
weight is skipped) in the layout below:

=========  ======================  ==========  =============
op         weight                  out_axis    reduce_axis
=========  ======================  ==========  =============
MatMul     input 1, rank 2 [K, N]  1           0
Gemm       B (input 1), rank 2     0 if transB else 1      the other
Conv       W (input 1) [M, C/g,…]  0           1
=========  ======================  ==========  =============

Only initializers are taken. Weights computed by constant subgraphs (a ``Constant`` node, ``Transpose`` /
``Cast`` / ``Reshape`` of an initializer, ...) become initializers in ``model_io.prepare_model``
(:func:`~llc_onnx.model_io.fold_constant_weights`), and :func:`inspect_model` looks at the model as
``prepare_model`` leaves it (:func:`~llc_onnx.model_io.intake_view`), so ``inspect`` and ``optimize`` list the
same nodes. Weights that stay ``Constant`` node outputs,
graph inputs/activations, non-float, batched (rank ≥ 3 MatMul) or on the left side (W·X) are reported as
skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from .model_io import default_opset, initializer_bytes, intake_view, node_names, tensor_nbytes

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
CANDIDATE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@dataclass(frozen=True)
class CompressibleNode:
    name: str                 # node name (unique after prepare_model)
    op_type: str              # "MatMul" | "Gemm" | "Conv"
    weight: str               # initializer name (ONNX layout)
    input: str                # activation input tensor name
    weight_shape: tuple[int, ...]
    out_axis: int             # axis of W that indexes output channels
    reduce_axis: int          # axis of W summed against the input
    bias: str | None
    group: int                # Conv groups (1 otherwise)
    shared_with: tuple[str, ...]  # other nodes using the same initializer


def _dtype_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(int(elem_type))


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_compressible(model: onnx.ModelProto) -> tuple[list[CompressibleNode], list[tuple[str, str]]]:
    """Return ``(nodes, skipped)``: the compressible nodes in graph order, and ``(node name, reason)`` for
    every other MatMul/Gemm/Conv/ConvTranspose of the main graph. Unnamed nodes are reported under the
    name :func:`llc_onnx.model_io.prepare_model` would give them (``<op_type>_<index>``)."""
    graph = model.graph
    names = node_names(graph)
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    constant_outputs = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list[str]] = {}
    for node, name in zip(graph.node, names):
        for inp in set(node.input):
            if inp:
                consumers.setdefault(inp, []).append(name)

    def where(tensor: str) -> str:
        if tensor in graph_inputs:
            return "a graph input"
        if tensor in constant_outputs:
            return "a Constant node output"
        return "an activation"

    def weight_problem(w: str) -> str | None:
        """None when ``w`` is a float, non-input initializer; else the reason."""
        if w in graph_inputs and w in inits:
            return (f"weight '{w}' is a graph input (overridable initializer); "
                    "run prepare_model or re-export without keep_initializers_as_inputs")
        if w in constant_outputs:
            return f"weight '{w}' comes from a Constant node, not an initializer; fold it into an initializer"
        if w not in inits:
            return f"weight '{w}' is a graph input/activation"
        if inits[w].data_type == TensorProto.DOUBLE:
            return (f"weight '{w}' is DOUBLE; quantized weights dequantize to float32/float16/bfloat16 only: "
                    "convert the model to float32")
        if inits[w].data_type not in FLOAT_TYPES:
            return f"weight '{w}' is not float ({_dtype_name(inits[w].data_type)})"
        return None

    nodes: list[CompressibleNode] = []
    skipped: list[tuple[str, str]] = []
    for node, name in zip(graph.node, names):
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in CANDIDATE_OPS:
            continue
        ins = list(node.input)
        if op == "ConvTranspose":
            skipped.append((name, "ConvTranspose is not supported"))
            continue
        if len(ins) < 2 or not ins[0] or not ins[1]:
            skipped.append((name, "missing input"))
            continue
        a, w = ins[0], ins[1]
        a_const, w_const = a in inits and a not in graph_inputs, w in inits and w not in graph_inputs
        if op == "MatMul":
            if a_const and w_const:
                skipped.append((name, "MatMul between two constants (constant-foldable)"))
                continue
            if a_const and not w_const:
                skipped.append((name, f"weight '{a}' is input 0 (W·X); only X·W with the weight as input 1 is supported"))
                continue
            if not w_const and w not in constant_outputs and w not in graph_inputs:
                skipped.append((name, "MatMul between two activations"))
                continue
        elif op == "Gemm" and a_const and not w_const:
            skipped.append((name, f"weight '{a}' is input A (W·X); only A·B with the weight as B is supported"))
            continue
        problem = weight_problem(w)
        if problem:
            skipped.append((name, problem))
            continue
        shape = tuple(int(d) for d in inits[w].dims)
        bias = ins[2] if len(ins) > 2 and ins[2] else None
        group = 1
        if op == "MatMul":
            if len(shape) != 2:
                skipped.append((name, f"weight rank {len(shape)} ({'batched MatMul' if len(shape) > 2 else 'vector MatMul'})"))
                continue
            out_axis, reduce_axis = 1, 0
        elif op == "Gemm":
            if len(shape) != 2:
                skipped.append((name, f"weight rank {len(shape)} (Gemm needs rank 2)"))
                continue
            out_axis, reduce_axis = (0, 1) if _attr(node, "transB", 0) else (1, 0)
        else:  # Conv
            if len(shape) < 3:
                skipped.append((name, f"weight rank {len(shape)} (Conv needs rank ≥ 3)"))
                continue
            out_axis, reduce_axis = 0, 1
            group = int(_attr(node, "group", 1))
        shared = tuple(n for n in consumers.get(w, []) if n != name)
        nodes.append(CompressibleNode(name=name, op_type=op, weight=w, input=a, weight_shape=shape,
                                      out_axis=out_axis, reduce_axis=reduce_axis, bias=bias, group=group,
                                      shared_with=shared))
    return nodes, skipped


def _value_info(vi: onnx.ValueInfoProto) -> dict:
    t = vi.type
    if t.HasField("tensor_type"):
        tt = t.tensor_type
        dtype = _dtype_name(tt.elem_type).lower() if tt.elem_type else None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                     for d in tt.shape.dim]  # -1 (some converters' dynamic dim) is unknown
        else:
            shape = None
    else:
        dtype, shape = t.WhichOneof("value") or None, None
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def inspect_model(model: onnx.ModelProto) -> dict:
    """Plain-data description of ``model`` (what ``llc-onnx inspect`` prints / emits as JSON):
    ``opset``, ``ir_version``, ``producer``, ``inputs``/``outputs`` (name, dtype, shape with ints for
    static dims, strings for symbolic ones, null for unknown or ``-1``), ``compressible`` (name, op_type,
    weight, shape, dtype, params, bytes, out_axis, reduce_axis, group, depthwise, bias, shared_with),
    ``skipped`` (name, op_type, reason) and ``totals`` (compressible params/bytes with each shared
    initializer counted once, number and bytes of all initializers of the file). Compressible nodes are
    those of :func:`~llc_onnx.model_io.intake_view` (constant weights folded, initializers listed as inputs
    taken as constants), as ``prepare_model`` gives ``optimize`` (``model`` itself is not modified)."""
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    op_of = dict(zip(node_names(graph), (n.op_type for n in graph.node)))
    folded = intake_view(model)
    inits = {t.name: t for t in folded.graph.initializer}
    nodes, skipped = find_compressible(folded)
    comp = []
    for n in nodes:
        t = inits[n.weight]
        params = int(np.prod(n.weight_shape, dtype=np.int64))
        depthwise = n.op_type == "Conv" and n.group > 1 and n.weight_shape[1] == 1
        comp.append({
            "name": n.name, "op_type": n.op_type, "weight": n.weight, "shape": list(n.weight_shape),
            "dtype": _dtype_name(t.data_type).lower(), "params": params, "bytes": tensor_nbytes(t),
            "out_axis": n.out_axis, "reduce_axis": n.reduce_axis, "group": n.group, "depthwise": depthwise,
            "bias": n.bias, "shared_with": list(n.shared_with),
        })
    unique = {n.weight: inits[n.weight] for n in nodes}
    return {
        "opset": default_opset(model),
        "ir_version": int(model.ir_version),
        "producer": (model.producer_name + " " + model.producer_version).strip(),
        "inputs": [_value_info(i) for i in graph.input if i.name not in init_names],
        "outputs": [_value_info(o) for o in graph.output],
        "compressible": comp,
        "skipped": [{"name": name, "op_type": op_of.get(name, ""), "reason": reason} for name, reason in skipped],
        "totals": {
            "nodes": len(graph.node),
            "compressible_nodes": len(nodes),
            "compressible_params": int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in unique.values())),
            "compressible_bytes": int(sum(tensor_nbytes(t) for t in unique.values())),
            "initializers": len(graph.initializer),
            "initializer_bytes": initializer_bytes(model),
        },
    }
