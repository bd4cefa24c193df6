"""Write quantized weights (and activation Q/DQ pairs) into an ONNX graph.

For every node with a weight plan (an object with ``q, scale, axis, block_size, bits`` — the
``QuantizedWeight`` of the architecture contract; any object with those attributes works) the pass

* stores ``q`` as a new initializer ``<weight>_q<bits>`` of type INT8 / INT16 / INT4 / INT2
  (INT4/INT2 packed as ONNX requires, two resp. four values per byte),
* stores ``scale`` as ``<weight>_scale`` in the weight's float type,
* inserts ``DequantizeLinear(q, scale)`` named ``<node>_dq`` (attrs ``axis``, and ``block_size`` for
  blocked plans; no zero point — symmetric, zero point 0 — unless ``explicit_zero_point=True``,
  which adds an all-zero zero point of q's type) feeding that node's weight input,
* leaves the float initializer to ``apply_passes``' unused-value removal (``passes/common.py``).

A blocked Conv plan in the matrix layout of ``llc_onnx.quant.weights`` (codes ``[O, C/g·kh·kw]``, blocks
along axis 1 — the convolution's whole reduction; ONNX ``DequantizeLinear`` blocks along one axis only) is
written as ``q [O, R] → DequantizeLinear(axis=1, block_size) → Reshape(W.shape) → Conv`` (the Reshape is
``<node>_dq_reshape``, its shape initializer ``<weight>_shape``). Plans whose ``q`` has the weight's own
shape are written without the Reshape, as before.

Two nodes sharing one initializer may get different plans (each gets its own DQ, names are made
unique with the node name) or identical plans (one DQ, one copy of q/scale, shared).

For every node with an activation plan (``scale``, ``bits`` in {8, 16}) the pass inserts
``QuantizeLinear → DequantizeLinear`` (per tensor, zero point 0 of type int8/int16, named
``<node>_xq`` / ``<node>_xdq``) on that node's activation input (input 0) — only for that node's use of
the tensor; other consumers keep reading the float tensor.

Opset: the model must be at opset >= 21 (``prepare_model`` gives at least 21 and keeps 21..26). If any
weight uses INT2 and the model is below 25, the default opset is relabelled to 25 and the IR version raised
to 11 (INT2 DequantizeLinear exists from opset 25 on; the ops changed between 21 and 25 only gained types,
no semantics changed for the ops they already had); a model at 25 or 26 keeps its opset (ORT 1.31 runs
INT2 DequantizeLinear at both, checked in tests/test_pass_qdq.py). Nodes without a plan are untouched.

ONNX Runtime 1.31.1 (CPU) runs the graphs this pass writes, checked numerically against the
fake-quant model: per-channel and blocked (incl. a partial last block) INT8/INT16/INT4/INT2 weights on
MatMul, Gemm (transB 0/1) and Conv (normal, grouped, depthwise), alone and with int8/int16 activation
Q/DQ. See tests/test_pass_qdq.py. One exception, an ORT 1.31.1 bug: a MatMul whose weight DQ is INT2
*and* whose input has an int8 Q/DQ pair fails at session creation ("Type 'tensor(int2)' of input
parameter ... of operator (MatMulIntegerToFloat) ... is invalid": the QDQ fusion rewrites it to
MatMulIntegerToFloat, which has no int2 kernel; ORT_ENABLE_BASIC or session.disable_quant_qdq=1 avoid
it). For that combination the pass by default stores the 2-bit codes as INT4 (``<weight>_q2_as_int4``;
identical values, so identical results; 4 bits per weight stored instead of 2), and lists the node in
the result's ``int2_as_int4`` (:class:`QDQResult`); ``int2_int8_matmul="error"`` raises instead. The same holds when one side of the
pair is already in the graph (plans applied in two calls): an existing INT2 weight DQ of a MatMul that
gets an int8 activation plan has its codes rewritten to INT4. Gemm/Conv with INT2 + int8 run fine.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from llc_onnx.axes import norm_axis
from llc_onnx.errors import LLCError
from llc_onnx.passes import common
from llc_onnx.quant.weights import is_matrix_layout

__all__ = ["QDQPass", "QDQResult", "apply_qdq", "WeightPlan", "ActivationPlan", "QTYPES"]

#: bits -> (ONNX data type, numpy storage type, (min, max)) of quantized weights.
QTYPES: dict[int, tuple[ir.DataType, Any, tuple[int, int]]] = {
    2: (ir.DataType.INT2, ml_dtypes.int2, (-2, 1)),
    4: (ir.DataType.INT4, ml_dtypes.int4, (-8, 7)),
    8: (ir.DataType.INT8, np.int8, (-128, 127)),
    16: (ir.DataType.INT16, np.int16, (-32768, 32767)),
}
_ACT_BITS = (8, 16)


@runtime_checkable
class WeightPlan(Protocol):
    """What the pass reads from a ``QuantizedWeight`` (llc_onnx.quant)."""

    q: np.ndarray  # integer values, the ONNX weight's shape (or [O, C/g·kh·kw] for a blocked Conv)
    scale: np.ndarray  # per-channel [q.shape[axis]] or blocked (q.shape with axis -> ceil(K/block))
    axis: int
    block_size: int | None
    bits: int


@runtime_checkable
class ActivationPlan(Protocol):
    """What the pass reads from an ``ActivationQuant``."""

    scale: float
    bits: int


def _check_weight_plan(node: ir.Node, w: np.ndarray, plan: Any) -> tuple[np.ndarray, np.ndarray, int, int | None, int]:
    where = f"node '{node.name}'"
    q, bits = common.plan_codes(where, plan, "weight plan", sorted(QTYPES))
    block = None if plan.block_size is None else int(plan.block_size)
    matrix = block is not None and q.shape != w.shape and is_matrix_layout(w.shape, q.shape)
    if q.shape != w.shape and not matrix:
        raise LLCError(f"{where}: weight plan q has shape {q.shape} but the weight is {w.shape}; quantize this node's weight")
    shape = q.shape  # the shape the DequantizeLinear sees
    scale = np.asarray(plan.scale, dtype=np.float64)
    axis = int(plan.axis)
    if scale.ndim == 0:  # per tensor (no axis attribute written)
        if block is not None:
            raise LLCError(f"{where}: weight plan has a scalar scale but block_size={block}; give blocked scales")
        return q, scale, axis, None, bits
    axis = norm_axis(axis, len(shape), "weight plan axis", where)
    if block is None:
        if scale.shape != (shape[axis],):
            raise LLCError(
                f"{where}: per-channel scale has shape {scale.shape}, expected ({shape[axis]},) for axis {axis}"
            )
    else:
        if block < 1:
            raise LLCError(f"{where}: weight plan block_size={block} must be >= 1")
        if matrix and axis != 1:
            raise LLCError(f"{where}: a Conv plan with codes {shape} (matrix layout) is blocked along axis 1, "
                           f"not {axis}; pass the QuantizedWeight unchanged")
        want = list(shape)
        want[axis] = -(-shape[axis] // block)
        if scale.shape != tuple(want):
            raise LLCError(
                f"{where}: blocked scale has shape {scale.shape}, expected {tuple(want)} "
                f"(axis {axis}, block_size {block})"
            )
    return q, scale, axis, block, bits


_INT8_TYPES = (ir.DataType.INT8, ir.DataType.UINT8)


def _dq_input_dtype(value: ir.Value | None) -> ir.DataType | None:
    """Type of the quantized input of the DequantizeLinear producing ``value`` (None otherwise)."""
    producer = value.producer() if value is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain not in ("", "ai.onnx"):
        return None
    src = producer.inputs[0]
    if src is None or src.type is None:
        return None
    return src.dtype


def _plan_key(weight: str, q: np.ndarray, scale: np.ndarray, axis: int, block: int | None, bits: int) -> tuple:
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(q, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(scale, dtype=np.float64).tobytes())
    return (weight, bits, axis, block, scale.shape, h.hexdigest())


@dataclasses.dataclass
class QDQResult(common.RewriteResult):
    """:class:`~llc_onnx.passes.common.RewriteResult` of :class:`QDQPass`. ``written``: nodes whose weight now
    reads a DequantizeLinear; ``activations``: nodes given an activation Q/DQ pair; ``int2_as_int4``: MatMul
    nodes whose 2-bit codes are stored as INT4 (the ORT 1.31 MatMulIntegerToFloat bug, module doc);
    ``int2_transposed``: nodes whose blocked 2-bit [K, N] weight (N % 4 != 0) is stored as [N, K] followed by a
    Transpose (ORT 1.31 fuses DequantizeLinear(INT2 [K, N]) + MatMul/Gemm into a MatMulNBits that computes
    wrong outputs when N % 4 != 0; the transposed form is not fused and exact: tests/test_pass_qdq.py)."""

    activations: tuple[str, ...] = ()
    int2_as_int4: tuple[str, ...] = ()
    int2_transposed: tuple[str, ...] = ()

    def notes(self) -> list[tuple[str, str]]:
        return [(n, "2-bit codes stored as INT4 (ORT 1.31 MatMulIntegerToFloat has no int2 kernel)")
                for n in self.int2_as_int4] + \
               [(n, "2-bit blocked weight stored transposed [N, K] + Transpose (ORT 1.31 fuses INT2 [K, N] with "
                    "N % 4 != 0 into a wrong MatMulNBits); runs unfused") for n in self.int2_transposed]


@dataclasses.dataclass
class _Checked:
    weights: list           # (node, input index, value, q, scale, axis, block, bits)
    activations: list       # (node, bits, scale)
    storage: dict[str, int]  # node -> bits its codes are stored with
    int2_as_int4: list[str]
    existing_int2: list[ir.Node]  # DQ nodes already in the graph whose INT2 codes become INT4


class QDQPass(common.RewritePass):
    """Insert DequantizeLinear for planned weights and Q/DQ pairs for planned activations.

    ``weights``: node name -> QuantizedWeight-like (``q, scale, axis, block_size, bits``).
    ``activations``: node name -> ActivationQuant-like (``scale, bits``).
    ``explicit_zero_point``: also write an all-zero zero point on weight DQs (default: omitted,
    which ONNX defines as 0). ``int2_int8_matmul``: ``"int4"`` stores the codes of an INT2 MatMul weight with
    an int8 activation pair as INT4 (listed in ``result.int2_as_int4``), ``"error"`` refuses the plan.
    Returns a :class:`QDQResult`.
    """

    def __init__(
        self,
        weights: Mapping[str, Any],
        activations: Mapping[str, Any] | None = None,
        *,
        explicit_zero_point: bool = False,
        int2_int8_matmul: str = "int4",
    ):
        super().__init__()
        if int2_int8_matmul not in ("int4", "error"):
            raise LLCError(f"QDQPass: int2_int8_matmul='{int2_int8_matmul}'; use 'int4' or 'error'")
        self.int2_int8_matmul = int2_int8_matmul
        self.weights = dict(weights)
        self.activations = dict(activations or {})
        self.explicit_zero_point = explicit_zero_point

    def check(self, model: ir.Model) -> _Checked:
        graph = model.graph
        opset = common.default_opset(model)
        if (self.weights or self.activations) and opset < 21:
            raise LLCError(
                f"model: default opset is {opset}; QDQ with int4/int16/blocked scales needs opset >= 21; "
                "run model_io.prepare_model first"
            )
        w_nodes = common.find_nodes(graph, self.weights, "weight plan")
        a_nodes = common.find_nodes(graph, self.activations, "activation plan")
        prepared = []
        for node in w_nodes:
            idx, value, w = common.weight_value(node)
            prepared.append((node, idx, value, *_check_weight_plan(node, w, self.weights[node.name])))
        act_prepared = []
        for node in a_nodes:
            if node.op_type not in common.WEIGHT_INPUT or not node.inputs or node.inputs[0] is None:
                raise LLCError(
                    f"node '{node.name}' (op {node.op_type}): activation plans apply to the input 0 of "
                    "MatMul, Gemm or Conv nodes"
                )
            plan = self.activations[node.name]
            bits, scale = int(plan.bits), float(plan.scale)
            if bits not in _ACT_BITS:
                raise LLCError(f"node '{node.name}': activation plan has bits={bits}; supported are 8 and 16")
            if not np.isfinite(scale) or scale <= 0:
                raise LLCError(f"node '{node.name}': activation scale {scale} must be positive and finite")
            act_prepared.append((node, bits, scale))

        # ORT 1.31.1 cannot run MatMul + INT2 weight DQ + int8 activation Q/DQ (see module doc). The
        # combination can also arise with a DQ already in the graph (plans applied in two calls).
        int8_act = {node.name for node, bits, _ in act_prepared if bits == 8}
        fallbacks: list[str] = []

        def refuse(node: ir.Node) -> None:
            if self.int2_int8_matmul == "error":
                raise LLCError(
                    f"node '{node.name}': INT2 weight with an int8 activation Q/DQ on a MatMul fails in "
                    "ONNX Runtime 1.31 (MatMulIntegerToFloat has no int2 kernel); use int4 weights or "
                    "int16 activations for this node"
                )
            fallbacks.append(node.name)

        storage: dict[str, int] = {}
        for node, *_, bits in prepared:
            storage[node.name] = bits
            if bits == 2 and node.op_type == "MatMul" and (
                node.name in int8_act or _dq_input_dtype(node.inputs[0]) in _INT8_TYPES
            ):
                refuse(node)
                storage[node.name] = 4
        existing_int2: list[ir.Node] = []
        for node, bits, _ in act_prepared:
            if bits == 8 and node.op_type == "MatMul" and node.name not in storage:
                if _dq_input_dtype(node.inputs[1]) == ir.DataType.INT2:
                    refuse(node)
                    if node.inputs[1].producer() not in existing_int2:
                        existing_int2.append(node.inputs[1].producer())
        return _Checked(prepared, act_prepared, storage, fallbacks, existing_int2)

    def rewrite(self, model: ir.Model, checked: _Checked) -> QDQResult:
        graph = model.graph
        prepared, act_prepared, storage = checked.weights, checked.activations, checked.storage
        if any(b == 2 for b in storage.values()):
            common.set_default_opset(model, 25, 11)
        elif prepared or act_prepared:
            common.set_default_opset(model, 21, 10)
        names = common.Names(graph)
        shared: dict[tuple, ir.Value] = {}
        self._transposed: list[str] = []
        for node, idx, value, q, scale, axis, block, bits in prepared:
            key = (*_plan_key(value.name, q, scale, axis, block, bits), storage[node.name])
            dq_out = shared.get(key)
            if dq_out is None:
                dq_out = self._insert_weight_dq(
                    graph, names, node, value, q, scale, axis, block, bits, storage[node.name]
                )
                shared[key] = dq_out
            node.replace_input_with(idx, dq_out)

        for node, bits, scale in act_prepared:
            self._insert_activation_qdq(graph, names, node, bits, scale)
        for dq in checked.existing_int2:  # codes (and a zero point, if any) of an existing DQ: INT2 -> INT4
            for i in (0, 2):
                old = dq.inputs[i] if len(dq.inputs) > i else None
                if old is None or old.dtype != ir.DataType.INT2 or old.const_value is None:
                    continue
                codes = old.const_value.numpy().astype(np.int8).astype(ml_dtypes.int4)
                name = names.fresh(f"{old.name}_as_int4")
                new = common.add_initializer(graph, name, ir.Tensor(codes, dtype=ir.DataType.INT4, name=name))
                dq.replace_input_with(i, new)

        return QDQResult(model, modified=bool(prepared or act_prepared),
                         written=tuple(n.name for n, *_ in prepared),
                         activations=tuple(n.name for n, *_ in act_prepared),
                         int2_as_int4=tuple(checked.int2_as_int4), int2_transposed=tuple(self._transposed))

    def _insert_weight_dq(self, graph, names, node, value, q, scale, axis, block, bits, stored_bits) -> ir.Value:
        w_shape = tuple(value.const_value.shape)
        matrix = tuple(q.shape) != w_shape  # blocked Conv codes [O, R]: DequantizeLinear, then Reshape
        dtype, np_type, _ = QTYPES[stored_bits]
        fdtype = value.const_value.dtype
        base, nname = value.name, node.name
        # ORT 1.31 fuses DQ(INT2 [K, N], blocked along K) + MatMul/Gemm into a MatMulNBits that is wrong when
        # N % 4 != 0: store [N, K] blocked along axis 1 and transpose after the DequantizeLinear (not fused, exact)
        transpose = (stored_bits == 2 and block is not None and not matrix and q.ndim == 2 and axis == 0
                     and q.shape[1] % 4 != 0)
        if transpose:
            q, scale, axis = np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T), 1
            self._transposed.append(nname)
        tag = f"q{bits}" if stored_bits == bits else f"q{bits}_as_int{stored_bits}"
        q_name = names.fresh(f"{base}_{tag}", f"{base}_{nname}_{tag}")
        s_name = names.fresh(f"{base}_scale", f"{base}_{nname}_scale")
        q_val = common.add_initializer(graph, q_name, ir.Tensor(q.astype(np_type), dtype=dtype, name=q_name))
        s_val = common.add_initializer(
            graph, s_name, ir.tensor(scale.astype(common.np_float_dtype(fdtype)), name=s_name)
        )
        inputs = [q_val, s_val]
        if self.explicit_zero_point:
            zp_shape = () if scale.ndim == 0 else scale.shape
            z_name = names.fresh(f"{base}_zero_point", f"{base}_{nname}_zero_point")
            zp = np.zeros(zp_shape, dtype=np_type)
            inputs.append(common.add_initializer(graph, z_name, ir.Tensor(zp, dtype=dtype, name=z_name)))
        attrs: dict[str, Any] = {}
        if scale.ndim > 0:
            attrs["axis"] = axis
        if block is not None:
            attrs["block_size"] = block
        dq_name = names.fresh(f"{base}_dequant_2d" if matrix else f"{base}_dequant",
                              f"{base}_{nname}_dequant_2d" if matrix else f"{base}_{nname}_dequant")
        out = ir.Value(name=dq_name, shape=ir.Shape(q.shape), type=ir.TensorType(fdtype))
        dq = ir.node(
            "DequantizeLinear", inputs, attrs, outputs=[out], name=names.fresh(f"{nname}_dq")
        )
        graph.insert_before(node, dq)
        if transpose:
            t_out = ir.Value(name=names.fresh(f"{base}_dequant_t", f"{base}_{nname}_dequant_t"),
                             shape=ir.Shape(w_shape), type=ir.TensorType(fdtype))
            graph.insert_before(node, ir.node("Transpose", [out], {"perm": [1, 0]}, outputs=[t_out],
                                              name=names.fresh(f"{nname}_dq_transpose")))
            return t_out
        if not matrix:
            return out
        shape_name = names.fresh(f"{base}_shape", f"{base}_{nname}_shape")
        shape_val = common.add_initializer(
            graph, shape_name, ir.tensor(np.array(w_shape, dtype=np.int64), name=shape_name)
        )
        reshaped = ir.Value(
            name=names.fresh(f"{base}_dequant", f"{base}_{nname}_dequant"),
            shape=ir.Shape(w_shape),
            type=ir.TensorType(fdtype),
        )
        reshape = ir.node("Reshape", [out, shape_val], outputs=[reshaped], name=names.fresh(f"{nname}_dq_reshape"))
        graph.insert_before(node, reshape)
        return reshaped

    def _insert_activation_qdq(self, graph, names, node, bits, scale) -> None:
        x = node.inputs[0]
        fdtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
        qdtype = ir.DataType.INT8 if bits == 8 else ir.DataType.INT16
        n = node.name
        s_name = names.fresh(f"{n}_x_scale")
        z_name = names.fresh(f"{n}_x_zero_point")
        s_val = common.add_initializer(
            graph, s_name, ir.tensor(np.array(scale, dtype=common.np_float_dtype(fdtype)), name=s_name)
        )
        z_val = common.add_initializer(
            graph, z_name, ir.tensor(np.array(0, dtype=np.int8 if bits == 8 else np.int16), name=z_name)
        )
        xq = ir.Value(name=names.fresh(f"{n}_x_q"), shape=x.shape, type=ir.TensorType(qdtype))
        xdq = ir.Value(name=names.fresh(f"{n}_x_dq"), shape=x.shape, type=ir.TensorType(fdtype))
        qnode = ir.node("QuantizeLinear", [x, s_val, z_val], outputs=[xq], name=names.fresh(f"{n}_xq"))
        dqnode = ir.node("DequantizeLinear", [xq, s_val, z_val], outputs=[xdq], name=names.fresh(f"{n}_xdq"))
        graph.insert_before(node, [qnode, dqnode])
        node.replace_input_with(0, xdq)


def apply_qdq(
    model: onnx.ModelProto,
    weights: Mapping[str, Any],
    activations: Mapping[str, Any] | None = None,
    *,
    explicit_zero_point: bool = False,
    int2_int8_matmul: str = "int4",
) -> onnx.ModelProto:
    """Return a copy of ``model`` with :class:`QDQPass` applied (``model`` is not modified)."""
    return common.apply_passes(model, [QDQPass(
        weights, activations, explicit_zero_point=explicit_zero_point, int2_int8_matmul=int2_int8_matmul)])
