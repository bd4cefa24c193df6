"""Model intake: the ONNX files converters write are accepted as they are.

* weights computed by constant subgraphs (Constant node, Transpose / Cast fp16->fp32 / Reshape / Identity
  of initializers) are folded into initializers, so those nodes are compressible (inspect and optimize
  agree), the folded model computes the same in ONNX Runtime and the input is never modified;
* opsets 11..26 are accepted: 21..26 kept, 11..20 converted up to 21 (an opset-23 RMSNormalization model
  used to fail with "No Previous Version");
* ``-1`` dims are dynamic dims.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from _models import save_npz, torch_threads
from llc_onnx.calib.data import load_dataset, model_inputs, validate_arrays
from llc_onnx.compressible import find_compressible, inspect_model
from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph
from llc_onnx.model_io import default_opset, intake_view, prepare_model
from llc_onnx.passes.qdq import apply_qdq
from llc_onnx.quant import WeightQuantSpec, quantize_weight


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float activations in MatMulNBits
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def converter_style(opset: int = 13, softmax: bool = False) -> onnx.ModelProto:
    """A small CNN as Keras/TF/Paddle/old-PyTorch converters write it: the Conv weight is a flat initializer
    Reshape'd by a Constant shape (Paddle), the dense weight is stored [N, K] and Transpose'd (TF), one
    weight is float16 behind a Cast (mixed precision), one is a Constant node behind an Identity (Keras),
    and the batch dim is -1."""
    rng = np.random.default_rng(0)
    w_conv = (0.3 * rng.standard_normal(8 * 3 * 3 * 3)).astype(np.float32)
    w_t = (0.1 * rng.standard_normal((16, 8 * 4 * 4))).astype(np.float32)
    w_h = (0.3 * rng.standard_normal((16, 12))).astype(np.float16)
    w_c = (0.3 * rng.standard_normal((12, 10))).astype(np.float32)
    nodes = [
        oh.make_node("Constant", [], ["conv_shape"], value=nh.from_array(np.array([8, 3, 3, 3], np.int64))),
        oh.make_node("Reshape", ["w_conv_flat", "conv_shape"], ["w_conv"]),
        oh.make_node("Conv", ["x", "w_conv"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node("Flatten", ["r"], ["f"]),
        oh.make_node("Transpose", ["w_t"], ["w_t_T"], perm=[1, 0]),
        oh.make_node("MatMul", ["f", "w_t_T"], ["h1"]),
        oh.make_node("Cast", ["w_h"], ["w_h32"], to=TP.FLOAT),
        oh.make_node("Gemm", ["h1", "w_h32"], ["h2"]),
        oh.make_node("Constant", [], ["w_c"], value=nh.from_array(w_c, "w_c")),
        oh.make_node("Identity", ["w_c"], ["w_c_id"]),
        oh.make_node("MatMul", ["h2", "w_c_id"], ["logits"]),
    ]
    out = "logits"
    if softmax:
        nodes.append(oh.make_node("Softmax", ["logits"], ["probs"], axis=1))
        out = "probs"
    g = oh.make_graph(nodes, "converter_style", [oh.make_tensor_value_info("x", TP.FLOAT, [-1, 3, 8, 8])],
                      [oh.make_tensor_value_info(out, TP.FLOAT, [-1, 10])],
                      [nh.from_array(w_conv, "w_conv_flat"), nh.from_array(w_t, "w_t"), nh.from_array(w_h, "w_h")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(m, full_check=True)
    return m


NAMES = ["Conv_2", "MatMul_6", "Gemm_8", "MatMul_11"]


def test_constant_weight_chains_are_folded_into_initializers():
    m = converter_style()
    before = m.SerializeToString()
    assert find_compressible(m)[0] == []  # what llc-onnx said before: "no compressible node"
    p = prepare_model(m)
    assert m.SerializeToString() == before  # the argument is untouched
    nodes, skipped = find_compressible(p)
    assert [n.name for n in nodes] == NAMES and skipped == []
    assert [n.weight for n in nodes] == ["w_conv", "w_t_T", "w_h32", "w_c_id"]
    inits = {t.name: t for t in p.graph.initializer}
    assert {t: tuple(inits[t].dims) for t in ("w_conv", "w_t_T", "w_h32", "w_c_id")} == {
        "w_conv": (8, 3, 3, 3), "w_t_T": (128, 16), "w_h32": (16, 12), "w_c_id": (12, 10)}
    assert all(inits[t].data_type == TP.FLOAT for t in ("w_conv", "w_t_T", "w_h32", "w_c_id"))
    # the chains are gone, their sources too; names are those of the original file (inspect's names)
    assert [n.op_type for n in p.graph.node] == ["Conv", "Relu", "Flatten", "MatMul", "Gemm", "MatMul"]
    assert set(inits) == {"w_conv", "w_t_T", "w_h32", "w_c_id"}
    np.testing.assert_array_equal(nh.to_array(inits["w_t_T"]), nh.to_array(m.graph.initializer[1]).T)
    np.testing.assert_array_equal(nh.to_array(inits["w_h32"]), nh.to_array(m.graph.initializer[2]).astype(np.float32))
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_ort(p, {"x": x})[0], _ort(m, {"x": x})[0])
    # inspect (on the file as given) lists the same nodes as optimize (on the prepared model)
    info = inspect_model(m)
    assert [c["name"] for c in info["compressible"]] == NAMES and info["skipped"] == []
    assert info["inputs"][0]["shape"] == [None, 3, 8, 8]
    assert m.SerializeToString() == before


def test_folded_model_quantizes_and_runs_in_ort():
    """The QDQ pass on the folded weights: ORT computes the fake-quant model."""
    p = prepare_model(converter_style())
    nodes, _ = find_compressible(p)
    inits = {t.name: nh.to_array(t) for t in p.graph.initializer}
    plans = {n.name: quantize_weight(inits[n.weight], WeightQuantSpec(4, 32), n.out_axis, n.reduce_axis) for n in nodes}
    q = apply_qdq(p, plans)
    ref = onnx.ModelProto()
    ref.CopyFrom(p)
    for t in ref.graph.initializer:
        node = next(n for n in nodes if n.weight == t.name)
        t.CopyFrom(nh.from_array(plans[node.name].dequant, t.name))
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_ort(q, {"x": x})[0], _ort(ref, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_shared_large_tensor_and_dequantized_weights_are_not_folded():
    """A tied embedding (Gather reads the table, the output MatMul its Transpose) is not copied; a weight
    behind DequantizeLinear (already compressed) is not folded; a small shared shape is."""
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((100, 64)).astype(np.float32)  # 6400 elements, also read by the Gather
    q = rng.integers(-8, 8, size=(64, 8)).astype(np.int8)
    nodes = [
        oh.make_node("Gather", ["emb", "ids"], ["e"]),
        oh.make_node("Transpose", ["emb"], ["emb_T"], perm=[1, 0]),
        oh.make_node("MatMul", ["e", "emb_T"], ["logits"]),
        oh.make_node("DequantizeLinear", ["wq", "ws"], ["w_dq"], axis=1),
        oh.make_node("MatMul", ["e", "w_dq"], ["h"]),
    ]
    g = oh.make_graph(nodes, "tied", [oh.make_tensor_value_info("ids", TP.INT64, ["B", "T"])],
                      [oh.make_tensor_value_info("logits", TP.FLOAT, None), oh.make_tensor_value_info("h", TP.FLOAT, None)],
                      [nh.from_array(emb, "emb"), nh.from_array(q, "wq"), nh.from_array(np.full(8, 0.1, np.float32), "ws")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    p = prepare_model(m)
    assert [n.op_type for n in p.graph.node] == [n.op_type for n in m.graph.node]
    assert [n.op_type for n in intake_view(m).graph.node] == [n.op_type for n in m.graph.node]
    folded = prepare_model(converter_style())
    assert intake_view(folded) is folded  # nothing left to change: no copy made
    _, skipped = find_compressible(p)
    assert [s[0] for s in skipped] == ["MatMul_2", "MatMul_4"]


@pytest.mark.parametrize("opset", [11, 13, 17, 20, 21, 22, 23, 24, 25, 26])
def test_opsets_11_to_26_are_accepted(opset):
    """ReduceMean's axes moved from attribute to input at 18; Softmax's semantics changed at 13: the
    converted (< 21) or kept (≥ 21) model computes what the original does, in ORT and in the interpreter."""
    rng = np.random.default_rng(opset)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    mean = (oh.make_node("ReduceMean", ["h"], ["m"], axes=[1], keepdims=1) if opset < 18 else
            oh.make_node("ReduceMean", ["h", "axes"], ["m"], keepdims=1))
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), mean, oh.make_node("Sub", ["h", "m"], ["d"]),
             oh.make_node("Softmax", ["d"], ["y"], axis=1)]
    inits = [nh.from_array(w, "w")] + ([nh.from_array(np.array([1], np.int64), "axes")] if opset >= 18 else [])
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 6])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 5])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)], ir_version=7 if opset < 21 else 10)
    p = prepare_model(m)
    assert default_opset(p) == max(opset, 21) and p.ir_version == (10 if max(opset, 21) <= 22 else 11)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    want = _ort(m, {"x": x})[0]
    np.testing.assert_allclose(_ort(p, {"x": x})[0], want, rtol=1e-6, atol=1e-7)
    got, _ = TorchGraph(p).run({"x": x})
    np.testing.assert_allclose(got["y"].numpy(), want, rtol=1e-5, atol=1e-6)
    plan = quantize_weight(w, WeightQuantSpec(4, 32), 1, 0)
    q = apply_qdq(p, {"MatMul_0": plan})
    assert default_opset(q) == max(opset, 21)
    assert np.isfinite(_ort(q, {"x": x})[0]).all()


def test_opset_23_rms_normalization_model_is_kept_at_23():
    """Was refused: prepare_model converted everything to 21 and RMSNormalization has no opset-21 version."""
    rng = np.random.default_rng(23)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [oh.make_node("RMSNormalization", ["x", "g"], ["n"], epsilon=1e-5, axis=-1),
             oh.make_node("MatMul", ["n", "w"], ["y"])]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["B", "T", 8])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["B", "T", 8])],
                      [nh.from_array(w, "w"), nh.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "g")])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)], ir_version=11)
    p = prepare_model(m)
    assert default_opset(p) == 23 and [n.name for n in find_compressible(p)[0]] == ["MatMul_1"]
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    got, _ = TorchGraph(p).run({"x": x})
    np.testing.assert_allclose(got["y"].numpy(), _ort(m, {"x": x})[0], rtol=1e-5, atol=1e-5)
    plan = quantize_weight(w, WeightQuantSpec(2, 32), 1, 0)
    q = apply_qdq(p, {"MatMul_1": plan})
    assert default_opset(q) == 25  # INT2 relabels 23 -> 25
    fake = onnx.ModelProto()
    fake.CopyFrom(m)
    fake.graph.initializer[0].CopyFrom(nh.from_array(plan.dequant, "w"))
    np.testing.assert_allclose(_ort(q, {"x": x})[0], _ort(fake, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_opset_newer_than_ort_is_refused_in_one_line():
    m = converter_style(opset=21)
    m.opset_import[0].version = 27
    with pytest.raises(LLCError) as e:
        prepare_model(m)
    assert str(e.value) == ("model: opset 27 is newer than ONNX Runtime 1.31 runs (26); "
                            "re-export the model with an opset in 11..26")


def test_minus_one_dims_are_dynamic(tmp_path):
    m = converter_style()
    specs = model_inputs(m)
    assert specs[0].shape == (None, 3, 8, 8)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    validate_arrays({"x": x, "labels": np.zeros(5, np.int64)}, m, "data")
    with pytest.raises(LLCError, match=r"dim 1 must be 3"):
        validate_arrays({"x": x[:, :2]}, m, "data")
    data = save_npz(tmp_path / "d.npz", np.zeros(5, np.int64), x=x)
    ds = load_dataset(data, m, batch_size=2)
    assert [b.size for b in ds.batches] == [2, 2, 1]
    p = prepare_model(m)
    assert [d.dim_value if d.HasField("dim_value") else None for d in p.graph.input[0].type.tensor_type.shape.dim] \
        == [None, 3, 8, 8]
    assert all(d.dim_value >= 0 for vi in (*p.graph.input, *p.graph.output, *p.graph.value_info)
               for d in vi.type.tensor_type.shape.dim)


def test_optimize_end_to_end_on_a_converter_style_model(tmp_path):
    """``llc-onnx optimize`` on the converter-style model (opset 13, -1 batch, every weight behind a constant
    subgraph): it finds the four nodes, writes a verified model at opset 21, and the input is untouched."""
    import contextlib
    import io

    from llc_onnx.cli import main

    m = converter_style()
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path))
    before = path.read_bytes()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((160, 3, 8, 8)).astype(np.float32)
    labels = _ort(m, {"x": x})[0].argmax(1).astype(np.int64)
    data = save_npz(tmp_path / "d.npz", labels, x=x)
    out, err = io.StringIO(), io.StringIO()
    with torch_threads(1), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["optimize", str(path), "--data", data, "-o", str(tmp_path / "o.onnx"), "--bits", "8,float",
                   "--json", "--batch-size", "40", "--target", "qdq", "--tolerance", "0.01"])
    assert rc == 0, err.getvalue()
    res = json.loads(out.getvalue().strip().splitlines()[-1])
    assert res["verified"] and [n["node"] for n in res["nodes"]] == NAMES
    assert path.read_bytes() == before
    written = onnx.load(str(tmp_path / "o.onnx"))
    assert default_opset(written) == 21
    dq = [n for n in written.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == sum(v for k, v in res["levels"].items() if k.startswith("qdq-int"))


class _OldStyle(torch.nn.Module):
    """Weights stored as the layer does not use them: a flat conv weight reshaped in forward (Paddle-like), a
    [out, in] matrix used transposed (TF-like), a float16 master weight cast to float32 (mixed precision)."""

    def __init__(self):
        super().__init__()
        self.conv_flat = torch.nn.Parameter(torch.randn(8 * 3 * 3 * 3) * 0.2)
        self.fc = torch.nn.Parameter(torch.randn(16, 128) * 0.1)
        self.head = torch.nn.Parameter((torch.randn(16, 10) * 0.3).half())

    def forward(self, x):
        h = torch.relu(torch.nn.functional.conv2d(x, self.conv_flat.reshape(8, 3, 3, 3), padding=1, stride=2))
        return (h.flatten(1) @ self.fc.t()) @ self.head.float()


def test_old_pytorch_export_without_constant_folding():
    """torch.onnx (TorchScript) with do_constant_folding=False and keep_initializers_as_inputs=True, the way older
    exports came: the weights are graph inputs behind Reshape/Transpose/Cast nodes. All three nodes become
    compressible and the prepared model computes the same."""
    import io
    import warnings

    torch.manual_seed(0)
    f = io.BytesIO()
    with warnings.catch_warnings(), torch_threads(1):
        warnings.simplefilter("ignore")
        torch.onnx.export(_OldStyle().eval(), (torch.randn(2, 3, 8, 8),), f, dynamo=False, opset_version=13,
                          do_constant_folding=False, keep_initializers_as_inputs=True, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}})
    m = onnx.load_from_string(f.getvalue())
    assert {"Reshape", "Transpose", "Cast"} <= {n.op_type for n in m.graph.node}
    assert find_compressible(m)[0] == []
    p = prepare_model(m)
    nodes, _ = find_compressible(p)
    assert [n.op_type for n in nodes] == ["Conv", "MatMul", "MatMul"]
    assert {n.op_type for n in p.graph.node} == {"Conv", "Relu", "Flatten", "MatMul"}
    x = np.random.default_rng(6).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_ort(p, {"x": x})[0], _ort(m, {"x": x})[0], rtol=1e-6, atol=1e-6)
    assert [c["name"] for c in inspect_model(m)["compressible"]] == [n.name for n in nodes]


def _save_raw(model, path) -> str:
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return str(path)


def test_out_of_order_graph_with_a_sparse_initializer_is_sorted(tmp_path):
    """Found by the long fuzz run: sorting read ``.name`` of a SparseTensorProto (its name is ``values.name``)."""
    from onnx import TensorProto, helper, numpy_helper

    from llc_onnx.model_io import load_model

    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "S")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 3], np.int64), "S_idx"), [4])
    nodes = [helper.make_node("Add", ["h", "S"], ["y"], name="add"), helper.make_node("Relu", ["x"], ["h"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    loaded = load_model(_save_raw(model, tmp_path / "m.onnx"))
    assert [n.name for n in loaded.graph.node] == ["relu", "add"]


def test_two_local_functions_with_one_id_are_bad_input(tmp_path, capsys):
    """Found by the long fuzz run: some such models pass onnx.checker, then inlining raised (exit 3); whichever
    check catches it, the answer is one error line and exit 2."""
    from onnx import TensorProto, helper

    from llc_onnx.cli import main

    fn = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", 21)])
    bare = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], [])
    for called in (True, False):  # unused duplicates without opset imports at IR 7 pass onnx.checker (the fuzz case)
        node = helper.make_node("f", ["x"], ["y"], domain="local", name="call") if called else \
            helper.make_node("Relu", ["x"], ["y"], name="relu")
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
        opsets = [helper.make_opsetid("", 21 if called else 13)] + ([helper.make_opsetid("local", 1)] if called else [])
        model = helper.make_model(graph, opset_imports=opsets, ir_version=10 if called else 7,
                                  functions=[fn, fn] if called else [bare, bare])
        path = _save_raw(model, tmp_path / f"m{called}.onnx")
        assert main(["inspect", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "local::f" in err[0]
