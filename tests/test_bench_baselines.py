"""bench.baselines on tiny models built here: HAWQ / Fisher costs, the knapsack allocation, the uniform-SVD
budget matcher, the weight-byte accounting, the ORT INT4 applicability rule. No cached benchmark models."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import baselines as B
from llc_onnx.compressible import find_compressible
from llc_onnx.passes.qdq import apply_qdq

F = TensorProto.FLOAT


def _mlp(seed=0, d_in=64, hidden=48, classes=8):
    """x[N, d_in] -> MatMul(W1) -> Relu -> Gemm(W2, transB=1) -> logits; nodes 'fc1' (MatMul), 'fc2' (Gemm)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(d_in, hidden)) / np.sqrt(d_in)).astype(np.float32)
    w2 = (rng.normal(size=(classes, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (0.1 * rng.normal(size=classes)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["logits"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", d_in])],
                          [helper.make_tensor_value_info("logits", F, ["N", classes])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                           numpy_helper.from_array(b2, "b2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m)
    return m, {"W1": w1, "W2": w2, "b2": b2}


def _conv_only():
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(4, 2, 3, 3)) / 3).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", F, ["N", 2, 5, 5])],
                          [helper.make_tensor_value_info("y", F, ["N", 4, 5, 5])], [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _table(fisher=None):
    m, w = _mlp()
    nodes, _ = find_compressible(m)
    ws = {n.name: (w[n.weight].astype(np.float64), n.out_axis, n.reduce_axis) for n in nodes}
    return m, nodes, w, B.level_table(ws, B.LEVELS, block_size=32, scale="mse", fisher=fisher)


def test_level_table_sizes_and_noise_order():
    _, nodes, w, t = _table()
    for n in nodes:
        bits = t.levels[n.name]
        assert bits == [2, 4, 8, 16, 0]
        sizes, d2 = t.sizes[n.name], t.deltas_sq[n.name]
        assert sizes[-1] == 4 * w[n.weight].size  # float level
        assert sizes == sorted(sizes)  # more bits, more bytes
        assert d2[-1] == 0.0 and all(a > b for a, b in zip(d2, d2[1:-1]))  # more bits, less noise
        qw = t.quantized[n.name][4]
        assert qw.block_size == 32 and qw.bits == 4
        assert qw.dequant is None and qw.q.dtype == np.int8  # stored compactly
        deq = B.dequant(qw)
        assert np.isclose(t.deltas_sq[n.name][1], ((deq - w[n.weight].astype(np.float64)) ** 2).sum())
        # the compact copy is the same quantization, nearest rounding: |w/s - q| <= 1/2 where not clipped
        full = B.quantize_weight(w[n.weight].astype(np.float64), B.spec_for(4), n.out_axis, n.reduce_axis)
        assert np.array_equal(full.q, qw.q) and np.allclose(full.dequant, deq)
        ratio = w[n.weight].astype(np.float64) * (qw.q / np.where(deq == 0, 1, deq))
        inside = np.abs(qw.q) < 7
        assert np.all(np.abs(ratio - qw.q)[inside & (deq != 0)] <= 0.5 + 1e-6)


def test_hawq_cost_formula():
    _, nodes, w, t = _table()
    traces = {"fc1": 3.0, "fc2": 0.5}
    numel = {n.name: w[n.weight].size for n in nodes}
    costs = B.hawq_costs(t, traces, numel)
    for i, n in enumerate(t.nodes):
        for j, d2 in enumerate(t.deltas_sq[n]):
            assert costs[i][j] == pytest.approx(0.5 * traces[n] / numel[n] * d2)
        assert costs[i][-1] == 0.0


def test_fisher_cost_formula_and_relation_to_hawq():
    m, w = _mlp()
    rng = np.random.default_rng(3)
    fisher = {"fc1": rng.uniform(0, 2, size=w["W1"].shape), "fc2": rng.uniform(0, 2, size=w["W2"].shape)}
    _, nodes, _, t = _table(fisher)
    costs = B.fisher_costs(t)
    for i, n in enumerate(t.nodes):
        wt = w["W1" if n == "fc1" else "W2"].astype(np.float64)
        for j, bits in enumerate(t.levels[n]):
            if bits == 0:
                assert costs[i][j] == 0.0
                continue
            delta = B.dequant(t.quantized[n][bits]) - wt
            assert costs[i][j] == pytest.approx(0.5 * float((fisher[n] * delta ** 2).sum()))
    # a constant Fisher diagonal F = tr/n gives exactly the HAWQ cost
    const = {"fc1": np.full(w["W1"].shape, 2.0), "fc2": np.full(w["W2"].shape, 0.25)}
    _, _, _, tc = _table(const)
    hawq = B.hawq_costs(tc, {"fc1": 2.0 * w["W1"].size, "fc2": 0.25 * w["W2"].size},
                        {"fc1": w["W1"].size, "fc2": w["W2"].size})
    assert np.allclose(B.fisher_costs(tc), hawq)
    with pytest.raises(ValueError):
        B.fisher_costs(B.level_table({"fc1": (w["W1"], 1, 0)}))


def test_allocation_respects_budget_and_sensitivity():
    m, nodes, w, t = _table()
    numel = {n.name: w[n.weight].size for n in nodes}
    ref = sum(4 * v for v in numel.values())
    budget = int(0.2 * ref)
    order = {2: 0, 4: 1, 8: 2, 16: 3, 0: 4}
    costs_a = B.hawq_costs(t, {"fc1": 1e4, "fc2": 1e-4}, numel)  # fc1 far more sensitive
    costs_b = B.hawq_costs(t, {"fc1": 1e-4, "fc2": 1e4}, numel)  # fc2 far more sensitive
    choice = B.allocate(t, costs_a, budget)
    choice2 = B.allocate(t, costs_b, budget)
    for ch, costs in ((choice, costs_a), (choice2, costs_b)):
        assert B.allocation_bytes(t, ch) <= budget
        # exact optimum by enumeration (2 nodes x 5 levels)
        best = min(costs[0][i] + costs[1][j] for i in range(5) for j in range(5)
                   if t.sizes["fc1"][i] + t.sizes["fc2"][j] <= budget)
        got = sum(costs[k][t.levels[n].index(ch[n])] for k, n in enumerate(t.nodes))
        assert got == pytest.approx(best)
    assert order[choice["fc1"]] >= order[choice2["fc1"]]
    assert order[choice2["fc2"]] >= order[choice["fc2"]]
    # the rewritten model runs in ORT and its weight bytes are exactly the allocation's
    model = B.rewrite(m, t, choice)
    assert B.weight_bytes(model)[0] == B.allocation_bytes(t, choice)
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert out.shape == (5, 8) and np.isfinite(out).all()


def test_weight_bytes_float_and_qdq():
    m, w = _mlp()
    assert B.weight_bytes(m) == (4 * (w["W1"].size + w["W2"].size), 2)  # bias not counted
    _, nodes, _, t = _table()
    q = {n: t.quantized[n][4] for n in t.nodes}
    qm = apply_qdq(m, q)
    assert B.weight_bytes(qm)[0] == sum(v.nbytes for v in q.values())


def test_svd_matcher_from_below():
    shapes = {"a": (64, 48), "b": (288, 32), "c": (10, 10)}
    full = sum(k * n for k, n in shapes.values())
    target = int(0.4 * full)
    frac, params, ranks = B.match_uniform_fraction(shapes, target)
    assert params <= target
    assert params == B.svd_params(shapes, frac)[0]
    # no fraction on the grid does better while staying under the target
    for i in range(1, 4001):
        p = B.svd_params(shapes, i / 4000)[0]
        assert p > target or p <= params
    # rank that saves nothing stays unfactored: (10, 10) at rank >= 5
    assert B.svd_rank(10, 10, 0.5) is None and B.svd_rank(10, 10, 0.4) == 4
    assert B.match_uniform_fraction(shapes, 10) is None


def test_uniform_svd_model_runs_and_counts_params():
    m, w = _mlp()
    nodes, _ = find_compressible(m)
    shapes = {n.name: B.matrix_shape(n) for n in nodes}
    assert shapes == {"fc1": (64, 48), "fc2": (48, 8)}
    frac, params, ranks = B.match_uniform_fraction(shapes, 64 * 48 // 2 + 48 * 8)
    model = B.uniform_svd(m, nodes, {n.name: w[n.weight] for n in nodes}, ranks)
    assert B.weight_bytes(model)[0] == 4 * params
    # at full rank the factorisation reproduces the model
    full = B.uniform_svd(m, nodes, {n.name: w[n.weight] for n in nodes}, {"fc1": 48, "fc2": None})
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    run = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(run(full), run(m), atol=1e-4)
    assert run(model).shape == (4, 8)


def test_ort_int4_applicability(tmp_path):
    conv = tmp_path / "conv.onnx"
    onnx.save(_conv_only(), conv)
    with pytest.raises(B.NotApplicable, match="no MatMul"):
        B.ort_int4(str(conv), str(tmp_path / "c4.onnx"))
    m, _ = _mlp()
    src = tmp_path / "mlp.onnx"
    onnx.save(m, src)
    info = B.ort_int4(str(src), str(tmp_path / "m4.onnx"))
    assert info["total_matmul"] == 1 and len(info["covered"]) == 1  # the Gemm is not covered
    q = onnx.load(tmp_path / "m4.onnx")
    nbytes, count = B.weight_bytes(q)
    assert count == 2
    assert nbytes < 4 * (64 * 48 + 8 * 48)


def test_quick_subset_deterministic(tmp_path, monkeypatch):
    from bench.models import _subset

    src = tmp_path / "d.npz"
    np.savez(src, input=np.arange(100, dtype=np.float32)[:, None], labels=np.arange(100))
    a = _subset(src, 10, tmp_path / "a.npz", 0)
    b = _subset(src, 10, tmp_path / "b.npz", 0)
    with np.load(a) as za, np.load(b) as zb:
        assert sorted(za.files) == ["input", "labels"]
        assert np.array_equal(za["labels"], zb["labels"]) and len(za["labels"]) == 10
        assert np.array_equal(za["input"][:, 0], za["labels"])
    assert _subset(src, None, tmp_path / "c.npz", 0) == src


def test_merge_previous_keeps_models_and_rows_not_rerun(tmp_path):
    import json

    from bench.run import merge_previous
    raw = tmp_path / "results_full.json"
    raw.write_text(json.dumps({"started": "yesterday", "command": "python -m bench.run", "results": [
        {"name": "fmnist", "notes": [], "rows": [{"key": "fp32", "label": "FP32", "v": 1},
                                                  {"key": "llc", "label": "llc", "v": 1}]},
        {"name": "smollm2", "notes": [], "rows": [{"key": "fp32", "label": "FP32", "v": 1}]}]}))
    now = [{"name": "fmnist", "notes": [], "rows": [{"key": "llc", "label": "llc", "v": 2}]},
           {"name": "effnet", "notes": [], "rows": [{"key": "fp32", "label": "FP32", "v": 3}]}]
    merged = merge_previous(now, raw)
    by = {m["name"]: m for m in merged}
    assert [m["name"] for m in merged] == ["fmnist", "smollm2", "effnet"]
    assert [(r["key"], r["v"]) for r in by["fmnist"]["rows"]] == [("fp32", 1), ("llc", 2)]  # fresh row replaces
    # every kept row carries its run; fresh rows carry theirs (set by main before merging), untouched here
    assert by["fmnist"]["rows"][0]["run"] == "yesterday (`python -m bench.run`)"
    assert "run" not in by["fmnist"]["rows"][1]
    assert by["smollm2"]["rows"][0]["run"] == "yesterday (`python -m bench.run`)"
    assert merge_previous(now, tmp_path / "missing.json") == now


def test_markdown_lists_the_runs_each_row_comes_from(tmp_path):
    from argparse import Namespace

    from bench.run import write_markdown
    row = {"status": "failed", "reason": "x", "seconds": 1.0}
    res = {"name": "fmnist", "title": "F", "metric": "top1", "loss": "ce", "calib": "c", "held": "h", "calib_n": 1,
           "held_n": 1, "measure_samples": 1, "nodes": 1, "fp_bytes": 4, "seconds_total": 60, "notes": [],
           "rows": [{**row, "key": "a", "label": "A", "run": "2026-01-01 (`cmd one`)"},
                    {**row, "key": "b", "label": "B", "run": "2026-01-02 (`cmd two`)"}]}
    mach = {k: "?" for k in ("cpus", "cpu", "python", "onnxruntime", "torch", "onnx", "numpy", "loadavg_at_end")}
    out = tmp_path / "R.md"
    write_markdown([res], Namespace(quick=False, command_line="cmd two", threads=2, repeats=3), out, "2026-01-02",
                   60, mach)
    text = out.read_text()
    assert "merges the rows of 2 runs" in text and "  - 2026-01-01 (`cmd one`)" in text
    assert "- rows from the run of 2026-01-01 (`cmd one`): A" in text
    assert "- rows from the run of 2026-01-02 (`cmd two`): B" in text


def test_standing_compares_llc_with_the_baselines_at_matching_points():
    from bench.run import standing

    def row(key, loss, ratio, verified=False):
        return {"key": key, "status": "ok", "held_loss": loss, "ratio": ratio, "bytes": int(ratio * 1000),
                "verified": verified}
    res = {"name": "m", "rows": [row("fp32", 1.0, 1.0), row("llc_lossless", 0.99, 0.25, True),
                                 row("ort_int8", 1.01, 0.26), row("llc_b25", 1.05, 0.25),
                                 row("hawq_b25", 1.02, 0.25), row("fisher_b25", 1.10, 0.25),
                                 {"key": "svd_uniform", "status": "n/a", "reason": "no target"},
                                 row("llc_lr_compact", 1.0, 1.0, True)]}
    text = "\n".join(standing([res], [0.25]))
    assert "| m | lossless / INT8 | 0.250×, held 0.9900 (-0.0100), verified |" in text
    assert "**llc-onnx**: verified, ORT INT8 is not" in text
    assert "**HAWQ-V2** lowest held loss, by 0.0300 over llc-onnx (llc-onnx +0.0300)" in text
    assert "plain SVD n/a: no target" in text
    assert "budget 0.15" not in text
