"""While the interpreter measures, it holds the large float weights alone (``FlowContext.hold_weights``): the
model proto is a structure copy without their data, and the full proto is dropped. Plans are written from the
structure and completed from the interpreter's copy (``complete``), session files get them streamed in
(``held_data``), and they go back into the model (``restore_weights``) where it is read whole; the output bytes
are those of a run that never held them."""

import hashlib
import os

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
        held = self._hold.names if self._hold.held else frozenset()
        data = {t.name: len(t.raw_data) for t in self.model.graph.initializer}
        seen.append((set(held), {n: data[n] for n in held}))
    monkeypatch.setattr(C, "HOLD_BYTES", 1)
    monkeypatch.setattr(C.FlowContext, "hold_weights", spy)
    held, res_held = _run(tmp_path, "held", ["--target", target])
    assert seen and seen[0][0], "nothing was held"
    names, sizes = seen[0]
    assert set(sizes.values()) == {0}               # the model the flow sees holds no data of those weights
    assert any(n["level"] != "float" for n in res_held["nodes"])   # the run compressed something
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


def test_the_full_proto_is_really_let_go(tmp_path, monkeypatch):
    """Holding the weights saves memory only if nothing else points into the full proto (a proto's memory lives
    as long as any part of it is referenced): on a model with 64 MB of weights, the process's RSS drops by most
    of that when the interpreter takes over, in a real `optimize` run."""
    import ctypes
    import gc

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def rss():
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))

    rng = np.random.default_rng(0)
    w = {"W1": rng.normal(size=(2048, 4096)).astype(np.float32) / 45, "W2": rng.normal(size=(4096, 2048)).astype(
        np.float32) / 64, "W3": rng.normal(size=(2048, 4)).astype(np.float32) / 45}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["g"], name="fc2"),
             helper.make_node("MatMul", ["g", "W3"], ["logits"], name="out")]
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2048])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    del model, graph
    x = rng.normal(size=(64, 2048)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=rng.integers(0, 4, 64))
    drops = []
    orig = C.FlowContext.hold_weights

    def spy(self):
        before = rss()
        orig(self)
        drops.append(before - rss())
    monkeypatch.setattr(C.FlowContext, "hold_weights", spy)
    rc, _, err = run_cli(["optimize", str(path), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "o.onnx"),
                          "--bits", "8,float", "--nodes", "out", "--allow-loss-increase", "--no-latency",
                          "--batch-size", "32"])
    assert rc == 0, err
    weight_bytes = sum(v.nbytes for v in w.values())
    assert drops and drops[0] > 0.7 * weight_bytes, (drops, weight_bytes)


@pytest.mark.parametrize("by_parts", [1 << 30, 1000, 1])
def test_the_model_digest_is_the_same_with_held_weights(tmp_path, monkeypatch, by_parts):
    """The cost cache's key reads the model's weights; a context that holds them (from its creation on) hashes
    the bytes the interpreter holds, and the digest equals that of the model with its weights put back — with
    every tensor small (serialized whole), some large (hashed one by one) and all large."""
    import hashlib

    from _models import write_mlp_files
    from llc_onnx import model_io
    from llc_onnx.config import DeviceConfig, OptimizeConfig

    monkeypatch.setattr(C, "HOLD_BYTES", 1)
    monkeypatch.setattr(model_io, "_SIZE_BY_PARTS", by_parts)
    model, data = write_mlp_files(tmp_path, n=160)
    ctx = C.create_context(model, data, OptimizeConfig(device=DeviceConfig(threads=1)))
    assert ctx._hold.held and all(len(t.raw_data) == 0 for t in ctx.model.graph.initializer
                                  if t.name in ctx._hold.names)
    held = hashlib.sha256()
    ctx.update_digest(held)
    ctx.restore_weights()
    assert all(len(t.raw_data) > 0 for t in ctx.model.graph.initializer)
    full = hashlib.sha256()
    model_io.update_digest(full, ctx.model)
    assert held.hexdigest() == full.hexdigest()


def test_the_float_baseline_runs_while_the_interpreter_holds_the_weights(tmp_path, monkeypatch):
    """The float model's sessions at the baseline read it from files: the full proto is already dropped then (a
    large model's baseline would otherwise hold it, the interpreter's copy and the session's)."""
    from _models import write_mlp_files
    from llc_onnx.config import DeviceConfig, OptimizeConfig

    monkeypatch.setattr(C, "HOLD_BYTES", 1)
    seen = []
    orig = C.FlowContext.evaluate

    def spy(self, *args, **kwargs):
        seen.append(self._hold.held)
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(C.FlowContext, "evaluate", spy)
    model, data = write_mlp_files(tmp_path, n=160)
    C.create_context(model, data, OptimizeConfig(device=DeviceConfig(threads=1)))
    assert seen and all(seen)


@pytest.mark.parametrize("target", ["ort-cpu", "qdq"])
def test_large_model_memory_paths_change_no_byte(tmp_path, monkeypatch, target):
    """A large model's run (here forced with ``SPILL_BYTES = 0``): the interpreter's held weights are file maps
    (``_file_backed``: a Spill kept between tasks, copy-on-write), the gradient pass recomputes its activations
    in pieces and accumulates in files (``_gradient_pass``), the joint stage reads its weights from files and drops
    them as it passes (``_PassedPages``), validation's plans are written from the structure and completed from those
    files (``FlowContext.complete``), glibc gives memory back at once — and the output bytes, levels and losses are
    those of the ordinary run."""
    import os

    plain, res_plain = _run(tmp_path, "plain", ["--target", target])
    from llc_onnx.flows import quantize as Q

    monkeypatch.setattr(C, "HOLD_BYTES", 1)
    monkeypatch.setattr(C, "SPILL_BYTES", 0)
    monkeypatch.setattr(Q, "SPILL_BYTES", 0)
    monkeypatch.setattr(Q, "SPILL_MIN_BYTES", 0)   # codes and the joint stage's weights in files too
    seen = {}
    orig_hook = Q._PassedPages.hook

    def hook(self, arr, value):
        seen.setdefault("joint_mapped", []).append(isinstance(arr, Q.np.memmap))
        return orig_hook(self, arr, value)
    monkeypatch.setattr(Q._PassedPages, "hook", hook)
    orig_fb, orig_gp = C._file_backed, C.collect_gradients

    def file_backed(graph, names):
        spill = orig_fb(graph, names)
        seen["weights"] = spill
        files = {os.path.join(spill.dir, f) for f in os.listdir(spill.dir)}
        seen["mapped"] = len(files) == len(names) and all(
            any(f"{path}" in line for line in open("/proc/self/maps")) for path in files)
        return spill

    def gradients(*args, **kwargs):
        seen.setdefault("passes", []).append((kwargs.get("segments"), kwargs.get("spill") is not None))
        return orig_gp(*args, **kwargs)

    orig_complete = C.FlowContext.complete

    def complete(self, model):  # validation's plans: written from the structure, completed from the files
        missing = sum(not t.HasField("raw_data") for t in model.graph.initializer if t.name in self._hold.names)
        seen.setdefault("completed", []).append((self._hold.held, missing))
        out = orig_complete(self, model)
        assert all(t.HasField("raw_data") for t in out.graph.initializer if t.name in self._hold.names)
        return out

    monkeypatch.setattr(C, "_file_backed", file_backed)
    monkeypatch.setattr(C, "collect_gradients", gradients)
    monkeypatch.setattr(C.FlowContext, "complete", complete)
    big, res_big = _run(tmp_path, "big", ["--target", target])
    assert seen["completed"] and all(held for held, _ in seen["completed"])  # no plan saw a restored proto
    assert any(missing for _, missing in seen["completed"])
    assert seen["weights"] is not None and seen["weights"].between_tasks is False and seen["mapped"]
    assert seen["passes"] and all(seg > 1 and spilled for seg, spilled in seen["passes"])
    assert seen["joint_mapped"] and all(seen["joint_mapped"])
    assert big == plain
    assert [n["level"] for n in res_big["nodes"]] == [n["level"] for n in res_plain["nodes"]]
    assert res_big["splits"]["test"]["compressed"]["loss"] == res_plain["splits"]["test"]["compressed"]["loss"]


def _resident(path: str) -> int:
    """Resident bytes of this process's mappings of file ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:        # a mapping's first line
                inside = len(head) >= 6 and head[5] == path
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")
def test_weights_no_kept_snapshot_reads_leave_memory(monkeypatch):
    """The candidate stage measures in graph order: once the snapshots before a node are dropped
    (``forget_snapshots_before``), the file-backed weights only earlier nodes read leave the process's memory, the
    later ones stay, and a measurement gives the same losses as before."""
    from llc_onnx.config import OptimizeConfig

    monkeypatch.setattr(C, "HOLD_BYTES", 1)
    monkeypatch.setattr(C, "SPILL_BYTES", 0)
    ctx = C.create_context(EX_MODEL, EX_DATA, OptimizeConfig())
    ctx.gradients()
    base = ctx.base().sums.copy()
    h = ctx._hold
    files = {n: h.spill.arrays[h.spill_index[n]].filename for n in h.names}
    assert _resident(files["fc1.weight"]) > 0 and _resident(files["fc2.weight"]) > 0   # the base run read them
    ctx.forget_snapshots_before("/fc2/Gemm")
    assert all(_resident(files[n]) == 0 for n in ("conv1.weight", "conv2.weight", "fc1.weight"))
    assert _resident(files["fc2.weight"]) > 0
    again = ctx.measure({"/fc1/Gemm": lambda w: w})    # runs from an earlier point: reads fc1 from the file
    assert (again.sums == base).all()
