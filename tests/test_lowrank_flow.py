"""``optimize --method lowrank`` end to end on a genuinely low-rank model (rank-4 64x64 Gemm + full-rank noise;
the labels come from the noise-free teacher, so truncating the noise away lowers the loss)."""

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _models import torch_threads, write_lowrank_files
from llc_onnx.calib.data import load_dataset, split_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.cli import main
from llc_onnx.ort_eval import EXACT, evaluate


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lowrank")
    model, data, w = write_lowrank_files(tmp, n=1200)
    return model, data, w, tmp


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _held_losses(model_path, out_path, data):
    src = onnx.load(model_path)
    _, held = split_dataset(load_dataset(data, src, batch_size=64), 0.5, 0)
    loss = make_loss("ce", "logits")
    # the qdq target's session (MatMulNBits at full precision); a float-only low-rank model is the same in any
    return evaluate(src, held, loss, session=EXACT).loss, evaluate(onnx.load(out_path), held, loss, session=EXACT).loss


def test_compact_factors_the_low_rank_node_and_verifies(files):
    model, data, w, tmp = files
    out = tmp / "compact.onnx"
    rc, stdout, err = run_cli(["optimize", model, "--data", data, "-o", str(out), "--method", "lowrank",
                               "--mode", "compact", "--json"])
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["verified"] and r["method"] == "lowrank" and r["stages"][0]["settings"]["mode"] == "compact"
    level = {n["node"]: n["level"] for n in r["nodes"]}
    assert level["big"].startswith("rank ")
    rank = int(level["big"].split()[1])
    assert 4 <= rank < 32  # the signal rank at least, and a rank that saves parameters
    assert r["stages"][0]["search"] and all("calib_delta" in s for s in r["stages"][0]["search"])

    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    names = {n.name for n in m.graph.node}
    assert {"big_lr_a", "big_lr_b"} <= names and "big" not in names
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert "W" not in inits  # the float weight is gone
    a = next(v for k, v in inits.items() if k.endswith("_lr_a"))
    b = next(v for k, v in inits.items() if k.endswith("_lr_b"))
    assert a.shape == (64, rank) and b.shape == (64, rank)  # Gemm transB=1 keeps [N, r]
    # the factors reproduce the low-rank part of W: the relative error is about the noise share
    approx = (a @ b.T).T  # M = L·R in the [K, N] view; W = Mᵀ for transB=1
    rel = np.linalg.norm(approx - w["W"]) / np.linalg.norm(w["W"])
    assert rel < 0.5
    assert r["bytes"]["compressed"] == 4 * (a.size + b.size) + 4 * 64 * 4  # factors + the untouched head
    ref, got = _held_losses(model, str(out), data)
    assert ref == pytest.approx(r["splits"]["test"]["reference"]["loss"], rel=1e-9)
    assert got == pytest.approx(r["splits"]["test"]["compressed"]["loss"], rel=1e-9)
    assert got <= ref


def test_lossless_without_a_rank_inside_the_neighbourhood_is_a_one_line_error(files):
    model, data, _, tmp = files
    out = tmp / "none.onnx"
    rc, stdout, err = run_cli(["optimize", model, "--data", data, "-o", str(out), "--method", "lowrank",
                               "--mode", "lossless", "--gamma", "1e-4"])
    assert rc == 2 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "no rank of any node lies inside the neighbourhood" in lines[0] and "--mode compact" in lines[0]
    assert not out.exists()


def test_lossless_with_large_relative_gamma_runs_and_reports(files):
    model, data, _, tmp = files
    out = tmp / "lossless.onnx"
    rc, stdout, err = run_cli(["optimize", model, "--data", data, "-o", str(out), "--method", "lowrank",
                               "--mode", "lossless", "--gamma", "0.5", "--gamma-relative", "--json"])
    assert rc in (0, 1), err  # today: exit 2, "no rank of any node lies inside the neighbourhood ‖δ‖ ≤ 0.5 ·‖W‖"
    r = json.loads(stdout)
    st = r["stages"][0]
    assert st["settings"]["mode"] == "lossless" and st["settings"]["gamma_relative"] is True
    assert st["search"] and st["search"][0]["nodes"] == 1
    cands = [c for c in st["candidates"] if not c["reference"]]
    assert cands and all(c["rel_noise"] <= 0.5 + 1e-9 and c["predicted"] < 0 for c in cands)
    assert (rc == 0) == r["verified"] == out.exists()


def test_lowrank_then_quant_has_factor_nodes_and_dequantize(files):
    model, data, _, tmp = files
    out = tmp / "both.onnx"
    rc, stdout, err = run_cli(["optimize", model, "--data", data, "-o", str(out), "--method", "lowrank,quant",
                               "--mode", "compact", "--json", "--target", "qdq"])
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["verified"] and r["method"] == "lowrank,quant"
    assert [s["method"] for s in r["stages"]] == ["lowrank", "quant"]
    assert r["bytes"]["reference"] == 4 * (64 * 64 + 64 * 4)  # the original float weights
    assert r["bytes"]["compressed"] == r["stages"][1]["bytes"]["compressed"]
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    by_name = {n.name: n for n in m.graph.node}
    producer = {o: n for n in m.graph.node for o in n.output}
    assert {"big_lr_a", "big_lr_b"} <= set(by_name)
    assert any(n.op_type == "DequantizeLinear" for n in m.graph.node)
    level = {n["node"]: n["level"] for n in r["nodes"]}  # the last stage's nodes: the factors + head
    assert {"big_lr_a", "big_lr_b", "head"} == set(level)
    for name, lv in level.items():
        p = producer.get(by_name[name].input[1])
        assert (p is not None and p.op_type == "DequantizeLinear") == lv.startswith("qdq-int")
    assert meta_verified(m) == "true"
    ref, got = _held_losses(model, str(out), data)
    assert got == pytest.approx(r["splits"]["test"]["compressed"]["loss"], rel=1e-9) and got <= ref


def meta_verified(m):
    return {p.key: p.value for p in m.metadata_props}["llc_onnx.verified"]


def test_lowrank_honours_relative_error_max(files):
    model, data, _, tmp = files
    common = ["optimize", model, "--data", data, "-o", str(tmp / "rel.onnx"), "--method", "lowrank",
              "--mode", "compact", "--json", "--allow-loss-increase"]
    rc, stdout, err = run_cli(common)
    assert rc == 0, err
    r = json.loads(stdout)
    base = abs(r["splits"]["calibration"]["reference"]["loss"])
    assert base < 1
    diffs = sorted(abs(c["measured"] - c["predicted"]) for c in r["stages"][0]["candidates"] if not c["reference"])
    d = diffs[len(diffs) // 2]
    e = d / base ** 0.5  # base·e < d ≤ e: this candidate is inside for absolute, outside for relative
    rc, stdout, err = run_cli(common + ["--error-max", repr(e), "--relative"])
    assert rc == 0, err
    r = json.loads(stdout)
    assert r["config"]["criterion"]["relative"] is True
    cands = [c for c in r["stages"][0]["candidates"] if not c["reference"]]
    for c in cands:
        diff = abs(c["measured"] - c["predicted"])
        if abs(diff - base * e) > 1e-9:
            assert c["inside"] == (diff <= base * e), c
    assert any(base * e < abs(c["measured"] - c["predicted"]) <= e and not c["inside"] for c in cands)

def test_lowrank_that_keeps_everything_hands_quant_the_original_model(tmp_path):
    """When the low-rank stage factors nothing, the quantization stage works on the original model: the same
    output bytes as --method quant, and the same --cache entry (its measurements are reused)."""
    from _models import write_mlp_files

    model, data = write_mlp_files(tmp_path)
    cache = str(tmp_path / "cache")
    base = ["--data", data, "--bits", "4,8,float", "--json", "--allow-loss-increase", "--cache", cache]
    rc, out_q, err = run_cli(["optimize", model, "-o", str(tmp_path / "q.onnx"), *base])
    assert rc == 0, err
    rc, out_b, err = run_cli(["optimize", model, "-o", str(tmp_path / "b.onnx"), "--method", "lowrank,quant",
                              "--mode", "compact", "--rank-grid", "0.01", *base])
    assert rc == 0, err
    q, b = json.loads(out_q), json.loads(out_b)
    assert set(b["stages"][0]["levels"]) == {"full"}  # rank 1 everywhere costs loss: nothing factored
    assert b["stages"][1]["cache"]["hit"] is True and b["stages"][1]["cache"]["entry"] == q["stages"][0]["cache"]["entry"]
    assert "svd" not in b["stages"][1]["seconds"] and "candidates" not in b["stages"][1]["seconds"]
    mq, mb = onnx.load(str(tmp_path / "q.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert {p.key: p.value for p in mb.metadata_props}["llc_onnx.method"] == "lowrank,quant"
    del mq.metadata_props[:], mb.metadata_props[:]  # they differ in the method named, and only there
    assert mq.SerializeToString() == mb.SerializeToString()
