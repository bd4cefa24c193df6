"""The deployment commands: ``check`` (tensorrt rules; how ORT CPU runs each node), ``run`` (interpreter on a
device), ``engine`` (TensorRT; the error path here) and ``compare``'s latency, on real ORT sessions and the
bundled example model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llc_onnx import api
from llc_onnx.calib.data import load_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.cli import main
from llc_onnx.ort_eval import EXACT, evaluate
from llc_onnx.targets import Format, get_target
from llc_onnx.targets.plans import plan_nodes

from _models import write_mlp_files

EX = Path(__file__).resolve().parents[1] / "examples"
W8 = Format("w8a8", 8, None, code_bits=7, activations="uint8", output=True)
W8_GEMM = Format("w8a8", 8, None, code_bits=7, activations="uint8")
MNB4 = Format("matmulnbits", 4, 32, activations="int8-block", accuracy_level=4)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """The example CNN written three ways: ort-cpu (W8A8 convs, MatMulNBits fc1, W8A8 fc2), qdq (weight-only
    Q/DQ everywhere) and tensorrt (symmetric int8 W8A8 convs), plus 64 held-out samples."""
    d = tmp_path_factory.mktemp("fashion")
    model = onnx.load(EX / "fashion_cnn.onnx")
    data = np.load(EX / "fashion_data.npz")
    x, y = data["input"][:64], data["labels"][:64]
    feeds = [{"input": x[i:i + 32]} for i in range(0, 64, 32)]
    files = {"float": EX / "fashion_cnn.onnx"}
    cpu = get_target("ort-cpu")
    choices = {"/conv1/Conv": W8, "/conv2/Conv": W8, "/fc1/Gemm": MNB4, "/fc2/Gemm": W8_GEMM}
    files["ort-cpu"] = d / "cpu.onnx"
    onnx.save(cpu.rewrite(model, plan_nodes(cpu, model, choices, data=feeds)).model, files["ort-cpu"])
    qdq = get_target("qdq")
    files["qdq"] = d / "qdq.onnx"
    qchoice = {n: Format("qdq", 8, None) for n in choices}
    onnx.save(qdq.rewrite(model, plan_nodes(qdq, model, qchoice)).model, files["qdq"])
    trt = get_target("tensorrt")
    files["tensorrt"] = d / "trt.onnx"
    tchoice = {n: Format("w8a8", 8, None, activations="int8") for n in ("/conv1/Conv", "/conv2/Conv")}
    onnx.save(trt.rewrite(model, plan_nodes(trt, model, tchoice, data=feeds)).model, files["tensorrt"])
    held = d / "held.npz"
    np.savez(held, input=x, labels=y)
    return {k: str(v) for k, v in files.items()} | {"held": str(held), "dir": d}


def _json(capsys, argv, code=0):
    assert main(argv) == code
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return json.loads(out)


def _err(capsys, argv, code=2):
    assert main(argv) == code
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.startswith("error: ") and cap.err.count("\n") == 1
    return cap.err


# ------------------------------------------------------------------------------------------ check
def test_check_tensorrt_lists_every_violation_with_its_node(fashion, capsys):
    clean = _json(capsys, ["check", "--target", "tensorrt", fashion["tensorrt"], "--json"])
    assert clean["passed"] and clean["violations"] == [] and "zero-point" in clean["rules"]
    bad = _json(capsys, ["check", "--target", "tensorrt", fashion["ort-cpu"], "--json"], code=1)
    assert not bad["passed"]
    names = {v["node"] for v in bad["violations"]}
    rules = {v["rule"] for v in bad["violations"]}
    # uint8 activation Q/DQ, the int32 Gemm bias, the com.microsoft MatMulNBits node
    assert {"type", "plugin"} <= rules
    assert "/fc1/Gemm" in names and any(n.startswith("/conv1/Conv") for n in names)
    m = onnx.load(fashion["ort-cpu"])
    assert names <= {n.name for n in m.graph.node}                   # every violation names a real node
    assert main(["check", "--target", "tensorrt", fashion["ort-cpu"]]) == 1
    text = capsys.readouterr().out
    assert "violation(s) of the tensorrt rules" in text and "/fc1/Gemm" in text and "FAIL" in text


def test_check_ort_cpu_reads_the_kernels_ort_runs(fashion, capsys):
    good = _json(capsys, ["check", fashion["ort-cpu"], "--json", "--threads", "1"])
    kernels = {n["node"]: (n["kernel"], n["integer"]) for n in good["nodes"]}
    assert kernels["/conv1/Conv"] == ("QLinearConv", True) and kernels["/conv2/Conv"] == ("QLinearConv", True)
    assert kernels["/fc1/Gemm"] == ("MatMulNBits", True) and kernels["/fc2/Gemm"] == ("QGemm", True)
    assert good["passed"] and good["optimized_ops"]["QLinearConv"] == 2
    # weight-only Q/DQ: ORT dequantizes in float on every run -> one violation per node, exit 1
    bad = _json(capsys, ["check", "--target", "ort-cpu", fashion["qdq"], "--json"], code=1)
    assert {v["node"] for v in bad["violations"]} == {"/conv1/Conv", "/conv2/Conv", "/fc1/Gemm", "/fc2/Gemm"}
    assert {v["rule"] for v in bad["violations"]} == {"float-dq"}
    assert all(not n["integer"] for n in bad["nodes"])
    # the float model: nothing quantized, nothing violated, nothing integer
    plain = _json(capsys, ["check", fashion["float"], "--json"])
    assert plain["passed"] and all(n["weight"] == "float" and not n["integer"] for n in plain["nodes"])


def test_check_ort_cpu_flags_level0_low_bit_matmulnbits(tmp_path, capsys):
    model_path, _ = write_mlp_files(tmp_path, n=8)
    model = onnx.load(model_path)
    t = get_target("ort-cpu")
    for bits, violated in ((8, True), (4, False)):
        fmt = Format("matmulnbits", bits, 16, accuracy_level=0)
        path = tmp_path / f"mnb{bits}.onnx"
        onnx.save(t.rewrite(model, plan_nodes(t, model, {"fc1": fmt})).model, path)
        res = _json(capsys, ["check", str(path), "--json"], code=1 if violated else 0)
        assert [v["node"] for v in res["violations"]] == (["fc1"] if violated else [])
        assert all(v["rule"] == "mnb-level0" for v in res["violations"])
        fc1 = next(n for n in res["nodes"] if n["node"] == "fc1")
        assert fc1["kernel"] == "MatMulNBits" and fc1["weight"] == f"MatMulNBits {bits}-bit, accuracy_level 0"


# ------------------------------------------------------------------------------------------ run
def test_run_on_cpu_matches_onnx_runtime_exact_maths(tmp_path, capsys):
    model_path, data_path = write_mlp_files(tmp_path, n=96)
    model = onnx.load(model_path)
    t = get_target("ort-cpu")
    rw = t.rewrite(model, plan_nodes(t, model, {"fc1": Format("matmulnbits", 4, 16, accuracy_level=0)})).model
    cpath = tmp_path / "mnb.onnx"
    onnx.save(rw, cpath)
    res = _json(capsys, ["run", str(cpath), "--data", data_path, "--batch-size", "32", "--json"])
    ds = load_dataset(data_path, rw, batch_size=32)
    ref = evaluate(rw, ds, make_loss("ce", "logits"), session=EXACT)
    assert res["loss"] == pytest.approx(ref.loss, rel=1e-5, abs=1e-6)
    assert res["metrics"]["top1"] == pytest.approx(ref.metrics["top1"])
    assert res["device"] == "cpu" and res["n_samples"] == 96 and res["batch_size"] == 32
    assert res["nodes"] == {"MatMulNBits": 1} and "interpreter" in res["executor"] and "compare" in res["note"]
    assert res["latency_ms"] > 0 and res["throughput"] > 0
    assert main(["run", str(cpath), "--data", data_path]) == 0
    assert "throughput" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the error path does not apply")
def test_run_cuda_without_gpu_is_one_line(tmp_path, capsys):
    model_path, data_path = write_mlp_files(tmp_path, n=16)
    err = _err(capsys, ["run", model_path, "--data", data_path, "--device", "cuda"])
    assert "no CUDA device" in err and "device 'cpu'" in err
    err = _err(capsys, ["run", model_path, "--data", data_path, "--device", "tpu"])
    assert "not a device name" in err
    assert "not supported" in _err(capsys, ["run", model_path, "--data", data_path, "--device", "meta"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (the GPU run needs one)")
def test_run_cuda_matches_cpu(tmp_path):
    model_path, data_path = write_mlp_files(tmp_path, n=64)
    model = onnx.load(model_path)
    t = get_target("ort-cpu")
    rw = t.rewrite(model, plan_nodes(t, model, {"fc1": Format("matmulnbits", 4, 16, accuracy_level=0)})).model
    cpu = api.run(rw, data_path, device="cpu")
    gpu = api.run(rw, data_path, device="cuda")
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-3) and gpu.kernels["MatMulNBits"] == "triton"


# ------------------------------------------------------------------------------------------ engine
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_engine_without_tensorrt_says_what_to_install(fashion, tmp_path, capsys):
    plan = tmp_path / "m.plan"
    err = _err(capsys, ["engine", fashion["tensorrt"], "-o", str(plan), "--data", fashion["held"]])
    assert "tensorrt" in err and "install TensorRT" in err
    assert not plan.exists()
    err = _err(capsys, ["engine", str(tmp_path / "missing.onnx"), "-o", str(plan)])
    assert "no such file" in err
    err = _err(capsys, ["engine", fashion["tensorrt"], "-o", fashion["tensorrt"]])
    assert "overwrite" in err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs TensorRT (tensorrt with tensorrt.plugin) and a CUDA GPU; neither is here")
def test_engine_builds_and_matches_onnx_runtime(fashion, tmp_path):
    plan = tmp_path / "m.plan"
    res = api.engine(fashion["tensorrt"], str(plan), data=fashion["held"])
    assert plan.stat().st_size == res.built["bytes"] > 0
    c = res.comparison
    assert c["n_samples"] == 64 and abs(c["tensorrt"]["loss"] - c["onnxruntime"]["loss"]) < 0.05


# ------------------------------------------------------------------------------------------ compare
def test_compare_reports_latency_and_throughput_of_both(fashion, capsys):
    assert main(["compare", fashion["float"], fashion["ort-cpu"], "--data", fashion["held"], "--batch-size", "16",
                 "--rounds", "3", "--threads", "1", "--json", "--tolerance", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    lat = res["latency"]
    assert list(lat) == ["1", "16"]                                   # batch 1 and the data's batch
    for b, row in lat.items():
        assert row["rounds"] == 3 and row["threads"] == 1
        assert row["reference_ms"] > 0 and row["candidate_ms"] > 0
        assert row["reference_median_ms"] >= row["reference_ms"]
        assert row["candidate_throughput"] == pytest.approx(int(b) / row["candidate_ms"] * 1e3)
        assert row["speedup"] == pytest.approx(row["reference_ms"] / row["candidate_ms"])
    off = _json(capsys, ["compare", fashion["float"], fashion["float"], "--data", fashion["held"], "--json",
                         "--no-latency"])
    assert off["latency"] is None
    assert main(["compare", fashion["float"], fashion["float"], "--data", fashion["held"], "--rounds", "2"]) == 0
    assert "speed-up" in capsys.readouterr().out
    err = _err(capsys, ["compare", fashion["float"], fashion["float"], "--data", fashion["held"], "--rounds", "0"])
    assert "--rounds 0" in err


def test_time_sessions_stops_at_its_time_budget(fashion):
    from llc_onnx.ort_eval import make_session
    from llc_onnx.targets.latency import time_sessions

    x = np.load(fashion["held"])["input"][:8]
    sessions = {"a": make_session(fashion["float"]), "b": make_session(fashion["ort-cpu"])}
    quick = time_sessions(sessions, {"input": x}, rounds=50, max_seconds=0.0, min_rounds=3)
    assert quick["a"].rounds == quick["b"].rounds == 3
    full = time_sessions(sessions, {"input": x}, rounds=5)
    assert full["a"].rounds == 5 and full["a"].min_ms <= full["a"].median_ms <= full["a"].max_ms
