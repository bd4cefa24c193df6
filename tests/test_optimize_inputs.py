"""optimize on inputs the main flow tests don't cover: grouped convolutions under low-rank, a language model
without a labels array, out-of-range options, and the fit/measure split (float16/bfloat16 weights:
test_half_precision.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _models import F, make, ort_logits, save_npz, teacher_labels, torch_threads
from llc_onnx.calib.data import Batch, Dataset
from llc_onnx.cli import main
from llc_onnx.flows.context import fit_measure_split


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def optimize_json(capsys, model, data, out, *extra) -> dict:
    """``optimize ... --json --allow-loss-increase``: exit 0 asserted, the report returned."""
    rc, stdout, err = run(["optimize", model, "--data", data, "-o", str(out), *extra, "--json",
                           "--allow-loss-increase"], capsys)
    assert rc == 0, err
    return json.loads(stdout)


def grouped_cnn(tmp_path):
    """Conv(1→4) -> grouped Conv(4→4, group 2) -> GlobalAveragePool -> Flatten -> Gemm(4→3)."""
    rng = np.random.default_rng(0)
    w = {"W0": rng.normal(size=(4, 1, 3, 3)).astype(np.float32) / 3,
         "Wg": rng.normal(size=(4, 2, 3, 3)).astype(np.float32) / 4,
         "Wf": rng.normal(size=(3, 4)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W0"], ["a"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "Wg"], ["b"], name="grouped", pads=[1, 1, 1, 1], group=2),
             helper.make_node("GlobalAveragePool", ["b"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "Wf"], ["logits"], name="fc", transB=1)]
    m = make(nodes, [helper.make_tensor_value_info("x", F, ["N", 1, 6, 6])],
             [helper.make_tensor_value_info("logits", F, ["N", 3])], w)
    x = rng.normal(size=(256, 1, 6, 6)).astype(np.float32)
    path = tmp_path / "g.onnx"
    onnx.save(m, path)
    return str(path), save_npz(tmp_path / "g.npz", teacher_labels(ort_logits(m, x=x)), x=x)


def test_grouped_conv_is_kept_whole_by_lowrank(tmp_path, capsys):
    model, data = grouped_cnn(tmp_path)
    r = optimize_json(capsys, model, data, tmp_path / "o.onnx", "--method", "lowrank", "--mode", "compact")
    cands = r["stages"][0]["candidates"]
    levels = {c["level"] for c in cands if c["node"] == "grouped"}
    assert levels == {"full"}  # no rank candidates for a grouped Conv
    assert any(c["node"] == "c0" and c["level"].startswith("rank") for c in cands)


def tiny_lm(tmp_path, vocab=11, d=8, n=48, t=6):
    """input_ids -> Gather(E) -> MatMul(W) -> logits [B, T, V]; the npz has input_ids only (no labels)."""
    rng = np.random.default_rng(1)
    w = {"E": rng.normal(size=(vocab, d)).astype(np.float32), "W": rng.normal(size=(d, vocab)).astype(np.float32) / 3}
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["logits"], name="head")]
    m = make(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"])],
             [helper.make_tensor_value_info("logits", F, ["B", "T", vocab])], w)
    path = tmp_path / "lm.onnx"
    onnx.save(m, path)
    ids = rng.integers(0, vocab, size=(n, t)).astype(np.int64)
    np.savez(tmp_path / "lm.npz", input_ids=ids)
    return str(path), str(tmp_path / "lm.npz")


def test_language_model_without_labels_uses_input_ids(tmp_path, capsys):
    model, data = tiny_lm(tmp_path)
    r = optimize_json(capsys, model, data, tmp_path / "o.onnx", "--batch-size", "8", "--bits", "8,float")
    assert r["splits"]["calibration"]["reference"]["loss"] > 0 and "ppl" in r["splits"]["test"]["reference"]["metrics"]
    assert r["stages"][0]["measurement"]["in_sample"] is False and r["objective"] == "task"


@pytest.mark.parametrize("flag, value, needle", [
    ("--max-rounds", "-1", "--max-rounds -1: must be an integer ≥ 0"),
    ("--seed", "-1", "--seed -1: must be an integer ≥ 0"),
    ("--threads", "-2", "--threads -2: must be an integer ≥ 0"),
    ("--tolerance", "nan", "--tolerance nan: must be ≥ 0"),
    ("--gamma", "0", "--gamma 0: must be > 0"),
    ("--avg-bits", "0", "--avg-bits 0: average bits per weight in (0, 32]"),
    ("--holdout", "1", "--holdout 1: a fraction in (0, 1)"),
    ("--bits", "3", "--bits 3: levels are 2, 4, 8, 16 and float"),
    ("--seed", "x", "--seed x: expected an integer"),
    ("--objective", "kl", "--objective kl: choose one of auto, task, fidelity"),
    ("--cet-samples", "0", "--cet-samples 0: must be an integer ≥ 1"),
    ("--cet-steps", "4", "--cet-steps 4: must be an integer ≥ quant.cet_k (8)"),
])
def test_out_of_range_options_are_one_line_errors(tmp_path, capsys, flag, value, needle):
    model, data = grouped_cnn(tmp_path)
    rc, out, err = run(["optimize", model, "--data", data, "-o", str(tmp_path / "o.onnx"), flag, value], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_budget_with_lowrank_only_is_refused(tmp_path, capsys):
    model, data = grouped_cnn(tmp_path)
    rc, out, err = run(["optimize", model, "--data", data, "--method", "lowrank", "--budget", "0.3"], capsys)
    assert rc == 2 and "--budget 0.3: budgets and sweeps apply to quantization" in err


def test_fit_measure_split_is_seeded_disjoint_and_covers_the_data():
    batches = [Batch({"x": np.full((4, 1), i, dtype=np.float32)}, np.zeros(4, dtype=np.int64)) for i in range(10)]
    ds = Dataset(batches, "d")
    fit, meas = fit_measure_split(ds, None, seed=0)
    ids = lambda d: [int(b.inputs["x"][0, 0]) for b in d.batches]  # noqa: E731
    assert len(meas.batches) == 5 and sorted(ids(fit) + ids(meas)) == list(range(10))
    assert ids(meas) != [0, 1, 2, 3, 4]  # not simply the first batches (ordered data would bias it)
    assert ids(fit_measure_split(ds, None, seed=0)[1]) == ids(meas)  # deterministic
    assert ids(fit_measure_split(ds, None, seed=1)[1]) != ids(meas)
    fit, meas = fit_measure_split(ds, 9, seed=0)  # enough batches for ≥ 9 samples: 3 of 4
    assert len(meas.batches) == 3 and len(fit.batches) == 7
    one = Dataset(batches[:1], "one")
    fit, meas = fit_measure_split(one)
    assert fit is meas  # a single batch: in-sample, and the report says so


def test_one_long_sequence_still_gives_a_standard_error(tmp_path, capsys):
    """LM measurements use token spans as units: one sequence of 200 tokens in the measure part gives SE > 0
    (a per-sequence SE would rest on one number and be 0, silently switching --margin-z off)."""
    model, data = tiny_lm(tmp_path, n=4, t=200)
    r = optimize_json(capsys, model, data, tmp_path / "o.onnx", "--batch-size", "1", "--measure-samples", "1",
                      "--bits", "4,float", "--target", "qdq")
    assert r["stages"][0]["measurement"]["measure_samples"] == 1
    head = [c for c in r["stages"][0]["candidates"] if c["node"] == "head" and c["level"] == "qdq-int4-b32"][0]
    assert head["se"] > 0 and head["cost"] == pytest.approx(head["measured"] + head["se"])
