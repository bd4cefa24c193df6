"""The ORT CPU target on the bundled example: what it offers and refuses, what ORT makes of its rewrite in a
default session, and that the interpreter hooks reproduce the written numerics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from llc_onnx.compressible import find_compressible
from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph
from llc_onnx.targets import DEFAULT_TARGET, FLOAT, Format, NodePlan, check_tensorrt, get_target
from llc_onnx.targets.base import GraphContext, input_hook
from llc_onnx.targets.plans import plan_nodes

EX = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def fashion():
    model = onnx.load(EX / "fashion_cnn.onnx")
    data = np.load(EX / "fashion_data.npz")
    return model, data["input"][:256], data["labels"][:256]


def ce(logits, labels):
    z = logits - logits.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), labels]))


def test_default_target_and_offers(fashion):
    model, _, _ = fashion
    assert DEFAULT_TARGET == "ort-cpu"
    t = get_target()
    nodes, _ = find_compressible(model)
    offers = t.offers(model, nodes, levels=(2, 4, 8, 16, "float"), block_size=32)
    conv = offers["/conv1/Conv"]
    assert conv.names() == ["float", "w8a8-int8c7-auint8"]
    assert conv.formats[1].output                                    # QLinearConv needs the output quantized
    assert {lv for lv, _ in conv.refused} == {"int2", "int4", "int16"}
    assert all("QLinearConv" in why or "int16" in why for _, why in conv.refused)
    fc = offers["/fc1/Gemm"]
    assert fc.names() == ["float", "mnb-int2-b32-acc4", "mnb-int4-b32-acc4", "w8a8-int8c7-auint8",
                          "mnb-int8-b32-acc4"]
    assert [lv for lv, _ in fc.refused] == ["int16"]
    # block 16: no 2-bit int8 kernel -> refused with the measured reason; block 24 is no MatMulNBits block
    fc16 = t.offers(model, nodes, levels=(2, 4), block_size=16)["/fc1/Gemm"]
    assert fc16.names() == ["float", "mnb-int4-b16-acc4"] and "block 16" in fc16.refused[0][1]
    fc24 = t.offers(model, nodes, levels=(4,), block_size=24)["/fc1/Gemm"]
    assert fc24.names() == ["float"] and "power of two" in fc24.refused[0][1]
    with pytest.raises(LLCError, match="level"):
        t.offers(model, nodes, levels=(3,))


def test_offer_refuses_matmul_add_w8a8_and_alpha_gemm():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["m"], name="mm"), oh.make_node("Add", ["m", "b"], ["y"], name="add"),
             oh.make_node("Gemm", ["y", "w2"], ["z"], name="gm", alpha=0.5)]
    g = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TP.FLOAT, ["M", 32])],
                      [oh.make_tensor_value_info("z", TP.FLOAT, ["M", 8])],
                      [nh.from_array(w, "w"), nh.from_array(np.zeros(16, np.float32), "b"),
                       nh.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w2")])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 21)], ir_version=10)
    offers = get_target("ort-cpu").offers(model, find_compressible(model)[0], levels=(4, 8))
    assert "w8a8-int8c7-auint8" not in offers["mm"].names()
    assert any("float Gemm" in why for _, why in offers["mm"].refused)
    assert offers["gm"].names() == ["float", "w8a8-int8c7-auint8"]
    assert all("alpha" in why for _, why in offers["gm"].refused)


def test_rewrite_fuses_in_default_session_and_stays_accurate(fashion, tmp_path):
    model, x, labels = fashion
    t = get_target("ort-cpu")
    choices = {"/conv1/Conv": Format("w8a8", 8, None, code_bits=7, activations="uint8", output=True),
               "/conv2/Conv": Format("w8a8", 8, None, code_bits=7, activations="uint8", output=True),
               "/fc1/Gemm": Format("matmulnbits", 4, 32, activations="int8-block", accuracy_level=4),
               "/fc2/Gemm": Format("w8a8", 8, None, code_bits=7, activations="uint8")}
    feeds = [{"input": x[i:i + 64]} for i in range(0, 256, 64)]
    plans = plan_nodes(t, model, choices, data=feeds, calibration="percentile")
    before = model.SerializeToString()
    rw = t.rewrite(model, plans)
    assert model.SerializeToString() == before
    onnx.checker.check_model(rw.model)
    assert rw.written == {k: v.name for k, v in choices.items()}
    opt = tmp_path / "opt.onnx"
    sess = t.session().make_session(rw.model, optimized_model_path=str(opt))
    ops = [n.op_type for n in onnx.load(opt).graph.node]
    assert ops.count("QLinearConv") == 2 and "QGemm" in ops and "MatMulNBits" in ops
    assert "Conv" not in ops and "Gemm" not in ops
    y_f = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    y_q = sess.run(None, {"input": x})[0]
    assert abs(ce(y_q, labels) - ce(y_f, labels)) < 0.02
    assert np.mean(y_q.argmax(1) == y_f.argmax(1)) > 0.97
    # ORT CPU output is not a TensorRT model: uint8 activations, int32 bias, com.microsoft ops
    vios = check_tensorrt(rw.model)
    assert {v.rule for v in vios} == {"type", "plugin"}
    msgs = " ".join(v.message for v in vios)
    assert "UINT8" in msgs and "INT32" in msgs and "MatMulNBits" in msgs


def test_interpreter_hooks_reproduce_matmulnbits_level4(fashion):
    model, x, _ = fashion
    t = get_target("ort-cpu")
    fmt = Format("matmulnbits", 4, 32, activations="int8-block", accuracy_level=4)
    plans = plan_nodes(t, model, {"/fc1/Gemm": fmt})
    rw = t.rewrite(model, plans)
    y_ort = t.session().make_session(rw.model).run(None, {"input": x[:32]})[0]
    g = TorchGraph(model)
    dq = torch.from_numpy(plans["/fc1/Gemm"].weight.dequant)
    hook = input_hook(plans["/fc1/Gemm"])
    with torch.no_grad():
        out, _ = g.run({"input": x[:32]}, weight_fns={"/fc1/Gemm": lambda w: dq},
                       input_fns={"/fc1/Gemm": hook})
        plain, _ = g.run({"input": x[:32]}, weight_fns={"/fc1/Gemm": lambda w: dq})
    y_hook, y_plain = out["logits"].numpy(), plain["logits"].numpy()
    scale = np.abs(y_ort).max()
    assert np.abs(y_hook - y_ort).max() < 1e-4 * scale               # the hook is what ORT computes
    assert np.abs(y_plain - y_ort).max() > 10 * np.abs(y_hook - y_ort).max()


def test_rewrite_rejects_foreign_or_mismatched_plans(fashion):
    model, _, _ = fashion
    t = get_target("ort-cpu")
    plans = plan_nodes(get_target("qdq"), model, {"/fc1/Gemm": Format("qdq", 4, 32)})
    with pytest.raises(LLCError, match="not a ort-cpu format"):
        t.rewrite(model, plans)
    p = plan_nodes(t, model, {"/fc1/Gemm": Format("matmulnbits", 4, 64, accuracy_level=4)})["/fc1/Gemm"]
    wrong = {"/fc1/Gemm": NodePlan(Format("matmulnbits", 4, 32, accuracy_level=4), p.weight)}
    with pytest.raises(LLCError, match="block_size=64"):
        t.rewrite(model, wrong)
    w8 = Format("w8a8", 8, None, code_bits=7, activations="uint8", output=True)
    p8 = plan_nodes(t, model, {"/conv1/Conv": w8}, data=[{"input": np.zeros((1, 1, 28, 28), np.uint8)}])
    with pytest.raises(LLCError, match="calibrat"):
        t.rewrite(model, {"/conv1/Conv": NodePlan(w8, p8["/conv1/Conv"].weight, p8["/conv1/Conv"].input)})
    with pytest.raises(LLCError, match="unknown"):
        get_target("tflite")


def test_qdq_target_is_todays_output(fashion):
    model, x, _ = fashion
    t = get_target("qdq")
    nodes, _ = find_compressible(model)
    offers = t.offers(model, nodes, levels=(2, 4, 8, 16, "float"))
    assert offers["/conv1/Conv"].names() == ["float", "qdq-int2-b32", "qdq-int4-b32", "qdq-int8", "qdq-int16"]
    assert t.session().config == (("session.qdq_matmulnbits_accuracy_level", "0"),)
    plans = plan_nodes(t, model, {"/fc1/Gemm": Format("qdq", 4, 32), "/conv2/Conv": Format("qdq", 8)})
    rw = t.rewrite(model, plans)
    assert {n.op_type for n in rw.model.graph.node} >= {"DequantizeLinear"}
    y = t.session().make_session(rw.model).run(None, {"input": x[:8]})[0]
    assert np.all(np.isfinite(y))


def test_graph_context_facts(fashion):
    model, _, _ = fashion
    ctx = GraphContext(model)
    assert ctx.input_rank("/fc1/Gemm") == 2
    assert ctx.attr("/fc1/Gemm", "transB", 0) == 1
    assert FLOAT.nbytes(find_compressible(model)[0][0]) == 4 * 8 * 9


def test_full_range_w8a8_codes_are_an_explicit_option_for_vnni_cpus(fashion, tmp_path):
    """``--w8a8-codes 8``: the offered W8A8 formats store full-range int8 codes (7-bit by default). Where this
    CPU's int8 kernels do not saturate (VNNI, ARM64) the written Convs/Gemm match their dequantized float
    reference in ONNX Runtime, with codes beyond the 7-bit range, and the saved model records the requirement;
    elsewhere optimize refuses it before measuring anything. Bad values are config errors."""
    import llc_onnx
    from llc_onnx.config import ConfigError, OptimizeConfig, QuantConfig, TargetConfig
    from llc_onnx.targets.ort_cpu import int8_full_range_exact

    model, x, _ = fashion
    ctx = GraphContext(model)
    node = next(n for n in find_compressible(model)[0] if n.op_type == "Conv")
    fmts = {t: [f for f in get_target("ort-cpu", **kw).offer(node, ctx).formats if f.kind == "w8a8"]
            for t, kw in (("c7", {}), ("c8", {"w8a8_code_bits": 8}))}
    assert [f.code_bits for f in fmts["c7"]] == [7] and [f.code_bits for f in fmts["c8"]] == [8]
    assert fmts["c8"][0].name == "w8a8-int8-auint8"
    with pytest.raises(LLCError, match="w8a8_code_bits=6"):
        get_target("ort-cpu", w8a8_code_bits=6)
    for bad in ({"w8a8_codes": 6}, {"w8a8_codes": 8, "name": "qdq"}):
        with pytest.raises(ConfigError):
            TargetConfig(**bad)
    cfg = OptimizeConfig(target=TargetConfig(w8a8_codes=8, measure_latency=False), quant=QuantConfig(budget=0.3))
    why = int8_full_range_exact()
    if why:
        with pytest.raises(LLCError, match="--w8a8-codes 8: this CPU has no AVX512-VNNI"):
            llc_onnx.optimize(str(EX / "fashion_cnn.onnx"), str(EX / "fashion_data.npz"), cfg)
        pytest.skip(f"full-range codes are not exact here: {why}")
    t = get_target("ort-cpu", w8a8_code_bits=8)
    choices = {n.name: next(f for f in t.offer(n, ctx).formats if f.kind == "w8a8")
               for n in find_compressible(model)[0] if any(f.kind == "w8a8" for f in t.offer(n, ctx).formats)}
    plans = plan_nodes(t, model, choices, data=[{"input": x[:128]}])
    codes = [nh.to_array(i) for i in t.rewrite(model, plans).model.graph.initializer if i.data_type == TP.INT8]
    assert codes and max(int(np.abs(c).max()) for c in codes) > 63          # beyond the 7-bit range
    res = llc_onnx.optimize(str(EX / "fashion_cnn.onnx"), str(EX / "fashion_data.npz"), cfg)
    path = res.save(str(tmp_path / "c8.onnx"), force=True)
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    if any(str(n.level).startswith("w8a8") for n in res.stages[-1].nodes):
        assert meta["llc_onnx.w8a8_codes"].startswith("8: full-range")
        assert any("--w8a8-codes 8" in n for n in res.notes)
