"""Static W8A8: 8-bit weights *and* calibrated 8-bit activations around Conv/Gemm/MatMul, in the Q/DQ form
that ONNX Runtime's CPU provider fuses into integer kernels.

For a planned node the pass writes

* the weight as ``DequantizeLinear(int8 codes, per-channel scale, zero point 0)`` (through
  :class:`llc_onnx.passes.qdq.QDQPass` with ``explicit_zero_point=True``: ORT's Gemm fusion requires the
  zero-point input). Plans with 7-bit codes (``bits=7``, codes in ``[-64, 63]``) are stored as INT8: on
  x86 CPUs without VNNI, ORT's u8·s8 kernels add pairs of products in int16 and saturate when the weight
  codes use the full int8 range (tests/test_pass_qdq.py::test_int8_matmul_saturation_canary), so the
  ORT CPU target asks for 7-bit codes (ORT's own ``reduce_range``);
* ``QuantizeLinear → DequantizeLinear`` on the activation input (per tensor; uint8 with a zero point, or
  int8 with zero point 0, from :class:`llc_onnx.calib.activation_ranges.ActivationQParams`);
* optionally ``QuantizeLinear → DequantizeLinear`` on the output (``output`` plan): on the node's output,
  or — uint8 plans only — on the output of a ``Relu``/``Clip(0, ·)`` that is the node's only consumer (ORT
  folds that activation into the integer kernel when the Q's range starts at 0; a symmetric int8 Q cannot
  absorb it, the activation then runs in float after the DQ). Every consumer reads the dequantized tensor;
  a graph output keeps its name. Conv needs it to become ``QLinearConv``;
* for Gemm, the bias as ``DequantizeLinear(int32, scale = s_x·s_w)`` (``int32_bias``; a zero bias when the
  Gemm has none): with the weight zero point this is what ORT fuses into ``QGemm``. The bias is then
  rounded to multiples of ``s_x·s_w`` (error ≤ s_x·s_w/2 per output, far below the activation step).

What ORT 1.31.1 makes of it (session optimizations on; inspected via ``optimized_model_filepath`` in
tests/test_pass_w8a8.py): MatMul → ``MatMulIntegerToFloat`` (3-D inputs; a 2-D MatMul followed by an Add
of a constant is first fused into a float Gemm by ORT and stays float), Gemm → ``QGemm``, Conv with an
output plan → ``QLinearConv``. A tensor quantized twice with the same parameters (a node's output and the
next node's input) gets one Q/DQ pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from llc_onnx.errors import LLCError
from llc_onnx.passes import common
from llc_onnx.passes.qdq import QDQPass

__all__ = ["W8A8Plan", "W8A8Pass", "apply_w8a8", "quantized_tensors", "quantized_tensors_of", "ABSORBED_ACTIVATIONS"]

#: ops ORT folds into a preceding integer Conv/Gemm when a QuantizeLinear follows them
ABSORBED_ACTIVATIONS = ("Relu", "Clip")
_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class W8A8Plan:
    """One node's static W8A8 plan.

    ``weight``: QuantizedWeight-like, per output channel (or per tensor), ``bits`` 8 or 7 (7-bit codes are
    stored as INT8). ``input`` / ``output``: ``ActivationQParams``-like (``scale, zero_point, dtype``) or
    None. ``int32_bias``: Gemm bias as int32 (default: for Gemm)."""

    weight: Any
    input: Any
    output: Any = None
    int32_bias: bool | None = None


@dataclass
class _Int8Codes:  # a 7-bit plan seen by QDQPass as the int8 plan it is stored as
    q: np.ndarray
    scale: np.ndarray
    axis: int
    block_size: int | None
    bits: int


def _act_params(where: str, p: Any) -> tuple[float, int, Any, ir.DataType]:
    for attr in ("scale", "zero_point", "dtype"):
        if not hasattr(p, attr):
            raise LLCError(f"{where}: activation plan has no attribute '{attr}'; pass ActivationQParams")
    scale, zp, dtype = float(p.scale), int(p.zero_point), str(p.dtype)
    if not np.isfinite(scale) or scale <= 0:
        raise LLCError(f"{where}: activation scale {scale} must be positive and finite")
    if dtype == "uint8":
        if not 0 <= zp <= 255:
            raise LLCError(f"{where}: uint8 zero point {zp} is outside [0, 255]")
        return scale, zp, np.uint8, ir.DataType.UINT8
    if dtype == "int8":
        if not -128 <= zp <= 127:
            raise LLCError(f"{where}: int8 zero point {zp} is outside [-128, 127]")
        return scale, zp, np.int8, ir.DataType.INT8
    raise LLCError(f"{where}: activation dtype '{dtype}'; static W8A8 takes uint8 or int8")


def _absorbed_consumer(value: ir.Value, dtype: str) -> ir.Node | None:
    """The Relu / Clip(min=0) that is the only consumer of ``value``, when a uint8 output plan can absorb it
    (ORT removes the activation when the Q's range [0, 255·s] lies inside it: zero point 0, which a
    calibrated range starting at 0 gives). int8 (symmetric) output plans never absorb it."""
    uses = list(value.uses())
    if dtype != "uint8" or len(uses) != 1 or value.is_graph_output():
        return None
    user = uses[0].node
    if user.op_type not in ABSORBED_ACTIVATIONS or user.domain not in ("", "ai.onnx"):
        return None
    if user.op_type == "Clip":
        lo = user.inputs[1] if len(user.inputs) > 1 else None
        lo_t = None if lo is None else ir.convenience.get_const_tensor(lo)    # an initializer or a Constant node
        if lo_t is None or float(lo_t.numpy()) != 0.0:
            return None
        hi = user.inputs[2] if len(user.inputs) > 2 else None
        if hi is not None and ir.convenience.get_const_tensor(hi) is None:
            return None
    return user


def quantized_tensors(model: onnx.ModelProto, node: str, dtype: str = "uint8") -> tuple[str, str]:
    """(input tensor, output tensor) a W8A8 plan of ``node`` with ``dtype`` activations quantizes: the node's
    activation input, and its output — or, for uint8, the output of the Relu / Clip(0, ·) that is its only
    consumer (absorbed into the integer kernel). Calibrate these two tensors."""
    return quantized_tensors_of(model, [(node, dtype)])[0]


def quantized_tensors_of(model: onnx.ModelProto, requests) -> list[tuple[str, str]]:
    """:func:`quantized_tensors` of every (node, dtype) of ``requests``, in order, reading the model into IR once
    (SmolLM2: 0.6 s per reading, 211 MatMuls)."""
    ir_model = ir.serde.deserialize_model(model)
    by_name = common.nodes_by_name(ir_model.graph)
    got = []
    for node, dtype in requests:
        if node not in by_name:
            raise LLCError(f"node '{node}': not in the main graph; use the node names of the prepared model")
        n = by_name[node]
        out = n.outputs[0]
        user = _absorbed_consumer(out, dtype)
        if user is not None:
            out = user.outputs[0]
        got.append((n.inputs[0].name, out.name))
    return got


class W8A8Pass(common.RewritePass):
    """Write static W8A8 plans (see module docstring). ``plans``: node name -> :class:`W8A8Plan`. The result's
    ``written`` lists the planned nodes."""

    def __init__(self, plans: Mapping[str, W8A8Plan], *, join_adds: bool = False):
        super().__init__()
        self.plans = dict(plans)
        self.join_adds = bool(join_adds)
        self.joined: list[str] = []                  # Add nodes that read quantized inputs (join_adds)

    def check(self, model: ir.Model) -> tuple[dict[str, Any], list]:
        if not self.plans:
            return {}, []
        graph = model.graph
        if common.default_opset(model) < 21:
            raise LLCError(f"model: default opset is {common.default_opset(model)}; static W8A8 needs opset >= 21; "
                           "run model_io.prepare_model first")
        nodes = common.find_nodes(graph, self.plans, "W8A8 plan")
        weights: dict[str, Any] = {}
        checked = []
        for node in nodes:
            where = f"node '{node.name}'"
            if node.op_type not in _OPS or node.domain not in ("", "ai.onnx"):
                raise LLCError(f"{where} (op {node.op_type}): static W8A8 applies to MatMul, Gemm and Conv")
            plan = self.plans[node.name]
            w = plan.weight
            bits = int(w.bits)
            if bits not in (7, 8) or w.block_size is not None:
                raise LLCError(f"{where}: W8A8 weight plan is {bits}-bit with block_size={w.block_size}; it must be "
                               "8- or 7-bit per output channel")
            if bits == 7:
                q = np.asarray(w.q)
                if q.size and (q.min() < -64 or q.max() > 63):
                    raise LLCError(f"{where}: 7-bit weight codes in [{q.min()}, {q.max()}], outside [-64, 63]")
                w = _Int8Codes(q=q, scale=np.asarray(w.scale), axis=int(w.axis), block_size=None, bits=8)
            weights[node.name] = w
            if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) != 0:
                raise LLCError(f"{where}: Gemm with transA=1 has no W8A8 form; leave it in float")
            in_p = _act_params(f"{where} input", plan.input)
            out_p = None if plan.output is None else _act_params(f"{where} output", plan.output)
            int32_bias = plan.int32_bias if plan.int32_bias is not None else node.op_type == "Gemm"
            if int32_bias and node.op_type == "Gemm":
                beta = node.attributes.get("beta")
                if beta is not None and float(beta.as_float()) != 1.0 and len(node.inputs) > 2 \
                        and node.inputs[2] is not None:
                    raise LLCError(f"{where}: Gemm with beta != 1 cannot take an int32 bias; use int32_bias=False")
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if int32_bias and node.op_type in ("Gemm", "Conv") and bias is not None:
                if bias.const_value is None:
                    raise LLCError(f"{where}: bias is not a constant; it cannot be stored as int32 "
                                   "(use int32_bias=False)")
                w_shape = common.weight_value(node)[2].shape
                trans_b = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 1
                n_out = int(w_shape[0] if trans_b else w_shape[1])
                if bias.const_value.size != n_out:
                    raise LLCError(f"{where}: bias has {bias.const_value.size} values for {n_out} outputs; it "
                                   "cannot be stored as int32 (use int32_bias=False)")
            checked.append((node, in_p, out_p, int32_bias))
        # the weights' own preconditions (QDQPass), before anything is written
        QDQPass(weights, explicit_zero_point=True).check(model)
        return weights, checked

    def rewrite(self, model: ir.Model, prepared: tuple[dict[str, Any], list]) -> common.RewriteResult:
        weights, checked = prepared
        if not checked:
            return common.RewriteResult(model, modified=False)
        graph = model.graph
        # weights: int8 per-channel DQ with an explicit zero point (one validated code path: QDQPass)
        QDQPass(weights, explicit_zero_point=True)(model)
        names = common.Names(graph)
        pairs: dict[tuple, ir.Value] = {}            # (id(tensor), scale, zp, dtype) -> its DQ output

        dq_params: dict[int, tuple] = {}              # id(DQ output) -> its (scale, zp, dtype)

        def qdq(x: ir.Value, params, stem: str, *, after: ir.Node | None = None,
                before: ir.Node | None = None) -> ir.Value:
            """Q/DQ pair on ``x``; ``after`` given: every consumer of x reads the DQ (an output plan)."""
            scale, zp, np_dt, ir_dt = params
            if dq_params.get(id(x)) == (scale, zp, ir_dt):
                return x                                   # already this tensor's Q/DQ with these parameters
            key = (id(x), scale, zp, ir_dt)
            if key in pairs:
                return pairs[key]
            fdtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
            s_name, z_name = names.fresh(f"{stem}_scale"), names.fresh(f"{stem}_zero_point")
            s_val = common.add_initializer(graph, s_name, ir.tensor(
                np.array(scale, dtype=common.np_float_dtype(fdtype)), name=s_name))
            z_val = common.add_initializer(graph, z_name, ir.tensor(np.array(zp, dtype=np_dt), name=z_name))
            xq = ir.Value(name=names.fresh(f"{stem}_q"), shape=x.shape, type=ir.TensorType(ir_dt))
            xdq = ir.Value(name=names.fresh(f"{stem}_dq"), shape=x.shape, type=ir.TensorType(fdtype))
            dqnode = ir.node("DequantizeLinear", [xq, s_val, z_val], outputs=[xdq], name=names.fresh(f"{stem}_dql"))
            was_output = x.is_graph_output()
            if after is not None:
                ir.convenience.replace_all_uses_with(x, xdq, replace_graph_outputs=True)
            qnode = ir.node("QuantizeLinear", [x, s_val, z_val], outputs=[xq], name=names.fresh(f"{stem}_ql"))
            if after is not None:
                graph.insert_after(after, [qnode, dqnode])
            else:
                graph.insert_before(before, [qnode, dqnode])
            if after is not None and was_output:            # the graph output keeps its name
                out_name = x.name
                x.name = names.fresh(f"{out_name}_float")
                xdq.name = out_name
            pairs[key] = xdq
            dq_params[id(xdq)] = (scale, zp, ir_dt)
            return xdq

        # outputs first (every consumer reads the DQ), then inputs (shared when the parameters agree)
        for node, _, out_p, _ in checked:
            if out_p is None:
                continue
            user = _absorbed_consumer(node.outputs[0], "uint8" if out_p[3] == ir.DataType.UINT8 else "int8")
            if user is not None and out_p[1] != 0:
                raise LLCError(f"node '{node.name}': output plan has zero point {out_p[1]} on the output of "
                               f"{user.op_type} '{user.name}' (>= 0); calibrate the tensor quantized_tensors() names")
            anchor = user if user is not None else node
            qdq(anchor.outputs[0], out_p, f"{node.name}_y", after=anchor)
        for node, in_p, _, int32_bias in checked:
            x = node.inputs[0]
            xdq = qdq(x, in_p, f"{node.name}_x", before=node)
            if xdq is not x:
                node.replace_input_with(0, xdq)
            if int32_bias and node.op_type in ("Gemm", "Conv"):
                self._int32_bias(graph, names, node, in_p[0])
        if self.join_adds:
            self._join_adds(graph, dq_params)
        common.set_default_opset(model, 21, 10)
        return common.RewriteResult(model, modified=True, written=tuple(n.name for n, *_ in checked))

    def _join_adds(self, graph: ir.Graph, dq_params: dict[int, tuple]) -> None:
        """Residual joins in integers: an ``Add`` whose two inputs are both quantized for some consumer (a DQ
        output, or a float tensor that also feeds one of this pass's QuantizeLinear) reads the dequantized
        inputs. When its output is quantized too ORT runs it as ``QLinearAdd``; when it is not (the last
        residual before a pooling), reading the DQ still leaves the producer of its skip input (a Relu) with
        the QuantizeLinear as its only consumer, which ORT needs to fold the Relu and fuse the *previous*
        residual Add. One quantization per tensor: the Add sees the values the quantized consumer of the same
        tensor sees. The candidate measurements quantize only each W8A8 node's own input; the joint
        validation in ONNX Runtime measures the written model."""
        twins: dict[int, ir.Value] = {}
        for node in graph:
            if node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
                dq = [u.node for u in node.outputs[0].uses() if u.node.op_type == "DequantizeLinear"]
                if dq and id(dq[0].outputs[0]) in dq_params:
                    twins.setdefault(id(node.inputs[0]), dq[0].outputs[0])

        def quantized(v: ir.Value | None) -> ir.Value | None:
            if v is None:
                return None
            return v if id(v) in dq_params else twins.get(id(v))

        for node in list(graph):
            if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            qa, qb = quantized(node.inputs[0]), quantized(node.inputs[1])
            if qa is None or qb is None:
                continue
            rewired = False
            for i, q in enumerate((qa, qb)):
                if q is not node.inputs[i]:
                    node.replace_input_with(i, q)
                    rewired = True
            if rewired:
                self.joined.append(node.name)

    def _int32_bias(self, graph: ir.Graph, names: common.Names, node: ir.Node, x_scale: float) -> None:
        w_dq = node.inputs[1].producer()
        w_scale = np.asarray(w_dq.inputs[1].const_value.numpy(), dtype=np.float64).reshape(-1)
        trans_b = node.attributes.get_int("transB", 0) if node.op_type == "Gemm" else 1
        w_shape = node.inputs[1].shape
        n_out = int(w_shape[0] if (node.op_type == "Conv" or trans_b) else w_shape[1])
        if w_scale.size == 1:
            w_scale = np.full(n_out, w_scale[0])
        b_scale = (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)
        old = node.inputs[2] if len(node.inputs) > 2 else None
        c = np.zeros(n_out, np.float64) if old is None else old.const_value.numpy().astype(np.float64).reshape(-1)
        q = np.clip(np.round(c / b_scale.astype(np.float64)), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        stem = f"{node.name}_bias"
        q_name, s_name = names.fresh(f"{stem}_q32"), names.fresh(f"{stem}_scale")
        q_val = common.add_initializer(graph, q_name, ir.tensor(q, name=q_name))
        s_val = common.add_initializer(graph, s_name, ir.tensor(b_scale, name=s_name))
        out = ir.Value(name=names.fresh(f"{stem}_dequant"), shape=ir.Shape([n_out]),
                       type=ir.TensorType(ir.DataType.FLOAT))
        dq = ir.node("DequantizeLinear", [q_val, s_val], {"axis": 0}, outputs=[out], name=names.fresh(f"{stem}_dq"))
        graph.insert_before(node, dq)
        if old is None:
            node.resize_inputs(3)
        node.replace_input_with(2, out)


def apply_w8a8(model: onnx.ModelProto, plans: Mapping[str, W8A8Plan]) -> onnx.ModelProto:
    """Return a copy of ``model`` with :class:`W8A8Pass` applied (``model`` is not modified)."""
    return common.apply_passes(model, [W8A8Pass(plans)])
