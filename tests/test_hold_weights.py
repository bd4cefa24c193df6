"""While the interpreter measures, it holds the large float weights alone (``FlowContext.hold_weights``): the
model proto is a structure copy without their data, and the full proto is dropped. The weights go back into the
model (``restore_weights``) before anything reads them there; the output bytes are those of a run that never
held them."""

import hashlib

import onnx
import pytest

from llc_onnx.flows import context as C
from test_optimize import EX_DATA, EX_MODEL, one_json, run_cli


def _run(tmp_path, name, extra=()):
    out = tmp_path / f"{name}.onnx"
    rc, stdout, _ = run_cli(["optimize", EX_MODEL, "--data", EX_DATA, "-o", str(out), "--json", "--seed", "0",
                             "--bits", "4,8,float", "--budget", "0.3", "--allow-loss-increase", *extra])
    assert rc == 0
    return hashlib.sha256(out.read_bytes()).hexdigest(), one_json(stdout)


@pytest.mark.parametrize("target", ["ort-cpu", "qdq"])
def test_held_weights_change_no_byte(tmp_path, monkeypatch, target):
    plain, res_plain = _run(tmp_path, "plain", ["--target", target])         # example weights < HOLD_BYTES
    seen = []
    orig = C.FlowContext.hold_weights

    def spy(self):
        orig(self)
        held = self._hold.names
        data = {t.name: len(t.raw_data) for t in self.model.graph.initializer}
        seen.append((set(held), {n: data[n] for n in held}))
    monkeypatch.setattr(C, "HOLD_BYTES", 1)
    monkeypatch.setattr(C.FlowContext, "hold_weights", spy)
    held, res_held = _run(tmp_path, "held", ["--target", target])
    assert seen and seen[0][0], "nothing was held"
    names, sizes = seen[0]
    assert set(sizes.values()) == {0}               # the model the flow sees holds no data of those weights
    weights = {n["node"] for n in res_held["nodes"]}
    assert weights                                  # (the run compressed something)
    assert held == plain                            # same output bytes
    assert [n["level"] for n in res_held["nodes"]] == [n["level"] for n in res_plain["nodes"]]
    assert res_held["splits"]["test"]["compressed"]["loss"] == res_plain["splits"]["test"]["compressed"]["loss"]


def test_holdable_only_plain_raw_float_tensors():
    import numpy as np

    big = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    assert C._holdable(big) == (16 * 4 >= C.HOLD_BYTES)
    typed = onnx.helper.make_tensor("t", onnx.TensorProto.FLOAT, [4, 4], np.ones(16).tolist())  # float_data
    doc = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "d")
    doc.doc_string = "kept by a full copy only"
    ints = onnx.numpy_helper.from_array(np.ones((4, 4), np.int64), "i")
    for t in (typed, doc, ints):
        assert not C._holdable(t)


def test_models_dropped_once_written_as_files(tmp_path, monkeypatch):
    """When the final and float models reach ONNX Runtime as files, the contexts let go of their protos before
    the calibration check and the test split; the verdict and the written bytes do not change (here every
    model is made "large" so that it is written as files; two stages, so an intermediate context exists)."""
    from llc_onnx import ort_eval

    extra = ["--method", "lowrank,quant", "--mode", "compact"]
    plain, res_plain = _run(tmp_path, "plain", extra)
    monkeypatch.setattr(ort_eval, "SESSION_FILE_BYTES", 1)
    dropped = []
    orig = C.FlowContext.drop_model

    def spy(self):
        dropped.append(self.model is not None)
        orig(self)
    monkeypatch.setattr(C.FlowContext, "drop_model", spy)
    files, res_files = _run(tmp_path, "files", extra)
    assert dropped and all(dropped)
    assert files == plain
    assert res_files["splits"]["test"] == res_plain["splits"]["test"]
