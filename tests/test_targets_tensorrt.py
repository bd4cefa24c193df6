"""TensorRT target and rule checker: one model per rule that breaks it (and only it), clean models, and the
target's own rewrite of the bundled example passing the checker."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from llc_onnx.compressible import find_compressible
from llc_onnx.errors import LLCError
from llc_onnx.targets import Format, check_tensorrt, get_target
from llc_onnx.targets.plans import plan_nodes
from llc_onnx.targets.tensorrt import RULES

EX = Path(__file__).resolve().parents[1] / "examples"
RNG = np.random.default_rng(0)


def model(nodes, inits, x_shape=("M", 128), y_shape=("M", 32), opset=21, extra_opsets=()):
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, list(x_shape))],
                      [oh.make_tensor_value_info("y", TP.FLOAT, list(y_shape))], inits)
    ops = [oh.make_opsetid("", opset), *[oh.make_opsetid(d, v) for d, v in extra_opsets]]
    return oh.make_model(g, opset_imports=ops, ir_version=10 if opset <= 22 else 11)


def act_qdq(x="x", out="xd", scale=0.05, zp=0, zp_type=np.int8, stem="a"):
    inits = [nh.from_array(np.array(scale, np.float32), f"{stem}_s"), nh.from_array(np.array(zp, zp_type), f"{stem}_z")]
    nodes = [oh.make_node("QuantizeLinear", [x, f"{stem}_s", f"{stem}_z"], [f"{stem}_q"], name=f"{stem}_ql"),
             oh.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_s", f"{stem}_z"], [out], name=f"{stem}_dql")]
    return nodes, inits


def w_int8(shape=(128, 32), axis=1, scale=None, zp=None, stem="w"):
    q = RNG.integers(-127, 128, size=shape).astype(np.int8)
    s = scale if scale is not None else np.full(shape[axis], 0.01, np.float32)
    inits = [nh.from_array(q, f"{stem}_q"), nh.from_array(s, f"{stem}_s")]
    ins = [f"{stem}_q", f"{stem}_s"]
    if zp is not None:
        inits.append(nh.from_array(zp, f"{stem}_z"))
        ins.append(f"{stem}_z")
    return [oh.make_node("DequantizeLinear", ins, [f"{stem}_d"], name=f"{stem}_dq", axis=axis)], inits


def w_int4(shape=(128, 32), block=64, axis=0, stem="w"):
    q = RNG.integers(-8, 8, size=shape).astype(ml_dtypes.int4)
    s_shape = list(shape)
    s_shape[axis] = -(-shape[axis] // block)
    t = onnx.helper.make_tensor(f"{stem}_q", TP.INT4, shape, q.astype(np.int8).reshape(-1).tolist())
    inits = [t, nh.from_array(np.full(s_shape, 0.01, np.float32), f"{stem}_s")]
    return [oh.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_s"], [f"{stem}_d"], name=f"{stem}_dq", axis=axis,
                         block_size=block)], inits


def w8a8_matmul(**wkw):
    a_nodes, a_inits = act_qdq()
    w_nodes, w_inits = w_int8(**wkw)
    return a_nodes + w_nodes + [oh.make_node("MatMul", ["xd", "w_d"], ["y"], name="mm")], a_inits + w_inits


def rules(m):
    return [(v.node, v.rule) for v in check_tensorrt(m)]


def test_clean_models_pass():
    n, i = w8a8_matmul()
    assert rules(model(n, i)) == []
    n4, i4 = w_int4()
    assert rules(model(n4 + [oh.make_node("MatMul", ["x", "w_d"], ["y"], name="mm")], i4)) == []
    # Gemm transB with INT4 blocked along its K axis (1), explicit zero zero-points on the activation pair
    n4, i4 = w_int4(shape=(32, 128), block=128, axis=1)
    assert rules(model(n4 + [oh.make_node("Gemm", ["x", "w_d"], ["y"], name="gm", transB=1)], i4)) == []
    # a plugin node that carries its registry attributes
    p = oh.make_node("LlcGemm", ["x"], ["y"], name="plug", domain="llc.plugins", plugin_namespace="llc",
                     plugin_version="1")
    assert rules(model([p], [], extra_opsets=[("llc.plugins", 1)])) == []


def test_each_rule_is_reported_with_the_node():
    cases = {}
    n, i = w8a8_matmul()
    cases["opset"] = (model(n, i, opset=25), "<model>")
    cases["unsupported-op"] = (model([oh.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"], name="dql")], [],
                                     y_shape=("M", 128)), "dql")
    cases["plugin"] = (model([oh.make_node("MatMulNBits", ["x"], ["y"], name="mnb", domain="com.microsoft")], [],
                             extra_opsets=[("com.microsoft", 1)]), "mnb")
    a, ai = act_qdq(zp=0, zp_type=np.uint8)
    w, wi = w_int8()
    cases["type"] = (model(a + w + [oh.make_node("MatMul", ["xd", "w_d"], ["y"], name="mm")], ai + wi), "a_ql")
    a, ai = act_qdq(zp=3)
    cases["zero-point"] = (model(a + w + [oh.make_node("MatMul", ["xd", "w_d"], ["y"], name="mm")], ai + wi), "a_ql")
    a, ai = act_qdq(scale=-0.1)
    cases["scale"] = (model(a + w + [oh.make_node("MatMul", ["xd", "w_d"], ["y"], name="mm")], ai + wi), "a_ql")
    a, ai = act_qdq()
    ai[0] = nh.from_array(np.full(128, 0.05, np.float32), "a_s")
    ai[1] = nh.from_array(np.zeros(128, np.int8), "a_z")
    a[0].attribute.append(oh.make_attribute("axis", 1))
    a[1].attribute.append(oh.make_attribute("axis", 1))
    cases["activation-per-tensor"] = (model(a + w + [oh.make_node("MatMul", ["xd", "w_d"], ["y"], name="mm")],
                                            ai + wi), "a_ql")
    n, i = w8a8_matmul(shape=(128, 32), axis=0, scale=np.full(128, 0.01, np.float32))
    cases["per-channel-axis"] = (model(n, i), "w_dq")
    n4, i4 = w_int4(block=32)
    cases["int4"] = (model(n4 + [oh.make_node("MatMul", ["x", "w_d"], ["y"], name="mm")], i4), "w_dq")
    n4, i4 = w_int4(shape=(120, 32), block=64)             # 120 is not a multiple of 64
    cases["block"] = (model(n4 + [oh.make_node("MatMul", ["x", "w_d"], ["y"], name="mm")], i4, x_shape=("M", 120)),
                      "w_dq")
    w, wi = w_int8()
    cases["w8a8"] = (model(w + [oh.make_node("MatMul", ["x", "w_d"], ["y"], name="mm")], wi), "mm")
    a, ai = act_qdq()
    cases["q-dq-pair"] = (model(a[:1] + [oh.make_node("Cast", ["a_q"], ["y"], name="cast", to=TP.FLOAT)], ai,
                                y_shape=("M", 128)), "a_ql")
    assert set(cases) == set(RULES)
    for rule, (m, node) in cases.items():
        got = rules(m)
        assert (node, rule) in got, (rule, got)
        assert {r for _, r in got} == {rule}, (rule, got)        # each model breaks exactly its rule


def test_int4_misuse_variants():
    n4, i4 = w_int4()
    conv_like = model(n4 + [oh.make_node("MatMul", ["w_d", "x2"], ["y"], name="left")], i4)
    conv_like.graph.input.append(oh.make_tensor_value_info("x2", TP.FLOAT, [32, 4]))
    assert ("w_dq", "int4") in rules(conv_like)                     # INT4 not as the B input of a GEMM
    n4, i4 = w_int4(axis=1, block=32 if False else 32, shape=(128, 64))
    m = model(n4 + [oh.make_node("MatMul", ["x", "w_d"], ["y"], name="mm")], i4, y_shape=("M", 64))
    assert ("w_dq", "int4") in rules(m)                             # blocked along N, not K (and block 32)


def test_tensorrt_target_offers_and_its_output_passes_the_checker():
    m = onnx.load(EX / "fashion_cnn.onnx")
    t = get_target("tensorrt")
    nodes, _ = find_compressible(m)
    offers = t.offers(m, nodes, levels=(2, 4, 8, 16, "float"), block_size=64)
    assert offers["/conv1/Conv"].names() == ["float", "w8a8-int8-aint8"]
    assert offers["/fc2/Gemm"].names() == ["float", "qdq-int4-b64", "w8a8-int8-aint8"]
    assert any("multiple of the block" in why for _, why in offers["/fc1/Gemm"].refused)   # K = 784
    assert any("plugin" in why for lv, why in offers["/fc2/Gemm"].refused if lv == "int2")
    with_plugins = get_target("tensorrt", plugins=True).offers(m, nodes, levels=(2, 8), block_size=64)
    assert "plugin-int2-b64-llc" in with_plugins["/fc2/Gemm"].names()
    x = np.load(EX / "fashion_data.npz")["input"][:64]
    choices = {"/conv1/Conv": Format("w8a8", 8, None, activations="int8"),
               "/conv2/Conv": Format("w8a8", 8, None, activations="int8"),
               "/fc1/Gemm": Format("w8a8", 8, None, activations="int8"),
               "/fc2/Gemm": Format("qdq", 4, 64)}
    plans = plan_nodes(t, m, choices, data=[{"input": x}], calibration="entropy")
    rw = t.rewrite(m, plans)
    assert check_tensorrt(rw.model) == []
    assert check_tensorrt(m) == []                                  # the float model is fine too
    ref = t.reference_session()
    y = ref.make_session(rw.model).run(None, {"input": x})[0]
    assert np.all(np.isfinite(y))
    with pytest.raises(LLCError, match="plugin writer"):
        get_target("tensorrt", plugins=True).rewrite(
            m, plan_nodes(t, m, {"/fc2/Gemm": Format("plugin", 2, 64, plugin="llc")}))
    u8 = plan_nodes(get_target("ort-cpu"), m, {"/fc1/Gemm": Format("w8a8", 8, None, activations="uint8")},
                    data=[{"input": x}])
    with pytest.raises(LLCError, match="symmetric int8"):
        t.rewrite(m, u8)
