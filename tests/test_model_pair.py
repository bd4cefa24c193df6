"""The ``.onnx`` / ``.data`` pair of a large model is written so that no reader ever sees a mismatched pair,
checked by killing real writers (scaled down: the external-data threshold is lowered to 1 KB, models of ~1 MB).
The > 2 GB run is ``bench/large_model.py`` (out of CI)."""

from __future__ import annotations

import os
import random
import re
import signal
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llc_onnx import model_io
from llc_onnx.model_io import external_data_name, load_model, save_model

DATA = re.compile(r"m\.onnx\.[0-9a-f]{16}\.data")


def _model(value: float, n: int = 4, size: int = 128) -> onnx.ModelProto:
    """x[1, size] -> MatMul(W0) -> ... -> MatMul(W{n-1}); every weight filled with ``value``."""
    inits = [numpy_helper.from_array(np.full((size, size), value, np.float32), f"W{i}") for i in range(n)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"W{i}"], [f"h{i + 1}"], name=f"mm{i}")
             for i in range(n)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
                          [helper.make_tensor_value_info(f"h{n}", TensorProto.FLOAT, [1, size])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    helper.set_model_props(m, {"weights": str(value)})  # the model file says which data belongs to it
    return m


def _value(path) -> float:
    """The single value every weight of the pair at ``path`` holds (loads it like any reader, data included),
    checked against the value the model file itself names."""
    m = load_model(path)
    values = {float(v) for t in m.graph.initializer for v in np.unique(numpy_helper.to_array(t))}
    assert values == {float(m.metadata_props[0].value)}, f"mismatched pair: data {values}, model {m.metadata_props}"
    return values.pop()


def test_large_model_pair_is_content_named_and_replaced_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "m.onnx"
    a, b = _model(1.0), _model(2.0)
    save_model(a, out)
    first = sorted(os.listdir(tmp_path))
    assert len(first) == 2 and DATA.fullmatch(first[1]) and _value(out) == 1.0
    assert a.graph.initializer[0].HasField("raw_data")  # the argument is untouched
    locs = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
            for e in t.external_data if e.key == "location"}
    assert locs == {first[1]}
    offsets = [int(e.value) for t in onnx.load(str(out), load_external_data=False).graph.initializer
               for e in t.external_data if e.key == "offset"]
    assert all(o % 4096 == 0 for o in offsets)
    save_model(a, out)  # same content: same name, same bytes
    assert sorted(os.listdir(tmp_path)) == first
    save_model(b, out)  # new content: new data file, the previous one removed after the commit
    second = sorted(os.listdir(tmp_path))
    assert len(second) == 2 and second[1] != first[1] and _value(out) == 2.0
    # leftovers of a killed writer (an orphan data file, its temporary directory) go with the next write
    (tmp_path / external_data_name("m.onnx", "0" * 64)).write_bytes(b"orphan")
    (tmp_path / ".m.onnx.abcd1234.tmp").mkdir()
    (tmp_path / "other.onnx.0123456789abcdef.data").write_bytes(b"not ours")
    save_model(a, out)
    assert sorted(os.listdir(tmp_path)) == sorted(first + ["other.onnx.0123456789abcdef.data"])


def test_failed_write_leaves_the_previous_pair(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "m.onnx"
    save_model(_model(1.0), out)
    before = sorted(os.listdir(tmp_path))

    def fail(*args):
        raise KeyboardInterrupt  # e.g. SIGINT turned into an exception by the CLI, between data and commit

    monkeypatch.setattr(model_io, "_fsync_directory", fail)  # after the commit: the new pair stands
    with pytest.raises(KeyboardInterrupt):
        save_model(_model(2.0), out)
    assert _value(out) == 2.0 and not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    monkeypatch.undo()
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    save_model(_model(1.0), out)
    assert sorted(os.listdir(tmp_path)) == before
    real_write = model_io._write_file

    def interrupted(path, data):
        real_write(path, data)
        raise KeyboardInterrupt  # before the data file moves out of the temporary directory

    monkeypatch.setattr(model_io, "_write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_model(_model(3.0), out)
    assert sorted(os.listdir(tmp_path)) == before and _value(out) == 1.0


def _writer(out: str, start: int) -> None:
    """Child process: write the three models in turn to ``out`` until killed."""
    try:
        models = [_model(1.0), _model(2.0), _model(3.0)]
        i = start
        while True:
            save_model(models[i % 3], out)
            i += 1
    finally:
        os._exit(0)


def test_killed_writers_never_leave_a_mismatched_pair(tmp_path, monkeypatch):
    """Writers alternating three models at one path are SIGKILLed at random instants; after every kill the
    path is absent (before the first commit) or a complete model whose data file matches it."""
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "m.onnx"
    rng = random.Random(0)
    seen = set()
    for round_ in range(40):
        pid = os.fork()
        if pid == 0:
            _writer(str(out), round_)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if out.exists():
            seen.add(_value(out))  # loads model + data with the checker: a mismatch would fail here
        data = [n for n in os.listdir(tmp_path) if DATA.fullmatch(n)]
        assert len(data) <= 3  # the current pair's, at most one orphan from the killed write (+ a stale one)
    assert len(seen) >= 2, "writers rarely got to a commit: raise the sleep"
    save_model(_model(1.0), out)  # the next write cleans what the killed ones left
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0] == "m.onnx" and DATA.fullmatch(names[1])
