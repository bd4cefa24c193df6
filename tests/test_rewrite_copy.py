"""A rewrite copies the model without the weights it replaces (``passes.common.apply_passes(replaced=...)``): the
written model is byte for byte the one a full copy gives, a weight that anything else reads keeps its data, and a
pass that keeps a weight after all falls back to the full copy."""

from pathlib import Path

import numpy as np
import onnx
import pytest

from _models import ort_logits, shared
from llc_onnx import model_io
from llc_onnx.compressible import find_compressible
from llc_onnx.passes.common import apply_passes, weights_only_read_by
from llc_onnx.passes.qdq import QDQPass
from llc_onnx.quant import WeightQuantSpec, quantize_weight
from llc_onnx.targets import get_target
from llc_onnx.targets.base import NodePlan

EX = Path(__file__).resolve().parents[1] / "examples"


def _plans(model, target, level):
    nodes, _ = find_compressible(model)
    offers = get_target(target).offers(model, nodes, levels=(level, "float"))
    plans = {}
    for n in nodes:
        fmt = next((f for f in offers[n.name].formats if f.kind in ("qdq", "matmulnbits")), None)
        if fmt is None:
            continue
        w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.weight))
        plans[n.name] = NodePlan(fmt, quantize_weight(w, fmt.weight_spec(), n.out_axis, n.reduce_axis))
    return plans


@pytest.mark.parametrize("target,level", [("qdq", 4), ("ort-cpu", 4)])
def test_same_bytes_as_a_full_copy(monkeypatch, target, level):
    model = onnx.load(EX / "fashion_cnn.onnx")
    before = model.SerializeToString()
    plans = _plans(model, target, level)
    assert plans
    lean = get_target(target).rewrite(model, plans).model
    skipped = []
    orig = model_io._copy

    def full_copy(m, skip_data=None):           # what apply_passes did before: copy every weight's data
        skipped.append(set(skip_data or ()))
        return orig(m)
    monkeypatch.setattr(model_io, "_copy", full_copy)
    full = get_target(target).rewrite(model, plans).model
    assert skipped and skipped[0]                  # the lean path would have left these weights' data out
    assert lean.SerializeToString(deterministic=True) == full.SerializeToString(deterministic=True)
    assert model.SerializeToString() == before     # the input is never modified


def test_a_weight_read_elsewhere_keeps_its_data():
    model, w = shared()
    # mm1 and mm2 share W: rewriting mm1 alone must keep W's data for mm2; Wo is read by 'out' alone
    assert weights_only_read_by(model, ["mm1"]) == set()
    assert weights_only_read_by(model, ["mm1", "mm2"]) == {"W"}
    assert weights_only_read_by(model, ["out"]) == {"Wo"}
    qw = quantize_weight(w["W"], WeightQuantSpec(8, None), 1, 0)
    out = apply_passes(model, [QDQPass({"mm1": qw})], replaced=["mm1"])
    onnx.checker.check_model(out)
    kept = next(t for t in out.graph.initializer if t.name == "W")          # mm2 still reads the float W
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(kept), w["W"])
    full = apply_passes(model, [QDQPass({"mm1": qw})])
    assert out.SerializeToString(deterministic=True) == full.SerializeToString(deterministic=True)
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_array_equal(ort_logits(out, x=x), ort_logits(full, x=x))


def test_a_pass_that_keeps_the_weight_gets_the_full_copy():
    model, w = shared()
    # QDQPass given no plan for 'out' keeps Wo; claiming 'out' is replaced must not leave Wo without data
    out = apply_passes(model, [QDQPass({})], replaced=["out"])
    wo = next(t for t in out.graph.initializer if t.name == "Wo")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(wo), w["Wo"])


def test_a_replaced_gemms_bias_keeps_its_data():
    """Only the weight slot (input 1) of a replaced MatMul/Gemm/Conv is left out: the rewrites read a Gemm's or
    Conv's bias (an int32 bias of W8A8, a MatMulNBits bias), and a tensor without data reads as zeros."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(size=(1, 4)).astype(np.float32), "B"),
             numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "K"),
             numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "KB")]
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="gemm"),
         helper.make_node("Conv", ["im", "K", "KB"], ["z"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("im", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 3, 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assert weights_only_read_by(model, ["gemm", "conv"]) == {"W", "K"}
