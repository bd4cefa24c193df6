"""ORT CPU integer chains: what the ort-cpu rewrite does so that consecutive W8A8 nodes stay in integers in ONNX
Runtime — a zero Pad folded into its Conv (exactly), a Clip whose bounds are Constant nodes absorbed into the
output quantizer, residual Adds reading the dequantized tensors (QLinearAdd). Checked on ORT's own optimized
graph and against the unfused numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from llc_onnx.passes.pad_fusion import fuse_pad_into_conv
from llc_onnx.passes.w8a8 import W8A8Pass, W8A8Plan
from llc_onnx.targets import Format, get_target
from llc_onnx.targets.base import apply_passes
from llc_onnx.targets.plans import plan_nodes

W8 = Format("w8a8", 8, None, code_bits=7, activations="uint8", output=True)
RNG = np.random.default_rng(0)


def _model(nodes, inits, c_out=4, size=8, extra_outputs=()):
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 3, size, size])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["N", "c", "h", "w"]), *extra_outputs],
                      [nh.from_array(v, k) for k, v in inits.items()])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m)
    return m


def _w(o, i, k=3):
    return (RNG.standard_normal((o, i, k, k)) / np.sqrt(i * k * k)).astype(np.float32)


def _const(name, value):
    return oh.make_node("Constant", [], [name], value=nh.from_array(np.asarray(value), name + "_v"), name=name + "_c")


def _run(model, x, optimize=True):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _optimized_ops(model, tmp_path):
    p = tmp_path / "opt.onnx"
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(p)
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(p).graph.node]


def padded_convs():
    """x → Conv a → Clip(0, 6; Constant bounds) → Pad(pads from a constant subgraph) → Conv b (stride 2)."""
    nodes = [oh.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             _const("lo", np.float32(0)), _const("hi", np.float32(6)),
             oh.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip"),
             _const("half", np.array([0, 0, 1, 1], np.int64)), _const("rest", np.array([0, 0, 2, 2], np.int64)),
             oh.make_node("Concat", ["half", "rest"], ["pads"], name="cat", axis=0),
             oh.make_node("Pad", ["c", "pads"], ["p"], name="pad"),
             oh.make_node("Conv", ["p", "wb"], ["y"], name="conv_b", strides=[2, 2], pads=[0, 0, 0, 0])]
    return _model(nodes, {"wa": _w(4, 3), "wb": _w(4, 4)})


def test_pad_fusion_is_exact_and_folds_a_computed_pad():
    m = padded_convs()
    f = fuse_pad_into_conv(m)
    ops = [n.op_type for n in f.graph.node]
    assert "Pad" not in ops and "Concat" not in ops                  # the pads' constant subgraph went too
    conv_b = next(n for n in f.graph.node if n.name == "conv_b")
    assert oh.get_attribute_value(next(a for a in conv_b.attribute if a.name == "pads")) == [1, 1, 2, 2]
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(_run(m, x, optimize=False), _run(f, x, optimize=False))
    assert m.graph.node[7].op_type == "Pad"                           # the input model is untouched


@pytest.mark.parametrize("change", ["reflect", "value", "channel", "negative", "two_users", "graph_output"])
def test_pad_fusion_leaves_pads_it_cannot_fold(change):
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    attrs, inputs, extra, outs = {}, ["x", "pads"], [], []
    if change == "reflect":
        attrs["mode"] = "reflect"
    if change == "value":
        inputs.append("cv")
    if change == "channel":
        pads = np.array([0, 1, 1, 1, 0, 0, 1, 1], np.int64)
    if change == "negative":
        pads = np.array([0, 0, -1, 1, 0, 0, 1, 1], np.int64)
    inits = {"pads": pads, "cv": np.array(0.5, np.float32), "w": _w(4, 4 if change == "channel" else 3)}
    nodes = [oh.make_node("Pad", inputs, ["p"], name="pad", **attrs),
             oh.make_node("Conv", ["p", "w"], ["y"], name="conv")]
    if change == "two_users":
        nodes.append(oh.make_node("Relu", ["p"], ["r"], name="relu"))
        outs = [oh.make_tensor_value_info("r", TP.FLOAT, ["N", "c", "h", "w"])]
    if change == "graph_output":
        outs = [oh.make_tensor_value_info("p", TP.FLOAT, ["N", "c", "h", "w"])]
    m = _model(nodes, inits, extra_outputs=outs)
    assert [n.op_type for n in fuse_pad_into_conv(m).graph.node] == [n.op_type for n in m.graph.node]


def test_ort_cpu_rewrite_keeps_the_chain_in_integers(tmp_path):
    m = padded_convs()
    t = get_target("ort-cpu")
    x = RNG.random((4, 3, 8, 8)).astype(np.float32)
    plans = plan_nodes(t, m, {"conv_a": W8, "conv_b": W8}, data=[{"x": x}])
    fused = t.rewrite(m, plans).model
    ops = _optimized_ops(fused, tmp_path)
    assert ops.count("QLinearConv") == 2 and "Pad" not in ops and "Clip" not in ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1   # in and out of the chain
    # the same plans without the fold: Pad (and before the Constant-bounds fix, Clip) run in float between
    w8 = {n: W8A8Plan(weight=p.weight, input=p.input, output=p.output) for n, p in plans.items()}
    unfused = apply_passes(m, [W8A8Pass(w8)])
    assert "Pad" in _optimized_ops(unfused, tmp_path)
    # folding a zero Pad commutes with the quantizer: the same numbers, without and with ORT's fusions
    np.testing.assert_allclose(_run(fused, x, optimize=False), _run(unfused, x, optimize=False), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_run(fused, x), _run(unfused, x), rtol=0, atol=1e-5)


def residual():
    """x → Conv a → Relu → [Conv b → Add(·, skip) → Relu] → [Conv c → Add(·, skip) → Relu] → Conv d → y: the
    second block's skip is the first block's output, which only Conv c's input quantizer quantizes."""
    nodes = [oh.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["a"], ["ra"], name="relu_a"),
             oh.make_node("Conv", ["ra", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             oh.make_node("Add", ["b", "ra"], ["s"], name="add1"),
             oh.make_node("Relu", ["s"], ["rs"], name="relu_s"),
             oh.make_node("Conv", ["rs", "wc"], ["c"], name="conv_c", pads=[1, 1, 1, 1]),
             oh.make_node("Add", ["c", "rs"], ["s2"], name="add2"),
             oh.make_node("Relu", ["s2"], ["rs2"], name="relu_s2"),
             oh.make_node("Conv", ["rs2", "wd"], ["y"], name="conv_d", pads=[1, 1, 1, 1])]
    return _model(nodes, {"wa": _w(4, 3), "wb": _w(4, 4), "wc": _w(4, 4), "wd": _w(4, 4)})


def test_residual_add_runs_as_qlinearadd(tmp_path):
    m = residual()
    t = get_target("ort-cpu")
    x = RNG.random((8, 3, 8, 8)).astype(np.float32)
    plans = plan_nodes(t, m, {n: W8 for n in ("conv_a", "conv_b", "conv_c", "conv_d")}, data=[{"x": x}])
    joined = t.rewrite(m, plans).model
    ops = _optimized_ops(joined, tmp_path)
    assert ops.count("QLinearAdd") == 2 and "Add" not in ops and ops.count("QLinearConv") == 4
    w8 = {n: W8A8Plan(weight=p.weight, input=p.input, output=p.output) for n, p in plans.items()}
    p = W8A8Pass(w8, join_adds=True)
    apply_passes(m, [p])
    assert p.joined == ["add2"]                       # add1's inputs are DQ outputs already
    plain = apply_passes(m, [W8A8Pass(w8)])
    assert _optimized_ops(plain, tmp_path).count("Add") == 2     # relu_s feeds Q and add2: no QLinearAdd at all
    # the join makes add2 read the skip as conv_c reads it (quantized): a small, bounded change
    y_f = _run(m, x)
    err_joined = np.abs(_run(joined, x) - y_f).max()
    err_plain = np.abs(_run(plain, x) - y_f).max()
    assert err_joined < 3 * err_plain + 1e-3 and err_joined < 0.05 * np.abs(y_f).max()
