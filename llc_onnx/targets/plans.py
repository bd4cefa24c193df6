"""Turn a choice of formats into node plans: quantize each weight in the format's layout and calibrate the
activations W8A8 formats need (one interpreter pass over the calibration data for all of them)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from llc_onnx.calib.activation_ranges import collect_activation_ranges, qparams
from llc_onnx.compressible import CompressibleNode, find_compressible
from llc_onnx.errors import LLCError
from llc_onnx.quant import quantize_weight
from llc_onnx.targets.base import Format, NodePlan, Target

__all__ = ["quantize_for", "plan_nodes"]


def quantize_for(fmt: Format, node: CompressibleNode, w: np.ndarray, *, grad: np.ndarray | None = None,
                 scale_method: str = "minmax", rounding: str = "nearest"):
    """The node's weight quantized the way ``fmt`` stores it (None for float; a ``SeriesWeight`` of
    ``fmt.terms`` nearest-rounded terms for a series format)."""
    if fmt.kind == "series":
        from llc_onnx.series import expand_node

        return expand_node(w, node, bits=int(fmt.bits), terms=int(fmt.terms), block_size=fmt.block_size,
                           scale_method=scale_method)
    spec = fmt.weight_spec(scale_method=scale_method, rounding=rounding)
    if spec is None:
        return None
    return quantize_weight(w, spec, out_axis=node.out_axis, reduce_axis=node.reduce_axis, grad=grad)


def plan_nodes(target: Target, model: onnx.ModelProto, choices: Mapping[str, Format], *, data=None, graph=None,
               calibration: str = "minmax", percentile: float = 99.999, scale_method: str = "minmax",
               rounding: str = "nearest", grads: Mapping[str, np.ndarray] | None = None) -> dict[str, NodePlan]:
    """One :class:`NodePlan` per chosen node. ``data`` (a Dataset or feed dicts) and ``graph`` (a
    ``TorchGraph`` of ``model``; built when None) are needed when a W8A8 format is chosen; ``calibration``
    is the activation range method (``minmax`` | ``percentile`` | ``entropy``)."""
    nodes = {n.name: n for n in find_compressible(model)[0]}
    inits = {t.name: t for t in model.graph.initializer}
    plans: dict[str, NodePlan] = {}
    needs: dict[str, tuple[str | None, str | None, str]] = {}
    for name in choices:
        if name not in nodes:
            raise LLCError(f"node '{name}': not a compressible node of the model; choose formats for "
                           "find_compressible() nodes")
    static = [(name, fmt) for name, fmt in choices.items() if fmt.kind == "w8a8" and not fmt.dynamic]
    for (name, fmt), (x, y) in zip(static, target.tensors_to_calibrate_all(model, static)):
        needs[name] = (x, y, fmt.activations)   # (dynamic W8A8 quantizes its input at run time)
    ranges = {}
    if needs:
        if data is None:
            raise LLCError("W8A8 formats need calibration data for their activation ranges; pass data=")
        if graph is None:
            from llc_onnx.interpreter import TorchGraph

            graph = TorchGraph(model)
        tensors = sorted({t for x, y, _ in needs.values() for t in (x, y) if t is not None})
        ranges = collect_activation_ranges(graph, data, tensors, method=calibration, percentile=percentile,
                                           symmetric=True, observed=[i.name for i in model.graph.input])
    for name, fmt in choices.items():
        node = nodes[name]
        w = numpy_helper.to_array(inits[node.weight])
        grad = None if grads is None else grads.get(name)
        weight = quantize_for(fmt, node, w, grad=grad, scale_method=scale_method, rounding=rounding)
        inp = out = None
        if name in needs:
            x, y, dtype = needs[name]
            inp = qparams(ranges[x], dtype)
            out = qparams(ranges[y], dtype) if y is not None else None
        plans[name] = NodePlan(format=fmt, weight=weight, input=inp, output=out)
    return plans
