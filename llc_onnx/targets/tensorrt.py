"""TensorRT (``--target tensorrt``): explicit quantization with Q/DQ, and a static checker of its rules.

Formats (TensorRT 10.x, "Working with Quantized Types" / "Explicit Quantization", and the ONNX parser's
Q/DQ importer, onnx-tensorrt ``onnxOpImporters.cpp``):

* Conv / Gemm / MatMul at 8 bits: **W8A8** — the weight as INT8 ``DequantizeLinear`` per output channel
  (full int8 codes: TensorRT's int8 GEMMs accumulate in int32, no reduce-range needed), the activation
  input as an INT8 ``QuantizeLinear → DequantizeLinear`` pair per tensor, symmetric (zero point 0).
  TensorRT fuses the pair into its int8 kernels and chooses the output precision itself.
* Gemm / MatMul at 4 bits: **INT4 weight-only**, blocked along K with a block of 64 or 128 (the block
  sizes TensorRT supports for INT4), K divisible by the block, activations float.
* Levels TensorRT has no kernel for — INT2, weight-only INT8, series terms, INT4 with other blocks — are
  **plugin nodes** (a custom-domain node with ``plugin_namespace``/``plugin_version`` that TensorRT's
  parser resolves from its plugin registry). They are offered only with ``plugins=True`` and written by the
  ``plugin_writer`` the plugin helper provides. 16-bit and INT4 Conv are refused.
* Series terms (T ≥ 2 b-bit terms, MatMul/Gemm, ``plugins=True`` only): the ``llc_onnx::series_matmul`` plugin
  node (:mod:`llc_onnx.plugins.tensorrt.convert`: the untiled input, the MatMulNBits bytes as int32 words,
  attributes K (one term, padded to whole blocks), N, bits, block_size, terms), written from the explicit
  MatMulNBits form of :mod:`llc_onnx.passes.series`. The model also carries a model-local function of the same
  op (the plugin's maths in standard ops): TensorRT 10's ONNX parser prefers a registered plugin to a local
  function for a node with ``plugin_namespace``, and a runtime without the plugin (ONNX Runtime CPU, the
  reference session here) runs the function. T = 1 is the single-level quantizer (``--method quant``); Conv
  has no series plugin.

:func:`check_tensorrt` reports every violation of the rules below with the node name (``RULES``).

Session of the verdict: ONNX Runtime's TensorRT execution provider (``trt_int8_enable``), CUDA and CPU
after it. Where it is not installed (this machine), :meth:`TensorRTTarget.reference_session` runs the Q/DQ
graph literally on CPU (``session.disable_quant_qdq=1``: no integer fusions, no MatMulNBits fusion): the
ONNX semantics TensorRT implements, up to its accumulation order; the report must say which one was used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx import TensorProto, numpy_helper

from llc_onnx.compressible import CompressibleNode
from llc_onnx.errors import LLCError
from llc_onnx.model_io import infer_shapes
from llc_onnx.passes.qdq import QDQPass
from llc_onnx.passes.w8a8 import W8A8Pass, W8A8Plan
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

__all__ = ["RULES", "TensorRTTarget", "Violation", "check_tensorrt", "INT4_BLOCKS", "OPSET_RANGE"]

#: INT4 block sizes TensorRT supports ("INT4 quantization requires per-block scales. The supported block
#: sizes are {64, 128}", TensorRT docs, quantization schemes)
INT4_BLOCKS = (64, 128)
#: default-domain opsets TensorRT 10.15's ONNX parser imports
OPSET_RANGE = (9, 24)
#: quantized types TensorRT accepts in Q/DQ
QTYPES_OK = {TensorProto.INT8: "INT8", TensorProto.INT4: "INT4", TensorProto.FLOAT8E4M3FN: "FP8",
             getattr(TensorProto, "FLOAT4E2M1", -1): "FP4"}
#: ops in the default domain TensorRT's parser does not import (quantized forms other than Q/DQ)
UNSUPPORTED_OPS = ("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear")
_WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")

RULES = {
    "opset": f"default-domain opset within {OPSET_RANGE[0]}..{OPSET_RANGE[1]} (TensorRT 10.15 parser)",
    "unsupported-op": f"no {', '.join(UNSUPPORTED_OPS)}: TensorRT imports quantization only as Q/DQ",
    "plugin": "a node outside the ONNX domain is a plugin: it needs string attributes plugin_namespace and "
              "plugin_version so TensorRT's parser finds it in the plugin registry",
    "type": "Q/DQ quantized type is INT8, INT4, FP8 or FP4 (no INT2, INT16, UINT8, INT32)",
    "zero-point": "zero points are constant and all zero (TensorRT only supports symmetric quantization)",
    "scale": "scales are constants, finite and > 0",
    "activation-per-tensor": "activation (non-constant) Q/DQ is per tensor",
    "per-channel-axis": "per-channel weight scales run along the output channels of the consuming op",
    "block": "block scales have the input's rank, one blocked axis, and divide it exactly",
    "int4": "INT4 is weight-only: a constant, blocked (block 64 or 128) along K, even last dimension, feeding "
            "MatMul/Gemm only",
    "w8a8": "an INT8 weight of Conv/Gemm/MatMul needs its activation input quantized too (TensorRT has no "
            "weight-only INT8)",
    "q-dq-pair": "a QuantizeLinear output is read by DequantizeLinear nodes only",
}


@dataclass(frozen=True)
class Violation:
    node: str
    rule: str
    message: str


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def check_tensorrt(model: onnx.ModelProto) -> list[Violation]:
    """Every violation of TensorRT's explicit-quantization rules (``RULES``) in ``model``, in graph order."""
    g = model.graph
    out: list[Violation] = []
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    const_types = {t.name: t.data_type for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            v = _attr(n, "value")
            if v is not None:
                consts[n.output[0]] = numpy_helper.to_array(v)
                const_types[n.output[0]] = v.data_type
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for t in n.input:
            if t:
                consumers.setdefault(t, []).append(n)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        out.append(Violation("<model>", "opset", f"default opset {opset} is outside {OPSET_RANGE[0]}.."
                             f"{OPSET_RANGE[1]}, what TensorRT 10.15 imports; convert the model's opset"))
    try:
        inferred = infer_shapes(model)
        shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                  for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
                  if v.type.tensor_type.HasField("shape")}
    except Exception:  # noqa: BLE001 - shapes only refine the int4/block checks
        shapes = {}
    for name, arr in consts.items():
        shapes[name] = list(arr.shape)

    def vio(node_name: str, rule: str, msg: str) -> None:
        out.append(Violation(node_name, rule, msg))

    for idx, n in enumerate(g.node):
        name = _node_name(n, idx)
        if n.domain not in ("", "ai.onnx"):
            attrs = {a.name: a for a in n.attribute}
            missing = [k for k in ("plugin_namespace", "plugin_version")
                       if k not in attrs or attrs[k].type != onnx.AttributeProto.STRING]
            if missing:
                vio(name, "plugin", f"{n.domain}::{n.op_type} is not an ONNX op and has no string attribute "
                                    f"{' / '.join(missing)}; TensorRT cannot import it (write it as a plugin node)")
            continue
        if n.op_type in UNSUPPORTED_OPS:
            vio(name, "unsupported-op", f"{n.op_type} is not imported by TensorRT; express it with Q/DQ")
            continue
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_dq = n.op_type == "DequantizeLinear"
        x = n.input[0]
        # quantized type: DQ input type / Q zero-point type (default uint8 when absent)
        if is_dq:
            qtype = const_types.get(x)
            if qtype is None and x in producer and producer[x].op_type == "QuantizeLinear":
                zp_name = producer[x].input[2] if len(producer[x].input) > 2 else ""
                qtype = const_types.get(zp_name, TensorProto.UINT8) if zp_name else \
                    _attr(producer[x], "output_dtype", TensorProto.UINT8) or TensorProto.UINT8
        else:
            zp_name = n.input[2] if len(n.input) > 2 else ""
            qtype = const_types.get(zp_name) if zp_name else (_attr(n, "output_dtype", 0) or TensorProto.UINT8)
        if qtype is not None and qtype not in QTYPES_OK:
            vio(name, "type", f"{n.op_type} on '{x}' uses {TensorProto.DataType.Name(qtype)}; TensorRT quantizes "
                              "to INT8, INT4, FP8 or FP4 only")
        # scale
        s_name = n.input[1] if len(n.input) > 1 else ""
        scale = consts.get(s_name)
        if scale is None:
            vio(name, "scale", f"scale '{s_name}' is not a constant; TensorRT needs build-time scales")
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            vio(name, "scale", f"scale '{s_name}' has non-positive or non-finite values; TensorRT needs scales > 0")
        # zero point
        zp_name = n.input[2] if len(n.input) > 2 else ""
        if zp_name:
            zp = consts.get(zp_name)
            if zp is None:
                vio(name, "zero-point", f"zero point '{zp_name}' is not a constant; TensorRT needs it all zero")
            elif np.any(zp.astype(np.float64) != 0):
                vio(name, "zero-point", f"zero point '{zp_name}' is not all zero; TensorRT only supports symmetric "
                                        "quantization")
        # granularity
        x_const = x in consts
        x_shape = shapes.get(x)
        if scale is not None and scale.size > 1:
            if not x_const and not (is_dq and x in producer and producer[x].input[0] in consts):
                vio(name, "activation-per-tensor", f"activation '{x}' has {scale.size} scales; TensorRT quantizes "
                                                   "activations per tensor")
            elif x_shape and scale.ndim == len(x_shape) and scale.ndim > 1:
                ratios = [(d // s if d and s else None) for d, s in zip(x_shape, scale.shape)]
                blocked = [i for i, r in enumerate(ratios) if r != 1]
                if len(blocked) != 1 or any(d and s and d % s for d, s in zip(x_shape, scale.shape)) or \
                        any(d and s and -(-d // s) != _attr(n, "block_size", d // s) and i in blocked
                            for i, (d, s) in enumerate(zip(x_shape, scale.shape))):
                    vio(name, "block", f"block scales {tuple(scale.shape)} for '{x}' {tuple(x_shape)}: TensorRT needs "
                                       "one blocked axis that the block size divides exactly")
        # what the DQ feeds
        if is_dq:
            users = consumers.get(n.output[0], [])
            is_int4 = qtype == TensorProto.INT4
            if is_int4:
                block = _attr(n, "block_size", 0)
                if not x_const:
                    vio(name, "int4", f"INT4 DequantizeLinear on activation '{x}'; TensorRT's INT4 is weight-only")
                if scale is not None and (scale.size <= 1 or not block):
                    vio(name, "int4", "INT4 weights need block scales (TensorRT: per-block INT4 only)")
                elif block and block not in INT4_BLOCKS:
                    vio(name, "int4", f"INT4 block size {block}; TensorRT supports {INT4_BLOCKS}")
                if x_shape and x_shape[-1] and x_shape[-1] % 2:
                    vio(name, "int4", f"INT4 weight '{x}' has an odd last dimension {x_shape[-1]}")
            for u in users:
                uname = _node_name(u, list(g.node).index(u))
                if is_int4 and not (u.op_type in ("MatMul", "Gemm") and len(u.input) > 1 and u.input[1] == n.output[0]):
                    vio(name, "int4", f"INT4 weight feeds {u.op_type} '{uname}'; TensorRT runs INT4 only as the "
                                      "weight of MatMul/Gemm")
                elif is_int4 and block:
                    axis = int(_attr(n, "axis", 1)) % max(len(x_shape or [0, 0]), 1)
                    k_axis = (1 if _attr(u, "transB", 0) else 0) if u.op_type == "Gemm" else 0
                    if axis != k_axis:
                        vio(name, "int4", f"INT4 weight of '{uname}' is blocked along axis {axis}, not its K axis "
                                          f"{k_axis}")
                if x_const and scale is not None and scale.ndim == 1 and scale.size > 1 and u.op_type in _WEIGHTED \
                        and len(u.input) > 1 and u.input[1] == n.output[0]:
                    axis = int(_attr(n, "axis", 1))
                    rank = len(x_shape) if x_shape else 2
                    axis %= rank
                    want = 0 if u.op_type == "Conv" else (rank - 1 if u.op_type == "MatMul" else
                                                          (0 if _attr(u, "transB", 0) else 1))
                    if u.op_type == "ConvTranspose":
                        want = 1
                    if axis != want:
                        vio(name, "per-channel-axis", f"per-channel scales of the weight of {u.op_type} '{uname}' run "
                                                      f"along axis {axis}; its output channels are axis {want}")
                if qtype == TensorProto.INT8 and x_const and u.op_type in _WEIGHTED and len(u.input) > 1 \
                        and u.input[1] == n.output[0]:
                    a = u.input[0]
                    p = producer.get(a)
                    if p is None or p.op_type != "DequantizeLinear":
                        vio(uname, "w8a8", f"{u.op_type} '{uname}' has an INT8 weight but a float activation "
                                           f"'{a}'; TensorRT has no weight-only INT8 (quantize the input too, or "
                                           "use a plugin)")
        else:
            for u in consumers.get(n.output[0], []):
                if u.op_type != "DequantizeLinear":
                    uname = _node_name(u, list(g.node).index(u))
                    vio(name, "q-dq-pair", f"QuantizeLinear output '{n.output[0]}' is read by {u.op_type} '{uname}'; "
                                           "TensorRT expects a DequantizeLinear")
    return out


class TensorRTTarget(Target):
    """TensorRT explicit quantization (see module docstring). ``plugins``: offer plugin formats for levels
    TensorRT has no kernel for; ``plugin_writer(model, plans) -> ModelProto`` writes them."""

    name = "tensorrt"
    summary = "TensorRT explicit quantization: symmetric INT8 W8A8 Q/DQ, INT4 weight-only blocked (64/128)"
    table = {
        "Conv": [("W8A8: INT8 weight DQ per channel + INT8 activation Q/DQ per tensor", "TensorRT int8 conv")],
        "MatMul/Gemm": [
            ("W8A8: INT8 weight DQ per channel + INT8 activation Q/DQ per tensor", "TensorRT int8 GEMM"),
            ("INT4 weight-only DQ, blocked along K (block 64 or 128)", "TensorRT INT4 weight-only GEMM"),
            ("plugin node (INT2, weight-only INT8, other INT4 blocks)", "only with plugins=True"),
            ("series_matmul plugin node (T ≥ 2 terms of 2/4/8 bits) + its local function", "only with plugins=True"),
        ],
        "any": [("16-bit", "not offered: TensorRT has no INT16 quantization")],
    }

    def __init__(self, *, plugins: bool = False, plugin_writer: Callable | None = None):
        self.plugins = bool(plugins)
        self.plugin_writer = plugin_writer

    def offer(self, node: CompressibleNode, context: GraphContext, *, levels: Sequence[int | str] = LEVELS,
              block_size: int = 32) -> Offer:
        formats: list[Format] = [FLOAT]
        refused: list[tuple[str, str]] = []
        op = node.op_type
        gemm_like = op in ("MatMul", "Gemm")
        init = context.inits.get(node.weight)
        if init is not None and init.data_type != TensorProto.FLOAT:
            return Offer(node.name, (FLOAT,), tuple((f"int{lv}", "weight is not float32") for lv in levels
                                                     if lv != "float"))
        k = node.weight_shape[node.reduce_axis]
        for lv in levels:
            if lv == "float":
                continue
            if lv == 16:
                refused.append(("int16", "TensorRT has no INT16 quantization"))
                continue
            if lv == 8:
                if op == "Gemm" and context.attr(node.name, "transA", 0):
                    refused.append(("int8", "Gemm with transA=1"))
                else:
                    formats.append(Format("w8a8", 8, None, activations="int8"))
                if gemm_like and self.plugins:
                    formats.append(Format("plugin", 8, block_size, plugin="llc"))
                continue
            if not gemm_like:
                refused.append((f"int{lv}", f"TensorRT runs INT{lv} weights only in MatMul/Gemm (weight-only "
                                            "GEMM); Conv stays float or int8"))
                continue
            if lv == 4:
                block = block_size if block_size in INT4_BLOCKS else None
                last = node.weight_shape[-1]
                why = None
                if block is None:
                    why = f"block {block_size}: TensorRT's INT4 takes blocks of {INT4_BLOCKS}"
                elif k % block:
                    why = f"K={k} is not a multiple of the block {block} (TensorRT needs whole blocks)"
                elif last % 2:
                    why = f"INT4 weights need an even last dimension (here {last})"
                if why is None:
                    formats.append(Format("qdq", 4, block))
                    continue
                if self.plugins:
                    formats.append(Format("plugin", 4, block_size, plugin="llc"))
                    refused.append(("int4 (Q/DQ)", why + "; offered as a plugin"))
                else:
                    refused.append(("int4", why))
                continue
            if self.plugins:
                formats.append(Format("plugin", int(lv), block_size, plugin="llc"))
            else:
                refused.append((f"int{lv}", f"TensorRT has no INT{lv} kernel; it needs the llc plugin "
                                            "(plugins=True)"))
        return Offer(node.name, tuple(formats), tuple(refused))

    def offer_series(self, node: CompressibleNode, context: GraphContext, *, bits: Sequence[int] = (2, 4, 8),
                     terms: Sequence[int] = (1, 2, 3, 4), block_size: int = 32) -> Offer:
        from llc_onnx.passes.matmulnbits import valid_block_size
        from llc_onnx.series.packing import stacked_block

        formats: list[Format] = [FLOAT]
        refused: list[tuple[str, str]] = []
        init = context.inits.get(node.weight)
        why = None
        if not self.plugins:
            why = "TensorRT runs series terms only as the llc series_matmul plugin (plugins=True)"
        elif node.op_type not in ("MatMul", "Gemm"):
            why = "the series plugin is a matmul; Conv has none"
        elif init is not None and init.data_type != TensorProto.FLOAT:
            why = "weight is not float32"
        else:
            k = node.weight_shape[node.reduce_axis]
            block = stacked_block(k, block_size)
            if not valid_block_size(block):
                why = f"the terms' block is {block} (K={k}); the plugin takes a power of two ≥ 16"
        for b in bits:
            if why:
                refused.append((f"series int{b}", why))
                continue
            for t in terms:
                if int(t) < 2:
                    refused.append((f"series int{b}x1", "T = 1 is the single-level quantizer (method quant)"))
                else:
                    formats.append(Format("series", int(b), block_size, plugin="llc", terms=int(t)))
        return Offer(node.name, tuple(formats), tuple(refused))

    def session(self) -> SessionSettings:
        return SessionSettings(
            providers=(("TensorrtExecutionProvider", (("trt_int8_enable", "True"),)),
                       ("CUDAExecutionProvider", ()), ("CPUExecutionProvider", ())),
            description="ONNX Runtime TensorRT execution provider (explicit quantization)",
        )

    def reference_session(self) -> SessionSettings:
        """Where TensorRT is not installed: the Q/DQ graph run literally on CPU (see module docstring)."""
        return SessionSettings(
            providers=(("CPUExecutionProvider", ()),),
            config=(("session.disable_quant_qdq", "1"), ("session.qdq_matmulnbits_accuracy_level", "0")),
            description="ONNX Runtime CPU running the Q/DQ graph literally (TensorRT not available)",
        )

    def rewrite(self, model: onnx.ModelProto, plans: Mapping[str, NodePlan]) -> Rewrite:
        self.check_plans(plans, ("float", "w8a8", "qdq", "plugin", "series"))
        for n, p in plans.items():
            if p.format.kind == "w8a8" and (p.input is None or p.input.dtype != "int8" or p.input.zero_point != 0):
                raise LLCError(f"node '{n}': TensorRT W8A8 needs symmetric int8 activations (zero point 0); "
                               "use qparams(range, 'int8')")
        w8 = {n: W8A8Plan(weight=p.weight, input=p.input, output=None, int32_bias=False)
              for n, p in plans.items() if p.format.kind == "w8a8"}
        w4 = {n: p.weight for n, p in plans.items() if p.format.kind == "qdq"}
        out = apply_passes(model, [W8A8Pass(w8), QDQPass(w4, explicit_zero_point=False)], replaced=[*w8, *w4])
        series = {n: p.weight for n, p in plans.items() if p.format.kind == "series"}
        if series:
            out = write_series_plugins(out, series)
        plugin_plans = {n: p for n, p in plans.items() if p.format.kind == "plugin"}
        if plugin_plans:
            if self.plugin_writer is None:
                raise LLCError(f"node '{next(iter(plugin_plans))}': plugin formats need a plugin writer "
                               "(TensorRTTarget(plugin_writer=...)); none is installed")
            out = self.plugin_writer(out, plugin_plans)
        written = {n: p.format.name for n, p in plans.items() if p.format.kind != "float"}
        return Rewrite(model=out, written=written)


def write_series_plugins(model: onnx.ModelProto, weights: Mapping) -> onnx.ModelProto:
    """``model`` with the named nodes' series terms (T ≥ 2) as ``llc_onnx::series_matmul`` plugin nodes plus the
    op's model-local function (module doc)."""
    from llc_onnx.passes.series import apply_series
    from llc_onnx.plugins.tensorrt.convert import PLUGIN_DOMAIN, SERIES_PLUGIN, to_tensorrt

    for name, w in weights.items():
        if w.order < 2:
            raise LLCError(f"node '{name}': a series plugin node needs T ≥ 2 terms (T = 1 is the single-level "
                           "quantizer); offer it through the quant family")
    nbits = apply_series(model, weights, form="nbits", accuracy_level=0)
    out = to_tensorrt(nbits).model
    if not any(f.domain == PLUGIN_DOMAIN and f.name == SERIES_PLUGIN for f in out.functions):
        opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 21)
        out.functions.append(series_plugin_function(opset))
    return out


def _ref_attr(name: str, ref: str, kind: int) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, kind
    return a


def series_plugin_function(opset: int = 21) -> onnx.FunctionProto:
    """``llc_onnx.tensorrt::series_matmul(x, words, scales) -> y`` in standard ops: ``words`` int32
    ``[N, T·nb·blob/4]`` (the MatMulNBits bytes), codes ``u = (word >> bits·j) & (2^bits − 1)``,
    ``q = u − 2^(bits−1)``, ``scales`` ``[N·T·nb]`` or ``[N·T]`` (per channel), ``w[N, K] = Σ_t s_t·q_t``,
    ``y = x·wᵀ`` (K = one term, whole blocks)."""
    from onnx import helper as oh

    def const(out: str, attr: str) -> onnx.NodeProto:
        n = oh.make_node("Constant", [], [out])
        n.attribute.append(_ref_attr("value_int", attr, onnx.AttributeProto.INT))
        return n

    def lit(out: str, value, dtype) -> onnx.NodeProto:
        return oh.make_node("Constant", [], [out], value=numpy_helper.from_array(np.array(value, dtype), out))

    nodes = [
        const("bits", "bits"), const("n", "N"), const("t", "terms"), const("k", "K"), const("bs", "block_size"),
        lit("zero", 0, np.int64), lit("width", 32, np.int64), lit("two", 2, np.int64),
        lit("word", 1 << 32, np.int64), lit("ax0", [0], np.int64), lit("ax1", [1], np.int64),
        lit("last", [-1], np.int64), lit("one", [1], np.int64),
        oh.make_node("Range", ["zero", "width", "bits"], ["shifts"]),
        oh.make_node("Pow", ["two", "shifts"], ["divisors"]),
        oh.make_node("Pow", ["two", "bits"], ["modulus"]),
        oh.make_node("Div", ["modulus", "two"], ["zero_point"]),
        oh.make_node("Cast", ["words"], ["w64"], to=TensorProto.INT64),
        oh.make_node("Mod", ["w64", "word"], ["unsigned"]),                  # two's complement -> 0..2^32-1
        oh.make_node("Unsqueeze", ["unsigned", "last"], ["u3"]),
        oh.make_node("Div", ["u3", "divisors"], ["shifted"]),
        oh.make_node("Mod", ["shifted", "modulus"], ["u"]),
        oh.make_node("Sub", ["u", "zero_point"], ["q"]),
        oh.make_node("CastLike", ["q", "scales"], ["qf"]),
        oh.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        oh.make_node("Unsqueeze", ["t", "ax0"], ["t1"]),
        oh.make_node("Unsqueeze", ["k", "ax0"], ["k1"]),
        oh.make_node("Unsqueeze", ["bs", "ax0"], ["bs1"]),
        oh.make_node("Concat", ["n1", "t1", "last", "bs1"], ["q_shape"], axis=0),
        oh.make_node("Reshape", ["qf", "q_shape"], ["q4"]),                   # [N, T, nb, block]
        oh.make_node("Concat", ["n1", "t1", "last", "one"], ["s_shape"], axis=0),
        oh.make_node("Reshape", ["scales", "s_shape"], ["s4"]),               # [N, T, nb or 1, 1]
        oh.make_node("Mul", ["q4", "s4"], ["dq"]),
        oh.make_node("Concat", ["n1", "t1", "k1"], ["t_shape"], axis=0),
        oh.make_node("Reshape", ["dq", "t_shape"], ["dq3"]),                  # [N, T, K]
        oh.make_node("ReduceSum", ["dq3", "ax1"], ["w"], keepdims=0),         # [N, K]
        oh.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        oh.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    from llc_onnx.plugins.tensorrt.convert import PLUGIN_DOMAIN, SERIES_PLUGIN

    return oh.make_function(PLUGIN_DOMAIN, SERIES_PLUGIN, ["x", "words", "scales"], ["y"], nodes,
                            [oh.make_opsetid("", int(opset))],
                            ["K", "N", "bits", "block_size", "terms", "plugin_namespace", "plugin_version", "aot"],
                            doc_string="the series_matmul plugin's maths in standard ops (for runtimes without it)")
