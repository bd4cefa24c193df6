import hashlib
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from llc_onnx import model_io
from llc_onnx.errors import LLCError
from llc_onnx.model_io import initializer_bytes, load_model, name_nodes, prepare_model, save_model, tensor_nbytes


def _mlp(opset=21, ir=10, names=("", "")):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name=names[0]),
             helper.make_node("Relu", ["h"], ["r"], name=names[1]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_load_plain_and_external_data_without_touching_files(tmp_path):
    m = _mlp()
    plain = tmp_path / "plain.onnx"
    onnx.save_model(m, plain)
    ext = tmp_path / "ext.onnx"
    onnx.save_model(m, ext, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
                    size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size == (4 * 8 + 8 * 3) * 4
    before = {p: _digest(p) for p in (plain, ext, tmp_path / "ext.onnx.data")}
    a, b = load_model(plain), load_model(str(ext))
    for t in b.graph.initializer:  # data loaded into memory, no longer external
        assert t.data_location == TensorProto.DEFAULT
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(ta), numpy_helper.to_array(tb))
    prepare_model(b)
    prepare_model(b, opset=25)
    assert {p: _digest(p) for p in before} == before


def test_missing_external_data_file(tmp_path):
    ext = tmp_path / "ext.onnx"
    onnx.save_model(_mlp(), ext, save_as_external_data=True, location="w.data", size_threshold=0)
    os.remove(tmp_path / "w.data")
    with pytest.raises(LLCError) as e:
        load_model(ext)
    assert str(e.value) == (f"{ext}: external data file 'w.data' for tensor 'w1' not found next to the model; "
                            "copy the .data file into the model's directory")


def test_truncated_non_onnx_empty_missing(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save_model(_mlp(), good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(LLCError) as e:
        load_model(trunc)
    assert str(e.value) == (f"{trunc}: not a valid ONNX model (cannot parse protobuf); "
                            "check the file was fully written/exported")
    text = tmp_path / "notes.onnx"
    text.write_text("hello, this is not a model\n")
    with pytest.raises(LLCError) as e:
        load_model(text)
    assert str(e.value) == (f"{text}: not a valid ONNX model (cannot parse protobuf); "
                            "check the file was fully written/exported")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(LLCError) as e:
        load_model(empty)
    assert str(e.value) == f"{empty}: not a valid ONNX model (empty file); check the file was fully written/exported"
    with pytest.raises(LLCError) as e:
        load_model(tmp_path / "nope.onnx")
    assert str(e.value) == f"{tmp_path / 'nope.onnx'}: file not found; check the path"


def test_checker_failure_is_reported(tmp_path):
    m = _mlp()
    m.graph.node[0].input[1] = "undefined_tensor"
    bad = tmp_path / "bad.onnx"
    onnx.save_model(m, bad)
    with pytest.raises(LLCError) as e:
        load_model(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: not a valid ONNX model (checker: ") and "undefined_tensor" in msg
    assert msg.endswith("; check the file was fully written/exported") and "\n" not in msg


def test_prepare_converts_opset_and_sets_ir_version():
    # ReduceMean: axes is an attribute up to opset 17, an input from opset 18
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)], "g", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    p = prepare_model(m)
    assert model_io.default_opset(p) == 21 and p.ir_version == 10
    assert len(p.graph.node[-1].input) == 2  # axes became an input
    assert model_io.default_opset(m) == 17 and m.ir_version == 8  # argument unchanged
    xv = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(_run(p, xv), xv.mean(1))
    p25 = prepare_model(m, opset=25)
    assert model_io.default_opset(p25) == 25 and p25.ir_version == 11
    np.testing.assert_allclose(_run(p25, xv), xv.mean(1))  # ORT 1.31 runs it
    with pytest.raises(LLCError) as e:
        prepare_model(m, opset=28)
    assert str(e.value) == "opset 28: not supported; ONNX Runtime 1.31 runs opsets 7..26 (use 21, or 25 for INT2)"


def test_prepare_names_nodes_uniquely_and_infers_shapes():
    m = _mlp(names=("", "MatMul_2"))  # node 1 already uses the name node 2 would get
    p = prepare_model(m)
    assert [n.name for n in p.graph.node] == ["MatMul_0", "MatMul_2", "MatMul_2_1"]
    assert [n.name for n in m.graph.node] == ["", "MatMul_2", ""]
    shapes = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in p.graph.value_info}
    assert shapes["h"] == ["N", 8] and shapes["r"] == ["N", 8]
    again = name_nodes(p)
    assert [n.name for n in again.graph.node] == ["MatMul_0", "MatMul_2", "MatMul_2_1"]


def test_prepare_drops_initializers_listed_as_inputs():
    m = _mlp()
    m.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [4, 8]))
    p = prepare_model(m)
    assert [i.name for i in p.graph.input] == ["x"]
    assert [i.name for i in m.graph.input] == ["x", "w1"]


def test_save_model_atomic_roundtrip_and_failure_cleanup(tmp_path):
    m = prepare_model(_mlp())
    out = tmp_path / "out.onnx"
    save_model(m, out)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    again = load_model(out)
    assert again.SerializeToString() == m.SerializeToString()
    # destination is a directory: os.replace fails, nothing is left behind
    target = tmp_path / "dir.onnx"
    target.mkdir()
    with pytest.raises(LLCError) as e:
        save_model(m, target)
    assert str(e.value).startswith(f"{target}: cannot write the model (")
    assert sorted(os.listdir(tmp_path)) == ["dir.onnx", "out.onnx"] and os.listdir(target) == []


def test_save_model_uses_external_data_above_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 100)
    m = _mlp()
    big = numpy_helper.from_array(np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32), "w_unused")
    m.graph.initializer.append(big)  # > 1024 bytes: goes to the .data file
    out = tmp_path / "big.onnx"
    save_model(m, out)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0] == "big.onnx" and re.fullmatch(r"big\.onnx\.[0-9a-f]{16}\.data", names[1])
    assert m.graph.initializer[0].data_location == TensorProto.DEFAULT  # argument untouched
    back = load_model(out)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_run(back, x), _run(m, x))


def test_packed_byte_counts():
    t4 = helper.make_tensor("q4", TensorProto.INT4, [11], list(range(-5, 6)))
    t2 = helper.make_tensor("q2", TensorProto.INT2, [9], [0, 1, -1, -2, 0, 1, 1, 0, -1])
    f = numpy_helper.from_array(np.zeros((3, 5), np.float16), "h")
    assert (tensor_nbytes(t4), tensor_nbytes(t2), tensor_nbytes(f)) == (6, 3, 30)
    g = helper.make_graph([], "g", [], [], [t4, t2, f])
    assert initializer_bytes(helper.make_model(g)) == 39
