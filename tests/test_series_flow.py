"""Series expansion in the product: formats, target offers and rewrites, ``--method series`` / ``quant,series``
through ``optimize``, the data-free ``expand`` command, and the config's refusals.

Every rewrite is checked in ONNX Runtime against the interpreter running the *plan* (the dequantized sum
Σ_t s_t·Q_t as the weight hook, the written node's input hook): the numbers the flow measured are the
numbers the written model computes.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from _models import make, torch_threads, write_mlp_files
from llc_onnx import api
from llc_onnx.cli import main
from llc_onnx.compressible import find_compressible
from llc_onnx.config import ConfigError, CriterionConfig, OptimizeConfig, QuantConfig, SeriesConfig, TargetConfig
from llc_onnx.errors import LLCError
from llc_onnx.interpreter import TorchGraph
from llc_onnx.model_io import prepare_model
from llc_onnx.ort_eval import EXACT, make_session
from llc_onnx.series import SeriesWeight, expand_weight
from llc_onnx.targets import Format, NodePlan, get_target
from llc_onnx.targets.base import GraphContext, input_hook
from llc_onnx.targets.plans import quantize_for

F = onnx.TensorProto.FLOAT


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def net(seed=0, d_in=64, hidden=32, classes=3, ch=4):
    """x[N, 1, 8, 8] -> Conv(ch, 3x3, pad 1) 'conv' -> Relu -> Flatten -> Gemm(transB=1, hidden, bias) 'fc1'
    -> Relu -> MatMul(classes) 'fc2' -> logits. fc2 has N = 3 (N % 4 != 0: the INT2 fusion case)."""
    rng = np.random.default_rng(seed)
    w = {"Wc": (rng.normal(size=(ch, 1, 3, 3)) / 3).astype(np.float32),
         "bc": (0.1 * rng.normal(size=ch)).astype(np.float32),
         "W1": (rng.normal(size=(hidden, ch * d_in)) / np.sqrt(ch * d_in)).astype(np.float32),
         "b1": (0.1 * rng.normal(size=hidden)).astype(np.float32),
         "W2": (rng.normal(size=(hidden, classes)) / np.sqrt(hidden)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat", axis=1),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="relu2"),
             helper.make_node("MatMul", ["hr", "W2"], ["logits"], name="fc2")]
    return make(nodes, [helper.make_tensor_value_info("x", F, ["N", 1, 8, 8])],
                [helper.make_tensor_value_info("logits", F, ["N", classes])], w)


def interpreter_output(model, plans, x):
    """The prepared model in the interpreter with each plan's dequantized weight and input hook."""
    g = TorchGraph(model, dtype=torch.float64)
    weights = {n: torch.as_tensor(p.weight.dequant() if isinstance(p.weight, SeriesWeight) else p.weight.dequant,
                                  dtype=torch.float64) for n, p in plans.items()}
    inputs = {n: h for n, p in plans.items() if (h := input_hook(p)) is not None}
    with torch.no_grad():
        out, _ = g.run({"x": torch.as_tensor(x, dtype=torch.float64)},
                       weight_fns={n: (lambda _w, v=v: v) for n, v in weights.items()}, input_fns=inputs)
    return next(iter(out.values())).numpy()


# ------------------------------------------------------------------------------------------ formats
def test_series_format_name_bytes_and_contract():
    m = prepare_model(net())
    nodes = {n.name: n for n in find_compressible(m)[0]}
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for name, bits, block, terms in [("fc1", 4, 32, 3), ("fc2", 2, 16, 2), ("conv", 4, 32, 2), ("conv", 8, None, 1)]:
        node = nodes[name]
        fmt = Format("series", bits, block, terms=terms)
        sw = quantize_for(fmt, node, w[node.weight], scale_method="mse")
        assert isinstance(sw, SeriesWeight) and sw.order == terms
        assert fmt.nbytes(node) == sw.nbytes()          # the knapsack's bytes are the stored bytes
    assert Format("series", 4, 32, terms=2).name == "series-int4x2-b32"
    assert Format("series", 8, None, terms=3).name == "series-int8x3"
    with pytest.raises(LLCError, match="terms"):
        Format("series", 4, 32)
    with pytest.raises(LLCError, match="terms"):
        Format("qdq", 4, 32, terms=2)


def test_target_offers_say_what_they_refuse():
    m = prepare_model(net())
    nodes = find_compressible(m)[0]
    qdq = get_target("qdq").series_offers(m, nodes, bits=(2, 4, 8), terms=(1, 2))
    assert all(len(o.formats) == 1 + 6 and not o.refused for o in qdq.values())
    cpu = get_target("ort-cpu").series_offers(m, nodes, bits=(2, 4), terms=(1, 2), block_size=16)
    assert any("block" in why for _, why in cpu["fc1"].refused)           # INT2 needs blocks ≥ 32 there
    assert [f.name for f in cpu["fc1"].formats[1:]] == ["series-int4x1-b16-acc4", "series-int4x2-b16-acc4"]
    assert all(f.accuracy_level is None for f in cpu["conv"].formats[1:])  # Conv: the standard form, not fused
    cuda = get_target("ort-cuda").series_offers(m, nodes, bits=(2, 4), terms=(2,))
    assert len(cuda["conv"].formats) == 1 and {f.bits for f in cuda["fc1"].formats[1:]} == {4}
    trt = get_target("tensorrt").series_offers(m, nodes, bits=(4,), terms=(1, 2))
    assert all(len(o.formats) == 1 and "plugins" in o.refused[0][1] for o in trt.values())
    trt = get_target("tensorrt", plugins=True).series_offers(m, nodes, bits=(4,), terms=(1, 2))
    assert [f.terms for f in trt["fc1"].formats[1:]] == [2] and len(trt["conv"].formats) == 1
    # a reduction the MatMulNBits block cannot cover (K = 24 < 32: one block of 24) is refused with the reason
    g = make([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="g", transB=1, beta=0.5)],
             [helper.make_tensor_value_info("x", F, ["N", 24])], [helper.make_tensor_value_info("y", F, ["N", 8])],
             {"W": np.ones((8, 24), np.float32), "b": np.ones(8, np.float32)})
    o = get_target("ort-cpu").offer_series(find_compressible(g)[0][0], GraphContext(g), bits=(4,), terms=(2,))
    assert len(o.formats) == 1 and "power of two" in o.refused[0][1]


@pytest.mark.parametrize("target,bits,terms", [("qdq", 2, 2), ("qdq", 4, 3), ("qdq", 8, 2), ("ort-cpu", 4, 2),
                                               ("ort-cpu", 2, 3), ("ort-cpu", 8, 2), ("ort-cuda", 4, 2),
                                               ("tensorrt", 2, 2)])
def test_rewrite_computes_the_plan(target, bits, terms):
    """Every offered node in (bits, terms): ORT runs the written model (in the target's session; the TensorRT
    model through the plugin op's local function) as the interpreter runs the plan, weight hook and input hook."""
    m = prepare_model(net())
    t = get_target(target, plugins=True) if target == "tensorrt" else get_target(target)
    nodes = find_compressible(m)[0]
    offers = t.series_offers(m, nodes, bits=(bits,), terms=(terms,))
    w = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    plans = {}
    for node in nodes:
        fmts = [f for f in offers[node.name].formats if f.kind == "series"]
        if fmts:
            plans[node.name] = NodePlan(fmts[0], quantize_for(fmts[0], node, w[node.weight], scale_method="mse"))
    assert plans
    out = t.rewrite(m, plans).model
    onnx.checker.check_model(out)
    x = np.random.default_rng(1).normal(size=(16, 1, 8, 8)).astype(np.float32)
    settings = t.reference_session() if target == "tensorrt" else t.session()
    if target == "ort-cuda":
        settings = get_target("qdq").session()   # its nbits form on the CPU provider (no GPU here), level 0
    y = settings.make_session(out).run(None, {"x": x})[0]
    ref = interpreter_output(m, plans, x)
    err, scale = np.abs(y - ref), np.abs(ref).max()
    if target != "ort-cpu":
        assert err.max() <= 2e-5 * scale
    else:  # MatMul/Gemm: one MatMulNBits each (level 4); Conv: the standard form
        ops = [n.op_type for n in out.graph.node]
        assert ops.count("MatMulNBits") == 2 and ops.count("DequantizeLinear") == 1
        # level 4 rounds activations to int8: float-order differences upstream flip an odd rounding downstream
        assert np.quantile(err, 0.9) <= 2e-5 * scale and err.max() <= 5e-3 * scale
        bare = {n: NodePlan(Format("series", p.format.bits, p.format.block_size, terms=p.format.terms), p.weight)
                for n, p in plans.items()}
        plain = interpreter_output(m, bare, x)
        assert np.median(np.abs(y - plain)) > 10 * np.median(err)   # the input hook is what ORT computes
    if target == "tensorrt":
        from llc_onnx.targets.tensorrt import check_tensorrt

        assert sum(n.op_type == "series_matmul" for n in out.graph.node) == len(plans)
        assert check_tensorrt(out) == []


def test_standard_form_fusion_is_fragile_on_ort_cpu(tmp_path):
    """Why ort-cpu writes MatMulNBits itself: the portable standard form of a Gemm followed by Relu is *not*
    fused into MatMulNBits by ORT (it becomes a float FusedGemm behind a DequantizeLinear run every time)."""
    import onnxruntime as ort

    from llc_onnx.passes.series import apply_series

    m = prepare_model(net())
    node = next(n for n in find_compressible(m)[0] if n.name == "fc1")
    w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == node.weight))
    sw = expand_weight(w, bits=4, terms=2, out_axis=node.out_axis, reduce_axis=node.reduce_axis)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(apply_series(m, {"fc1": sw}).SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "FusedGemm" in ops and "DequantizeLinear" in ops and "MatMulNBits" not in ops


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("build,field", [
    (lambda: SeriesConfig(bits=(3,)), "series.bits"),
    (lambda: SeriesConfig(terms=(0, 2)), "series.terms"),
    (lambda: OptimizeConfig(method=("series", "quant")), "method"),
    (lambda: OptimizeConfig(method=("series",), series=SeriesConfig(form="custom")), "series.form"),
    (lambda: OptimizeConfig(method=("series",), target=TargetConfig(name="tensorrt")), "target.plugins"),
])
def test_config_refuses_bad_combinations(build, field):
    with pytest.raises(ConfigError) as exc:
        build()
    assert exc.value.field == field and "\n" not in str(exc.value)


def test_config_methods_and_cli_flags(tmp_path):
    assert OptimizeConfig(method=("quant", "series")).stages == ("quant+series",)
    assert OptimizeConfig(method=("lowrank", "series")).stages == ("lowrank", "series")
    assert OptimizeConfig(method=("series",), quant=QuantConfig(budget=0.3)).quant.budget == 0.3   # budgets apply
    rc, _, err = run_cli(["optimize", "m.onnx", "--data", "d.npz", "--method", "series", "--series-bits", "3"])
    assert rc == 2 and err.startswith("error: --series-bits 3:") and err.count("\n") == 1
    rc, _, err = run_cli(["optimize", "m.onnx", "--data", "d.npz", "--method", "series", "--series-form", "custom"])
    assert rc == 2 and "target qdq" in err and err.count("\n") == 1
    rc, out, _ = run_cli(["optimize", "m.onnx", "--method", "quant,series", "--series-terms", "2,3",
                          "--print-config"])
    assert rc == 0 and 'method = ["quant", "series"]' in out and "terms = [2, 3]" in out


# ------------------------------------------------------------------------------------------ optimize
def _series_files(tmp_path):
    return write_mlp_files(tmp_path, n=400, d_in=32, hidden=32, classes=4)


def _written_series(model: onnx.ModelProto, node: str, bits: int, terms: int, w: np.ndarray, out_axis: int,
                    reduce_axis: int, block) -> SeriesWeight:
    return expand_weight(w.astype(np.float64), bits=bits, terms=terms, out_axis=out_axis, reduce_axis=reduce_axis,
                         block_size=block)


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
def test_optimize_series_writes_what_it_measured(tmp_path, target):
    mpath, dpath = _series_files(tmp_path)
    out = str(tmp_path / "out.onnx")
    cfg = OptimizeConfig(method=("series",), series=SeriesConfig(bits=(2, 4), terms=(1, 2, 3)),
                         quant=QuantConfig(budget=0.4), target=TargetConfig(name=target, measure_latency=False),
                         criterion=CriterionConfig(allow_loss_increase=True))
    res = api.optimize(mpath, dpath, cfg, out=out)
    st = res.stages[0]
    assert st.method == "series"
    cands = {c.level for c in st.candidates}
    assert all(lv == "float" or lv.startswith("series-") for lv in cands)
    assert {int(lv.split("x")[1].split("-")[0]) for lv in cands if lv != "float"} == {1, 2, 3}
    # the verdict is honest: verified exactly when the test loss is not above float's
    test = res.splits["test"]
    assert res.verified == (test.compressed.loss <= test.reference.loss)
    written = onnx.load(out)
    # the written model in ORT equals the interpreter running the plan (expansions of the float64 weights)
    prepared = prepare_model(onnx.load(mpath))
    nodes = {n.name: n for n in find_compressible(prepared)[0]}
    inits = {i.name: numpy_helper.to_array(i) for i in prepared.graph.initializer}
    fmts = {f.name: f for o in get_target(target).series_offers(prepared, nodes.values(), bits=(2, 4),
                                                                  terms=(1, 2, 3)).values() for f in o.formats}
    plans = {}
    for d in st.nodes:
        if d.level == "float":
            continue
        f, node = fmts[d.level], nodes[d.node]
        sw = _written_series(prepared, d.node, f.bits, f.terms, inits[node.weight], node.out_axis, node.reduce_axis,
                             f.block_size)
        assert sw.nbytes() == d.bytes
        plans[d.node] = NodePlan(f, sw)
    assert plans, "the budget forces at least one node into series terms"
    x = np.load(dpath)["x"][:64]
    sess = make_session(written, EXACT) if target == "qdq" else get_target(target).session().make_session(written)
    y = sess.run(None, {"x": x})[0]
    ref = interpreter_output(prepared, plans, x)
    err = np.abs(y - ref)
    assert np.quantile(err, 0.9) <= 2e-5 * np.abs(ref).max() and err.max() <= 5e-3 * np.abs(ref).max()


def test_cached_series_run_is_identical(tmp_path):
    mpath, dpath = _series_files(tmp_path)
    cache = str(tmp_path / "cache")
    argv = ["optimize", mpath, "--data", dpath, "--method", "series", "--target", "qdq", "--series-bits", "4",
            "--series-terms", "1,2", "--budget", "0.4", "--allow-loss-increase", "--no-latency", "--cache", cache,
            "--json"]
    outs = []
    for i in range(2):
        out = str(tmp_path / f"o{i}.onnx")
        rc, stdout, _ = run_cli(argv + ["-o", out])
        rep = json.loads(stdout)
        outs.append((open(out, "rb").read(), rep["stages"][0]["cache"]["hit"]))
    assert outs[0][1] is False and outs[1][1] is True
    strip = [onnx.load_from_string(b) for b, _ in outs]
    for m in strip:
        del m.metadata_props[:]
    assert strip[0].SerializeToString() == strip[1].SerializeToString()


def test_quant_and_series_share_one_knapsack(tmp_path):
    """One cost table over both families; the ladder of every node holds both, ordered by weight error, and
    the solver picks among them: a weight with an outlier per output channel, where two blocked 2-bit terms
    are finer than per-channel int8 (and than int4) at fewer bytes than int8; at a quarter of the float bytes
    that node gets the series terms."""
    rng = np.random.default_rng(0)
    d, h, c = 64, 64, 4
    w1 = (rng.normal(size=(d, h)) / np.sqrt(d)).astype(np.float32)
    w1[rng.integers(0, d, size=h), np.arange(h)] = 40.0        # one outlier per output channel
    w2 = (rng.normal(size=(h, c)) / np.sqrt(h)).astype(np.float32)
    m = make([helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"), helper.make_node("Tanh", ["a"], ["t"]),
              helper.make_node("MatMul", ["t", "W2"], ["logits"], name="mm2")],
             [helper.make_tensor_value_info("x", F, ["N", d])], [helper.make_tensor_value_info("logits", F, ["N", c])],
             {"W1": w1, "W2": w2})
    x = rng.normal(size=(400, d)).astype(np.float32)
    y = np.tanh(x @ w1) @ w2
    labels = y.argmax(1)
    onnx.save_model(m, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    cfg = OptimizeConfig(method=("quant", "series"),
                         quant=QuantConfig(bits=(4, 8, "float"), rounding="nearest", budget=0.25),
                         series=SeriesConfig(bits=(2,), terms=(1, 2, 3)),
                         target=TargetConfig(name="qdq", measure_latency=False))
    res = api.optimize(str(tmp_path / "m.onnx"), str(tmp_path / "d.npz"), cfg)
    st = res.stages[0]
    assert st.method == "quant+series"
    for node in ("mm1", "mm2"):
        kinds = {c.level.split("-")[0] for c in st.candidates if c.node == node}
        assert kinds == {"float", "qdq", "series"}
    mm1 = {c.level: c for c in st.candidates if c.node == "mm1"}
    s22, q8 = mm1["series-int2x2-b32"], mm1["qdq-int8"]
    assert s22.nbytes < q8.nbytes and s22.rel_noise < q8.rel_noise   # finer at fewer bytes
    assert s22.rel_noise < mm1["qdq-int4-b32"].rel_noise
    chosen = {d.node: d.level for d in st.nodes}
    assert chosen["mm1"] == "series-int2x2-b32"


# ------------------------------------------------------------------------------------------ expand
def test_expand_command_bytes_residuals_and_no_verdict_without_data(tmp_path):
    mpath, dpath = _series_files(tmp_path)
    out = str(tmp_path / "e.onnx")
    rc, stdout, _ = run_cli(["expand", mpath, "--bits", "4", "--terms", "3", "-o", out])
    assert rc == 0 and "not verified: no data (run llc-onnx compare to check it)" in stdout
    rc, stdout, _ = run_cli(["expand", mpath, "--bits", "4", "--terms", "3", "-o", out, "--json"])
    rep = json.loads(stdout)
    assert rep["verified"] is None and rep["status"].startswith("not verified: no data")
    prepared = prepare_model(onnx.load(mpath))
    nodes = find_compressible(prepared)[0]
    assert rep["bytes"] == sum(Format("series", 4, 32, terms=3).nbytes(n) for n in nodes)
    for n in rep["nodes"]:
        r = n["relative_residuals"]
        assert len(r) == 3 and r[0] > r[1] > r[2] > 0
    written = onnx.load(out)
    assert {p.key: p.value for p in written.metadata_props}["llc_onnx.verified"] == "unverified"


def test_expand_order_and_data_verdict(tmp_path):
    mpath, dpath = _series_files(tmp_path)
    full = api.expand(mpath, bits=2, terms=4)
    cut = api.expand(mpath, bits=2, terms=4, order=2, data=dpath, out=str(tmp_path / "cut.onnx"))
    assert cut.order == 2 and cut.nbytes * 2 == full.nbytes         # τ = 2 of the same expansion: half the terms
    # the truncated model is the T = 2 expansion (greedy: its first terms are the shorter expansion)
    direct = api.expand(mpath, bits=2, terms=2)
    x = np.load(dpath)["x"][:32]
    y_cut = make_session(cut.model, EXACT).run(None, {"x": x})[0]
    y_dir = make_session(direct.model, EXACT).run(None, {"x": x})[0]
    assert np.array_equal(y_cut, y_dir)
    assert cut.comparison is not None and cut.verified == cut.comparison.passed
    rc, stdout, _ = run_cli(["expand", mpath, "--bits", "2", "--terms", "4", "--order", "2", "--data", dpath,
                             "-o", str(tmp_path / "c2.onnx")])
    assert rc == (0 if cut.verified else 1) and ("PASS" in stdout) == cut.verified
    rc, _, err = run_cli(["expand", mpath, "--terms", "2", "--order", "3"])
    assert rc == 2 and err.startswith("error: --order 3:")
    rc, _, err = run_cli(["expand", mpath, "--bits", "3"])
    assert rc == 2 and err.startswith("error: --bits 3:")


def test_solver_keeps_to_its_ladders_when_a_joint_re_solve_re_prices_a_level_over_the_bound():
    """A joint re-solve raises candidates' costs in place. When a finer series level goes over the lossless
    bound, the coarser level it dominated becomes undominated in the cost table — but it is not on the ladder
    (back-off and plans index the ladders), so the solver must not pick it (it raised ValueError on
    EfficientNet-Lite0 with --method series)."""
    from types import SimpleNamespace

    from llc_onnx.config import OptimizeConfig
    from llc_onnx.flows.quantize import Formats, Solver
    from llc_onnx.solvers.cost_model import Candidate, CostTable
    from llc_onnx.targets.base import FLOAT, Format

    fine, coarse = Format("series", 4, 32, terms=2), Format("series", 4, 32, terms=1)
    by_level = {("a", FLOAT.name): FLOAT, ("a", fine.name): fine, ("a", coarse.name): coarse}
    ref = Candidate("a", FLOAT.name, 400, 0.0, 0.0, 0.0, True, 0.0, reference=True)
    a = Candidate("a", fine.name, 100, -1e-4, -1e-4, 0.01, True, -1e-4)
    b = Candidate("a", coarse.name, 150, -2e-4, -2e-4, 0.08, True, -2e-4)  # dominated by a: coarser, larger
    ctx = SimpleNamespace(config=OptimizeConfig(), objective="task", calib_fp=SimpleNamespace(loss=1.0))
    solver = Solver(ctx, CostTable.from_candidates([ref, a, b]), Formats(by_level, {}, {}))
    assert [c.level for c in solver.ladders["a"]] == [fine.name, FLOAT.name]
    assert solver.ladders["a"][solver.solve(None, 0.5)["a"]] is a
    a.cost += 1.0  # re-priced by a joint measurement: now over the bound (0.01 × the float loss)
    assert solver.ladders["a"][solver.solve(None, 0.5)["a"]] is ref


def test_series_expansions_kept_are_bounded_and_change_nothing(tmp_path, monkeypatch):
    """``flows.series.expansion`` keeps the most recent ``EXPANSIONS_KEPT`` expansions (each holds a float64
    copy of its weight and every term's values): at most that many are alive at any call, and a run that must
    expand evicted weights again writes the same bytes as one that keeps all of them."""
    from llc_onnx.flows import series as series_flow

    mpath, dpath = _series_files(tmp_path)
    cfg = OptimizeConfig(method=("series",), series=SeriesConfig(bits=(2, 4), terms=(1, 2, 3)),
                         quant=QuantConfig(budget=0.4), target=TargetConfig(name="qdq", measure_latency=False),
                         criterion=CriterionConfig(allow_loss_increase=True))
    sizes = []
    real = series_flow.expansion

    def watched(*args, memo, **kwargs):
        out = real(*args, memo=memo, **kwargs)
        sizes.append(len(memo))
        return out

    monkeypatch.setattr(series_flow, "expansion", watched)
    monkeypatch.setattr(series_flow, "EXPANSIONS_KEPT", 1000)
    kept_all = api.optimize(mpath, dpath, cfg)
    assert max(sizes) > 1
    sizes.clear()
    monkeypatch.setattr(series_flow, "EXPANSIONS_KEPT", 1)
    bounded = api.optimize(mpath, dpath, cfg)
    assert sizes and max(sizes) == 1
    assert bounded.model.SerializeToString() == kept_all.model.SerializeToString()
