"""MatMulNBitsPass: ORT's MatMulNBits must compute our codes exactly (level 0) and the emulated int8
activations (level 4), whatever the session configuration says."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from llc_onnx.errors import LLCError
from llc_onnx.passes.matmulnbits import (
    MatMulNBitsPass,
    apply_matmulnbits,
    level4_input_fake_quant,
    pack_codes,
    unpack_codes,
)
from llc_onnx.passes.qdq import apply_qdq
from llc_onnx.quant import WeightQuantSpec, quantize_weight


def _model(nodes, inputs, outputs, inits):
    g = oh.make_graph(nodes, "g", inputs, outputs, inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


def vi(name, shape):
    return oh.make_tensor_value_info(name, TP.FLOAT, shape)


def matmul_model(rng, k, n, xshape=("M",)):
    w = rng.standard_normal((k, n)).astype(np.float32)
    node = oh.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return _model([node], [vi("x", [*xshape, k])], [vi("y", [*xshape, n])], [nh.from_array(w, "w")]), w


def gemm_model(rng, k, n, trans_b, alpha=1.0, beta=1.0, c_shape=None):
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [nh.from_array(w, "w")]
    ins = ["x", "w"]
    if c_shape is not None:
        inits.append(nh.from_array(rng.standard_normal(c_shape).astype(np.float32), "c"))
        ins.append("c")
    node = oh.make_node("Gemm", ins, ["y"], name="gm", transB=trans_b, alpha=alpha, beta=beta)
    return _model([node], [vi("x", ["M", k])], [vi("y", ["M", n])], inits), w


def session(model, level_entry=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if level_entry is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level_entry))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model, x, level_entry=None):
    return session(model, level_entry).run(None, {"x": x})[0]


def rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def plan(w, bits, block, reduce_axis):
    return quantize_weight(w, WeightQuantSpec(bits, block), out_axis=1 - reduce_axis, reduce_axis=reduce_axis)


def test_pack_roundtrip_and_layout():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        q = rng.integers(-(1 << bits - 1), 1 << bits - 1, size=(5, 70))
        b = pack_codes(q, bits, 32)
        assert b.shape == (5, 3, 32 * bits // 8) and b.dtype == np.uint8
        assert np.array_equal(unpack_codes(b, bits, 70), q)
    # 4 bits: element 0 in the low nibble, element 1 in the high nibble, stored unsigned (q + 8)
    b = pack_codes(np.array([[-8, 7] + [0] * 14]), 4, 16)
    assert b[0, 0, 0] == (-8 + 8) | ((7 + 8) << 4) == 0xF0
    assert b[0, 0, 1] == 0x88                                       # q = 0 -> u = 8 in both nibbles


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_matmul_levels_match_reference(bits, block):
    rng = np.random.default_rng(bits * 1000 + block)
    k, n = 200, 24                                                   # K not a multiple of any block
    model, w = matmul_model(rng, k, n)
    p = plan(w, bits, block, 0)
    x = rng.standard_normal((5, k)).astype(np.float32)
    exact = x.astype(np.float64) @ p.dequant.astype(np.float64)
    before = model.SerializeToString()
    m0 = apply_matmulnbits(model, {"mm": p}, accuracy_level=0)
    m4 = apply_matmulnbits(model, {"mm": p}, accuracy_level=4)
    assert model.SerializeToString() == before                       # input not modified
    onnx.checker.check_model(m4)
    assert [(nd.op_type, nd.domain, nd.name) for nd in m4.graph.node] == [("MatMulNBits", "com.microsoft", "mm")]
    assert "w" not in {t.name for t in m4.graph.initializer}
    attrs = {a.name: oh.get_attribute_value(a) for a in m4.graph.node[0].attribute}
    assert attrs == {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 4}
    assert rel(run(m0, x), exact) < 2e-6
    y4 = run(m4, x)
    xq = level4_input_fake_quant(torch.from_numpy(x).double(), block).numpy()
    emulated = xq @ p.dequant.astype(np.float64)
    moved = rel(y4, exact)
    if bits == 2 and block == 16:                                    # ORT: no int8 kernel, computes level 0
        assert moved < 2e-6
    else:
        assert rel(y4, emulated) < 2e-6
        assert 1e-4 < moved < 3e-2                                   # how far int8 activations move the output


def test_numerics_do_not_depend_on_session_config():
    rng = np.random.default_rng(3)
    model, w = matmul_model(rng, 128, 32)
    x = rng.standard_normal((4, 128)).astype(np.float32)
    for level in (0, 4):
        m = apply_matmulnbits(model, {"mm": plan(w, 4, 32, 0)}, accuracy_level=level)
        outs = [run(m, x, entry) for entry in (None, 0, 4)]
        assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_same_bytes_as_qdq_graph():
    rng = np.random.default_rng(4)
    model, w = matmul_model(rng, 96, 40, xshape=("B", "T"))         # 3-D activations
    p = plan(w, 4, 32, 0)
    x = rng.standard_normal((2, 3, 96)).astype(np.float32)
    y_mnb = run(apply_matmulnbits(model, {"mm": p}, accuracy_level=0), x)
    y_qdq = run(apply_qdq(model, {"mm": p}), x, 0)
    assert y_mnb.shape == (2, 3, 40)
    assert rel(y_mnb, y_qdq.astype(np.float64)) < 2e-6


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("beta,c_shape", [(1.0, (24,)), (0.5, (1, 24)), (1.0, None)])
def test_gemm_layouts_and_bias(trans_b, beta, c_shape):
    rng = np.random.default_rng(10 + trans_b)
    model, w = gemm_model(rng, 80, 24, trans_b, beta=beta, c_shape=c_shape)
    p = plan(w, 4, 16, 1 if trans_b else 0)
    x = rng.standard_normal((3, 80)).astype(np.float32)
    m = apply_matmulnbits(model, {"gm": p}, accuracy_level=0)
    assert [nd.op_type for nd in m.graph.node] == ["MatMulNBits"]
    wd = p.dequant.T if trans_b else p.dequant
    want = x.astype(np.float64) @ wd.astype(np.float64)
    if c_shape is not None:
        c = nh.to_array(next(t for t in model.graph.initializer if t.name == "c")).reshape(-1)
        want = want + beta * c
    assert rel(run(m, x), want) < 2e-6
    if c_shape is None or beta == 1.0:
        assert {t.name for t in m.graph.initializer} == {"w_mnb4", "w_mnb_scale"} | ({"c"} if c_shape else set())


def test_gemm_bias_as_add():
    rng = np.random.default_rng(12)
    model, w = gemm_model(rng, 64, 24, 1, beta=2.0, c_shape=(24,))
    p = plan(w, 4, 32, 1)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    a = apply_matmulnbits(model, {"gm": p}, accuracy_level=0, bias_input=False)
    b = apply_matmulnbits(model, {"gm": p}, accuracy_level=0)
    assert [nd.op_type for nd in a.graph.node] == ["MatMulNBits", "Add"] and len(a.graph.node[0].input) == 3
    assert [o.name for o in a.graph.output] == ["y"]
    assert rel(run(a, x), run(b, x).astype(np.float64)) < 1e-6


def test_gemm_left_alone_when_not_expressible():
    rng = np.random.default_rng(5)
    for kwargs, why in [({"alpha": 0.5, "c_shape": (24,)}, "alpha"), ({"c_shape": (3, 24)}, "shape")]:
        model, w = gemm_model(rng, 64, 24, 1, **kwargs)
        import onnx_ir as ir
        p = MatMulNBitsPass({"gm": plan(w, 4, 32, 1)})
        res = p(ir.serde.deserialize_model(model))
        assert not res.modified and res.written == () and p.result is res
        assert list(res.skipped) == ["gm"] and why in res.skipped["gm"]


def test_bad_plans_raise():
    rng = np.random.default_rng(6)
    model, w = matmul_model(rng, 64, 8)
    with pytest.raises(LLCError, match="power of two"):
        apply_matmulnbits(model, {"mm": plan(w, 4, 24, 0)})
    with pytest.raises(LLCError, match="power of two"):
        apply_matmulnbits(model, {"mm": quantize_weight(w, WeightQuantSpec(8, None), 1, 0)})
    with pytest.raises(LLCError, match="bits=16"):
        apply_matmulnbits(model, {"mm": plan(w, 16, 32, 0)})
    with pytest.raises(LLCError, match="0..4"):
        apply_matmulnbits(model, {"mm": plan(w, 4, 32, 0)}, accuracy_level=7)
    with pytest.raises(LLCError, match="not in the main graph"):
        apply_matmulnbits(model, {"nope": plan(w, 4, 32, 0)})
