"""A large model's memory at intake and in ONNX Runtime: ``prepare_model`` copies the weights' data once (not
through every serialization of opset conversion and shape inference), and a large proto reaches ORT as files
with external data (``model_io.write_for_session``). Both must change nothing but memory: the same prepared
model, the same session outputs, the input untouched."""

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from llc_onnx import memory, model_io, ort_eval


def _weights_model(opset=17, as_inputs=True):
    """x[N, 64] -> MatMul(W1) -> Relu -> MatMul(Transpose(W2t)) -> Add(b) -> y: heavy float weights, one behind a
    Transpose chain (folded at intake), initializers listed as graph inputs, an old opset (converted)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(64, 96)).astype(np.float32)
    w2t = rng.normal(size=(32, 96)).astype(np.float32)
    b = rng.normal(size=(32,)).astype(np.float32)
    shape = np.array([-1, 32], np.int64)
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2t, "W2t"),
             numpy_helper.from_array(b, "b"), numpy_helper.from_array(shape, "shape")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Transpose", ["W2t"], ["W2"], perm=[1, 0]),
             helper.make_node("MatMul", ["r", "W2"], ["z"]), helper.make_node("Add", ["z", "b"], ["zb"]),
             helper.make_node("Reshape", ["zb", "shape"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])]
    if as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _bytes(m):
    return m.SerializeToString(deterministic=True)


def test_prepare_copies_weight_data_once_and_gives_the_same_model():
    model = _weights_model()
    before = _bytes(model)
    heavy = model_io._heavy_weights(model)
    assert set(heavy) == {"W1", "W2t"}  # float, > 1 KB; the int64 shape and the small bias are copied as usual
    light = model_io.prepare_model(model, opset=21)
    full = model_io._prepare(model, 17, 21, {})  # the plain full copy
    assert _bytes(light) == _bytes(full)
    assert _bytes(model) == before  # the input is not modified
    inits = {t.name: t for t in light.graph.initializer}
    assert "W2" in inits and "W2t" not in inits  # the chain was folded from the real data
    np.testing.assert_array_equal(numpy_helper.to_array(inits["W1"]), numpy_helper.to_array(heavy["W1"]))
    assert light.opset_import[0].version == 21


def test_prepare_falls_back_to_a_full_copy_when_a_weight_changes(monkeypatch):
    """Opset conversion that rewrote a weight (simulated) must not leave a data-less initializer behind."""
    model = _weights_model(opset=21, as_inputs=False)
    real = model_io._restore_weights
    calls = []

    def moved(m, heavy):
        calls.append(bool(heavy))
        if heavy:
            raise model_io._WeightsMoved
        return real(m, heavy)

    monkeypatch.setattr(model_io, "_restore_weights", moved)
    out = model_io.prepare_model(model)
    assert calls == [True, False]
    assert all(t.HasField("raw_data") or t.float_data or t.int64_data for t in out.graph.initializer)


def test_large_protos_reach_onnx_runtime_as_files_with_the_same_outputs(tmp_path, monkeypatch):
    model = model_io.prepare_model(_weights_model())
    before = _bytes(model)
    path = model_io.write_for_session(model, str(tmp_path))
    on_disk = onnx.load(path, load_external_data=False)
    ext = [t for t in on_disk.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert {t.name for t in ext} == {"W1", "W2"}
    assert all(int(next(e.value for e in t.external_data if e.key == "offset")) % 4096 == 0 for t in ext)
    assert os.path.getsize(path) < 2048 and _bytes(model) == before
    x = np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    monkeypatch.setattr(ort_eval, "SESSION_FILE_BYTES", 1024)  # this small model now goes through files
    sess = ort_eval.make_session(model)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ref)


def test_shape_inference_without_the_weights_gives_the_same_shapes():
    """``model_io.infer_shapes`` infers on a copy without the float weights' data: the same value_info, inputs
    and outputs as onnx's own inference on the whole model (a Reshape reading a small int64 constant included),
    and the input untouched."""
    m = model_io.prepare_model(_weights_model(), opset=21)
    before = _bytes(m)
    full = onnx.shape_inference.infer_shapes(m, data_prop=True)
    light = model_io.infer_shapes(m, data_prop=True)
    for part in ("value_info", "input", "output"):
        assert [_bytes_vi(v) for v in getattr(light.graph, part)] == [_bytes_vi(v) for v in getattr(full.graph, part)]
    data = {t.name: bool(t.raw_data or t.float_data or t.int64_data) for t in light.graph.initializer}
    assert data == {"W1": False, "W2": False, "b": True, "shape": True}  # weights > 1 KiB left out
    assert _bytes(m) == before


def _bytes_vi(v):
    return v.SerializeToString(deterministic=True)


# ----------------------------------------------------------------------------------- sizing and hashing a model
def _large_model(n_large=4, mib=2):
    """A model with ``n_large`` float initializers of ``mib`` MiB each (raw_data), small ones of every storage
    kind (float_data, int64 raw, a scalar), a Constant node, a local function and metadata: every part of the
    size ``proto_size`` adds up."""
    rng = np.random.default_rng(1)
    side = int(np.sqrt(mib * (1 << 20) / 4))
    inits = [numpy_helper.from_array(rng.normal(size=(side, side)).astype(np.float32), f"W{i}")
             for i in range(n_large)]
    inits.append(helper.make_tensor("f", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))  # float_data, not raw
    inits.append(numpy_helper.from_array(np.arange(5, dtype=np.int64), "shape"))
    inits.append(numpy_helper.from_array(np.float32(2.0), "s"))
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, np.float32)))]
    x = "x"
    for i in range(n_large):
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", side])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", side])], inits,
                          doc_string="d" * 300)
    fn = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", 21)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("local", 1)],
                          ir_version=10, functions=[fn], producer_name="p" * 200)
    helper.set_model_props(m, {"k": "v" * 50})
    return m


def test_proto_size_is_the_serialized_size_with_and_without_large_tensors():
    for m in (_large_model(), _large_model(n_large=1, mib=130), _large_model(n_large=0), _weights_model()):
        assert model_io.proto_size(m) == len(m.SerializeToString())
    ext = _large_model()
    ext.graph.initializer[0].data_location = TensorProto.EXTERNAL  # an external entry next to raw ones
    ext.graph.initializer[0].external_data.add(key="location", value="w.bin")
    assert model_io.proto_size(ext) == len(ext.SerializeToString())
    assert model_io.proto_size(ext.graph) == ext.graph.ByteSize()  # any other message: ByteSize()


def test_update_digest_sees_every_weight_byte_and_the_structure():
    import hashlib

    def digest(m):
        h = hashlib.sha256()
        model_io.update_digest(h, m)
        return h.hexdigest()

    a, b = _large_model(), _large_model()
    assert digest(a) == digest(b)
    raw = bytearray(b.graph.initializer[2].raw_data)
    raw[-1] ^= 1  # one bit of one large weight
    b.graph.initializer[2].raw_data = bytes(raw)
    assert digest(a) != digest(b)
    c = _large_model()
    c.graph.node[1].name = "other"
    assert digest(a) != digest(c)
    small = _weights_model()  # no large tensor: the digest of the serialized model, as before
    assert digest(small) == hashlib.sha256(small.SerializeToString(deterministic=True)).hexdigest()


def test_sizing_a_large_model_does_not_serialize_it():
    """protobuf's upb backend sizes a message by encoding it: sizing a 0.65 GB model held +1.3 GB. Sized from its
    parts the peak stays far below one copy of the model (kernel high-water mark, where the kernel allows
    resetting it)."""
    import pytest

    m = _large_model(n_large=8, mib=16)  # 128 MiB of weights
    if not memory.reset_high_water():
        pytest.skip("this kernel does not allow resetting VmHWM (/proc/self/clear_refs)")
    before = memory.rss()
    n = model_io.proto_size(m)
    assert memory.high_water() - before < 48 << 20  # ByteSize() here: +256 MiB
    assert n > 128 << 20


def test_a_model_is_written_streamed_with_the_bytes_of_serialize_to_string(tmp_path):
    for i, m in enumerate((_large_model(), _large_model(n_large=0), _weights_model())):
        path = tmp_path / f"m{i}.onnx"
        model_io.save_model(m, path)
        assert path.read_bytes() == m.SerializeToString()
    m = _large_model(n_large=8, mib=16)
    if not memory.reset_high_water():
        return
    before = memory.rss()
    model_io.save_model(m, tmp_path / "big.onnx")
    assert memory.high_water() - before < 48 << 20  # SerializeToString() here: +128 MiB or more
    assert (tmp_path / "big.onnx").read_bytes() == m.SerializeToString()


def test_parked_data_leaves_the_proto_and_comes_back_byte_for_byte():
    """``ParkedData``: the large tensors' bytes wait in files (its copy of the proto holds none of them), and the
    restored model serializes to the bytes the original had; small tensors are not touched."""
    from llc_onnx.model_io import ParkedData

    model = _weights_model(as_inputs=False)                    # W1 24 KiB, W2t 12 KiB, b 128 B
    before = model.SerializeToString()
    parked = ParkedData(model, min_bytes=16 << 10)
    sizes = {t.name: len(t.raw_data) for t in parked.model.graph.initializer}
    assert sizes["W1"] == 0 and sizes["W2t"] == 32 * 96 * 4 and sizes["b"] == 32 * 4
    assert model.SerializeToString() == before                      # the original is not modified
    assert parked.restore().SerializeToString() == before
    assert parked.restore().SerializeToString() == before          # a second restore changes nothing


def test_held_data_is_written_into_session_files_as_if_the_model_had_it(tmp_path):
    """``write_for_session(held=...)``: an initializer without data in the model gets its bytes from ``held``,
    and the files are those of the complete model."""
    from llc_onnx.model_io import _copy, write_for_session

    model = _weights_model(as_inputs=False)
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    shell = _copy(model, skip_data={"W1": None})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = write_for_session(model, str(tmp_path / "a"), "m.onnx")
    part = write_for_session(shell, str(tmp_path / "b"), "m.onnx", held={"W1": lambda: w1.raw_data})
    for suffix in ("", ".data"):
        assert open(full + suffix, "rb").read() == open(part + suffix, "rb").read()
