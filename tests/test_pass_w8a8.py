"""W8A8Pass: ORT must fuse what the pass writes into integer kernels, and the fused kernels must compute
exactly what the Q/DQ graph means (the same model with graph optimizations off)."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from _models import ort_session
from llc_onnx.calib.activation_ranges import qparams
from llc_onnx.errors import LLCError
from llc_onnx.passes.w8a8 import W8A8Plan, apply_w8a8, quantized_tensors
from llc_onnx.quant import WeightQuantSpec, quantize_weight

Q_OPS = {"QuantizeLinear", "DequantizeLinear"}


def vi(name, shape):
    return oh.make_tensor_value_info(name, TP.FLOAT, shape)


def mk(nodes, inputs, outputs, inits):
    g = oh.make_graph(nodes, "g", inputs, outputs, inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


def sess(model, optimized=True, path=None):
    return ort_session(model, optimized, path)


def fused_ops(model, tmp_path):
    p = tmp_path / "opt.onnx"
    sess(model, path=p)
    return [n.op_type for n in onnx.load(p).graph.node]


def wplan(w, out_axis, reduce_axis, bits=7):
    return quantize_weight(w, WeightQuantSpec(bits, None), out_axis=out_axis, reduce_axis=reduce_axis)


def act(x, dtype):
    return qparams((float(x.min()), float(x.max())), dtype)


def conv_relu(rng, cin=16, cout=32, group=1, clip=False):
    w = (rng.standard_normal((cout, cin // group, 3, 3)) * 0.2).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    nodes = [oh.make_node("Conv", ["x", "w", "b"], ["c"], name="cv", pads=[1, 1, 1, 1], group=group)]
    inits = [nh.from_array(w, "w"), nh.from_array(b, "b")]
    if clip:
        nodes.append(oh.make_node("Clip", ["c", "lo", "hi"], ["y"], name="act"))
        inits += [nh.from_array(np.array(0.0, np.float32), "lo"), nh.from_array(np.array(6.0, np.float32), "hi")]
    else:
        nodes.append(oh.make_node("Relu", ["c"], ["y"], name="act"))
    return mk(nodes, [vi("x", ["B", cin, 12, 12])], [vi("y", ["B", cout, 12, 12])], inits), w


def float_outputs(model, x, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(vi(n, None))
    return dict(zip([o.name for o in m.graph.output], sess(m, optimized=False).run(None, {"x": x})))


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("variant", ["relu", "clip", "depthwise"])
def test_conv_becomes_qlinearconv_and_is_exact(tmp_path, dtype, variant):
    rng = np.random.default_rng(1)
    model, w = conv_relu(rng, cin=16, cout=16 if variant == "depthwise" else 32,
                         group=16 if variant == "depthwise" else 1, clip=variant == "clip")
    x = np.abs(rng.standard_normal((2, 16, 12, 12))).astype(np.float32)
    absorbed = dtype == "uint8"                                      # int8 Q cannot absorb the activation
    out_t = "y" if absorbed else "c"
    assert quantized_tensors(model, "cv", dtype) == ("x", out_t)
    f = float_outputs(model, x, ["c"])
    y = f["y"]
    plan = W8A8Plan(weight=wplan(w, 0, 1), input=act(x, dtype), output=act(f[out_t], dtype))
    before = model.SerializeToString()
    qm = apply_w8a8(model, {"cv": plan})
    assert model.SerializeToString() == before
    onnx.checker.check_model(qm, full_check=True)
    assert [o.name for o in qm.graph.output] == ["y"]
    ops = fused_ops(qm, tmp_path)
    assert "QLinearConv" in ops and "Conv" not in ops and "FusedConv" not in ops
    assert ("Relu" in ops or "Clip" in ops) != absorbed
    got = sess(qm).run(None, {"x": x})[0]
    want = sess(qm, optimized=False).run(None, {"x": x})[0]
    step = plan.output.scale
    assert np.abs(got - want).max() <= step * 1.001                  # at most one output step (rounding order)
    assert np.mean(got != want) < 0.01
    assert np.abs(got - y).max() < 0.05 * np.abs(y).max()             # and near the float model


def test_conv_without_output_plan_stays_float(tmp_path):
    rng = np.random.default_rng(2)
    model, w = conv_relu(rng)
    x = np.abs(rng.standard_normal((1, 16, 12, 12))).astype(np.float32)
    qm = apply_w8a8(model, {"cv": W8A8Plan(weight=wplan(w, 0, 1), input=act(x, "uint8"))})
    assert "QLinearConv" not in fused_ops(qm, tmp_path)             # why the targets ask for output plans


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("trans_b,bias", [(1, True), (0, True), (1, False)])
def test_gemm_becomes_qgemm_and_is_exact(tmp_path, dtype, trans_b, bias):
    rng = np.random.default_rng(3)
    k, n = 96, 40
    w = (rng.standard_normal((n, k) if trans_b else (k, n)) * 0.1).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    ins = ["x", "w"] + (["c"] if bias else [])
    inits = [nh.from_array(w, "w")] + ([nh.from_array(c, "c")] if bias else [])
    model = mk([oh.make_node("Gemm", ins, ["y"], name="gm", transB=trans_b)], [vi("x", ["M", k])],
               [vi("y", ["M", n])], inits)
    x = rng.standard_normal((8, k)).astype(np.float32)
    p = wplan(w, 0 if trans_b else 1, 1 if trans_b else 0)
    qm = apply_w8a8(model, {"gm": W8A8Plan(weight=p, input=act(x, dtype))})
    assert "QGemm" in fused_ops(qm, tmp_path)
    got = sess(qm).run(None, {"x": x})[0]
    want = sess(qm, optimized=False).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    # the graph means: fake-quant x, dequantized weights, bias rounded to multiples of s_x * s_w
    xs = act(x, dtype)
    xq = (np.clip(np.round(x / np.float32(xs.scale)) + xs.zero_point, xs.qmin, xs.qmax) - xs.zero_point) * \
        np.float32(xs.scale)
    wd = p.dequant.T if trans_b else p.dequant
    ref = xq.astype(np.float64) @ wd + (c if bias else 0)
    assert np.abs(want - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_matmul_becomes_matmulintegertofloat(tmp_path, dtype):
    rng = np.random.default_rng(4)
    k, n = 128, 64
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    model = mk([oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["B", "T", k])],
               [vi("y", ["B", "T", n])], [nh.from_array(w, "w")])
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    qm = apply_w8a8(model, {"mm": W8A8Plan(weight=wplan(w, 1, 0), input=act(x, dtype))})
    assert "MatMulIntegerToFloat" in fused_ops(qm, tmp_path)
    got = sess(qm).run(None, {"x": x})[0]
    want = sess(qm, optimized=False).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()      # 7-bit codes: no int16 saturation


def test_chain_shares_one_pair_and_graph_output_keeps_name(tmp_path):
    rng = np.random.default_rng(5)
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)
    nodes = [oh.make_node("Conv", ["x", "w1"], ["c1"], name="cv1", pads=[1, 1, 1, 1]),
             oh.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             oh.make_node("Conv", ["r1", "w2"], ["y"], name="cv2", pads=[1, 1, 1, 1])]
    model = mk(nodes, [vi("x", ["B", 8, 10, 10])], [vi("y", ["B", 16, 10, 10])],
               [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")])
    x = np.abs(rng.standard_normal((2, 8, 10, 10))).astype(np.float32)
    f = float_outputs(model, x, ["r1"])
    r1 = act(f["r1"], "uint8")
    plans = {"cv1": W8A8Plan(weight=wplan(w1, 0, 1), input=act(x, "uint8"), output=r1),
             "cv2": W8A8Plan(weight=wplan(w2, 0, 1), input=r1, output=act(f["y"], "uint8"))}
    qm = apply_w8a8(model, plans)
    assert sum(n.op_type == "QuantizeLinear" for n in qm.graph.node) == 3   # x, r1 (shared), y
    assert [o.name for o in qm.graph.output] == ["y"]
    assert next(n for n in qm.graph.node if "y" in n.output).op_type == "DequantizeLinear"
    ops = fused_ops(qm, tmp_path)
    assert ops.count("QLinearConv") == 2 and "Relu" not in ops
    got = sess(qm).run(None, {"x": x})[0]
    assert np.abs(got - f["y"]).max() < 0.05 * np.abs(f["y"]).max()


def test_w8a8_faster_than_fp32():
    """The point of the format: measured here, interleaved medians (MatMul 32×1024×1024 and a 64-channel
    3×3 Conv both run in about 0.5–0.6 of FP32's time on this AVX2 CPU)."""
    rng = np.random.default_rng(6)
    k = n = 1024
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    model = mk([oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["B", "T", k])],
               [vi("y", ["B", "T", n])], [nh.from_array(w, "w")])
    x = rng.standard_normal((1, 32, k)).astype(np.float32)
    qm = apply_w8a8(model, {"mm": W8A8Plan(weight=wplan(w, 1, 0), input=act(x, "uint8"))})
    s_f, s_q = sess(model), sess(qm)
    times = {"f": [], "q": []}
    for _ in range(15):
        for key, s in (("f", s_f), ("q", s_q)):
            t0 = time.perf_counter()
            for _ in range(3):
                s.run(None, {"x": x})
            times[key].append(time.perf_counter() - t0)
    assert np.median(times["q"]) < 0.9 * np.median(times["f"])


def test_bad_plans():
    rng = np.random.default_rng(7)
    model, w = conv_relu(rng)
    x = np.ones((1, 16, 12, 12), np.float32)
    with pytest.raises(LLCError, match="per output channel"):
        apply_w8a8(model, {"cv": W8A8Plan(weight=quantize_weight(w, WeightQuantSpec(4, 16), 0, 1),
                                          input=act(x, "uint8"))})
    with pytest.raises(LLCError, match="outside \\[-64, 63\\]"):
        p = wplan(w, 0, 1, bits=8)
        p.bits = 7
        apply_w8a8(model, {"cv": W8A8Plan(weight=p, input=act(x, "uint8"))})
    bad = qparams((0.0, 1.0), "uint8")
    with pytest.raises(LLCError, match="dtype"):
        apply_w8a8(model, {"cv": W8A8Plan(weight=wplan(w, 0, 1), input=type(bad)(0.1, 0, "int16"))})
    with pytest.raises(LLCError, match="MatMul, Gemm and Conv"):
        apply_w8a8(model, {"act": W8A8Plan(weight=wplan(w, 0, 1), input=bad)})
