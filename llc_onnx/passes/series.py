"""Write series-expanded weights (W ≈ Σ_t s_t·Q_t, :mod:`llc_onnx.series`) into an ONNX graph.

Two forms (``form=``), both run in ONNX Runtime 1.31 CPU:

``"standard"`` (default; standard ops only). The T terms are stacked along the reduction axis
(:mod:`llc_onnx.series.packing`) behind one blocked ``DequantizeLinear`` (INT2/INT4/INT8 codes, zero point 0,
``block_size`` = the stacked block) and the node reads its input tiled T times, so one node computes
Σ_t X·(s_t·Q_t):

* MatMul ``Y = X·W``: ``W' = DQ(q[T·K', N], axis 0)``, ``Y = MatMul(Concat_T(Pad(X)), W')``;
* Gemm: the same with ``transB`` set to 0 (weight written [T·K', N]; ORT fuses DQ+Gemm only for transB=0 and
  α = β = 1 with C absent or [N]), the input tiled along axis 1 (axis 0 when ``transA=1``);
* Conv: ``W' = Reshape(DQ(q[O, T·K'], axis 1), [O, T·C/g, kH, kW])`` (a Slice drops per-term padding when
  C/g·kH·kW is not a multiple of the block), input channels tiled so that group j sees its own channels T
  times: ``Concat_T(X)`` for group 1, else ``Gather(X, idx, axis 1)`` with ``idx = [j·C/g + c for j, t, c]``.

K' = K rounded up to whole blocks; Pad(X) adds the matching zeros (absent when the block divides K). ONNX
Runtime's optimizer fuses the MatMul/Gemm(transB=0) form into one ``com.microsoft::MatMulNBits`` when the block is
a power of two ≥ 16 (2, 4 and 8 bits; checked in tests/test_series_pass.py). Exception, an ORT 1.31 bug: for
an INT2 weight [K, N] with N % 4 != 0 that fusion computes wrong outputs (any K, M; INT4/INT8 and N % 4 == 0
are right). For 2-bit terms with N % 4 != 0 the pass therefore writes the weight as [N, T·K'] (blocked along
axis 1) followed by a Transpose (MatMul) or with transB=1 (Gemm): correct, still 2 bits per code, not fused.
The same bug hits any INT2 DQ + MatMul graph, including ``passes/qdq.py``'s.

``"custom"``. One node per weight in the domain ``ai.llc_onnx`` that a GPU/TensorRT runtime can map to one kernel:

* ``SeriesMatMul(A, B, scales) -> Y`` with attributes ``K`` (per-term reduction length), ``N``, ``bits``,
  ``block_size`` (the stacked block), ``terms``: ``Y = Σ_t A·(s_t·Q_t)ᵀ``; ``B`` uint8 ``[N, T·nb, blob]`` and
  ``scales [N·T·nb]`` in the MatMulNBits layout (codes ``u = q + 2^(bits−1)``, low bits first). Gemm becomes
  (Transpose when transA) → SeriesMatMul → Mul α → Add β·C.
* ``SeriesConv(X, B, scales[, bias]) -> Y``: the same weight bytes (matrix view [O, C/g·kH·kW]) plus the Conv
  attributes ``group, kernel_shape, strides, pads, dilations, auto_pad``.

With ``function=True`` (default) the model carries model-local functions (``FunctionProto``) with the bodies of
both ops in standard ops (unpack the bytes with Div/Mod, scale, sum the terms, MatMul/Conv), so ONNX Runtime (which
inlines local functions) and any other runtime without the kernel still run it; ``function=False`` leaves the bare
custom nodes (for a runtime that has the kernels; the llc-onnx interpreter runs both).

Opset: ≥ 21 required; relabelled to 25 (IR 11) when 2-bit terms are written in the standard form (INT2
DequantizeLinear). The float weight initializer is removed once unused (``apply_passes``). Nodes without a plan are untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import AttributeProto, TensorProto
from onnx import helper as oh

from llc_onnx.errors import LLCError
from llc_onnx.passes import common
from llc_onnx.passes.qdq import QTYPES
from llc_onnx.series.expansion import SERIES_BITS, SeriesWeight
from llc_onnx.series.packing import StackedTerms, pack_nbits, stack_terms

__all__ = ["SeriesPass", "SeriesResult", "apply_series", "DOMAIN", "FORMS", "series_matmul_function", "series_conv_function"]

DOMAIN = "ai.llc_onnx"
DOMAIN_VERSION = 1
FORMS = ("standard", "custom")
_CONV_ATTRS = ("strides", "pads", "dilations", "auto_pad")


@dataclasses.dataclass
class SeriesResult(common.RewriteResult):
    """:class:`~llc_onnx.passes.common.RewriteResult` of :class:`SeriesPass`; ``transposed``: MatMul/Gemm nodes
    whose 2-bit terms are written [N, T·K'] with a Transpose / transB=1 (the ORT 1.31 INT2 fusion bug, module
    doc): correct and still 2 bits per code, but not fused into MatMulNBits."""

    transposed: tuple[str, ...] = ()

    def notes(self) -> list[tuple[str, str]]:
        return [(n, "2-bit series terms written transposed (ORT 1.31 fuses INT2 [K, N] with N % 4 != 0 wrongly); "
                    "runs unfused") for n in self.transposed]


class SeriesPass(common.RewritePass):
    """Rewrite each named MatMul/Gemm/Conv to compute its :class:`SeriesWeight` (module doc).

    ``weights``: node name -> SeriesWeight of that node's weight (same shape and axes); a node's ``order``
    may be lowered with ``orders`` (node -> τ) to write a truncated model without re-expanding. Returns a
    :class:`SeriesResult`."""

    def __init__(self, weights: Mapping[str, SeriesWeight], *, form: str = "standard", function: bool = True,
                 orders: Mapping[str, int] | None = None):
        super().__init__()
        if form not in FORMS:
            raise LLCError(f"series pass: form='{form}' is unknown; use one of {', '.join(FORMS)}")
        self.weights = dict(weights)
        self.form = form
        self.function = bool(function)
        self.orders = dict(orders or {})

    def check(self, model: ir.Model) -> list:
        opset = common.default_opset(model)
        if self.weights and opset < 21:
            raise LLCError(f"model: default opset is {opset}; series terms need opset ≥ 21 (blocked "
                           "DequantizeLinear); run model_io.prepare_model first")
        nodes = common.find_nodes(model.graph, self.weights, "series plan")
        plans = [(node, *self._check(node)) for node in nodes]
        if self.form == "standard" and opset > 25 and any(st.bits == 2 for *_, st in plans):
            raise LLCError(f"model: default opset is {opset}; ONNX Runtime 1.31 runs INT2 only up to opset 25")
        return plans

    def rewrite(self, model: ir.Model, plans: list) -> SeriesResult:
        graph = model.graph
        names = common.Names(graph)
        if not plans:
            return SeriesResult(model, modified=False)
        if self.form == "standard":
            if any(st.bits == 2 for *_, st in plans):
                common.set_default_opset(model, 25, 11)
            else:
                common.set_default_opset(model, 21, 10)
        else:
            model.opset_imports[DOMAIN] = DOMAIN_VERSION
            model.graph.opset_imports[DOMAIN] = DOMAIN_VERSION
        shared: dict[tuple, Any] = {}
        transposed = []
        for node, idx, value, sw, st in plans:
            key = (value.name, id(sw), st.terms)
            if self.form == "standard":
                if self._standard(graph, names, node, idx, value, st, shared, key):
                    transposed.append(node.name)
            else:
                self._custom(graph, names, node, value, st, shared, key)
        if self.form == "custom" and self.function:
            opset = common.default_opset(model)
            used = {n.op_type for n in graph if n.domain == DOMAIN}
            for op, make in (("SeriesMatMul", series_matmul_function), ("SeriesConv", series_conv_function)):
                if op in used and (DOMAIN, op, "") not in model.functions:
                    fn = ir.serde.deserialize_function(make(opset))
                    model.functions[fn.identifier()] = fn
        return SeriesResult(model, modified=True, written=tuple(n.name for n, *_ in plans),
                            transposed=tuple(transposed))

    # ------------------------------------------------------------------------------ checks
    def _check(self, node: ir.Node):
        where = f"node '{node.name}' (op {node.op_type})"
        idx, value, w = common.weight_value(node)
        sw = self.weights[node.name]
        if not isinstance(sw, SeriesWeight):
            raise LLCError(f"{where}: series plan is a {type(sw).__name__}; pass a SeriesWeight")
        if tuple(sw.shape) != tuple(w.shape):
            raise LLCError(f"{where}: series plan expands a weight of shape {sw.shape}, the node's is {w.shape}; "
                           "expand this node's weight")
        want = _axes(node)
        if (sw.out_axis, sw.reduce_axis) != want:
            raise LLCError(f"{where}: series plan has (out_axis, reduce_axis) = {(sw.out_axis, sw.reduce_axis)}, "
                           f"the node needs {want}")
        if sw.bits not in SERIES_BITS:
            raise LLCError(f"{where}: series plan has bits={sw.bits}; supported are 2, 4 and 8")
        order = self.orders.get(node.name, sw.order)
        if not 1 <= order <= sw.order:
            raise LLCError(f"{where}: series order {order} is outside 1..{sw.order} (the plan's terms)")
        st = stack_terms(sw, order)
        for t in range(st.terms):
            if not np.all(np.isfinite(st.scales[:, t])):
                raise LLCError(f"{where}: term {t} has non-finite scales; fix the expansion")
        return idx, value, sw, st

    # ------------------------------------------------------------------------------ standard form
    def _standard(self, graph, names, node, idx, value, st: StackedTerms, shared, key) -> bool:
        """Write the standard form; True when the weight is written transposed (2-bit, N % 4 != 0)."""
        n, t, kp = st.n, st.terms, st.k_pad
        fdtype = value.const_value.dtype
        base, nname = value.name, node.name
        op = node.op_type
        # ORT 1.31 fuses DQ(INT2 [K, N]) + MatMul into a *wrong* MatMulNBits when N % 4 != 0: keep [N, T·K'] then
        transposed = op != "Conv" and st.bits == 2 and n % 4 != 0
        if key not in shared:
            dtype, np_type, _ = QTYPES[st.bits]
            codes = st.codes.reshape(n, t * kp)
            scales = st.scales.reshape(n, t * st.nb).astype(common.np_float_dtype(fdtype))
            axis = 1
            if op != "Conv" and not transposed:  # [T·K', N] blocked along axis 0: what ORT fuses into MatMulNBits
                codes, scales, axis = codes.T, scales.T, 0
            q_name = names.fresh(f"{base}_series_q{st.bits}", f"{base}_{nname}_series_q{st.bits}")
            s_name = names.fresh(f"{base}_series_scale", f"{base}_{nname}_series_scale")
            q_val = common.add_initializer(
                graph, q_name, ir.Tensor(np.ascontiguousarray(codes).astype(np_type), dtype=dtype, name=q_name))
            s_val = common.add_initializer(graph, s_name, ir.tensor(np.ascontiguousarray(scales), name=s_name))
            dq_out = ir.Value(name=names.fresh(f"{base}_series_dequant"), shape=ir.Shape(codes.shape),
                              type=ir.TensorType(fdtype))
            new = [ir.node("DequantizeLinear", [q_val, s_val], {"axis": axis, "block_size": st.block},
                           outputs=[dq_out], name=names.fresh(f"{nname}_series_dq"))]
            w_out = dq_out
            if op == "MatMul" and transposed:
                w_out = ir.Value(name=names.fresh(f"{base}_series_weight"), shape=ir.Shape([t * kp, n]),
                                 type=ir.TensorType(fdtype))
                new.append(ir.node("Transpose", [dq_out], {"perm": [1, 0]}, outputs=[w_out],
                                   name=names.fresh(f"{nname}_series_transpose")))
            if op == "Conv":
                kshape = list(value.const_value.shape)
                cg = kshape[1]
                final = [n, t * cg, *kshape[2:]]
                src = dq_out
                if kp != st.k:
                    mid = _const(graph, names, f"{nname}_series_tk", np.array([n, t, kp], np.int64))
                    r1 = ir.Value(name=names.fresh(f"{base}_series_terms"), type=ir.TensorType(fdtype))
                    new.append(ir.node("Reshape", [dq_out, mid], outputs=[r1], name=names.fresh(f"{nname}_series_split")))
                    sl = ir.Value(name=names.fresh(f"{base}_series_unpadded"), type=ir.TensorType(fdtype))
                    starts = _const(graph, names, f"{nname}_series_zero", np.array([0], np.int64))
                    ends = _const(graph, names, f"{nname}_series_k", np.array([st.k], np.int64))
                    axes = _const(graph, names, f"{nname}_series_axis2", np.array([2], np.int64))
                    new.append(ir.node("Slice", [r1, starts, ends, axes], outputs=[sl],
                                       name=names.fresh(f"{nname}_series_unpad")))
                    src = sl
                shp = _const(graph, names, f"{nname}_series_shape", np.array(final, np.int64))
                w_out = ir.Value(name=names.fresh(f"{base}_series_weight"), shape=ir.Shape(final),
                                 type=ir.TensorType(fdtype))
                new.append(ir.node("Reshape", [src, shp], outputs=[w_out], name=names.fresh(f"{nname}_series_reshape")))
            graph.insert_before(node, new)
            shared[key] = w_out
        node.replace_input_with(idx, shared[key])

        # the input, tiled T times (and padded to whole blocks)
        x = node.inputs[0]
        if op == "Conv":
            if t > 1:
                xt = ir.Value(name=names.fresh(f"{nname}_series_x"), type=x.type)
                group = node.attributes.get_int("group", 1)
                if group == 1:
                    tile = ir.node("Concat", [x] * t, {"axis": 1}, outputs=[xt], name=names.fresh(f"{nname}_series_tile"))
                else:
                    cg = value.const_value.shape[1]
                    idx_arr = np.array([j * cg + c for j in range(group) for _ in range(t) for c in range(cg)],
                                       dtype=np.int64)
                    ind = _const(graph, names, f"{nname}_series_channels", idx_arr)
                    tile = ir.node("Gather", [x, ind], {"axis": 1}, outputs=[xt], name=names.fresh(f"{nname}_series_tile"))
                graph.insert_before(node, tile)
                node.replace_input_with(0, xt)
            return transposed
        axis = -1
        if op == "Gemm":
            axis = 0 if node.attributes.get_int("transA", 0) else 1
            node.attributes["transB"] = ir.AttrInt64("transB", 1 if transposed else 0)
        new = []
        cur = x
        if kp != st.k:
            pads = _const(graph, names, f"{nname}_series_pads", np.array([0, kp - st.k], np.int64))
            axes = _const(graph, names, f"{nname}_series_pad_axis", np.array([axis], np.int64))
            padded = ir.Value(name=names.fresh(f"{nname}_series_x_padded"), type=x.type)
            new.append(ir.node("Pad", [cur, pads, None, axes], outputs=[padded], name=names.fresh(f"{nname}_series_pad")))
            cur = padded
        if t > 1:
            xt = ir.Value(name=names.fresh(f"{nname}_series_x"), type=x.type)
            new.append(ir.node("Concat", [cur] * t, {"axis": axis}, outputs=[xt], name=names.fresh(f"{nname}_series_tile")))
            cur = xt
        if new:
            graph.insert_before(node, new)
            node.replace_input_with(0, cur)
        return transposed

    # ------------------------------------------------------------------------------ custom form
    def _custom(self, graph, names, node, value, st: StackedTerms, shared, key) -> None:
        nname, base = node.name, value.name
        fdtype = value.const_value.dtype
        if key not in shared:
            b, s = pack_nbits(st)
            b_name = names.fresh(f"{base}_series_B", f"{base}_{nname}_series_B")
            s_name = names.fresh(f"{base}_series_scales", f"{base}_{nname}_series_scales")
            b_val = common.add_initializer(graph, b_name, ir.tensor(b, name=b_name))
            s_val = common.add_initializer(
                graph, s_name, ir.tensor(s.astype(common.np_float_dtype(fdtype)), name=s_name))
            shared[key] = (b_val, s_val)
        b_val, s_val = shared[key]
        attrs: dict[str, Any] = {"K": st.k, "N": st.n, "bits": st.bits, "block_size": st.block, "terms": st.terms}
        out = node.outputs[0]
        new_out = ir.Value(name=names.fresh(f"{nname}_series_out"), type=out.type, shape=out.shape)
        x = node.inputs[0]
        new: list[ir.Node] = []
        if node.op_type == "Conv":
            kshape = list(value.const_value.shape)
            attrs["group"] = node.attributes.get_int("group", 1)
            attrs["kernel_shape"] = kshape[2:]
            for name in _CONV_ATTRS:
                a = node.attributes.get(name)
                if a is not None:
                    attrs[name] = a.value
            ins = [x, b_val, s_val] + ([node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] is not None else [])
            new.append(ir.node("SeriesConv", ins, attrs, domain=DOMAIN, outputs=[new_out],
                               name=names.fresh(f"{nname}_series")))
        elif node.op_type == "MatMul":
            new.append(ir.node("SeriesMatMul", [x, b_val, s_val], attrs, domain=DOMAIN, outputs=[new_out],
                               name=names.fresh(f"{nname}_series")))
        else:  # Gemm: Y = α·A'·B' + β·C
            a_in = x
            if node.attributes.get_int("transA", 0):
                a_in = ir.Value(name=names.fresh(f"{nname}_series_at"), type=x.type)
                new.append(ir.node("Transpose", [x], {"perm": [1, 0]}, outputs=[a_in],
                                   name=names.fresh(f"{nname}_series_transA")))
            alpha = node.attributes.get_float("alpha", 1.0)
            beta = node.attributes.get_float("beta", 1.0)
            c = node.inputs[2] if len(node.inputs) > 2 else None
            tail = alpha != 1.0 or c is not None
            y = ir.Value(name=names.fresh(f"{nname}_series_mm"), type=out.type) if tail else new_out
            new.append(ir.node("SeriesMatMul", [a_in, b_val, s_val], attrs, domain=DOMAIN, outputs=[y],
                               name=names.fresh(f"{nname}_series")))
            npf = common.np_float_dtype(fdtype)
            if alpha != 1.0:
                ya = ir.Value(name=names.fresh(f"{nname}_series_alpha_out"), type=out.type) if c is not None else new_out
                av = _const(graph, names, f"{nname}_series_alpha", np.array(alpha, npf))
                new.append(ir.node("Mul", [y, av], outputs=[ya], name=names.fresh(f"{nname}_series_alpha")))
                y = ya
            if c is not None:
                if beta != 1.0:
                    cb = ir.Value(name=names.fresh(f"{nname}_series_beta_c"), type=c.type)
                    bv = _const(graph, names, f"{nname}_series_beta", np.array(beta, npf))
                    new.append(ir.node("Mul", [c, bv], outputs=[cb], name=names.fresh(f"{nname}_series_beta")))
                    c = cb
                new.append(ir.node("Add", [y, c], outputs=[new_out], name=names.fresh(f"{nname}_series_bias")))
        graph.insert_before(node, new)
        out_name = out.name
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        out.name = names.fresh(f"{out_name}_replaced")
        new_out.name = out_name


def _axes(node: ir.Node) -> tuple[int, int]:
    """(out_axis, reduce_axis) of the node's weight, as find_compressible gives them."""
    if node.op_type == "Conv":
        return (0, 1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return (0, 1)
    return (1, 0)


def _const(graph: ir.Graph, names: common.Names, preferred: str, arr: np.ndarray) -> ir.Value:
    name = names.fresh(preferred)
    return common.add_initializer(graph, name, ir.tensor(arr, name=name))


# ---------------------------------------------------------------------------------- function bodies
def _ref(name: str, ref: str, kind: int) -> AttributeProto:
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, kind
    return a


def _unpack_body() -> list[onnx.NodeProto]:
    """Nodes computing ``w [N, K] = Σ_t s_t·Q_t`` from ``B`` and ``scales`` (MatMulNBits layout, attributes
    K, N, bits, block_size, terms): u = (B div 2^(bits·j)) mod 2^bits for the j-th code of a byte, q = u − 2^(bits−1)."""
    def const(out: str, ref: str) -> onnx.NodeProto:
        n = oh.make_node("Constant", [], [out])
        n.attribute.append(_ref("value_int", ref, AttributeProto.INT))
        return n

    def lit(out: str, values, dtype) -> onnx.NodeProto:
        return oh.make_node("Constant", [], [out], value=onnx.numpy_helper.from_array(np.array(values, dtype), out))

    return [
        const("bits64", "bits"), const("n64", "N"), const("t64", "terms"), const("k64", "K"), const("bs64", "block_size"),
        lit("i0", 0, np.int32), lit("i8", 8, np.int32), lit("i2", 2, np.int32),
        lit("ax0", [0], np.int64), lit("ax2", [2], np.int64), lit("one1", [1], np.int64),
        lit("neg1", [-1], np.int64), lit("keep2", [0, 0, -1], np.int64),
        oh.make_node("Cast", ["bits64"], ["bits32"], to=TensorProto.INT32),
        oh.make_node("Range", ["i0", "i8", "bits32"], ["shifts"]),
        oh.make_node("Pow", ["i2", "shifts"], ["divisors"]),
        oh.make_node("Pow", ["i2", "bits32"], ["modulus"]),
        oh.make_node("Div", ["modulus", "i2"], ["zero_point"]),
        oh.make_node("Cast", ["B"], ["b32"], to=TensorProto.INT32),
        oh.make_node("Unsqueeze", ["b32", "neg1"], ["b32u"]),
        oh.make_node("Div", ["b32u", "divisors"], ["shifted"]),
        oh.make_node("Mod", ["shifted", "modulus"], ["u"]),
        oh.make_node("Sub", ["u", "zero_point"], ["q"]),
        oh.make_node("CastLike", ["q", "scales"], ["qf"]),
        oh.make_node("Reshape", ["qf", "keep2"], ["qr"]),                  # [N, T·nb, blob·(8/bits)]
        oh.make_node("Unsqueeze", ["bs64", "ax0"], ["bs1"]),
        oh.make_node("Slice", ["qr", "ax0", "bs1", "ax2"], ["qb"]),        # [N, T·nb, block]
        oh.make_node("Unsqueeze", ["n64", "ax0"], ["n1"]),
        oh.make_node("Unsqueeze", ["t64", "ax0"], ["t1"]),
        oh.make_node("Unsqueeze", ["k64", "ax0"], ["k1"]),
        oh.make_node("Concat", ["n1", "neg1", "one1"], ["s_shape"], axis=0),
        oh.make_node("Reshape", ["scales", "s_shape"], ["s3"]),            # [N, T·nb, 1]
        oh.make_node("Mul", ["qb", "s3"], ["dq"]),
        oh.make_node("Concat", ["n1", "t1", "neg1"], ["t_shape"], axis=0),
        oh.make_node("Reshape", ["dq", "t_shape"], ["dq3"]),               # [N, T, nb·block]
        oh.make_node("Slice", ["dq3", "ax0", "k1", "ax2"], ["dqk"]),       # [N, T, K]
        oh.make_node("ReduceSum", ["dqk", "one1"], ["w"], keepdims=0),     # [N, K]
    ]


def series_matmul_function(opset: int = 21) -> onnx.FunctionProto:
    """``ai.llc_onnx::SeriesMatMul(A, B, scales) -> Y`` in standard ops (module doc)."""
    nodes = _unpack_body() + [
        oh.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        oh.make_node("MatMul", ["A", "wt"], ["Y"]),
    ]
    return oh.make_function(DOMAIN, "SeriesMatMul", ["A", "B", "scales"], ["Y"], nodes,
                            [oh.make_opsetid("", int(opset))], ["K", "N", "bits", "block_size", "terms"],
                            doc_string="Y = Σ_t A·(s_t·Q_t)ᵀ; B uint8 [N, terms·nb, blob] (MatMulNBits layout, "
                                       "zero point 2^(bits-1)), scales [N·terms·nb]")


def series_conv_function(opset: int = 21) -> onnx.FunctionProto:
    """``ai.llc_onnx::SeriesConv(X, B, scales[, bias]) -> Y`` in standard ops (module doc)."""
    conv = oh.make_node("Conv", ["X", "w4", "bias"], ["Y"])
    conv.attribute.extend([_ref("group", "group", AttributeProto.INT),
                           _ref("kernel_shape", "kernel_shape", AttributeProto.INTS),
                           _ref("strides", "strides", AttributeProto.INTS),
                           _ref("pads", "pads", AttributeProto.INTS),
                           _ref("dilations", "dilations", AttributeProto.INTS),
                           _ref("auto_pad", "auto_pad", AttributeProto.STRING)])
    ks = oh.make_node("Constant", [], ["ks"])
    ks.attribute.append(_ref("value_ints", "kernel_shape", AttributeProto.INTS))
    nodes = _unpack_body() + [
        ks,
        oh.make_node("Concat", ["n1", "neg1", "ks"], ["w_shape"], axis=0),
        oh.make_node("Reshape", ["w", "w_shape"], ["w4"]),                 # [O, C/g, k...]
        conv,
    ]
    return oh.make_function(DOMAIN, "SeriesConv", ["X", "B", "scales", "bias"], ["Y"], nodes,
                            [oh.make_opsetid("", int(opset))],
                            ["K", "N", "bits", "block_size", "terms", "group", "kernel_shape", *_CONV_ATTRS],
                            doc_string="Y = Conv(X, Σ_t s_t·Q_t) with the weight as SeriesMatMul's [O, C/g·k...]")


def apply_series(model: onnx.ModelProto, weights: Mapping[str, SeriesWeight], *, form: str = "standard",
                 function: bool = True, orders: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` with :class:`SeriesPass` applied (``model`` is not modified)."""
    return common.apply_passes(model, [SeriesPass(weights, form=form, function=function, orders=orders)])
