"""llc-onnx's weight-only nodes as nodes TensorRT's ONNX parser builds: plugins and native weight-only INT4.

TensorRT's parser imports an op type it has no importer for as a plugin: it looks up the creator named
``op_type`` with the node's ``plugin_version`` (default "1") and ``plugin_namespace`` attributes, and hands
it the node attributes the plugin declares (the others are ignored). So each converted node is

* ``matmul_int2`` / ``matmul_int8`` (``matmul_int4`` with ``int4="plugin"``): inputs ``(x, words, scales)``,
  attributes ``K, N, block_size``;
* ``series_matmul``: inputs ``(x, words, scales)`` with ``x`` untiled, attributes ``K`` (one term), ``N``,
  ``bits``, ``block_size``, ``terms``;

all with ``plugin_namespace="llc_onnx"``, ``plugin_version="1"``, ``aot=1`` (use the ahead-of-time
implementation), in the node domain ``llc_onnx.tensorrt`` (imported at version 1; TensorRT matches on the op
type, the domain keeps ``onnx.checker`` valid). ``words`` is the int32 view ``[N, n_blk·blob/4]`` of the
MatMulNBits bytes (same bytes, a type TensorRT's parser accepts as a constant), ``scales`` as stored (fp32 or
fp16), collapsed to one per (channel, term) when every block repeats it. A bias becomes an ``Add`` after the plugin.

4-bit weights (``int4="native"``, the default) become ``DequantizeLinear`` (INT4 ``[K, N]``, ``axis=0``,
``block_size``, scales ``[n_blk, N]`` in the activation dtype) + ``MatMul``: TensorRT runs that as its own
weight-only INT4 GEMM. MatMulNBits with zero points or ``g_idx`` has no conversion (llc-onnx never writes
them): a one-line LLCError names the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import LLCError
from ...model_io import infer_shapes
from ..layout import n_blocks, per_channel_scales, unpack_codes
from ..series import MS_DOMAIN, SERIES_DOMAIN, SERIES_OP, fuse_series

PLUGIN_NAMESPACE = "llc_onnx"
PLUGIN_VERSION = "1"
PLUGIN_DOMAIN = "llc_onnx.tensorrt"
MATMUL_PLUGINS = {2: "matmul_int2", 4: "matmul_int4", 8: "matmul_int8"}
SERIES_PLUGIN = "series_matmul"
INT4_MODES = ("native", "plugin")


@dataclass
class Conversion:
    """The converted model and what became what."""

    model: onnx.ModelProto
    plugins: dict[str, int] = field(default_factory=dict)   # plugin op type -> nodes
    native_int4: int = 0                                     # MatMulNBits -> DequantizeLinear + MatMul


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        g = infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - without inference only declared types are known
        g = model.graph
    out = {i.name: i.data_type for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type:
            out[vi.name] = vi.type.tensor_type.elem_type
    return out


class _Builder:
    """Collects the new initializers (each derived array once) and nodes."""

    def __init__(self, model: onnx.ModelProto):
        self.inits = {i.name: i for i in model.graph.initializer}
        self.added: dict[str, onnx.TensorProto] = {}

    def array(self, name: str, where: str) -> np.ndarray:
        if name not in self.inits:
            raise LLCError(f"node '{where}': input '{name}' is not an initializer; the packed weights and scales "
                           "must be constants")
        return numpy_helper.to_array(self.inits[name])

    def add(self, name: str, arr: np.ndarray) -> str:
        if name not in self.added:
            self.added[name] = numpy_helper.from_array(arr, name)
        return name


def _optional(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _plugin_node(op: str, inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=name, domain=PLUGIN_DOMAIN,
                            plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION, aot=1, **attrs)


def _with_bias(after: list, node: onnx.NodeProto, bias: str, out: str, b: _Builder, x_type: int) -> str:
    """Output name for the matmul part; appends to ``after`` an ``Add`` of the bias (in the activation dtype)."""
    if not bias:
        return out
    arr = b.array(bias, node.name).astype(helper.tensor_dtype_to_np_dtype(x_type))
    mm_out = f"{out}.no_bias"
    after.append(helper.make_node("Add", [mm_out, b.add(f"{bias}.{x_type}", arr)], [out], name=f"{node.name}.bias"))
    return mm_out


def to_tensorrt(model: onnx.ModelProto, *, int4: str = "native") -> Conversion:
    """A copy of ``model`` whose weight-only nodes TensorRT can parse (see the module docstring)."""
    if int4 not in INT4_MODES:
        raise LLCError(f"int4={int4!r}: use one of {', '.join(INT4_MODES)}")
    fused = fuse_series(model)
    types = _elem_types(fused)
    opset = next((o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")), 21)
    b = _Builder(fused)
    conv = Conversion(model=fused)
    new_nodes: list[onnx.NodeProto] = []
    for node in fused.graph.node:
        is_nbits = node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN
        is_series = node.op_type == SERIES_OP and node.domain == SERIES_DOMAIN
        if not (is_nbits or is_series):
            new_nodes.append(node)
            continue
        a = _attrs(node)
        K, N, bits, bs = int(a["K"]), int(a["N"]), int(a.get("bits", 4)), int(a["block_size"])
        terms = int(a.get("terms", 1))
        if is_nbits and (_optional(node, 3) or _optional(node, 4)):
            raise LLCError(f"node '{node.name}' (MatMulNBits): zero points / g_idx have no TensorRT conversion; "
                           "requantize symmetric without act-order (llc-onnx writes neither)")
        x, bname, sname = node.input[0], node.input[1], node.input[2]
        bias = node.input[3] if is_series and len(node.input) > 3 else _optional(node, 5) if is_nbits else ""
        x_type = types.get(x, TensorProto.FLOAT)
        raw = b.array(bname, node.name)
        scales = b.array(sname, node.name).reshape(-1)
        if scales.dtype not in (np.float32, np.float16):
            scales = scales.astype(np.float32)
        nblk = n_blocks(K, bs)
        after: list[onnx.NodeProto] = []
        out = _with_bias(after, node, bias, node.output[0], b, x_type)

        if is_nbits and bits == 4 and int4 == "native":
            if opset < 21:
                raise LLCError(f"node '{node.name}': native INT4 needs opset ≥ 21 (model has {opset}); convert the "
                               "model to opset 21 or use int4='plugin'")
            q = unpack_codes(raw, K, 4).astype(np.int16) - 8                      # [N, K]
            w = b.add(f"{bname}.int4", np.ascontiguousarray(q.T).astype(ml_dtypes.int4))
            s = scales.reshape(N, nblk).T.astype(helper.tensor_dtype_to_np_dtype(x_type))
            sn = b.add(f"{sname}.{x_type}.kn", np.ascontiguousarray(s))
            new_nodes.append(helper.make_node("DequantizeLinear", [w, sn], [f"{node.name}.w"],
                                              name=f"{node.name}.dq", axis=0, block_size=bs))
            new_nodes.append(helper.make_node("MatMul", [x, f"{node.name}.w"], [out], name=node.name))
            conv.native_int4 += 1
        else:
            words = b.add(f"{bname}.words", np.ascontiguousarray(raw).reshape(N, -1).view("<i4").copy())
            pc = per_channel_scales(scales, N, nblk, terms)
            sn = b.add(f"{sname}.per_channel", pc) if pc is not None and nblk > 1 else \
                b.add(f"{sname}.flat", scales)
            if is_series:
                op = SERIES_PLUGIN
                new_nodes.append(_plugin_node(op, [x, words, sn], out, node.name, K=K, N=N, bits=bits,
                                              block_size=bs, terms=terms))
            else:
                op = MATMUL_PLUGINS[bits]
                new_nodes.append(_plugin_node(op, [x, words, sn], out, node.name, K=K, N=N, block_size=bs))
            conv.plugins[op] = conv.plugins.get(op, 0) + 1
        new_nodes.extend(after)

    out_model = onnx.ModelProto()
    out_model.CopyFrom(fused)
    del out_model.graph.node[:]
    out_model.graph.node.extend(new_nodes)
    used = {i for n in new_nodes for i in n.input}
    kept = [i for i in out_model.graph.initializer if i.name in used]
    del out_model.graph.initializer[:]
    out_model.graph.initializer.extend(kept + [t for n, t in b.added.items() if n in used])
    produced = {o for n in new_nodes for o in n.output}
    vis = [v for v in out_model.graph.value_info if v.name in produced]
    del out_model.graph.value_info[:]
    out_model.graph.value_info.extend(vis)
    if conv.plugins and not any(o.domain == PLUGIN_DOMAIN for o in out_model.opset_import):
        out_model.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    for dom in (MS_DOMAIN, SERIES_DOMAIN):
        if not any(n.domain == dom for n in new_nodes):
            keep = [o for o in out_model.opset_import if o.domain != dom]
            del out_model.opset_import[:]
            out_model.opset_import.extend(keep)
    conv.model = out_model
    return conv
