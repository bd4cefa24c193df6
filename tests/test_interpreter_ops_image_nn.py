"""Interpreter ops added for real exports, each against ONNX Runtime on a one-node model at a stated opset,
with gradients through the differentiable ones: Resize (nearest with every coordinate transformation and
rounding mode ORT supports, linear, cubic), Upsample, DepthToSpace/SpaceToDepth, GroupNormalization (18 and
21), LpNormalization, Hardmax, Celu, TopK, and QuantizeLinear's output_dtype."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from _opcheck import Init, check_against_ort, check_gradient, one_node_model, ort_run
from llc_onnx.interpreter import TorchGraph

R = np.random.default_rng(11)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def floats(*vals):
    return Init(np.array(vals, np.float32))


def ints(*vals):
    return Init(np.array(vals, np.int64))


COORDS = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
          "tf_half_pixel_for_nn"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]


@pytest.mark.parametrize("nearest_mode", NEAREST)
@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("scales", [(1, 1, 2, 3), (1, 1, 0.6, 1.7), (1, 1, 0.5, 0.34)])
def test_resize_nearest(coord, nearest_mode, scales):
    x = f32(2, 3, 5, 6)
    model, feeds = one_node_model("Resize", [x, None, floats(*scales)],
                                  dict(mode="nearest", coordinate_transformation_mode=coord, nearest_mode=nearest_mode),
                                  opset=19)
    check_against_ort(model, feeds)


@pytest.mark.parametrize("coord", COORDS[:5] + ["tf_crop_and_resize"])
@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("sizes", [(2, 3, 9, 4), (2, 3, 3, 11)])
def test_resize_linear_and_cubic_with_gradients(coord, mode, sizes):
    x = f32(2, 3, 5, 6)
    roi = [None] if coord != "tf_crop_and_resize" else [floats(0, 0, 0.1, 0.2, 1, 1, 0.8, 1.1)]
    attrs = dict(mode=mode, coordinate_transformation_mode=coord, extrapolation_value=-3.0)
    model, feeds = one_node_model("Resize", [x, *roi, None, ints(*sizes)], attrs, opset=19)
    if roi == [None]:
        model, feeds = one_node_model("Resize", [x, None, None, ints(*sizes)], attrs, opset=19)
    check_against_ort(model, feeds, atol=2e-5)
    check_gradient(model, feeds, ["in0"])


@pytest.mark.parametrize("exclude_outside,a", [(0, -0.75), (1, -0.5)])
def test_resize_cubic_options_and_scales(exclude_outside, a):
    x = f32(1, 2, 6, 7)
    model, feeds = one_node_model("Resize", [x, None, floats(1, 1, 1.5, 0.7)],
                                  dict(mode="cubic", exclude_outside=exclude_outside, cubic_coeff_a=a), opset=13)
    check_against_ort(model, feeds, atol=2e-5)


@pytest.mark.parametrize("policy", ["not_larger", "not_smaller"])
def test_resize_keep_aspect_ratio_and_axes(policy):
    x = f32(1, 2, 6, 9)
    model, feeds = one_node_model("Resize", [x, None, None, ints(8, 8)],
                                  dict(mode="linear", axes=[2, 3], keep_aspect_ratio_policy=policy), opset=19)
    check_against_ort(model, feeds)


def test_resize_opset_11_and_10():
    x = f32(1, 2, 4, 5)
    model, feeds = one_node_model("Resize", [x, floats(), floats(1, 1, 2, 2)], dict(mode="linear"), opset=11)
    check_against_ort(model, feeds)
    model, feeds = one_node_model("Resize", [x, floats(1, 1, 2, 1.5)], dict(mode="nearest"), opset=10)
    check_against_ort(model, feeds)


@pytest.mark.parametrize("mode,scales", [("nearest", (1, 1, 2, 3)), ("linear", (1, 1, 2, 1.5)),
                                         ("nearest", (1, 1, 1.5, 2.5))])
def test_upsample_opset_9(mode, scales):
    x = f32(1, 2, 4, 6)
    model, feeds = one_node_model("Upsample", [x, floats(*scales)], dict(mode=mode), opset=9)
    check_against_ort(model, feeds)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_and_back(mode):
    x = f32(2, 12, 3, 4)
    model, feeds = one_node_model("DepthToSpace", [x], dict(blocksize=2, mode=mode), opset=13)
    check_against_ort(model, feeds)
    check_gradient(model, feeds, ["in0"])
    y = f32(2, 3, 6, 8)
    model, feeds = one_node_model("SpaceToDepth", [y], dict(blocksize=2), opset=13)
    check_against_ort(model, feeds)


@pytest.mark.parametrize("opset,per", [(18, "group"), (21, "channel")])
def test_group_normalization(opset, per):
    x = f32(2, 6, 4, 5)
    n = 3 if per == "group" else 6
    model, feeds = one_node_model("GroupNormalization", [x, f32(n), f32(n)], dict(num_groups=3, epsilon=1e-4),
                                  opset=opset)
    check_against_ort(model, feeds, atol=1e-4)
    check_gradient(model, feeds, ["in0", "in1", "in2"])


@pytest.mark.parametrize("p,axis", [(2, -1), (1, 1), (2, 0)])
def test_lp_normalization(p, axis):
    x = f32(3, 4, 5)
    model, feeds = one_node_model("LpNormalization", [x], dict(p=p, axis=axis), opset=21)
    check_against_ort(model, feeds)
    check_gradient(model, feeds, ["in0"])


@pytest.mark.parametrize("opset,axis", [(11, 1), (13, 1), (13, -1), (11, 2)])
def test_hardmax(opset, axis):
    x = np.round(f32(2, 3, 4), 0)  # ties: the first maximum wins
    model, feeds = one_node_model("Hardmax", [x], dict(axis=axis), opset=opset)
    check_against_ort(model, feeds)


def test_celu():
    x = f32(3, 7) * 3
    model, feeds = one_node_model("Celu", [x], dict(alpha=0.7), opset=12)
    check_against_ort(model, feeds)
    check_gradient(model, feeds, ["in0"])


@pytest.mark.parametrize("opset,largest,axis", [(11, 1, -1), (11, 0, 1), (10, 1, 0)])
def test_topk(opset, largest, axis):
    x = np.round(f32(4, 6, 5) * 2, 0)  # ties: lower index first
    attrs = dict(axis=axis) if opset < 11 else dict(axis=axis, largest=largest, sorted=1)
    model, feeds = one_node_model("TopK", [x, Init(np.array([3], np.int64))], attrs, n_out=2, opset=opset,
                                  out_types=[TensorProto.FLOAT, TensorProto.INT64])
    check_against_ort(model, feeds)
    model1, _ = one_node_model("TopK", [x], dict(k=2, axis=axis), n_out=2, opset=1,
                               out_types=[TensorProto.FLOAT, TensorProto.INT64])
    g = TorchGraph(model1).run(feeds)[0]
    np.testing.assert_array_equal(g["out0"].numpy(), -np.sort(-x, axis=axis, kind="stable").take(range(2), axis=axis))


def test_topk_gradient_flows_to_the_selected_values():
    x = f32(3, 8)
    model, feeds = one_node_model("TopK", [x, Init(np.array([3], np.int64))], dict(axis=1), n_out=2, opset=11,
                                  out_types=[TensorProto.FLOAT, TensorProto.INT64])
    check_gradient(model, feeds, ["in0"])


def _quantize_then_cast(x, scale, attrs, zp=None):
    """QuantizeLinear followed by Cast to INT32 (ORT's Python API cannot return INT4 tensors)."""
    from onnx import helper, numpy_helper

    inputs = ["x", "s"] + (["zp"] if zp is not None else [])
    nodes = [helper.make_node("QuantizeLinear", inputs, ["q"], **attrs),
             helper.make_node("Cast", ["q"], ["y"], to=TensorProto.INT32)]
    inits = [numpy_helper.from_array(np.float32(scale), "s")] + ([zp] if zp is not None else [])
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("dtype", [TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                                   TensorProto.INT4, TensorProto.UINT4])
def test_quantize_linear_output_dtype(dtype):
    """Without a zero point, output_dtype picks the type (ORT returns int8 where the interpreter used to
    return uint8); values clamp to that type's range."""
    x = f32(4, 6) * 40
    model, feeds = one_node_model("QuantizeLinear", [x, Init(np.float32(0.5))], dict(output_dtype=dtype), opset=21,
                                  out_types=[dtype])
    got = TorchGraph(model).run(feeds)[0]["out0"]
    if dtype in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16):
        ref = ort_run(model, feeds)[0]
        np.testing.assert_array_equal(got.numpy(), ref)
        assert str(got.dtype) == "torch." + str(ref.dtype)
    casted = _quantize_then_cast(x, 0.5, dict(output_dtype=dtype))
    ref = ort_run(casted, {"x": x})[0]
    np.testing.assert_array_equal(TorchGraph(casted).run({"x": x})[0]["y"].numpy(), ref)
    np.testing.assert_array_equal(got.numpy().astype(np.int64), ref)
    assert ref.min() < 0 if dtype in (TensorProto.INT8, TensorProto.INT16, TensorProto.INT4) else ref.min() == 0


def test_quantize_linear_int4_zero_point_clamps_to_int4():
    x = f32(3, 5) * 20
    zp = onnx.helper.make_tensor("zp", TensorProto.INT4, [], [1])
    model = _quantize_then_cast(x, 0.7, {}, zp)
    ref = ort_run(model, {"x": x})[0]
    got = TorchGraph(model).run({"x": x})[0]["y"].numpy()
    np.testing.assert_array_equal(got, ref)
    assert got.min() == -8 and got.max() <= 7
