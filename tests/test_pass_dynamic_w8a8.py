"""DynamicW8A8Pass and the ort-cpu target's dynamic W8A8 format: ORT must fuse what the pass writes into its
integer kernel, compute what the spec of DynamicQuantizeLinear → MatMulInteger means, and the interpreter's
hook (what candidates are measured with) must reproduce ORT's output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from _models import ort_session
from llc_onnx.compressible import find_compressible
from llc_onnx.errors import LLCError
from llc_onnx.passes.dynamic_w8a8 import apply_dynamic_w8a8
from llc_onnx.quant import WeightQuantSpec, dynamic_uint8_fake_quant, quantize_weight
from llc_onnx.targets.base import GraphContext, NodePlan, input_hook
from llc_onnx.targets.ort_cpu import NO_DYNAMIC, OrtCpuTarget, int8_full_range_exact

#: why ONNX Runtime's int8 kernels saturate full-range (8-bit) weight codes on this CPU; None where they do not
SATURATES = int8_full_range_exact()


def token_mlp(seed=0, d=16, h=24, c=5):
    """x [B, T, d] → MatMul(W1) → Relu → MatMul(W2) + x → ReduceMean(T) → MatMul(W3) → logits [B, c]; W1 and a
    second MatMul (Wg) read the same x, as q/k/v projections do."""
    rng = np.random.default_rng(seed)
    w = {"W1": rng.normal(0, 0.3, (d, h)), "Wg": rng.normal(0, 0.3, (d, h)), "W2": rng.normal(0, 0.3, (h, d)),
         "W3": rng.normal(0, 0.3, (d, c))}
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             oh.make_node("MatMul", ["x", "Wg"], ["g"], name="mmg"),
             oh.make_node("Mul", ["a", "g"], ["ag"], name="gate"),
             oh.make_node("Relu", ["ag"], ["r"], name="relu"),
             oh.make_node("MatMul", ["r", "W2"], ["b"], name="mm2"),
             oh.make_node("Add", ["b", "x"], ["res"], name="residual"),
             oh.make_node("ReduceMean", ["res", "axes"], ["pooled"], name="pool", keepdims=0),
             oh.make_node("MatMul", ["pooled", "W3"], ["logits"], name="head")]
    inits = [nh.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits.append(nh.from_array(np.array([1], np.int64), "axes"))
    g = oh.make_graph(nodes, "token_mlp", [oh.make_tensor_value_info("x", TP.FLOAT, ["B", "T", d])],
                      [oh.make_tensor_value_info("logits", TP.FLOAT, ["B", c])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m


def weights(model):
    return {t.name: nh.to_array(t) for t in model.graph.initializer}


def plan(w, bits=7):
    return quantize_weight(w, WeightQuantSpec(bits, None), out_axis=1, reduce_axis=0)


def run(model, x, optimized=True, path=None):
    return ort_session(model, optimized, path).run(None, {"x": x})[0]


def reference(model, plans, x):
    """numpy: every planned MatMul's input quantized per tensor as the ONNX spec says, weights dequantized."""
    w = weights(model)

    def dq(t):
        lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
        s = np.float32((hi - lo) / 255.0)
        z = np.clip(np.round(-lo / s), 0, 255)
        q = np.clip(np.round(t / s) + z, 0, 255)
        return ((q - z) * s).astype(np.float32)

    def mm(t, name, node):
        if node in plans:
            return dq(t) @ (plans[node].q.astype(np.float32) * plans[node].scale.reshape(1, -1))
        return t @ w[name]

    a, g = mm(x, "W1", "mm1"), mm(x, "Wg", "mmg")
    b = mm(np.maximum(a * g, 0), "W2", "mm2") + x
    return mm(b.mean(axis=1), "W3", "head")


@pytest.mark.parametrize("bits", [7, 8])
def test_ort_fuses_it_and_computes_the_spec(tmp_path, bits):
    m = token_mlp()
    w = weights(m)
    plans = {"mm1": plan(w["W1"], bits), "mmg": plan(w["Wg"], bits), "mm2": plan(w["W2"], bits)}
    before = m.SerializeToString()
    out = apply_dynamic_w8a8(m, plans)
    assert m.SerializeToString() == before                      # the input model is not modified
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulInteger") == 3 and ops.count("DynamicQuantizeLinear") == 2   # x quantized once
    assert ops.count("MatMul") == 1                               # the head stays float
    assert {n.name for n in out.graph.node if n.op_type == "MatMulInteger"} == {"mm1", "mmg", "mm2"}
    init = {t.name: t for t in out.graph.initializer}
    codes = [nh.to_array(init[n.input[1]]) for n in out.graph.node if n.op_type == "MatMulInteger"]
    assert all(c.dtype == np.int8 for c in codes)
    if bits == 7:
        assert all(c.min() >= -64 and c.max() <= 63 for c in codes)
    assert not any(t.data_type == TP.FLOAT and tuple(t.dims) == (16, 24) for t in out.graph.initializer)
    x = np.random.default_rng(1).normal(0, 1, (3, 7, 16)).astype(np.float32)
    ref = reference(m, plans, x)
    if bits == 8 and SATURATES:
        pytest.skip(f"ORT's kernels compute full-range codes inexactly here ({SATURATES}); "
                    "optimize refuses --w8a8-codes 8 on this CPU")
    fused = run(out, x, path=tmp_path / "opt.onnx")
    np.testing.assert_allclose(run(out, x, optimized=False), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused, ref, rtol=1e-4, atol=1e-4)
    opt_ops = {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node}
    assert "DynamicQuantizeMatMul" in opt_ops or "MatMulIntegerToFloat" in opt_ops, opt_ops
    assert "MatMulInteger" not in opt_ops
    # and it is not the float model: the activations were quantized
    assert np.abs(fused - run(m, x)).max() > 1e-4


def test_interpreter_hook_reproduces_ort(tmp_path):
    """What a candidate is measured with (the input hook + dequantized weight in the interpreter) equals the
    written model's output in ONNX Runtime's default session."""
    from llc_onnx.interpreter import TorchGraph
    from llc_onnx.targets.base import Format

    m = token_mlp(seed=3)
    w = weights(m)
    fmt = Format("w8a8", 8, None, code_bits=7, activations="dynamic")
    plans = {"mm1": plan(w["W1"]), "mm2": plan(w["W2"])}
    x = np.random.default_rng(2).normal(0, 1, (2, 5, 16)).astype(np.float32)
    graph = TorchGraph(m)
    hook = input_hook(NodePlan(format=fmt, weight=plans["mm1"]))
    assert hook is dynamic_uint8_fake_quant
    weight_fns = {n: (lambda _w, q=p: torch.as_tensor(q.dequant)) for n, p in plans.items()}
    got = graph.run({"x": torch.as_tensor(x)}, weight_fns=weight_fns, input_fns={n: hook for n in plans})
    got = got[0]["logits"]                      # (outputs, captured)
    ort_out = run(apply_dynamic_w8a8(m, plans), x)
    np.testing.assert_allclose(got.detach().numpy(), ort_out, rtol=1e-4, atol=1e-4)


def test_fake_quant_follows_the_onnx_spec():
    x = torch.tensor([[-1.0, 0.5, 2.0, 0.0], [3.0, -0.25, 1e-3, 1.5]])
    y = dynamic_uint8_fake_quant(x)
    lo, hi = -1.0, 3.0
    s = np.float32((hi - lo) / 255)
    z = np.round(-lo / s)
    ref = (np.clip(np.round(x.numpy() / s) + z, 0, 255) - z) * s
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-7)
    pos = torch.tensor([0.5, 1.0, 2.0])       # the range always holds 0: codes from zero point 0
    assert float(dynamic_uint8_fake_quant(pos)[0]) == pytest.approx(round(0.5 / (2 / 255)) * 2 / 255)
    zeros = torch.zeros(3)
    assert dynamic_uint8_fake_quant(zeros) is zeros
    g = torch.ones(4, requires_grad=True)                # straight-through gradient
    dynamic_uint8_fake_quant(g * 2).sum().backward()
    assert torch.equal(g.grad, torch.full((4,), 2.0))


def test_bad_plans_are_one_line_errors():
    m = token_mlp()
    w = weights(m)
    gemm = oh.make_model(oh.make_graph([oh.make_node("Gemm", ["x", "W"], ["y"], name="fc")], "g",
                                       [oh.make_tensor_value_info("x", TP.FLOAT, [2, 4])],
                                       [oh.make_tensor_value_info("y", TP.FLOAT, [2, 3])],
                                       [nh.from_array(np.ones((4, 3), np.float32), "W")]),
                         opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    with pytest.raises(LLCError, match="node 'fc' \\(op Gemm\\): dynamic W8A8 applies to MatMul only"):
        apply_dynamic_w8a8(gemm, {"fc": plan(np.ones((4, 3), np.float32))})
    blocked = quantize_weight(w["W1"], WeightQuantSpec(8, 8), out_axis=1, reduce_axis=0)
    with pytest.raises(LLCError, match="node 'mm1'.*per output channel"):
        apply_dynamic_w8a8(m, {"mm1": blocked})
    with pytest.raises(LLCError, match="node 'mm1'.*bits=4"):
        apply_dynamic_w8a8(m, {"mm1": quantize_weight(w["W1"], WeightQuantSpec(4, None), out_axis=1,
                                                      reduce_axis=0)})
    with pytest.raises(LLCError, match="node 'nope'"):
        apply_dynamic_w8a8(m, {"nope": plan(w["W1"])})


def test_target_offers_dynamic_w8a8_on_request_for_matmul_only():
    m = token_mlp()
    nodes = find_compressible(m)[0]
    ctx = GraphContext(m)
    default = OrtCpuTarget()
    names = lambda t, n: t.offer(n, ctx, levels=(8, "float")).names()  # noqa: E731
    mm1 = next(n for n in nodes if n.name == "mm1")
    assert "w8a8-int8c7-adyn" not in names(default, mm1)            # static only unless asked for
    both = OrtCpuTarget(w8a8_activations="both")
    assert {"w8a8-int8c7-auint8", "w8a8-int8c7-adyn"} <= set(names(both, mm1))
    dyn = OrtCpuTarget(w8a8_activations="dynamic", w8a8_code_bits=8)
    got = names(dyn, mm1)
    assert "w8a8-int8-adyn" in got and "w8a8-int8-auint8" not in got
    with pytest.raises(LLCError, match="w8a8_activations"):
        OrtCpuTarget(w8a8_activations="sometimes")
    # a Gemm keeps static W8A8, and the report says why it has no dynamic form
    gemm = oh.make_model(oh.make_graph([oh.make_node("Gemm", ["x", "W"], ["y"], name="fc")], "g",
                                       [oh.make_tensor_value_info("x", TP.FLOAT, [2, 4])],
                                       [oh.make_tensor_value_info("y", TP.FLOAT, [2, 3])],
                                       [nh.from_array(np.ones((4, 3), np.float32), "W")]),
                         opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    offer = both.offer(find_compressible(gemm)[0][0], GraphContext(gemm), levels=(8, "float"))
    assert "w8a8-int8c7-adyn" not in offer.names() and ("int8 (dynamic W8A8)", NO_DYNAMIC) in offer.refused
    # the target's rewrite writes the dynamic plans (and nothing calibrated is needed for them)
    fmt = next(f for f in both.offer(mm1, ctx, levels=(8,)).formats if f.dynamic)
    assert both.tensors_to_calibrate(m, "mm1", fmt) == (None, None)
    w = weights(m)
    out = both.rewrite(m, {"mm1": NodePlan(format=fmt, weight=plan(w["W1"]))}).model
    assert [n.op_type for n in out.graph.node].count("MatMulInteger") == 1


def test_optimize_writes_dynamic_w8a8_and_auto_asks_for_it_with_a_latency_budget(tmp_path):
    """End to end on a token model (3-D MatMuls, as in a transformer): ``--w8a8-activations dynamic`` and a
    budget that only 8-bit levels meet give every MatMul dynamic W8A8; the saved model runs in ONNX Runtime
    with the fused kernel and its loss is the one the result reports. ``auto`` offers it only with a latency
    budget, so runs without one keep their formats (and their cost-cache keys)."""
    import llc_onnx
    from llc_onnx.config import ConfigError, OptimizeConfig, QuantConfig, TargetConfig
    from llc_onnx.flows.context import w8a8_activations

    from _models import save_npz, teacher_labels

    m = token_mlp(seed=5)
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (240, 6, 16)).astype(np.float32)
    y = teacher_labels(run(m, x), seed=7, flip=0.1)
    mpath, dpath = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save_model(m, str(mpath))
    save_npz(dpath, y, x=x)
    cfg = OptimizeConfig(target=TargetConfig(w8a8_activations="dynamic", measure_latency=False),
                         quant=QuantConfig(bits=(8, "float"), budget=0.33))
    res = llc_onnx.optimize(str(mpath), str(dpath), cfg)
    levels = {n.node: str(n.level) for n in res.stages[-1].nodes}
    assert levels == dict.fromkeys(("mm1", "mmg", "mm2", "head"), "w8a8-int8c7-adyn"), levels
    path = res.save(str(tmp_path / "out.onnx"), force=True)
    out = onnx.load(path)
    assert [n.op_type for n in out.graph.node].count("MatMulInteger") == 4
    assert not any(n.op_type in ("QuantizeLinear", "MatMulNBits") for n in out.graph.node)
    assert np.isfinite(run(out, x[:4])).all()
    # both forms offered: each MatMul is measured in both, and the plan (same bytes) takes either
    both = OptimizeConfig(target=TargetConfig(w8a8_activations="both", measure_latency=False),
                          quant=QuantConfig(bits=(8, "float"), budget=0.33))
    res2 = llc_onnx.optimize(str(mpath), str(dpath), both)
    st = res2.stages[-1]
    measured = {(c.node, c.level) for c in st.candidates}
    for n in ("mm1", "mmg", "mm2", "head"):
        assert {(n, "w8a8-int8c7-adyn"), (n, "w8a8-int8c7-auint8")} <= measured
    assert {str(d.level) for d in st.nodes} <= {"w8a8-int8c7-adyn", "w8a8-int8c7-auint8"}
    with pytest.raises(ConfigError):
        TargetConfig(name="qdq", w8a8_activations="dynamic")
    assert w8a8_activations(TargetConfig()) == "static"
    assert w8a8_activations(TargetConfig(latency_budget=0.6)) == "both"
    assert w8a8_activations(TargetConfig(w8a8_activations="static", latency_budget=0.6)) == "static"


def test_latency_table_times_the_dynamic_form():
    """The latency table (what ``--latency-budget`` plans with) times a dynamic W8A8 unit through the target's
    own rewrite, beside float and static W8A8."""
    from llc_onnx.targets.latency import measure_latency_table

    m = token_mlp(seed=8)
    t = OrtCpuTarget(w8a8_activations="both")
    ctx = GraphContext(m)
    mm1 = next(n for n in find_compressible(m)[0] if n.name == "mm1")
    fmts = t.offer(mm1, ctx, levels=(8, "float")).formats
    x = np.random.default_rng(0).normal(0, 1, (2, 32, 16)).astype(np.float32)
    table = measure_latency_table(t, m, {"2": {"x": x}}, {"mm1": fmts}, threads=1, rounds=3)
    timed = set(table.units["2"]["mm1"])
    assert {"float", "w8a8-int8c7-auint8", "w8a8-int8c7-adyn", "mnb-int8-b32-acc4"} <= timed
    assert table.unit("2", "mm1", "w8a8-int8c7-adyn").median_ms > 0


def test_check_ort_cpu_lists_the_dynamic_nodes_and_their_integer_kernels(tmp_path):
    """``llc-onnx check --target ort-cpu`` reads ORT's optimized graph: a dynamic W8A8 node is listed under its
    own name, with the integer kernel ORT made of it (one DynamicQuantizeLinear shared by two consumers becomes
    MatMulIntegerToFloat; a lone one DynamicQuantizeMatMul)."""
    from llc_onnx.deploy import check

    m = token_mlp()
    w = weights(m)
    path = tmp_path / "dyn.onnx"
    onnx.save(apply_dynamic_w8a8(m, {"mm1": plan(w["W1"]), "mmg": plan(w["Wg"]), "mm2": plan(w["W2"])}), path)
    r = check(str(path), target="ort-cpu")
    by = {n["node"]: n for n in r.nodes}
    assert r.passed and set(by) == {"mm1", "mmg", "mm2", "head"}
    for name in ("mm1", "mmg", "mm2"):
        assert by[name]["integer"] and "dynamic W8A8" in by[name]["weight"], by[name]
    assert by["mm2"]["kernel"] == "DynamicQuantizeMatMul" and by["mm1"]["kernel"] == "MatMulIntegerToFloat"
    assert not by["head"]["integer"]


def test_interpreter_runs_the_written_model_like_ort():
    """``llc-onnx run`` executes a written model in the interpreter: its DynamicQuantizeLinear and
    MatMulInteger compute what ONNX Runtime computes."""
    from llc_onnx.interpreter import TorchGraph

    m = token_mlp(seed=4)
    w = weights(m)
    full = 7 if SATURATES else 8  # full-range codes where ORT computes them exactly (refused elsewhere)
    out = apply_dynamic_w8a8(m, {"mm1": plan(w["W1"]), "mmg": plan(w["Wg"], full), "head": plan(w["W3"])})
    x = np.random.default_rng(5).normal(0, 1, (3, 4, 16)).astype(np.float32)
    got = TorchGraph(out).run({"x": torch.as_tensor(x)})[0]["logits"]
    np.testing.assert_allclose(got.detach().numpy(), run(out, x, optimized=False), rtol=1e-5, atol=1e-5)


def test_tensors_to_calibrate_all_reads_the_model_once_and_honours_an_override(monkeypatch):
    """The batched lookup equals the per-node one (static W8A8 needs its input and output ranges, dynamic none), with
    one IR reading for all nodes; a target that overrides ``tensors_to_calibrate`` is asked per node."""
    import onnx_ir as ir

    from llc_onnx.passes import w8a8

    m = token_mlp()
    ctx = GraphContext(m)
    both = OrtCpuTarget(w8a8_activations="both")
    pairs = [(n.name, f) for n in find_compressible(m)[0] for f in both.offer(n, ctx, levels=(8,)).formats]
    assert any(f.kind == "w8a8" and not f.dynamic for _, f in pairs) and any(f.dynamic for _, f in pairs)
    single = [both.tensors_to_calibrate(m, n, f) for n, f in pairs]
    reads = []
    real = ir.serde.deserialize_model
    monkeypatch.setattr(w8a8.ir.serde, "deserialize_model", lambda p: reads.append(1) or real(p))
    assert both.tensors_to_calibrate_all(m, pairs) == single and len(reads) == 1
    assert all(x is None for (_, f), (x, _) in zip(pairs, single) if f.dynamic or f.kind != "w8a8")

    class Own(OrtCpuTarget):
        def tensors_to_calibrate(self, model, node, fmt):
            return ("mine", None)
    assert Own().tensors_to_calibrate_all(m, pairs[:2]) == [("mine", None)] * 2
