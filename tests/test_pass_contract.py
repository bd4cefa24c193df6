"""The onnx-ir pass contract of the rewrite passes: preconditions in requires() (one-line PlanError, nothing
touched), side outputs on the result, composition in a PassManager with onnx-ir's RemoveUnusedNodesPass, and
the postconditions of ensures()."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from llc_onnx.calib.activation_ranges import ActivationQParams
from llc_onnx.errors import LLCError
from llc_onnx.passes.common import PlanError, RewritePass, RewriteResult, apply_passes
from llc_onnx.passes.lowrank import LowRankPass, svd_factors
from llc_onnx.passes.matmulnbits import MatMulNBitsPass
from llc_onnx.passes.qdq import QDQPass
from llc_onnx.passes.series import SeriesPass, apply_series
from llc_onnx.passes.w8a8 import W8A8Pass, W8A8Plan
from llc_onnx.quant import WeightQuantSpec, quantize_weight
from llc_onnx.quant.activations import ActivationQuant
from llc_onnx.series import expand_weight


def mlp(k=64, h=32, n=10, seed=0, opset=21):
    """x[B, k] -> MatMul 'mm1' (W1) -> Relu -> Gemm 'gm' (W2, transB=1, C) -> y[B, n]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, h)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((n, h)) / np.sqrt(h)).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    g = oh.make_graph(
        [oh.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), oh.make_node("Relu", ["h"], ["r"], name="relu"),
         oh.make_node("Gemm", ["r", "W2", "C"], ["y"], name="gm", transB=1)],
        "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["B", k])], [oh.make_tensor_value_info("y", TP.FLOAT, ["B", n])],
        [nh.from_array(w1, "W1"), nh.from_array(w2, "W2"), nh.from_array(c, "C")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(m)
    return m, w1, w2


def run(model, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def q(w, bits, block, out_axis, reduce_axis):
    return quantize_weight(w, WeightQuantSpec(bits, block), out_axis, reduce_axis)


# ------------------------------------------------------------------------------------------ preconditions
def _bad_cases():
    m, w1, w2 = mlp()
    old, *_ = mlp(opset=19)
    grouped = onnx.ModelProto()
    grouped.CopyFrom(m)
    sw = expand_weight(w1, bits=4, terms=2, out_axis=1, reduce_axis=0)
    act = ActivationQParams(scale=0.1, zero_point=0, dtype="uint8")
    return [
        # (model, pass, what the one-line message must say)
        (m, lambda: QDQPass({"nope": q(w1, 8, None, 1, 0)}), "node 'nope'.*not in the main graph"),
        (m, lambda: QDQPass({"relu": q(w1, 8, None, 1, 0)}), "node 'relu' \\(op Relu\\): not a compressible op"),
        (m, lambda: QDQPass({"mm1": q(w2, 8, None, 0, 1)}), "node 'mm1': weight plan q has shape"),
        (old, lambda: QDQPass({"mm1": q(w1, 8, None, 1, 0)}), "default opset is 19.*prepare_model"),
        (m, lambda: LowRankPass({"mm1": (np.ones((64, 3)), np.ones((4, 32)))}), "node 'mm1'.*do not match"),
        (m, lambda: MatMulNBitsPass({"mm1": q(w1, 4, 24, 1, 0)}), "node 'mm1'.*power of two"),
        (m, lambda: MatMulNBitsPass({"mm1": q(w1, 4, 32, 1, 0)}, accuracy_level=7), "node 'mm1': accuracy_level=7"),
        (m, lambda: W8A8Pass({"mm1": W8A8Plan(q(w1, 4, 32, 1, 0), act)}), "node 'mm1': W8A8 weight plan is 4-bit"),
        (m, lambda: SeriesPass({"gm": sw}), "node 'gm' \\(op Gemm\\): series plan expands a weight of shape"),
    ]


@pytest.mark.parametrize("i", range(9))
def test_requires_raises_one_line_plan_error_and_touches_nothing(i):
    model, make_pass, message = _bad_cases()[i]
    ir_model = ir.serde.deserialize_model(model)
    before = ir.serde.serialize_model(ir_model).SerializeToString()
    p = make_pass()
    with pytest.raises(PlanError, match=message) as err:
        p(ir_model)
    # an LLCError (bad input: the CLI prints it, exit 2) and onnx-ir's PreconditionError, unwrapped
    assert isinstance(err.value, LLCError) and isinstance(err.value, ir.passes.PreconditionError)
    assert "\n" not in str(err.value) and err.value.exit_code == 2
    assert ir.serde.serialize_model(ir_model).SerializeToString() == before  # requires() changed nothing
    assert p.result is None
    # through apply_passes (onnx-ir's PassManager wraps a pass's errors in PassError): the same error comes out
    with pytest.raises(PlanError, match=message):
        apply_passes(model, [make_pass()])


def test_a_failing_pass_in_a_pass_manager_leaves_the_input_alone():
    m, w1, w2 = mlp()
    before = m.SerializeToString()
    with pytest.raises(PlanError, match="node 'gm'"):
        apply_passes(m, [QDQPass({"mm1": q(w1, 8, None, 1, 0)}), MatMulNBitsPass({"gm": q(w2, 4, 24, 0, 1)})])
    assert m.SerializeToString() == before


def test_matmulnbits_unsupported_error_is_a_precondition():
    m, w1, w2 = mlp()
    gm_alpha = onnx.ModelProto()
    gm_alpha.CopyFrom(m)
    gm_alpha.graph.node[2].attribute.append(oh.make_attribute("alpha", 0.5))
    plan = q(w2, 4, 32, 0, 1)
    res = MatMulNBitsPass({"gm": plan})(ir.serde.deserialize_model(gm_alpha))
    assert res.skipped == {"gm": "Gemm with alpha != 1 (MatMulNBits has no output scale)"} and not res.modified
    with pytest.raises(PlanError, match=r"node 'gm': cannot be written as MatMulNBits \(Gemm with alpha != 1"):
        apply_passes(gm_alpha, [MatMulNBitsPass({"gm": plan}, unsupported="error")])


# ------------------------------------------------------------------------------------------ side outputs
def test_results_say_what_was_written_and_stored():
    m, w1, w2 = mlp()
    p_q = QDQPass({"mm1": q(w1, 2, 32, 1, 0)}, {"mm1": ActivationQuant(scale=0.05, bits=8)})
    out = apply_passes(m, [p_q])
    assert isinstance(p_q.result, RewriteResult) and p_q.result.modified
    assert p_q.result.written == ("mm1",) and p_q.result.activations == ("mm1",)
    assert p_q.result.int2_as_int4 == ("mm1",)  # INT2 weight + int8 activation on a MatMul: stored as INT4
    assert {t.name: t.data_type for t in out.graph.initializer}["W1_q2_as_int4"] == TP.INT4
    p_m = MatMulNBitsPass({"gm": q(w2, 4, 32, 0, 1)})
    apply_passes(m, [p_m])
    assert p_m.result.written == ("gm",) and p_m.result.skipped == {} and p_m.result.notes() == []


def test_series_result_lists_the_transposed_weights():
    """2-bit terms with N % 4 != 0 are written [N, T·K'] + Transpose (ORT 1.31's INT2 fusion bug); the result
    names them and the ORT output is still Σ_t X·(s_t·Q_t)."""
    m, w1, w2 = mlp(h=10)  # W1 [64, 10]: N = 10
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    for bits, n_transposed in ((2, 1), (4, 0)):
        sw = expand_weight(w1, bits=bits, terms=2, out_axis=1, reduce_axis=0)
        p = SeriesPass({"mm1": sw})
        out = apply_passes(m, [p])
        assert p.result.written == ("mm1",)
        assert p.result.transposed == (("mm1",) if n_transposed else ())
        assert len(p.result.notes()) == n_transposed
        assert ("Transpose" in [n.op_type for n in out.graph.node]) == bool(n_transposed)
        w_eff = sum(sw.term(t).dequant().astype(np.float64) for t in range(2))
        h = np.maximum(x.astype(np.float64) @ w_eff, 0)
        want = h @ w2.T.astype(np.float64) + np.asarray(nh.to_array(m.graph.initializer[2]), np.float64)
        np.testing.assert_allclose(run(out, x), want, rtol=0, atol=1e-4)
        assert np.array_equal(run(out, x), run(apply_series(m, {"mm1": sw}), x))


# ------------------------------------------------------------------------------------------ composition
def test_pass_manager_composes_lowrank_then_qdq_and_removes_the_replaced_weights():
    m, w1, w2 = mlp()
    left, right = svd_factors(w1, 8)
    plans = {"mm1_lr_a": q(left, 8, None, 1, 0), "mm1_lr_b": q(right, 8, None, 1, 0)}
    lr, qd = LowRankPass({"mm1": (left, right)}), QDQPass(plans)
    out = apply_passes(m, [lr, qd])
    inits = {t.name for t in out.graph.initializer}
    assert "W1" not in inits and not {"W1_lr_a", "W1_lr_b"} & inits  # float weights gone (RemoveUnusedNodesPass)
    assert {"W1_lr_a_q8", "W1_lr_b_q8", "W2", "C"} <= inits
    assert lr.result.written == ("mm1",) and qd.result.written == ("mm1_lr_a", "mm1_lr_b")
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    w_eff = plans["mm1_lr_a"].dequant.astype(np.float64) @ plans["mm1_lr_b"].dequant.astype(np.float64)
    want = np.maximum(x.astype(np.float64) @ w_eff, 0) @ w2.T.astype(np.float64) + nh.to_array(m.graph.initializer[2])
    np.testing.assert_allclose(run(out, x), want, rtol=0, atol=1e-4)


def test_a_pass_alone_leaves_the_replaced_weight_to_the_cleanup():
    m, w1, _ = mlp()
    ir_model = ir.serde.deserialize_model(m)
    QDQPass({"mm1": q(w1, 4, 32, 1, 0)})(ir_model)
    assert "W1" in ir_model.graph.initializers and not ir_model.graph.initializers["W1"].uses()
    assert "W1" not in {t.name for t in apply_passes(m, [QDQPass({"mm1": q(w1, 4, 32, 1, 0)})]).graph.initializer}
    kept = apply_passes(m, [QDQPass({"mm1": q(w1, 4, 32, 1, 0)})], remove_unused=False)
    assert "W1" in {t.name for t in kept.graph.initializer}


# ------------------------------------------------------------------------------------------ postconditions
class _ClaimsWithoutWriting(RewritePass):
    """A broken pass: says it wrote 'mm1' but leaves its float weight in place."""

    def check(self, model):
        return None

    def rewrite(self, model, checked):
        return RewriteResult(model, modified=False, written=("mm1",))


class _BreaksOrder(RewritePass):
    """A broken pass: appends a node that the first node reads."""

    def check(self, model):
        return None

    def rewrite(self, model, checked):
        first = next(iter(model.graph))
        extra = ir.node("Neg", [model.graph.inputs[0]], name="late")
        model.graph.append(extra)
        first.replace_input_with(0, extra.outputs[0])
        return RewriteResult(model, modified=True)


def test_ensures_catches_broken_rewrites():
    m, *_ = mlp()
    with pytest.raises(ir.passes.PostconditionError, match="node 'mm1' was written but still reads float weight 'W1'"):
        _ClaimsWithoutWriting()(ir.serde.deserialize_model(m))
    with pytest.raises(ir.passes.PostconditionError, match="node 'mm1' reads .* before it is computed"):
        _BreaksOrder()(ir.serde.deserialize_model(m))
    # a postcondition is a bug, not bad input: apply_passes does not turn it into an LLCError
    with pytest.raises(ir.passes.PassError):
        apply_passes(m, [_ClaimsWithoutWriting()])
