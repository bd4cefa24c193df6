"""bench.baselines and the benchmark's bookkeeping on real small models: the bundled Fashion-MNIST CNN
(examples/, a trained network with its own held-out images), the same network with its Gemms written as
MatMuls (what ONNX Runtime's weight-only quantizers rewrite), and the tiny labelled MLP of tests/_models.

Checked against independent computations: AutoQuantize scores against a hand-written torch forward and
backward; HAWQ traces against the exact trace from unit-vector Hessian-vector products; the allocation's
validation split against the one ``llc_onnx.optimize`` reports; byte counts against the formulas of the
formats; ONNX Runtime's quantizers by running their output."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from _models import mlp, torch_threads, write_mlp_files
from bench import baselines as B

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX_MODEL = os.path.join(REPO, "examples", "fashion_cnn.onnx")
EX_DATA = os.path.join(REPO, "examples", "fashion_data.npz")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _ce(logits, labels):
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return float((lse - z[np.arange(len(labels)), labels]).mean())


def example_with_matmuls(tmp_path) -> str:
    """The bundled CNN with each Gemm(transB=1, W, b) written as MatMul(W.T) + Add(b): same function."""
    m = onnx.load(EX_MODEL)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.op_type != "Gemm":
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        name = n.input[1] + "_T"
        m.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        mid = n.output[0] + "_mm"
        nodes += [helper.make_node("MatMul", [n.input[0], name], [mid], name=n.name + "_mm"),
                  helper.make_node("Add", [mid, n.input[2]], [n.output[0]], name=n.name + "_add")]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    keep = [t for t in m.graph.initializer if t.name not in {n.input[1] for n in onnx.load(EX_MODEL).graph.node
                                                              if n.op_type == "Gemm"}]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    onnx.checker.check_model(m)
    path = str(tmp_path / "fashion_mm.onnx")
    onnx.save(m, path)
    return path


# ------------------------------------------------------------------------------- ONNX Runtime's quantizers
def test_ort_weight_only_quantizers_on_a_real_model(tmp_path):
    from llc_onnx.calib.data import load_dataset

    path = example_with_matmuls(tmp_path)
    with np.load(EX_DATA) as z:
        x, y = z["input"][:500], z["labels"][:500]
    fp = onnx.load(path)
    fp_loss = _ce(_run(fp, {"input": x}), y)
    np.testing.assert_allclose(_run(fp, {"input": x}), _run(onnx.load(EX_MODEL), {"input": x}), atol=1e-4)
    shapes = [(784, 64), (64, 10)]  # (K, N) of the two MatMuls
    conv = sum(4 * int(np.prod(t.dims)) for t in fp.graph.initializer if len(t.dims) == 4)  # Convs stay float
    calib = load_dataset(EX_DATA, fp, batch_size=250)
    # (gptq asymmetric: ONNX Runtime 1.31 crashes when a column has an odd number of blocks, K = 784 here)
    for algo, sym in (("default", True), ("rtn", True), ("hqq", False), ("gptq", True)):
        out = tmp_path / f"{algo}.onnx"
        info = B.ort_weight_only(path, str(out), algo, 32, sym, calib if algo == "gptq" else None)
        q = onnx.load(out)
        mnb = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
        assert info["total_matmul"] == 2 and len(info["covered"]) == 2 and len(mnb) == 2, algo
        assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level")) == 4
                   for n in mnb)
        nbytes, count = B.weight_bytes(q)
        assert count == 4
        nbytes -= conv
        codes = sum(n * (-(-k // 32)) * 16 for k, n in shapes)  # 4-bit codes, whole blocks
        scales = sum(n * (-(-k // 32)) for k, n in shapes)
        if sym:  # symmetric: no zero points
            assert nbytes == codes + 4 * scales
        else:  # zero points (packed uint8 or float) on top
            assert codes + 4 * scales < nbytes <= codes + 8 * scales
        loss = _ce(_run(q, {"input": x}), y)
        assert abs(loss - fp_loss) < 0.05, (algo, loss, fp_loss)  # 4-bit keeps this model working


def test_ort_dynamic_int8_on_a_real_model_and_its_bytes(tmp_path):
    path = example_with_matmuls(tmp_path)
    with np.load(EX_DATA) as z:
        x, y = z["input"][:500], z["labels"][:500]
    fp = onnx.load(path)
    out = tmp_path / "dyn.onnx"
    B.ort_int8_dynamic(path, str(out))
    q = onnx.load(out)
    ops = {n.op_type for n in q.graph.node}
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    assert sum(n.op_type in ("MatMulInteger", "ConvInteger") for n in q.graph.node) == 4
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    expect = sum(inits[n.input[1]].nbytes + inits[n.input[3]].nbytes + inits[n.input[1].removesuffix("_quantized")
                                                                           + "_scale"].nbytes
                 for n in q.graph.node if n.op_type in ("MatMulInteger", "ConvInteger"))
    assert all(inits[n.input[1]].dtype == np.int8 for n in q.graph.node if n.op_type == "MatMulInteger")
    nbytes, count = B.weight_bytes(q)
    assert (nbytes, count) == (expect, 4)
    assert nbytes < 0.3 * B.weight_bytes(fp)[0]  # int8 codes: a quarter of float32, plus scales
    assert abs(_ce(_run(q, {"input": x}), y) - _ce(_run(fp, {"input": x}), y)) < 0.05


def test_ort_weight_only_needs_matmuls():
    with pytest.raises(B.NotApplicable, match="MatMul"):
        B.ort_weight_only(EX_MODEL, "/nonexistent/out.onnx")  # Conv + Gemm only


def test_weight_bytes_float_and_qdq_and_matmulnbits(tmp_path):
    from llc_onnx.passes.qdq import apply_qdq
    from llc_onnx.quant import WeightQuantSpec, quantize_weight

    m, w = mlp(0, d_in=64, hidden=48)
    assert B.weight_bytes(m) == (4 * (w["W1"].size + w["W2"].size), 2)  # biases not counted
    q1 = quantize_weight(w["W1"].astype(np.float64), WeightQuantSpec(4, 32), 0, 1)  # Gemm transB: [N, K]
    q2 = quantize_weight(w["W2"].astype(np.float64), WeightQuantSpec(8, None), 1, 0)
    qm = apply_qdq(m, {"fc1": q1, "fc2": q2})
    assert B.weight_bytes(qm)[0] == q1.nbytes + q2.nbytes


# ---------------------------------------------------------------------------------------- quantized weights
def test_dequant_matches_the_quantizer_in_every_layout():
    from llc_onnx.quant import WeightQuantSpec, quantize_weight

    rng = np.random.default_rng(0)
    for shape, spec, out_axis, red_axis in (((40, 24), WeightQuantSpec(8, None), 1, 0),
                                            ((40, 24), WeightQuantSpec(4, 32), 1, 0),
                                            ((24, 70), WeightQuantSpec(2, 32), 0, 1),
                                            ((6, 5, 3, 3), WeightQuantSpec(4, 32), 0, 1),
                                            ((6, 5, 3, 3), WeightQuantSpec(16, None), 0, 1)):
        wt = rng.normal(size=shape)
        qw = quantize_weight(wt, spec, out_axis, red_axis)
        compact = qw.__class__(**{**qw.__dict__, "q": qw.q.astype(np.int16), "dequant": None})
        assert np.array_equal(B.dequant(compact, shape), qw.dequant), (shape, spec)


def test_unit_model_reproduces_the_node_inside_the_graph():
    from llc_onnx.compressible import find_compressible
    from llc_onnx.interpreter import TorchGraph
    from llc_onnx.model_io import load_model, prepare_model

    model = prepare_model(load_model(EX_MODEL))
    g = TorchGraph(model)
    with np.load(EX_DATA) as z:
        feeds = {"input": z["input"][:16]}
    nodes, _ = find_compressible(model)
    assert {n.op_type for n in nodes} == {"Conv", "Gemm"}
    by_name = {n.name: n for n in model.graph.node}
    for node in nodes:
        proto = by_name[node.name]
        x = g.run(feeds, outputs=[node.input])[0][node.input]
        y = g.run(feeds, outputs=[proto.output[0]])[0][proto.output[0]]
        unit = TorchGraph(B.unit_model(model, node.name))
        got = unit.run({unit.input_names[0]: x})[0][unit.output_names[0]]
        assert torch.equal(got, y), node.name


# ----------------------------------------------------------------------------------------- AutoQuantize
def _mlp_context(tmp_path, target="qdq", **kw):
    mpath, dpath = write_mlp_files(tmp_path, n=400, d_in=16, hidden=32)
    test = tmp_path / "test.npz"
    with np.load(dpath) as z:
        np.savez(test, x=z["x"][:100], labels=z["labels"][:100])
    ctx = B.baseline_context(mpath, dpath, str(test), batch_size=64, measure_samples=None, target=target, **kw)
    return ctx, mpath, dpath, str(test)


def test_autoquant_score_is_modelopts_formula(tmp_path):
    ctx, *_ = _mlp_context(tmp_path)
    quantized = B.quantize_all(ctx)
    scores = B.autoquant_scores(ctx, quantized)
    f32 = torch.float32
    w = {n.name: torch.as_tensor(ctx.weight_array(n), dtype=f32) for n in ctx.nodes}
    b1, b2 = (ctx.graph.params[k].detach().to(f32) for k in ("b1", "b2"))
    expect = {k: 0.0 for k in scores}
    for batch in ctx.calib.batches:  # by hand: y1 = x W1ᵀ + b1 (fc1), y2 = relu(y1) W2 (fc2), logits = y2 + b2
        x = torch.as_tensor(batch.inputs["x"], dtype=f32)
        y1 = x @ w["fc1"].T + b1
        r = torch.relu(y1)
        y2 = (r @ w["fc2"]).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy((y2 + b2).double(), torch.as_tensor(batch.labels))  # batch mean
        g2, = torch.autograd.grad(loss, [y2])
        g2 = g2.double()
        g1 = (g2 @ w["fc2"].T.double()) * (y1 > 0)  # ∂L/∂y1 through fc2 and the relu
        for node, fmt in scores:
            wq = torch.as_tensor(B.dequant(quantized.weights[(node, fmt)], tuple(w[node].shape)), dtype=f32)
            if node == "fc1":
                d = (x @ wq.T + b1).double() - y1.double()
                expect[(node, fmt)] += float((g1 ** 2 * d ** 2).sum())
            else:
                d = (r @ wq).double() - y2.detach().double()
                expect[(node, fmt)] += float((g2 ** 2 * d ** 2).sum())
    for k in scores:
        assert scores[k] == pytest.approx(expect[k], rel=1e-3), k
    for node in ("fc1", "fc2"):  # fewer bits, more output noise, higher score
        s = [scores[(node, f)] for f in ("qdq-int2-b32", "qdq-int4-b32", "qdq-int8", "qdq-int16")]
        assert s == sorted(s, reverse=True) and s[-1] < 1e-6 * s[0]


def test_monotone_never_lets_more_bits_cost_more(tmp_path):
    ctx, *_ = _mlp_context(tmp_path)
    q = B.quantize_all(ctx)
    raw = {k: 1.0 for k in q.delta_sq}
    raw[("fc1", "qdq-int2-b32")] = 0.5  # a noisy score: int2 cheaper than int4
    raw[("fc1", "float")] = 3.0
    mono = B.monotone(raw, q, ctx.nodes)
    assert mono[("fc1", "qdq-int4-b32")] == 0.5 and mono[("fc1", "qdq-int16")] == 0.5
    assert mono[("fc1", "float")] == 0.0 and mono[("fc2", "qdq-int8")] == 1.0


# ------------------------------------------------------------------------------------------------ HAWQ
def test_hawq_trace_converges_to_the_exact_trace(tmp_path):
    from llc_onnx.solvers.hessian import hvp

    ctx, *_ = _mlp_context(tmp_path)
    exact = {}
    for n in ctx.nodes:
        shape = ctx.weight_array(n).shape
        tr = 0.0
        for i in range(int(np.prod(shape))):
            e = np.zeros(int(np.prod(shape)))
            e[i] = 1.0
            tr += float(hvp(ctx.graph, ctx.calib, ctx.loss, [n.name], {n.name: e.reshape(shape)},
                            max_batches=1)[n.name].reshape(-1)[i])
        exact[n.name] = tr
    for per_node in (True, False):
        got = B.hawq_traces(ctx, probes=16, max_probes=64, max_batches=1, per_node=per_node)
        for n, t in got.items():
            assert t["probes"] in (16, 32, 48, 64) and t["se"] > 0
            assert abs(t["trace"] - exact[n]) <= 4 * t["se"], (n, t, exact[n])
            assert t["sensitivity"] > 0 and not t["clamped"]
    # deflated: per-node probe counts (each node stops at its own target), the same trace within 4 SE
    got = B.hawq_traces(ctx, probes=8, max_probes=64, max_batches=1, deflate=4)
    for n, t in got.items():
        assert t["steps"] == 4 and t["probes"] in (8, 16, 24, 32, 40, 48, 56, 64)
        assert t["stable"] or t["probes"] == 64
        assert abs(t["trace"] - exact[n]) <= 4 * t["se"] + 1e-12, (n, t, exact[n])
        assert t["krylov"] != t["trace"] and t["sensitivity"] > 0
    assert all(v > 0 for v in exact.values())


def test_gauss_newton_traces_match_the_closed_form_of_the_last_layer(tmp_path):
    """fc2 (logits = relu(y1)·W2 + b2) under cross-entropy: tr(GGN) = (1/N) Σ_s ‖r_s‖² (1 − ‖p_s‖²)."""
    ctx, *_ = _mlp_context(tmp_path)
    got = B.gauss_newton_traces(ctx)
    n = ctx.calib.n_samples
    f32 = torch.float32
    w1, w2 = (torch.as_tensor(ctx.weight_array(x), dtype=f32) for x in ctx.nodes)
    b1, b2 = (ctx.graph.params[k].detach().to(f32) for k in ("b1", "b2"))
    exact = 0.0
    for batch in ctx.calib.batches:
        r = torch.relu(torch.as_tensor(batch.inputs["x"], dtype=f32) @ w1.T + b1).double()
        p = torch.softmax((r @ w2.double() + b2.double()), dim=1)
        exact += float(((r ** 2).sum(1) * (1 - (p ** 2).sum(1))).sum()) / n
    t = got["fc2"]
    assert abs(t["trace"] - exact) <= 4 * t["se"] and t["se"] <= 0.1 * exact, (t, exact)
    for v in got.values():
        assert v["probes"] == n and v["curvature"] == "gauss-newton" and v["sampled"]
        assert v["trace"] > 0 and v["sensitivity"] == v["trace"] and not v["clamped"] and v["stable"]
    assert got == B.gauss_newton_traces(ctx)          # labels drawn from a fixed seed: the same traces


def test_sensitivity_is_never_free():
    got = B.sensitivities({"a": (5.0, 0.2), "b": (-0.3, 0.4), "c": (0.0, 0.0), "d": (0.1, 0.4), "e": (0.5, 0.4)},
                          probes=32)
    assert got["a"]["sensitivity"] == 5.0 and not got["a"]["clamped"] and got["a"]["stable"]
    assert got["b"]["clamped"] and got["b"]["sensitivity"] == 0.4  # a negative trace counts as its SE
    assert got["c"]["clamped"] and 0 < got["c"]["sensitivity"] <= 1e-11
    # a small positive trace below its SE counts as its SE too: not cheaper than the negative one
    assert got["d"]["clamped"] and got["d"]["sensitivity"] == got["b"]["sensitivity"]
    assert not got["e"]["clamped"] and got["e"]["sensitivity"] == 0.5 and not got["e"]["stable"]
    assert all(v["probes"] == 32 for v in got.values())


# ------------------------------------------------------------------------------------ allocation + back-off
def test_allocation_uses_llcs_validation_split_and_selection(tmp_path):
    import llc_onnx
    from llc_onnx.config import DataConfig, OptimizeConfig, QuantConfig, TargetConfig
    from llc_onnx.verify import plan_bytes

    ctx, mpath, dpath, test = _mlp_context(tmp_path)
    res = llc_onnx.optimize(mpath, dpath, OptimizeConfig(data=DataConfig(batch_size=64),
                                                         quant=QuantConfig(budget=0.25),
                                                         target=TargetConfig(name="qdq", measure_latency=False)),
                            held=test)
    val = res.splits["validation"]
    assert val.n == ctx.val.n_samples and val.source == ctx.val.source
    assert val.reference.loss == pytest.approx(ctx.val_fp.loss, rel=1e-12)  # same samples, same session
    assert res.splits["test"].reference.loss == pytest.approx(ctx.evaluate(ctx.model, ctx.test).loss, rel=1e-12)
    q = B.quantize_all(ctx)
    numel = {n.name: int(np.prod(n.weight_shape)) for n in ctx.nodes}
    bits = {"qdq-int2-b32": 2, "qdq-int4-b32": 4, "qdq-int8": 8, "qdq-int16": 16, "float": 32}
    plans = {}
    for hot, cold in (("fc1", "fc2"), ("fc2", "fc1")):  # at 0.3 × float bytes either node can keep 8+ bits
        traces = {hot: {"sensitivity": 10.0}, cold: {"sensitivity": 0.01}}
        costs = B.monotone(B.hawq_costs(q, traces, numel), q, ctx.nodes)
        a = B.allocation(ctx, q, costs, 0.3, "hawq")
        plans[hot] = {n: bits[lv] for n, lv in a.solver_plan.items()}
    assert plans["fc1"]["fc1"] > plans["fc2"]["fc1"] and plans["fc2"]["fc2"] > plans["fc1"]["fc2"]
    assert a.budget_bytes == int(0.3 * ctx.float_bytes())
    sel = a.selection
    assert sel.trials[0].name == "hawq" and {t.name for t in sel.trials[1:]} <= {"uniform int2", "uniform int4",
                                                                                 "uniform int8", "uniform int16",
                                                                                 *{f"back-off round {i}" for i in range(9)}}
    assert all(t.nbytes <= a.budget_bytes for t in sel.trials)
    # the kept plan is the selection's, measured on the validation split in the target's session
    assert ctx.evaluate(a.model, ctx.val).loss == pytest.approx(sel.trial.val_loss, rel=1e-12)
    assert B.weight_bytes(a.model)[0] == sel.trial.nbytes
    s = B.selection_summary(sel)
    assert s["chosen_plan"] == sel.trial.name and s["first_plan_passed"] == sel.first_plan_passed
    assert s["backoff_rounds"] == sum(t.name.startswith("back-off") for t in sel.trials)
    assert plan_bytes  # (imported: the same byte accounting as llc's selection)


def test_baselines_are_the_same_when_the_weights_are_held(tmp_path, monkeypatch):
    """A large model's context holds its weights in the interpreter from its creation on
    (``FlowContext.hold_weights``); AutoQuantize's one-node models and the allocation's plans read them from the
    model, so the baselines put them back first: the same scores and the same written model as without holding."""
    from llc_onnx.flows import context as C
    from llc_onnx.model_io import save_model

    def run(d):
        d.mkdir()
        ctx, *_ = _mlp_context(d)
        q = B.quantize_all(ctx)
        scores = B.autoquant_scores(ctx, q)
        a = B.allocation(ctx, q, B.monotone(scores, q, ctx.nodes), 0.3, "autoquant")
        save_model(a.model, str(d / "o.onnx"))
        return ctx._hold.names, scores, (d / "o.onnx").read_bytes()

    names, plain, plain_bytes = run(tmp_path / "plain")
    monkeypatch.setattr(C, "HOLD_BYTES", 1)
    held_names, held, held_bytes = run(tmp_path / "held")
    assert not names and held_names  # the second context held its weights
    assert held == plain and held_bytes == plain_bytes


# ------------------------------------------------------------------------------------------ uniform SVD
def test_svd_matcher_from_below():
    shapes = {"a": (64, 48), "b": (288, 32), "c": (10, 10)}
    full = sum(k * n for k, n in shapes.values())
    target = int(0.4 * full)
    frac, params, ranks = B.match_uniform_fraction(shapes, target)
    assert params <= target and params == B.svd_params(shapes, frac)[0]
    for i in range(1, 4001):
        p = B.svd_params(shapes, i / 4000)[0]
        assert p > target or p <= params
    assert B.svd_rank(10, 10, 0.5) is None and B.svd_rank(10, 10, 0.4) == 4
    assert B.match_uniform_fraction(shapes, 10) is None


def test_uniform_svd_model_runs_and_counts_params():
    from llc_onnx.compressible import find_compressible

    m, w = mlp(0, d_in=64, hidden=48)
    nodes, _ = find_compressible(m)
    shapes = {n.name: B.matrix_shape(n) for n in nodes}
    assert shapes == {"fc1": (64, 48), "fc2": (48, 4)}
    frac, params, ranks = B.match_uniform_fraction(shapes, 64 * 48 // 2 + 48 * 4)
    model = B.uniform_svd(m, nodes, {n.name: w[n.weight] for n in nodes}, ranks)
    assert B.weight_bytes(model)[0] == 4 * params
    full = B.uniform_svd(m, nodes, {n.name: w[n.weight] for n in nodes}, {"fc1": 48, "fc2": None})
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(full, {"x": x}), _run(m, {"x": x}), atol=1e-4)


# ---------------------------------------------------------------------------------------- bookkeeping
def test_quick_subset_deterministic(tmp_path):
    from bench.models import _subset

    src = tmp_path / "d.npz"
    np.savez(src, input=np.arange(100, dtype=np.float32)[:, None], labels=np.arange(100))
    a = _subset(src, 10, tmp_path / "a.npz", 0)
    b = _subset(src, 10, tmp_path / "b.npz", 0)
    with np.load(a) as za, np.load(b) as zb:
        assert sorted(za.files) == ["input", "labels"]
        assert np.array_equal(za["labels"], zb["labels"]) and len(za["labels"]) == 10
    assert _subset(src, None, tmp_path / "c.npz", 0) == src


def test_json_check_flags_every_difference():
    from bench.run import json_check

    llc = {"objective": "task", "test_compressed": 0.25, "test_reference": 0.24, "bytes": 1000}
    row = {"llc": llc, "test_loss": 0.25, "bytes": 1000}
    assert json_check(row, {"test_loss": 0.24}) == {"checked": ["test loss", "FP32 test loss", "bytes"],
                                                    "mismatches": []}
    bad = json_check({**row, "test_loss": 0.2501, "bytes": 1004}, {"test_loss": 0.24})["mismatches"]
    assert len(bad) == 2 and bad[0].startswith("test loss") and bad[1].startswith("bytes")
    fid = {"objective": "fidelity", "test_compressed": 0.003, "task_test_compressed": 0.3, "task_test_reference": 0.29,
           "bytes": 5}
    out = json_check({"llc": fid, "kl_fp": 0.003, "test_loss": 0.31, "bytes": 5}, {"test_loss": 0.29})
    assert out["checked"] == ["test KL to FP32", "test task loss", "FP32 test task loss", "bytes"]
    assert len(out["mismatches"]) == 1 and out["mismatches"][0].startswith("test task loss")


def test_merge_previous_keeps_models_and_rows_not_rerun(tmp_path):
    import json

    from bench.run import merge_previous
    raw = tmp_path / "results_full_v2.json"
    raw.write_text(json.dumps({"started": "yesterday", "command": "python -m bench.run", "results": [
        {"name": "fmnist", "rows": [{"key": "fp32", "v": 1}, {"key": "llc", "v": 1}]},
        {"name": "smollm2", "rows": [{"key": "fp32", "v": 1}]}]}))
    now = [{"name": "fmnist", "rows": [{"key": "llc", "v": 2}]}, {"name": "effnet", "rows": [{"key": "fp32", "v": 3}]}]
    merged = merge_previous(now, raw)
    by = {m["name"]: m for m in merged}
    assert [m["name"] for m in merged] == ["fmnist", "smollm2", "effnet"]
    assert [(r["key"], r["v"]) for r in by["fmnist"]["rows"]] == [("fp32", 1), ("llc", 2)]
    assert by["fmnist"]["rows"][0]["run"] == "yesterday (`python -m bench.run`)" and "run" not in by["fmnist"]["rows"][1]
    assert merge_previous(now, tmp_path / "missing.json") == now


def _row(key, family, loss, ratio, verified=False, **kw):
    return {"key": key, "label": key, "family": family, "target": "qdq", "status": "ok", "test_loss": loss,
            "ratio": ratio, "bytes": int(ratio * 1000), "verified": verified, "kl_fp": 0.001,
            "test_metrics": {"top1": 0.9}, "agree_fp_top1": 0.99, **kw}


def test_standing_compares_at_matching_points():
    from bench.markdown import standing

    sel = {"backoff_rounds": 0, "first_plan_passed": True, "chosen_plan": "solver", "plans": []}
    res = {"name": "m", "latency_batches": [1, 64], "rows": [
        _row("fp32", "fp32", 1.0, 1.0),
        _row("llc_cpu_lossless", "llc", 0.99, 0.25, True, selection=sel,
             latency=[{"batch": 1, "speedup": 1.6}, {"batch": 64, "speedup": 1.7}]),
        _row("ort_int8", "ort", 1.01, 0.26, latency=[{"batch": 1, "speedup": 1.2}, {"batch": 64, "speedup": 1.3}]),
        _row("llc_qdq_b25", "llc", 1.05, 0.25, selection={**sel, "first_plan_passed": False}),
        _row("hawq_b25", "alloc", 1.02, 0.25, selection=sel), _row("autoquant_b25", "alloc", 1.10, 0.25, selection=sel),
        {"key": "svd_uniform", "family": "svd", "status": "n/a", "reason": "no target"},
        _row("llc_lr_compact", "lowrank", 1.0, 1.0, True)]}
    text = "\n".join(standing([res]))
    assert "| m | lossless, ort-cpu / ORT INT8 | 0.250×, test 0.9900 (-0.0100), verified; b=1 1.60×, b=64 1.70× |" in text
    assert "llc-onnx smaller, test loss lower by 0.0200 than ORT INT8; at least as fast as it at every batch" in text
    assert "issue 12 done-when (lossless ort-cpu)" in text and "| **met** |" in text
    assert "**HAWQ-V2** lowest test loss, by 0.0300 over llc-onnx" in text
    assert "plain SVD n/a: no target" in text and "budget 0.15" not in text
    assert "first plan passed the validation split in **3 of 4**" in text


def test_markdown_lists_runs_and_checks(tmp_path):
    from argparse import Namespace

    from bench.markdown import write_markdown
    fail = {"status": "failed", "reason": "x", "seconds": 1.0, "family": "llc", "target": "qdq"}
    llc = {"objective": "task", "test_compressed": 0.5, "test_reference": 1.0, "bytes": 250}
    res = {"name": "fmnist", "title": "F", "metric": "top1", "loss": "ce", "calib": "c", "test": "t", "test_n": 1,
           "measure_samples": 1, "nodes": 1, "fp_bytes": 1000, "seconds_total": 60, "notes": [], "splits": None,
           "rows": [{**_row("fp32", "fp32", 1.0, 1.0), "run": "2026-01-02 (`cmd two`)"},
                    {**_row("llc_qdq_b25", "llc", 0.5, 0.25), "llc": llc, "run": "2026-01-02 (`cmd two`)",
                     "json_check": {"checked": ["test loss", "bytes"], "mismatches": []}},
                    {**fail, "key": "a", "label": "A", "run": "2026-01-01 (`cmd one`)"}]}
    mach = {k: "?" for k in ("cpus", "cpu", "python", "onnxruntime", "torch", "onnx", "numpy", "loadavg_at_end")}
    out = tmp_path / "R.md"
    write_markdown([res], Namespace(quick=False, command_line="cmd two", threads=2), out, "2026-01-02", 60, mach)
    text = out.read_text()
    assert "merges the rows of 2 runs" in text and "- rows from the run of 2026-01-01 (`cmd one`): A" in text
    assert "All 1 llc rows: bytes, test loss measured here equal the result JSON's" in text
    assert "| A | qdq | – |" in text and "**failed**: x" in text
    assert "same `verify.select_plan` on the same validation split" in text
