"""If and Loop in the interpreter against ONNX Runtime: constant and data-dependent conditions and trip counts,
loop-carried and scan outputs, subgraphs reading outer-scope values (graph inputs, initializers, values of
the enclosing subgraph), nesting, gradients through the branch taken and through every iteration, and the
unsupported-op report inside subgraphs."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from _models import torch_threads
from _opcheck import check_against_ort, check_gradient
from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph, unsupported_nodes

R = np.random.default_rng(3)
W = R.standard_normal((4, 4)).astype(np.float32)


def vi(name, dtype=TP.FLOAT, shape=None):
    return oh.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=(), opset=21):
    g = oh.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


def if_model(cond_from_data: bool):
    """y = If(cond, then: (x·W) * 2, else: x - bias); the branches read x, W and bias from the outer scope."""
    then_g = oh.make_graph([oh.make_node("MatMul", ["x", "W"], ["xw"]), oh.make_node("Mul", ["xw", "two"], ["t_out"])],
                           "then", [], [vi("t_out")], [nh.from_array(np.float32(2), "two")])
    else_g = oh.make_graph([oh.make_node("Sub", ["x", "bias"], ["e_out"])], "else", [], [vi("e_out")])
    nodes = []
    if cond_from_data:
        nodes += [oh.make_node("ReduceSum", ["x"], ["sx"], keepdims=0), oh.make_node("Greater", ["sx", "zero"], ["c"])]
    nodes.append(oh.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g))
    inits = [nh.from_array(W, "W"), nh.from_array(np.linspace(-1, 1, 4).astype(np.float32), "bias"),
             nh.from_array(np.float32(0), "zero")]
    inputs = [vi("x", shape=[3, 4])]
    if not cond_from_data:
        inputs.append(vi("c", TP.BOOL, []))
    return _model(nodes, inputs, [vi("y", shape=[3, 4])], inits)


@pytest.mark.parametrize("cond", [True, False])
def test_if_with_a_given_condition(cond):
    m = if_model(False)
    feeds = {"x": R.standard_normal((3, 4)).astype(np.float32), "c": np.array(cond)}
    check_against_ort(m, feeds)
    check_gradient(m, feeds, ["x"])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_if_on_a_data_dependent_condition(sign):
    m = if_model(True)
    x = np.abs(R.standard_normal((3, 4))).astype(np.float32) * sign
    check_against_ort(m, {"x": x})
    check_gradient(m, {"x": x}, ["x"])


def loop_model(trip: int | None, with_cond: bool, scan: bool = True):
    """h_{i+1} = tanh(h_i·W + x·i); scan output h_i·0.5; with_cond: also stop once sum(h) ≥ 3 or i ≥ 3
    (a while-loop whose condition the body computes)."""
    body_nodes = [
        oh.make_node("Cast", ["i"], ["fi"], to=TP.FLOAT),
        oh.make_node("Mul", ["x", "fi"], ["xi"]),
        oh.make_node("MatMul", ["h_in", "W"], ["hw"]),
        oh.make_node("Add", ["hw", "xi"], ["pre"]),
        oh.make_node("Tanh", ["pre"], ["h_out"]),
        oh.make_node("Mul", ["h_in", "half"], ["scan_out"]),
    ]
    if with_cond:  # go on while sum(h) < 3 and i < 3 (tanh keeps sum(h) below 8: it could go on for ever)
        body_nodes += [oh.make_node("ReduceSum", ["h_out"], ["s"], keepdims=0),
                       oh.make_node("Less", ["s", "three"], ["small"]),
                       oh.make_node("Less", ["fi", "three"], ["early"]),
                       oh.make_node("And", ["small", "early"], ["cond_out"])]
    else:
        body_nodes.append(oh.make_node("Identity", ["cond_in"], ["cond_out"]))
    outs = [vi("cond_out", TP.BOOL, []), vi("h_out", shape=[2, 4])] + ([vi("scan_out", shape=[2, 4])] if scan else [])
    body = oh.make_graph(body_nodes, "body", [vi("i", TP.INT64, []), vi("cond_in", TP.BOOL, []), vi("h_in", shape=[2, 4])],
                         outs, [nh.from_array(np.float32(0.5), "half")])
    loop_in = ["M" if trip is not None else "", "c0" if with_cond else "", "h0"]
    outputs = ["h_final"] + (["hs"] if scan else [])
    node = oh.make_node("Loop", loop_in, outputs, body=body)
    inits = [nh.from_array(W * 0.5, "W"), nh.from_array(np.float32(3.0), "three"), nh.from_array(np.array(True), "c0")]
    if trip is not None:
        inits.append(nh.from_array(np.array(trip, np.int64), "M"))
    return _model([node], [vi("x", shape=[2, 4]), vi("h0", shape=[2, 4])],
                  [vi("h_final", shape=[2, 4])] + ([vi("hs", shape=["T", 2, 4])] if scan else []), inits)


@pytest.mark.parametrize("trip,with_cond", [(3, False), (5, True), (None, True), (0, False)])
def test_loop(trip, with_cond):
    m = loop_model(trip, with_cond)
    feeds = {"x": R.standard_normal((2, 4)).astype(np.float32), "h0": R.standard_normal((2, 4)).astype(np.float32)}
    refs = check_against_ort(m, feeds, outputs=[0] if trip == 0 else None)
    if trip != 0:
        assert refs[1].shape[0] >= 1
        check_gradient(m, feeds, ["x", "h0"], output=1)
    check_gradient(m, feeds, ["h0"])


def test_if_nested_in_a_loop_reads_both_scopes():
    """The If inside the body reads the body's h_in and the main graph's x."""
    then_g = oh.make_graph([oh.make_node("Add", ["h_in", "x"], ["a"])], "then", [], [vi("a")])
    else_g = oh.make_graph([oh.make_node("Sub", ["h_in", "x"], ["b"])], "else", [], [vi("b")])
    body = oh.make_graph(
        [oh.make_node("Mod", ["i", "two"], ["r"]), oh.make_node("Equal", ["r", "zero"], ["even"]),
         oh.make_node("If", ["even"], ["h_out"], then_branch=then_g, else_branch=else_g),
         oh.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", TP.INT64, []), vi("cond_in", TP.BOOL, []), vi("h_in", shape=[3])],
        [vi("cond_out", TP.BOOL, []), vi("h_out", shape=[3])],
        [nh.from_array(np.array(2, np.int64), "two"), nh.from_array(np.array(0, np.int64), "zero")])
    m = _model([oh.make_node("Loop", ["M", "", "h0"], ["h"], body=body)], [vi("x", shape=[3]), vi("h0", shape=[3])],
               [vi("h", shape=[3])], [nh.from_array(np.array(5, np.int64), "M")])
    feeds = {"x": np.array([1.0, 2.0, 3.0], np.float32), "h0": np.zeros(3, np.float32)}
    check_against_ort(m, feeds)
    np.testing.assert_allclose(TorchGraph(m).run(feeds)[0]["h"].numpy(), [1.0, 2.0, 3.0])  # +x -x +x -x +x
    check_gradient(m, feeds, ["x"])


def test_unsupported_op_inside_a_subgraph_is_reported():
    then_g = oh.make_graph([oh.make_node("Frobnicate", ["x"], ["t"], name="odd", domain="example.ops")], "then", [],
                           [vi("t")])
    else_g = oh.make_graph([oh.make_node("Identity", ["x"], ["e"])], "else", [], [vi("e")])
    g = oh.make_graph([oh.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)], "g",
                      [vi("x", shape=[2]), vi("c", TP.BOOL, [])], [vi("y")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("example.ops", 1)], ir_version=10)
    assert unsupported_nodes(m) == [("branch/odd", "Frobnicate", "example.ops")]
    with pytest.raises(LLCError, match="node 'branch/odd' \\(op Frobnicate domain example.ops\\)"):
        TorchGraph(m)


class _Scripted(torch.nn.Module):
    """A TorchScript export writes Loop (for over a tensor dim) and If (on data)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = torch.zeros_like(x[0])
        for i in range(x.size(0)):
            h = torch.tanh(self.lin(x[i]) + h)
        if bool(h.sum() > 0):
            h = h * 2.0
        else:
            h = h - 1.0
        return h


def test_torchscript_export_with_loop_and_if():
    with warnings.catch_warnings(), torch_threads(1):
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(_Scripted().eval())
        f = io.BytesIO()
        x = torch.randn(3, 4)
        torch.onnx.export(scripted, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "T"}})
    m = onnx.load_from_string(f.getvalue())
    ops = {n.op_type for n in m.graph.node}
    assert {"Loop", "If"} <= ops, ops
    for t in (2, 5):
        xs = np.random.default_rng(t).standard_normal((t, 4)).astype(np.float32)
        check_against_ort(m, {"x": xs})
        check_gradient(m, {"x": xs}, ["x"])
