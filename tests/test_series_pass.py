"""SeriesPass: both ONNX forms compute Σ_t s_t·(X·Q_t) in ONNX Runtime and in the interpreter."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph
from llc_onnx.model_io import tensor_nbytes
from llc_onnx.ort_eval import EXACT, make_session
from llc_onnx.passes.series import DOMAIN, apply_series
from llc_onnx.series import expand_weight

FT = TP.FLOAT


def _model(nodes, x_shape, y_shape, inits, opset=21):
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", FT, x_shape)],
                      [oh.make_tensor_value_info("y", FT, y_shape)],
                      [nh.from_array(v, k) for k, v in inits.items()])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(m)
    return m


# Each case: (model, x, weight, out_axis, reduce_axis, reference(x64, w64, bias=True) -> y64)
def matmul_case(k=40, n=8, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, n)).astype(np.float32)
    m = _model([oh.make_node("MatMul", ["x", "W"], ["y"], name="node")], ["B", 3, k], ["B", 3, n], {"W": w})
    x = rng.normal(size=(2, 3, k)).astype(np.float32)
    return m, x, w, 1, 0, lambda x, w, bias=True: x @ w


def gemm_case(trans_a=0, trans_b=0, k=64, n=6, seed=1, alpha=0.75, beta=1.5):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.normal(size=(n,)).astype(np.float32)
    node = oh.make_node("Gemm", ["x", "W", "C"], ["y"], name="node", transA=trans_a, transB=trans_b,
                        alpha=alpha, beta=beta)
    x = rng.normal(size=(k, 5) if trans_a else (5, k)).astype(np.float32)
    m = _model([node], list(x.shape), [5, n], {"W": w, "C": c})

    def ref(x, w, bias=True):
        a = x.T if trans_a else x
        b = w.T if trans_b else w
        return alpha * (a @ b) + (beta * c.astype(np.float64) if bias else 0.0)

    return m, x, w, 0 if trans_b else 1, 1 if trans_b else 0, ref


def conv_case(c_in=4, c_out=6, group=1, k=3, seed=2, bias=True):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c_out, c_in // group, k, k)).astype(np.float32)
    b = rng.normal(size=(c_out,)).astype(np.float32)
    inits = {"W": w, "b": b} if bias else {"W": w}
    node = oh.make_node("Conv", ["x", "W", "b"] if bias else ["x", "W"], ["y"], name="node", group=group,
                        pads=[1, 0, 1, 2], strides=[1, 2], kernel_shape=[k, k])
    x = rng.normal(size=(2, c_in, 7, 8)).astype(np.float32)
    m = _model([node], ["B", c_in, 7, 8], ["B", c_out, 7, 4], inits)

    has_bias = bias

    def ref(x, w, bias=True):
        xt = F.pad(torch.from_numpy(x), (0, 2, 1, 1))
        y = F.conv2d(xt, torch.from_numpy(w), torch.from_numpy(b.astype(np.float64)) if bias and has_bias else None,
                     stride=(1, 2), groups=group)
        return y.numpy()

    return m, x, w, 0, 1, ref


CASES = {
    "matmul_pad": lambda: matmul_case(k=40),          # K=40: a partial block, padded per term
    "matmul": lambda: matmul_case(k=64, seed=3),
    "matmul_n10": lambda: matmul_case(k=64, n=10, seed=4),   # N % 4 != 0: ORT's INT2 fusion bug is avoided
    "gemm_tb0": lambda: gemm_case(trans_b=0),
    "gemm_tb1": lambda: gemm_case(trans_b=1),
    "gemm_plain_tb0": lambda: gemm_case(trans_b=0, n=8, alpha=1.0, beta=1.0),   # fusable: α = β = 1, C [N]
    "gemm_plain_tb1": lambda: gemm_case(trans_b=1, n=8, alpha=1.0, beta=1.0),
    "gemm_ta1_tb1_pad": lambda: gemm_case(trans_a=1, trans_b=1, k=48),
    "conv": lambda: conv_case(),                      # K = 4·3·3 = 36: padded to 64 at block 32
    "conv_grouped": lambda: conv_case(c_in=8, c_out=4, group=2),
    "conv_depthwise": lambda: conv_case(c_in=5, c_out=10, group=5, bias=False),
}


def _ort(model, x):
    return make_session(model, EXACT).run(None, {"x": x})[0]


def _interp(model, x):
    return TorchGraph(model, dtype=torch.float64).run({"x": x})[0]["y"].numpy()


def _reference(ref, x, sw):
    """Σ_t s_t·(X·Q_t) (+ the node's bias once) in float64, with s_t·Q_t as the graph dequantizes it
    (float32 product)."""
    x64 = x.astype(np.float64)
    return sum(ref(x64, sw.term(t).dequant().astype(np.float64), bias=(t == 0)) for t in range(sw.order))


@pytest.mark.parametrize("form", ["standard", "custom"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ort_interpreter_numpy_agree(case, bits, form):
    model, x, w, out_axis, reduce_axis, ref = CASES[case]()
    before = model.SerializeToString()
    full = expand_weight(w, bits=bits, terms=3, out_axis=out_axis, reduce_axis=reduce_axis)
    for t in (1, 2, 3):
        sw = full.truncate(t)
        m2 = apply_series(model, {"node": sw}, form=form)
        onnx.checker.check_model(m2, full_check=True)
        want = _reference(ref, x, sw)
        y_ort = _ort(m2, x)
        y_int = _interp(m2, x)
        tol = 2e-5 * max(1.0, np.abs(want).max())
        assert y_ort.shape == want.shape
        np.testing.assert_allclose(y_ort, want, rtol=0, atol=tol, err_msg=f"ORT, T={t}")
        np.testing.assert_allclose(y_int, want, rtol=0, atol=tol, err_msg=f"interpreter, T={t}")
        np.testing.assert_allclose(y_ort, y_int, rtol=0, atol=tol)
        if form == "custom":
            assert any(n.domain == DOMAIN for n in m2.graph.node)
            assert {f.name for f in m2.functions} <= {"SeriesMatMul", "SeriesConv"} and m2.functions
            bare = apply_series(model, {"node": sw}, form="custom", function=False)
            assert not bare.functions
            np.testing.assert_allclose(_interp(bare, x), want, rtol=0, atol=tol, err_msg="direct op")
            with pytest.raises(Exception):  # no kernel and no function: ONNX Runtime cannot run it
                make_session(bare)
        else:
            assert all(n.domain in ("", "ai.onnx") for n in m2.graph.node)
    # more terms are closer to the float layer
    exact = ref(x.astype(np.float64), w.astype(np.float64))
    errs = [np.abs(_ort(apply_series(model, {"node": full.truncate(t)}, form=form), x) - exact).max()
            for t in (1, 3)]
    assert errs[1] < errs[0]
    assert model.SerializeToString() == before  # input never modified


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", ["matmul", "matmul_n10", "gemm_plain_tb0", "gemm_plain_tb1"])
def test_standard_form_fuses_into_matmulnbits(tmp_path, case, bits):
    """ORT's optimizer turns blocked DQ + MatMul/Gemm over the tiled input into one MatMulNBits (block 32 for
    2/4 bits; per-channel 8-bit terms have block K = 64, also a power of two). ORT 1.31 fuses Gemm only with
    α = β = 1 and C absent or [N] (the original transB does not matter: the pass writes transB=0)."""
    model, x, w, out_axis, reduce_axis, ref = CASES[case]()
    sw = expand_weight(w, bits=bits, terms=2, out_axis=out_axis, reduce_axis=reduce_axis)
    m2 = apply_series(model, {"node": sw}, form="standard")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    path = os.fspath(tmp_path / "opt.onnx")
    so.optimized_model_filepath = path
    y = ort.InferenceSession(m2.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ops = [n.op_type for n in onnx.load(path).graph.node]
    np.testing.assert_allclose(y, _reference(ref, x, sw), rtol=0, atol=2e-5 * np.abs(y).max())
    if bits == 2 and sw.n % 4:  # ORT 1.31's INT2 fusion is wrong for N % 4 != 0: the pass keeps it unfused
        assert "MatMulNBits" not in ops and "DequantizeLinear" in ops, ops
        return
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops, ops
    nbits = next(n for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: oh.get_attribute_value(a) for a in nbits.attribute}
    assert attrs["bits"] == bits and attrs["K"] == 2 * sw.k


@pytest.mark.parametrize("form", ["standard", "custom"])
@pytest.mark.parametrize("case", ["matmul", "gemm_tb1", "conv_grouped"])
def test_bytes_are_what_the_file_stores(case, form):
    """Σ stored codes + scales of every term = the initializer bytes the rewrite adds (float weight removed)."""
    model, x, w, out_axis, reduce_axis, _ = CASES[case]()
    for bits, terms in ((2, 3), (4, 2), (8, 1)):
        sw = expand_weight(w, bits=bits, terms=terms, out_axis=out_axis, reduce_axis=reduce_axis)
        m2 = apply_series(model, {"node": sw}, form=form)
        names = {t.name for t in model.graph.initializer}
        assert "W" not in {t.name for t in m2.graph.initializer}
        # new initializers other than shape/index constants (int64) and scalars (Gemm's α, β)
        stored = [t for t in m2.graph.initializer if t.name not in names and t.data_type != TP.INT64 and t.dims]
        assert len(stored) == 2
        assert sum(tensor_nbytes(t) for t in stored) == sw.nbytes(), (bits, terms)
        assert sw.nbytes() < w.nbytes


def test_deterministic_and_shared_weight_written_once():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(32, 32)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "W"], ["a"], name="m1"), oh.make_node("Tanh", ["a"], ["t"]),
             oh.make_node("MatMul", ["t", "W"], ["y"], name="m2")]
    model = _model(nodes, ["B", 32], ["B", 32], {"W": w})
    sw = expand_weight(w, bits=4, terms=2, out_axis=1, reduce_axis=0)
    for form in ("standard", "custom"):
        a = apply_series(model, {"m1": sw, "m2": sw}, form=form)
        b = apply_series(model, {"m1": sw, "m2": sw}, form=form)
        assert a.SerializeToString() == b.SerializeToString()
        big = [t for t in a.graph.initializer if t.data_type in (TP.INT4, TP.UINT8)]
        assert len(big) == 1
        assert "W" not in {t.name for t in a.graph.initializer}
        x = rng.normal(size=(3, 32)).astype(np.float32)
        d = sw.dequant().astype(np.float64)
        want = np.tanh(x @ d) @ d
        np.testing.assert_allclose(_ort(a, x), want, atol=1e-4)


def test_bad_plans_are_one_line_errors():
    model, x, w, *_ = CASES["matmul"]()
    sw = expand_weight(w, bits=4, terms=2, out_axis=1, reduce_axis=0)
    with pytest.raises(LLCError, match="form='fast' is unknown"):
        apply_series(model, {"node": sw}, form="fast")
    with pytest.raises(LLCError, match="node 'nope'"):
        apply_series(model, {"nope": sw})
    wrong = expand_weight(w.T.copy(), bits=4, terms=2, out_axis=0, reduce_axis=1)
    with pytest.raises(LLCError, match=r"node 'node' \(op MatMul\): series plan expands a weight of shape"):
        apply_series(model, {"node": wrong})
    with pytest.raises(LLCError, match="series order 3 is outside 1..2"):
        apply_series(model, {"node": sw}, orders={"node": 3})
    old = _model([oh.make_node("MatMul", ["x", "W"], ["y"], name="node")], ["B", 3, 64], ["B", 3, 8], {"W": w},
                 opset=17)
    with pytest.raises(LLCError, match="opset ≥ 21"):
        apply_series(old, {"node": sw})


def test_orders_truncate_without_reexpanding():
    model, x, w, out_axis, reduce_axis, ref = CASES["matmul"]()
    sw = expand_weight(w, bits=4, terms=3, out_axis=out_axis, reduce_axis=reduce_axis)
    a = apply_series(model, {"node": sw}, orders={"node": 2})
    b = apply_series(model, {"node": sw.truncate(2)})
    assert a.SerializeToString() == b.SerializeToString()
