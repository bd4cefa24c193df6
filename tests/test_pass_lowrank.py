"""LowRankPass: factorised graphs checked numerically in ONNX Runtime."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from llc_onnx.errors import LLCError
from llc_onnx.passes.lowrank import LowRankPass, apply_lowrank, matrix_dims, svd_factors
from llc_onnx.solvers.rank_search import factor_params, useful_ranks
from llc_onnx.passes.qdq import apply_qdq


def vi(name, shape):
    return oh.make_tensor_value_info(name, TP.FLOAT, shape)


def _model(nodes, inputs, outputs, inits):
    g = oh.make_graph(nodes, "g", inputs, outputs, inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


def run(model, feeds):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def n_params(model):
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def replace_init(model, name, arr):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(nh.from_array(arr.astype(np.float32), name))
    return m


# Each case: (model, weight array, feeds, node name, kind, out_axis)
def matmul_case(rng, k=48, n=20):
    w = rng.standard_normal((k, n)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"], name="mm"), oh.make_node("Relu", ["h"], ["y"], name="relu")]
    model = _model(nodes, [vi("x", [2, 3, k])], [vi("y", [2, 3, n])], [nh.from_array(w, "w")])
    return model, w, {"x": rng.standard_normal((2, 3, k)).astype(np.float32)}, "mm", "matmul", 1


def gemm_case(rng, trans_b, trans_a=0, bias=True, k=40, n=24, m=5):
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [nh.from_array(w, "w")]
    ins = ["x", "w"]
    if bias:
        inits.append(nh.from_array(rng.standard_normal((n,)).astype(np.float32), "c"))
        ins.append("c")
    node = oh.make_node("Gemm", ins, ["y"], name="gm", transB=trans_b, transA=trans_a, alpha=0.6, beta=1.7)
    xs = (k, m) if trans_a else (m, k)
    model = _model([node], [vi("x", list(xs))], [vi("y", [m, n])], inits)
    return model, w, {"x": rng.standard_normal(xs).astype(np.float32)}, "gm", "gemm", 0 if trans_b else 1


def conv_case(rng, cin=6, cout=10, k=3, hw=9, **attrs):
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    b = rng.standard_normal((cout,)).astype(np.float32)
    node = oh.make_node("Conv", ["x", "w", "b"], ["y"], name="cv", **attrs)
    model = _model([node], [vi("x", [2, cin, hw, hw])], [vi("y", ["n", "c", "h", "w"])], [nh.from_array(w, "w"), nh.from_array(b, "b")])
    return model, w, {"x": rng.standard_normal((2, cin, hw, hw)).astype(np.float32)}, "cv", "conv", 0


CASES = {
    "matmul": lambda rng: matmul_case(rng),
    "gemm_tb0": lambda rng: gemm_case(rng, 0),
    "gemm_tb1": lambda rng: gemm_case(rng, 1),
    "gemm_tb1_nobias": lambda rng: gemm_case(rng, 1, bias=False),
    "gemm_ta1_tb1": lambda rng: gemm_case(rng, 1, trans_a=1),
    "conv_stride_pad": lambda rng: conv_case(rng, strides=[2, 2], pads=[1, 0, 2, 1]),
    "conv_dilation": lambda rng: conv_case(rng, cin=4, cout=12, dilations=[2, 2], pads=[1, 1, 1, 1]),
    "conv_autopad": lambda rng: conv_case(rng, cin=4, cout=12, strides=[2, 2], auto_pad="SAME_UPPER"),
}


def _apply(model, node, left, right):
    before = model.SerializeToString()
    out = apply_lowrank(model, {node: (left, right)})
    assert model.SerializeToString() == before  # input not mutated
    onnx.checker.check_model(out, full_check=True)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_full_rank_reproduces_original(case):
    rng = np.random.default_rng(zlib.crc32(case.encode()) % 1000)
    model, w, feeds, node, kind, out_axis = CASES[case](rng)
    k = int(np.prod(w.shape[1:])) if kind == "conv" else w.shape[1 - out_axis]
    n = w.shape[0] if kind == "conv" else w.shape[out_axis]
    left, right = svd_factors(w, min(k, n), kind, out_axis)
    out = _apply(model, node, left, right)
    names = [nd.name for nd in out.graph.node]
    assert f"{node}_lr_a" in names and f"{node}_lr_b" in names and node not in names
    inits = {t.name for t in out.graph.initializer}
    assert {"w_lr_a", "w_lr_b"} <= inits and "w" not in inits
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    assert rel_err(run(out, feeds)[0], run(model, feeds)[0]) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_truncated_rank_equals_reconstructed_weight(case):
    rng = np.random.default_rng(1 + zlib.crc32(case.encode()) % 1000)
    model, w, feeds, node, kind, out_axis = CASES[case](rng)
    ranks = useful_ranks(*matrix_dims(w.shape, kind))
    r = ranks[len(ranks) // 2]
    left, right = svd_factors(w, r, kind, out_axis)
    if kind == "conv":
        assert left.shape == (r, *w.shape[1:]) and right.shape == (w.shape[0], r, 1, 1)
        recon = (right.reshape(w.shape[0], r) @ left.reshape(r, -1)).reshape(w.shape)
    else:
        recon = left @ right if out_axis == 1 else (left @ right).T
    assert np.linalg.matrix_rank(recon.reshape(recon.shape[0], -1).astype(np.float64), tol=1e-4) == r
    out = _apply(model, node, left, right)
    want = run(replace_init(model, "w", recon), feeds)[0]
    assert rel_err(run(out, feeds)[0], want) < 1e-5
    assert rel_err(want, run(model, feeds)[0]) > 1e-3  # truncation really changed the weight
    # parameter count: weight replaced by r·(K+N)
    assert n_params(out) == n_params(model) - w.size + factor_params(*matrix_dims(w.shape, kind), r)
    assert factor_params(*matrix_dims(w.shape, kind), r) < w.size


def test_conv_matrix_view_factors_match_rank_search_convention():
    rng = np.random.default_rng(3)
    model, w, feeds, node, kind, _ = conv_case(rng, strides=[1, 2], pads=[1, 1, 1, 1])
    m = w.reshape(w.shape[0], -1).T  # M[K = I*kh*kw, N = O]
    u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    r = 4
    left, right = (u[:, :r] * s[:r]), vt[:r]
    out = _apply(model, node, left, right)
    recon = (left @ right).T.reshape(w.shape)
    assert rel_err(run(out, feeds)[0], run(replace_init(model, "w", recon), feeds)[0]) < 1e-5


def test_useful_ranks_formula():
    def ranks(shape, kind):
        return useful_ranks(*matrix_dims(shape, kind))

    assert ranks((48, 20), "matmul") == [r for r in range(1, 21) if r * 68 < 960]
    assert ranks((20, 48), "gemm") == ranks((48, 20), "matmul")
    assert matrix_dims((10, 6, 3, 3), "conv") == (54, 10)
    assert ranks((10, 6, 3, 3), "conv") == [r for r in range(1, 11) if r * (54 + 10) < 540]
    assert ranks((4, 4), "matmul") == [1]
    assert ranks((2, 2), "matmul") == []


def test_svd_factors_layouts():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((12, 7)).astype(np.float32)
    left, right = svd_factors(w, 7)
    assert left.shape == (12, 7) and right.shape == (7, 7) and left.dtype == np.float32
    assert np.allclose(left @ right, w, atol=1e-5)
    lt, rt = svd_factors(w.T, 7, "gemm", out_axis=0)  # transB layout [N, K]
    assert np.allclose(lt @ rt, w, atol=1e-5)
    # balanced split: both factors carry sqrt(S)
    assert np.allclose(np.linalg.norm(left, axis=0), np.linalg.norm(right, axis=1), rtol=1e-4)
    wc = rng.standard_normal((5, 3, 2, 2)).astype(np.float32)
    lc, rc = svd_factors(wc, 5, "conv")
    assert np.allclose((rc.reshape(5, 5) @ lc.reshape(5, -1)).reshape(wc.shape), wc, atol=1e-5)
    with pytest.raises(LLCError, match="out of range"):
        svd_factors(w, 8)


def test_shared_weight_and_quantization_can_follow():
    """Factor one of two users of a shared weight; the new nodes are then quantized by QDQPass."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["y1"], name="mm1"), oh.make_node("MatMul", ["x", "w"], ["y2"], name="mm2")]
    model = _model(nodes, [vi("x", [3, 64])], [vi("y1", [3, 32]), vi("y2", [3, 32])], [nh.from_array(w, "w")])
    left, right = svd_factors(w, 8)
    out = _apply(model, "mm1", left, right)
    assert {t.name for t in out.graph.initializer} == {"w", "w_lr_a", "w_lr_b"}  # w still used by mm2
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y1, y2 = run(out, {"x": x})
    assert rel_err(y1, x @ left @ right) < 1e-5 and rel_err(y2, x @ w) < 1e-6

    class QW:  # per-output-channel int8 of a [K, N] MatMul weight
        def __init__(self, m):
            self.scale = (np.abs(m).max(axis=0) / 127).astype(np.float32)
            self.q = np.clip(np.round(m / self.scale), -128, 127).astype(np.int32)
            self.axis, self.block_size, self.bits = 1, None, 8
            self.dequant = (self.q * self.scale).astype(np.float32)

    qa, qb = QW(left), QW(right)
    qm = apply_qdq(out, {"mm1_lr_a": qa, "mm1_lr_b": qb})
    onnx.checker.check_model(qm, full_check=True)
    y1q = run(qm, {"x": x})[0]
    assert rel_err(y1q, x @ qa.dequant @ qb.dequant) < 1e-5


def test_ir_pass_and_errors():
    rng = np.random.default_rng(6)
    model, w, feeds, node, kind, _ = matmul_case(rng)
    ir_model = ir.serde.deserialize_model(model)
    res = LowRankPass({"mm": svd_factors(w, 5)})(ir_model)
    assert res.modified and res.model is ir_model
    assert [n.op_type for n in ir_model.graph] == ["MatMul", "MatMul", "Relu"]
    with pytest.raises(LLCError, match="do not match"):
        apply_lowrank(model, {"mm": (np.ones((48, 3)), np.ones((4, 20)))})
    with pytest.raises(LLCError, match="not in the main graph"):
        apply_lowrank(model, {"zz": svd_factors(w, 5)})
    with pytest.raises(LLCError, match="not a compressible op"):
        apply_lowrank(model, {"relu": svd_factors(w, 5)})
    gw = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    g = _model([oh.make_node("Conv", ["x", "w"], ["y"], name="cv", group=4)], [vi("x", [1, 8, 5, 5])],
               [vi("y", [1, 8, 3, 3])], [nh.from_array(gw, "w")])
    with pytest.raises(LLCError, match="grouped Conv .* not supported"):
        apply_lowrank(g, {"cv": svd_factors(gw, 2, "conv")})
