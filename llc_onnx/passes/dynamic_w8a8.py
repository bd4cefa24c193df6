"""Dynamic W8A8: 8-bit weights per output channel and 8-bit activations quantized **at run time**, per
tensor, in the form ONNX Runtime's ``quantize_dynamic`` writes and its CPU provider fuses.

For a planned ``MatMul(x, W)`` (W a constant ``[K, N]``) the pass writes::

    x ─ DynamicQuantizeLinear ─► x_q (uint8), s_x, z_x          (one per activation tensor, shared)
    MatMulInteger(x_q, W_q int8 [K, N], z_x, z_W int8 [N] = 0) ─► int32
    Cast(int32 → float) · (s_x · s_W[N]) ─► the node's output (same name)

``DynamicQuantizeLinear`` computes, on every run, s_x = (max(x, 0) − min(x, 0)) / 255 and
z_x = round(−min(x, 0) / s_x) over the whole tensor (every row of the run's batch), so no calibration is
needed and an activation outlier widens the range of the run it occurs in only. ORT 1.31 fuses the chain into
``DynamicQuantizeMatMul`` (``MatMulIntegerToFloat`` where one DynamicQuantizeLinear feeds several MatMuls;
tests/test_pass_dynamic_w8a8.py inspects the optimized graph). The interpreter reproduces it with
:func:`llc_onnx.quant.activations.dynamic_uint8_fake_quant` (the target's input hook): candidates are measured,
and plans validated and verified, at the calibration batch size (``--batch-size``), one range per batch, as ORT
takes one per run; a model run with fewer rows per call (batch 1) takes tighter ranges.

Weight codes: 8-bit, or 7-bit codes in [-64, 63] stored as INT8 (the ORT CPU target's default: without VNNI,
ORT's u8·s8 kernels add pairs of products in int16 and saturate with full-range codes). Bytes are those of
static W8A8: int8 codes, a float scale and an int8 zero point per output channel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from llc_onnx.errors import LLCError
from llc_onnx.passes import common

__all__ = ["DynamicW8A8Pass", "apply_dynamic_w8a8"]


class DynamicW8A8Pass(common.RewritePass):
    """Write dynamic W8A8 plans (module doc). ``plans``: MatMul node name -> QuantizedWeight-like (8- or 7-bit
    codes per output channel, ``axis`` 1 of the ``[K, N]`` weight)."""

    def __init__(self, plans: Mapping[str, Any]):
        super().__init__()
        self.plans = dict(plans)

    def check(self, model: ir.Model) -> list[tuple[ir.Node, np.ndarray, np.ndarray]]:
        if not self.plans:
            return []
        if common.default_opset(model) < 11:
            raise LLCError(f"model: default opset is {common.default_opset(model)}; DynamicQuantizeLinear needs "
                           "opset >= 11; run model_io.prepare_model first")
        checked = []
        for node in common.find_nodes(model.graph, self.plans, "dynamic W8A8 plan"):
            where = f"node '{node.name}'"
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                raise LLCError(f"{where} (op {node.op_type}): dynamic W8A8 applies to MatMul only (what ORT's "
                               "MatMulInteger fusion takes); use static W8A8 or MatMulNBits for it")
            idx, value, w = common.weight_value(node)
            if idx != 1 or w.ndim != 2:
                raise LLCError(f"{where}: dynamic W8A8 needs a 2-D constant weight as MatMul's second input")
            if value.const_value.dtype != ir.DataType.FLOAT:
                raise LLCError(f"{where}: weight is {value.const_value.dtype.name}; ORT's MatMulInteger path "
                               "takes float32 activations")
            plan = self.plans[node.name]
            q, bits = common.plan_codes(where, plan, "dynamic W8A8 weight plan", (7, 8))
            if plan.block_size is not None:
                raise LLCError(f"{where}: dynamic W8A8 weights are per output channel; got block_size="
                               f"{plan.block_size}")
            n = w.shape[1]
            scale = np.asarray(plan.scale, dtype=np.float32).reshape(-1)
            if q.shape != w.shape or int(plan.axis) != 1 or scale.size != n:
                raise LLCError(f"{where}: weight plan has codes {tuple(q.shape)}, axis {plan.axis} and "
                               f"{scale.size} scales; need codes {tuple(w.shape)} with one scale per output "
                               f"channel (axis 1, {n} scales)")
            checked.append((node, q.astype(np.int8), scale))
        return checked

    def rewrite(self, model: ir.Model, checked) -> common.RewriteResult:
        if not checked:
            return common.RewriteResult(model, modified=False)
        graph = model.graph
        names = common.Names(graph)
        quantized: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}   # id(x) -> (x_q, s_x, z_x)
        for node, q, scale in checked:
            x, y = node.inputs[0], node.outputs[0]
            stem = node.name
            if id(x) not in quantized:
                xs = x.name or stem
                outs = [ir.Value(name=names.fresh(f"{xs}_quantized"), type=ir.TensorType(ir.DataType.UINT8),
                                 shape=x.shape),
                        ir.Value(name=names.fresh(f"{xs}_scale"), type=ir.TensorType(ir.DataType.FLOAT),
                                 shape=ir.Shape([])),
                        ir.Value(name=names.fresh(f"{xs}_zero_point"), type=ir.TensorType(ir.DataType.UINT8),
                                 shape=ir.Shape([]))]
                dql = ir.node("DynamicQuantizeLinear", [x], outputs=outs, name=names.fresh(f"{xs}_dql"))
                producer = x.producer()
                if producer is not None:
                    graph.insert_after(producer, dql)
                else:
                    graph.insert_before(next(iter(graph)), dql)
                quantized[id(x)] = tuple(outs)
            x_q, s_x, z_x = quantized[id(x)]
            q_name, s_name, z_name = (names.fresh(f"{stem}_W_quantized"), names.fresh(f"{stem}_W_scale"),
                                      names.fresh(f"{stem}_W_zero_point"))
            w_q = common.add_initializer(graph, q_name, ir.tensor(q, name=q_name))
            w_s = common.add_initializer(graph, s_name, ir.tensor(scale, name=s_name))
            w_z = common.add_initializer(graph, z_name, ir.tensor(np.zeros(scale.size, np.int8), name=z_name))
            s = ir.Value(name=names.fresh(f"{stem}_quant_scales_mul"), type=ir.TensorType(ir.DataType.FLOAT))
            acc = ir.Value(name=names.fresh(f"{stem}_output_quantized"), type=ir.TensorType(ir.DataType.INT32))
            acc_f = ir.Value(name=names.fresh(f"{stem}_output_quantized_cast"), type=ir.TensorType(ir.DataType.FLOAT))
            out = ir.Value(name=names.fresh(f"{stem}_output_dynamic"), type=y.type, shape=y.shape)
            mmi = ir.node("MatMulInteger", [x_q, w_q, z_x, w_z], outputs=[acc], name=names.fresh(f"{stem}_quant"))
            new = [ir.node("Mul", [s_x, w_s], outputs=[s], name=names.fresh(f"{stem}_scales_mul")), mmi,
                   ir.node("Cast", [acc], {"to": ir.DataType.FLOAT}, outputs=[acc_f],
                           name=names.fresh(f"{stem}_output_cast")),
                   ir.node("Mul", [acc_f, s], outputs=[out], name=names.fresh(f"{stem}_output_scale_mul"))]
            graph.insert_before(node, new)
            y_name = y.name
            ir.convenience.replace_all_uses_with(y, out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            y.name = names.fresh(f"{y_name}_float")   # the new output takes the tensor's name: consumers,
            out.name = y_name                           # graph outputs and reports read it as before
            mmi.name = node.name                        # the integer kernel carries the planned node's name
        common.set_default_opset(model, 11, 7)
        return common.RewriteResult(model, modified=True, written=tuple(n.name for n, *_ in checked))


def apply_dynamic_w8a8(model: onnx.ModelProto, plans: Mapping[str, Any]) -> onnx.ModelProto:
    """Return a copy of ``model`` with :class:`DynamicW8A8Pass` applied (``model`` is not modified)."""
    return common.apply_passes(model, [DynamicW8A8Pass(plans)], replaced=list(plans))
