import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.compressible import CompressibleNode, find_compressible, inspect_model

F = TensorProto.FLOAT


def _w(name, shape, dtype=np.float32, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).normal(size=shape).astype(dtype), name)


def zoo_model():
    """Gemm(transB=1), Gemm(transB=0), MatMul, grouped Conv, depthwise Conv, a shared initializer, a
    MatMul between two activations and several weights that must be skipped."""
    nodes = [
        helper.make_node("Conv", ["img", "w_grp", "b_grp"], ["c1"], group=2, pads=[1, 1, 1, 1], name="conv_grouped"),
        helper.make_node("Conv", ["c1", "w_dw"], ["c2"], group=8, pads=[1, 1, 1, 1], name="conv_dw"),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"]),
        helper.make_node("Gemm", ["f", "w_gemm", "b_gemm"], ["g"], transB=1, name="gemm_tb"),
        helper.make_node("Gemm", ["g", "w_gemm0"], ["g0"], name="gemm_plain"),
        helper.make_node("MatMul", ["g0", "w_shared"], ["h1"], name="mm_a"),
        helper.make_node("MatMul", ["h1", "w_shared"], ["h2"]),  # unnamed -> MatMul_7
        helper.make_node("Unsqueeze", ["h2", "ax1"], ["q"]),
        helper.make_node("Unsqueeze", ["h2", "ax2"], ["k"]),
        helper.make_node("MatMul", ["q", "k"], ["s"], name="mm_act"),
        helper.make_node("Flatten", ["s"], ["s2"]),
        helper.make_node("Add", ["h2", "s2"], ["logits"]),
    ]
    inits = [_w("w_grp", (8, 2, 3, 3)), _w("b_grp", (8,)), _w("w_dw", (8, 1, 3, 3)), _w("w_gemm", (6, 8)),
             _w("b_gemm", (6,)), _w("w_gemm0", (6, 6)), _w("w_shared", (6, 6)),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([2], np.int64), "ax2")]
    g = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info("img", F, ["N", 4, 5, 5])],
                          [helper.make_tensor_value_info("logits", F, ["N", 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_zoo_model_runs_and_nodes_found():
    m = zoo_model()
    onnx.checker.check_model(m)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"img": np.ones((2, 4, 5, 5), np.float32)})[0].shape == (2, 6)
    nodes, skipped = find_compressible(m)
    by = {n.name: n for n in nodes}
    assert list(by) == ["conv_grouped", "conv_dw", "gemm_tb", "gemm_plain", "mm_a", "MatMul_7"]
    assert by["conv_grouped"] == CompressibleNode("conv_grouped", "Conv", "w_grp", "img", (8, 2, 3, 3), 0, 1,
                                                  "b_grp", 2, ())
    assert by["conv_dw"] == CompressibleNode("conv_dw", "Conv", "w_dw", "c1", (8, 1, 3, 3), 0, 1, None, 8, ())
    assert by["gemm_tb"] == CompressibleNode("gemm_tb", "Gemm", "w_gemm", "f", (6, 8), 0, 1, "b_gemm", 1, ())
    assert (by["gemm_plain"].out_axis, by["gemm_plain"].reduce_axis, by["gemm_plain"].bias) == (1, 0, None)
    assert by["mm_a"] == CompressibleNode("mm_a", "MatMul", "w_shared", "g0", (6, 6), 1, 0, None, 1, ("MatMul_7",))
    assert by["MatMul_7"].shared_with == ("mm_a",) and by["MatMul_7"].input == "h1"
    assert skipped == [("mm_act", "MatMul between two activations")]


def _single(node, inits, inputs=(("x", F, ["N", 4]),), constant=None):
    nodes = ([constant] if constant is not None else []) + [node]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                          [helper.make_tensor_value_info(node.output[0], F, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_skip_reasons():
    cases = [
        (_single(helper.make_node("MatMul", ["w", "x"], ["y"], name="n"), [_w("w", (3, 5))]),
         "weight 'w' is input 0 (W·X); only X·W with the weight as input 1 is supported"),
        (_single(helper.make_node("MatMul", ["x", "w"], ["y"], name="n"), [_w("w", (2, 4, 3))]),
         "weight rank 3 (batched MatMul)"),
        (_single(helper.make_node("MatMul", ["x", "w"], ["y"], name="n"), [_w("w", (4, 3), np.int8)]),
         "weight 'w' is not float (INT8)"),
        (_single(helper.make_node("MatMul", ["x", "w"], ["y"], name="n"), [],
                 constant=helper.make_node("Constant", [], ["w"], value=_w("cw", (4, 3)))),
         "weight 'w' comes from a Constant node, not an initializer; fold it into an initializer"),
        (_single(helper.make_node("Gemm", ["x", "w"], ["y"], name="n"), [],
                 inputs=(("x", F, ["N", 4]), ("w", F, [4, 3]))),
         "weight 'w' is a graph input/activation"),
        (_single(helper.make_node("Conv", ["x", "w"], ["y"], name="n"), [],
                 inputs=(("x", F, ["N", 4, 5]), ("w", F, [2, 4, 1]))),
         "weight 'w' is a graph input/activation"),
        (_single(helper.make_node("Gemm", ["x", "w"], ["y"], name="n"), [_w("w", (4, 3))],
                 inputs=(("x", F, ["N", 4]), ("w", F, [4, 3]))),
         "weight 'w' is a graph input (overridable initializer); "
         "run prepare_model or re-export without keep_initializers_as_inputs"),
        (_single(helper.make_node("Gemm", ["w", "x"], ["y"], name="n"), [_w("w", (3, 4))]),
         "weight 'w' is input A (W·X); only A·B with the weight as B is supported"),
    ]
    for model, reason in cases:
        nodes, skipped = find_compressible(model)
        assert nodes == [] and skipped == [("n", reason)]


def test_inspect_model_totals_and_io():
    info = inspect_model(zoo_model())
    assert (info["opset"], info["ir_version"]) == (21, 10)
    assert info["inputs"] == [{"name": "img", "dtype": "float", "shape": ["N", 4, 5, 5]}]
    assert info["outputs"] == [{"name": "logits", "dtype": "float", "shape": ["N", 6]}]
    comp = {c["name"]: c for c in info["compressible"]}
    assert comp["conv_dw"]["depthwise"] and not comp["conv_grouped"]["depthwise"]
    assert comp["conv_grouped"]["params"] == 144 and comp["conv_grouped"]["bytes"] == 576
    assert info["skipped"] == [{"name": "mm_act", "op_type": "MatMul", "reason": "MatMul between two activations"}]
    t = info["totals"]
    params = 144 + 72 + 48 + 36 + 36  # w_shared counted once
    assert t["compressible_params"] == params and t["compressible_bytes"] == 4 * params
    assert t["initializer_bytes"] == 4 * (params + 8 + 6) + 16 and t["compressible_nodes"] == 6
