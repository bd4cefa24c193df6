import json
import math
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from llc_onnx.cli import main

F = TensorProto.FLOAT
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def classifier(w):
    """x [N, 4] -> Gemm(transB=1, W [10, 4]) -> logits [N, 10], and a second output probs."""
    return _model([helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1),
                   helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
                  [helper.make_tensor_value_info("x", F, ["N", 4])],
                  [helper.make_tensor_value_info("logits", F, ["N", 10]),
                   helper.make_tensor_value_info("probs", F, ["N", 10])],
                  [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(10, np.float32), "b")])


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 4)).astype(np.float32)
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save_model(classifier(w), ref)
    onnx.save_model(classifier(w + rng.normal(size=w.shape).astype(np.float32)), cand)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    labels = (x @ w.T).argmax(1)
    held = tmp_path / "held.npz"
    np.savez(held, x=x, labels=labels)
    return {"ref": str(ref), "cand": str(cand), "held": str(held), "x": x, "labels": labels, "w": w,
            "tmp": tmp_path}


def _json(capsys, argv, code=0):
    assert main(argv) == code
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, nothing else on stdout
    return json.loads(out)


def test_compare_identical_passes_and_perturbed_fails(files, capsys):
    same = _json(capsys, ["compare", files["ref"], files["ref"], "--data", files["held"], "--json"])
    assert same["passed"] and same["max_abs_diff"] == 0.0 and same["delta"]["loss"] == 0.0
    assert (same["loss_kind"], same["output"], same["n_samples"]) == ("ce", "logits", 50)
    # reference loss checked against numpy
    z = files["x"] @ files["w"].T
    z = z - z.max(1, keepdims=True)
    ce = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(50), files["labels"]])
    assert same["reference"]["loss"] == pytest.approx(ce, rel=1e-5)
    assert same["reference"]["metrics"]["top1"] == 1.0 and same["reference"]["weight_bytes"] == 200

    worse = _json(capsys, ["compare", files["ref"], files["cand"], "--data", files["held"], "--json",
                           "--batch-size", "8"], code=1)
    assert not worse["passed"] and worse["candidate"]["loss"] > worse["reference"]["loss"]
    assert worse["reference"]["loss"] == pytest.approx(ce, rel=1e-5)  # batching does not change the mean
    assert worse["max_abs_diff"] > worse["mean_abs_diff"] > 0
    gap = worse["delta"]["loss"]
    assert main(["compare", files["ref"], files["cand"], "--data", files["held"], "--tolerance", str(gap * 1.01)]) == 0
    text = capsys.readouterr().out
    assert "PASS: candidate loss" in text and "weight bytes" in text and "top5" in text


def test_compare_lm_default_and_ppl(tmp_path, capsys):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(13, 6)).astype(np.float32)
    head = rng.normal(size=(6, 13)).astype(np.float32)
    m = _model([helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
                helper.make_node("MatMul", ["h", "head"], ["logits"])],
               [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])],
               [helper.make_tensor_value_info("logits", F, ["B", "T", 13])],
               [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(head, "head")])
    path = tmp_path / "lm.onnx"
    onnx.save_model(m, path)
    ids = rng.integers(0, 13, size=(4, 9))
    data = tmp_path / "ids.npz"
    np.savez(data, input_ids=ids, labels=ids)
    r = _json(capsys, ["compare", str(path), str(path), "--data", str(data), "--json"])
    assert r["loss_kind"] == "lm"
    z = emb[ids] @ head
    z = z - z.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.mean([lp[b, t, ids[b, t + 1]] for b in range(4) for t in range(8)])
    assert r["reference"]["loss"] == pytest.approx(nll, rel=1e-5)
    assert r["reference"]["metrics"]["ppl"] == pytest.approx(math.exp(r["reference"]["loss"]))


def zoo(tmp_path):
    def w(name, shape):
        return numpy_helper.from_array(np.random.default_rng(0).normal(size=shape).astype(np.float32), name)
    m = _model([
        helper.make_node("Conv", ["img", "w_grp"], ["c1"], group=2, pads=[1, 1, 1, 1], name="conv_grouped"),
        helper.make_node("Conv", ["c1", "w_dw"], ["c2"], group=8, pads=[1, 1, 1, 1], name="conv_dw"),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"]),
        helper.make_node("Gemm", ["f", "w_gemm"], ["g"], transB=1, name="gemm"),
        helper.make_node("MatMul", ["g", "w_shared"], ["h1"], name="mm1"),
        helper.make_node("MatMul", ["h1", "w_shared"], ["h2"], name="mm2"),
        helper.make_node("Unsqueeze", ["h2", "ax1"], ["q"]),
        helper.make_node("Unsqueeze", ["h2", "ax2"], ["k"]),
        helper.make_node("MatMul", ["q", "k"], ["s"], name="mm_act"),
    ], [helper.make_tensor_value_info("img", F, ["N", 4, 5, 5])], [helper.make_tensor_value_info("s", F, ["N", 6, 6])],
        [w("w_grp", (8, 2, 3, 3)), w("w_dw", (8, 1, 3, 3)), w("w_gemm", (6, 8)), w("w_shared", (6, 6)),
         numpy_helper.from_array(np.array([1], np.int64), "ax1"),
         numpy_helper.from_array(np.array([2], np.int64), "ax2")])
    path = tmp_path / "zoo.onnx"
    onnx.save_model(m, path)
    return str(path)


def test_inspect_json_and_table(tmp_path, capsys):
    path = zoo(tmp_path)
    info = _json(capsys, ["inspect", path, "--json"])
    comp = {c["name"]: c for c in info["compressible"]}
    assert list(comp) == ["conv_grouped", "conv_dw", "gemm", "mm1", "mm2"]
    assert (comp["gemm"]["out_axis"], comp["gemm"]["reduce_axis"], comp["gemm"]["shape"]) == (0, 1, [6, 8])
    assert comp["conv_grouped"]["group"] == 2 and not comp["conv_grouped"]["depthwise"]
    assert comp["conv_dw"]["group"] == 8 and comp["conv_dw"]["depthwise"]
    assert comp["mm1"]["shared_with"] == ["mm2"] and comp["mm2"]["shared_with"] == ["mm1"]
    assert (comp["mm1"]["out_axis"], comp["mm1"]["reduce_axis"]) == (1, 0)
    assert info["skipped"] == [{"name": "mm_act", "op_type": "MatMul", "reason": "MatMul between two activations"}]
    assert info["totals"]["compressible_params"] == 144 + 72 + 48 + 36
    assert main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "conv_dw" in text and "MatMul between two activations" in text and "shared with mm2" in text


def _err(capsys, argv):
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and cap.err.startswith("error: ")
    return cap.err[len("error: "):].rstrip("\n")


def test_error_messages(files, capsys):
    tmp, ref, held = files["tmp"], files["ref"], files["held"]
    trunc = tmp / "trunc.onnx"
    trunc.write_bytes(open(ref, "rb").read()[:100])
    assert _err(capsys, ["inspect", str(trunc)]) == (
        f"{trunc}: not a valid ONNX model (cannot parse protobuf); check the file was fully written/exported")
    text = tmp / "text.onnx"
    text.write_text("just some text\n")
    assert _err(capsys, ["compare", str(text), ref, "--data", held]) == (
        f"{text}: not a valid ONNX model (cannot parse protobuf); check the file was fully written/exported")
    x, labels = files["x"], files["labels"]
    cases = {
        "missing": ({"labels": labels}, "missing array 'x' for graph input 'x' (model inputs: 'x'); "
                                        "add it, e.g. np.savez(path, x=..., labels=...)"),
        "extra": ({"x": x, "y": x, "labels": labels},
                  "array 'y' is not a graph input of the model (inputs: 'x', plus 'labels' and 'groups'); remove or rename it"),
        "shape": ({"x": x[:, :3], "labels": labels},
                  "array 'x' has shape (50, 3), model input expects [?, 4] (dim 1 must be 4); fix the data"),
        "dtype": ({"x": x.astype(np.float64), "labels": labels},
                  "array 'x' has dtype float64, model input expects float32; cast it with .astype(np.float32)"),
        "nan": ({"x": np.where(np.arange(50)[:, None] == 7, np.nan, x).astype(np.float32), "labels": labels},
                "array 'x' contains NaN/Inf (4 values); clean or drop those samples"),
    }
    for name, (arrays, msg) in cases.items():
        p = tmp / f"{name}.npz"
        np.savez(p, **arrays)
        assert _err(capsys, ["compare", ref, ref, "--data", str(p)]) == f"{p}: {msg}"
    p = tmp / "range.npz"
    np.savez(p, x=x, labels=np.where(np.arange(50) == 3, 12, labels))
    assert _err(capsys, ["compare", ref, ref, "--data", str(p)]) == (
        "labels: value 12 out of range for output 'logits' with 10 classes; labels must be in [0, 9] "
        "(or -100 to ignore), check --output and the labels")
    p = tmp / "nolabels.npz"
    np.savez(p, x=x)
    assert _err(capsys, ["compare", ref, ref, "--data", str(p)]).startswith(
        f"{p}: no 'labels' array; the 'ce' loss needs labels")
    assert _err(capsys, ["compare", ref, ref, "--data", held, "--output", "scores"]) == (
        f"{ref}: output 'scores' is not a graph output; available outputs: 'logits', 'probs'; pick one with --output")


def test_subprocess_exit_codes(files):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "llc_onnx", "compare", files["ref"], files["cand"],
                        "--data", files["held"], "--json"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["passed"] is False
    r = subprocess.run([sys.executable, "-m", "llc_onnx", "inspect", files["held"]], capture_output=True,
                       text=True, env=env, cwd=REPO)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"error: {files['held']}: not a valid ONNX model (cannot parse protobuf); "
                        "check the file was fully written/exported\n")
