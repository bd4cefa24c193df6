"""CET rounding (llc_onnx.quant.cet): error shaped against the Hessian's short axes, on the quantization grid.

Layout cases use a curvature model built from a random orthonormal basis (the input type the rounding reads,
with known axes); the model case uses the real per-node curvature of a tiny tanh MLP with every eigenpair
kept, where the CET model equals the explicit ½δᵀH_iiδ; the format case runs the QDQ rewrite in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.errors import LLCError
from llc_onnx.passes.qdq import apply_qdq
from llc_onnx.quant import WeightQuantSpec, qrange, quantize_weight
from llc_onnx.quant.cet import RHO_FLOOR, cet_round, element_scale
from llc_onnx.solvers.cet import NodeCurvature, cet_predict, node_curvature
from test_hessian import reference, setup

LAYOUTS = [  # (weight shape, out_axis, reduce_axis): MatMul, Gemm transB=1, Conv (reduce = input channels)
    ((40, 24), 1, 0),
    ((24, 40), 0, 1),
    ((6, 20, 3, 3), 0, 1),
]
LEVELS = [(8, None), (4, 16), (2, 16)]  # per channel; blocked with a partial last block (K = 40 or 20)


def synthetic(shape, lam=(40.0, 25.0, 12.0, 6.0, -4.0), rho=0.05, seed=0) -> NodeCurvature:
    n = int(np.prod(shape))
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, len(lam))))
    lam = np.asarray(lam, dtype=np.float64)
    return NodeCurvature("node", tuple(shape), lam, q.T.astype(np.float32), np.zeros(lam.size),
                         float(lam.sum() + rho * (n - lam.size)), 0.0, 30, 8)


def weight(shape, seed=1):
    return (np.random.default_rng(seed).normal(size=shape) * 0.1).astype(np.float32)


@pytest.mark.parametrize("shape,out_axis,reduce_axis", LAYOUTS)
@pytest.mark.parametrize("bits,block", LEVELS)
def test_cet_rounding_stays_on_the_grid_and_removes_the_short_axes(shape, out_axis, reduce_axis, bits, block):
    w = weight(shape)
    curv = synthetic(shape)
    spec = WeightQuantSpec(bits, block, "mse")
    near = quantize_weight(w, spec, out_axis, reduce_axis)
    r = cet_round(w, spec, out_axis, reduce_axis, curv)
    qw = r.weight
    # the nearest-rounding grid: same scales, layout and bytes; per-element scale reproduces its dequant
    s = element_scale(near, shape)
    wq = lambda qw: qw.q.reshape(shape)  # noqa: E731  (blocked Conv codes are stored as an [O, R] matrix)
    assert np.array_equal(near.dequant, wq(near).astype(np.float32) * s)
    assert np.array_equal(qw.scale, near.scale) and (qw.axis, qw.block_size, qw.bits, qw.nbytes) == \
        (near.axis, near.block_size, near.bits, near.nbytes)
    # every code is one of the weight's two grid neighbours, inside the integer range
    qmin, qmax = qrange(bits)
    x = w.astype(np.float64) / s
    assert qw.q.dtype == np.int32 and qw.q.min() >= qmin and qw.q.max() <= qmax and qw.q.shape == near.q.shape
    assert np.all((wq(qw) == np.clip(np.floor(x), qmin, qmax)) | (wq(qw) == np.clip(np.ceil(x), qmin, qmax))
                  | (wq(qw) == wq(near)))
    assert np.array_equal(qw.dequant, wq(qw).astype(np.float32) * s) and qw.dequant.dtype == np.float32
    assert r.changed == int((qw.q != near.q).sum()) and 0 < r.changed <= 0.1 * r.movable  # a few codes
    # the short-axis projection is (nearly) removed, the negative axis is pushed along, the model value falls
    assert r.projection_after <= 0.25 * r.projection_before
    assert r.negative_after >= r.negative_before
    assert r.objective_after < r.objective_before
    # deterministic
    again = cet_round(w, spec, out_axis, reduce_axis, curv)
    assert again.weight.q.tobytes() == qw.q.tobytes()

    # with positive curvature only, the objective is the CET model of solvers.cet (ρ above its floor here) and
    # no single further flip lowers it (a 1-flip local optimum), checked for all weights at once
    curv = synthetic(shape, lam=(40.0, 25.0, 12.0, 6.0))
    r = cet_round(w, spec, out_axis, reduce_axis, curv)
    qw = r.weight
    assert curv.remainder > RHO_FLOOR * curv.eigenvalues.max()
    d_after = qw.dequant.astype(np.float64) - w
    d_before = near.dequant.astype(np.float64) - w
    pred = cet_predict(curv, [d_before, d_after])
    np.testing.assert_allclose(pred.total, [r.objective_before, r.objective_after], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(pred.projection, [r.projection_before, r.projection_after], rtol=1e-9, atol=1e-15)
    alt = np.where(wq(qw) == np.clip(np.floor(x), qmin, qmax), np.clip(np.ceil(x), qmin, qmax),
                   np.clip(np.floor(x), qmin, qmax))
    flips = np.flatnonzero(alt.reshape(-1) != qw.q.reshape(-1))
    steps = (alt - wq(qw)).reshape(-1) * s.reshape(-1)
    d = np.repeat(d_after.reshape(1, -1), flips.size, axis=0)
    d[np.arange(flips.size), flips] += steps[flips]
    assert cet_predict(curv, d.reshape(-1, *shape)).total.min() >= r.objective_after - 1e-12 * abs(r.objective_after)


def test_no_movable_weight_gives_nearest_rounding():
    """Weights already on the grid (or clipped) cannot move: the result is nearest rounding, bit for bit."""
    shape = (16, 8)
    w = (np.random.default_rng(0).integers(-7, 8, size=shape) * 0.01).astype(np.float32)
    w[0, :] = 0.07  # channel absmax = 7 steps
    spec = WeightQuantSpec(4, None, "minmax")
    near = quantize_weight(w, spec, 1, 0)
    r = cet_round(w, spec, 1, 0, synthetic(shape))
    assert r.movable == 0 and r.changed == 0
    assert np.array_equal(r.weight.q, near.q) and np.array_equal(r.weight.dequant, near.dequant)


@pytest.mark.parametrize("bits,block", [(8, None), (4, 2), (2, 2)])
def test_with_every_eigenpair_cet_rounding_lowers_the_exact_quadratic_term(bits, block):
    """Tiny tanh MLP, node fc1 (MatMul W[4, 6], an indefinite block): with k = n and the negative axes believed
    everywhere the CET model is ½δᵀH_iiδ (+ g·δ), so the rounding minimises the true second-order loss
    change; checked against the explicit Hessian."""
    t, ds, g, loss = setup("mlp")
    H = reference(t, ds, ["fc1"])[2]
    curv = node_curvature(g, ds, loss, ["fc1"], k=24, k_negative=0, iters=60)["fc1"]
    assert curv.k == 24 and curv.remainder == 0.0
    w = t.params["W1"].astype(np.float32)
    spec = WeightQuantSpec(bits, block, "minmax")
    near = quantize_weight(w, spec, 1, 0)
    grad = np.random.default_rng(3).normal(size=w.shape) * 1e-3
    for gr in (None, grad):
        r = cet_round(w, spec, 1, 0, curv, grad=gr, negative_radius=None)

        def exact(qw):
            d = (qw.dequant.astype(np.float64) - w).reshape(-1)
            return 0.5 * d @ H @ d + (0.0 if gr is None else float(gr.reshape(-1) @ d))

        assert r.objective_before == pytest.approx(exact(near), rel=1e-5, abs=1e-12)
        assert r.objective_after == pytest.approx(exact(r.weight), rel=1e-5, abs=1e-12)
        assert exact(r.weight) <= exact(near) + 1e-12
        if bits <= 4:
            assert r.changed > 0 and exact(r.weight) < 0.9 * exact(near)


def test_negative_axes_pushed_within_the_trust_radius():
    shape = (40, 24)
    w = weight(shape)
    curv = synthetic(shape, lam=(40.0, 25.0, -30.0))
    spec = WeightQuantSpec(4, 16, "mse")
    s = element_scale(quantize_weight(w, spec, 1, 0), shape).astype(np.float64).reshape(-1)
    v = curv.eigenvectors[2].astype(np.float64)
    radius = np.sqrt((v * v) @ (s * s) / 12)  # RMS projection of a uniform rounding error on v
    capped = cet_round(w, spec, 1, 0, curv)  # negative_radius = 2
    free = cet_round(w, spec, 1, 0, curv, negative_radius=None)
    ignored = cet_round(w, spec, 1, 0, curv, use_negative=False)
    assert capped.negative_before < 2 * radius < capped.negative_after <= 2 * radius + np.abs(v * s).max()
    assert free.negative_after > 3 * capped.negative_after and free.changed > 3 * capped.changed
    assert ignored.negative_after == pytest.approx(ignored.negative_before, rel=0.5)
    for r in (capped, free, ignored):
        assert r.projection_after <= 0.25 * r.projection_before


def test_cet_rounded_weight_runs_in_onnx_runtime_as_the_interpreter_computes_it():
    """The QDQ rewrite of a CET-rounded 4-bit blocked MatMul weight: ONNX Runtime's output equals x @ dequant."""
    shape = (40, 24)
    w = weight(shape)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 40])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 24])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    r = cet_round(w, WeightQuantSpec(4, 16, "mse"), 1, 0, synthetic(shape))
    assert r.changed > 0
    q = apply_qdq(model, {"mm": r.weight})
    x = np.random.default_rng(5).normal(size=(7, 40)).astype(np.float32)
    so = ort.SessionOptions()  # weights at full precision (a fused MatMulNBits may quantize activations)
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    (y,) = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ r.weight.dequant, rtol=1e-5, atol=1e-5)
    assert model.graph.initializer[0].name == "W" and len(model.graph.node) == 1  # input model untouched


def test_bad_input_is_one_line_llc_error():
    w = weight((40, 24))
    with pytest.raises(LLCError, match="curvature for a weight of shape") as exc:
        cet_round(w, WeightQuantSpec(4, 16), 1, 0, synthetic((24, 40)))
    assert "\n" not in str(exc.value)
    with pytest.raises(LLCError, match="grad shape"):
        cet_round(w, WeightQuantSpec(4, 16), 1, 0, synthetic((40, 24)), grad=np.zeros(3))
    with pytest.raises(LLCError, match="bits=1"):
        cet_round(w, WeightQuantSpec(1, 16), 1, 0, synthetic((40, 24)))
