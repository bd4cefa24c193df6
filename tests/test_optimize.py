"""``llc-onnx optimize`` end to end: the bundled example (in-process and as a subprocess) and tiny models.

Every claim the command makes is re-checked from the files it wrote: the test-split loss is recomputed in ONNX
Runtime on the split the command used (by the documented split rule), the output passes the checker, quantized
weights really are integer initializers feeding DequantizeLinear, and the input file is untouched. The
statistical roles are checked too: the test split is evaluated exactly twice (float and final model), after
every validation measurement.
"""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from _models import torch_threads, write_mlp_files
from llc_onnx.calib.data import load_dataset, split_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.cli import main
from llc_onnx.compressible import find_compressible
from llc_onnx.ort_eval import EXACT, evaluate


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX_MODEL = os.path.join(REPO, "examples", "fashion_cnn.onnx")
EX_DATA = os.path.join(REPO, "examples", "fashion_data.npz")
KEYS = {"verified", "splits", "bytes", "levels", "nodes", "stages", "seconds", "objective", "config", "notes"}
INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.INT16, onnx.TensorProto.INT2,
             onnx.TensorProto.UINT8}


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_cli(argv):
    """main(argv) in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def one_json(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, stdout[:500]
    return json.loads(lines[0])


def meta(model):
    return {p.key: p.value for p in model.metadata_props}


def check_quantized_output(path, src_model):
    """The written model passes the checker, and every compressible node whose level is intN reads its
    weight from a DequantizeLinear of an integer initializer."""
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    by_name = {n.name: n for n in m.graph.node}
    int_fed = {}
    for node in find_compressible(src_model)[0]:
        w_in = by_name[node.name].input[1]
        p = producer.get(w_in)
        if p is not None and p.op_type == "DequantizeLinear":
            q = inits[p.input[0]]
            assert q.data_type in INT_TYPES
            int_fed[node.name] = onnx.TensorProto.DataType.Name(q.data_type)
    return m, int_fed


def documented_splits(data, model, holdout=0.5, val_fraction=0.25, seed=0, batch_size=64):
    """(calibration, validation, test) by the rule README and flows/context.py state."""
    rest, test = split_dataset(load_dataset(data, model, batch_size=batch_size), holdout, seed)
    calib, val = split_dataset(rest, val_fraction, seed + 1)
    return calib, val, test


# ----------------------------------------------------------------------------------- bundled example
@pytest.fixture(scope="module")
def example(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example")
    out, rep = tmp / "out.onnx", tmp / "report"
    before = _sha(EX_MODEL)
    # a tolerance the int8/int16 levels stay inside, so the run verifies whatever the split's noise
    rc, stdout, stderr = run_cli(["optimize", EX_MODEL, "--data", EX_DATA, "-o", str(out), "--measure-samples", "200",
                                  "--bits", "8,16,float", "--sweep", "0.3,0.5", "--tolerance", "0.01", "--json",
                                  "--report", str(rep), "--target", "qdq"])
    return {"rc": rc, "stdout": stdout, "stderr": stderr, "out": str(out), "report": str(rep), "before": before}


def test_example_verified_output_is_checked_independently(example):
    assert example["rc"] == 0, example["stderr"]
    r = one_json(example["stdout"])
    assert r["verified"] is True and r["output"] == example["out"]
    assert _sha(EX_MODEL) == example["before"]  # the input model is byte-identical after the run

    src = onnx.load(EX_MODEL)
    m, int_fed = check_quantized_output(example["out"], src)
    chosen = {n["node"]: n["level"] for n in r["nodes"]}
    quantized = {n for n, lv in chosen.items() if lv.startswith("qdq-int")}
    assert quantized and set(int_fed) == quantized  # exactly the intN nodes read a DequantizeLinear
    for n in quantized:
        assert "qdq-int" + int_fed[n][3:] == chosen[n].split("-b")[0]
    md = meta(m)
    assert md["llc_onnx.verified"] == "true" and md["llc_onnx.method"] == "quant"

    # recompute every split's loss on the splits the documented rule gives (holdout 0.5, val 0.25, seed 0)
    calib, val, test = documented_splits(EX_DATA, src)
    loss = make_loss("ce", "logits")
    s = r["splits"]
    assert (calib.n_samples, val.n_samples, test.n_samples) == (s["calibration"]["n"], s["validation"]["n"],
                                                                s["test"]["n"]) == (750, 250, 1000)
    for name, data in (("calibration", calib), ("validation", val), ("test", test)):  # the qdq target's session
        assert evaluate(src, data, loss, session=EXACT).loss == pytest.approx(s[name]["reference"]["loss"], rel=1e-9)
        assert evaluate(m, data, loss, session=EXACT).loss == pytest.approx(s[name]["compressed"]["loss"], rel=1e-9)
    assert s["test"]["compressed"]["loss"] <= s["test"]["reference"]["loss"] + 0.01
    assert s["calibration"]["fit"] + s["calibration"]["measure"] == 750


def test_example_json_and_report_files(example):
    r = one_json(example["stdout"])
    assert KEYS <= set(r)
    assert isinstance(r["seconds"], dict) and all(v >= 0 for v in r["seconds"].values())
    st = r["stages"][0]
    assert st["plans"][0]["plan"] == "solver" and st["chosen_plan"] in [p["plan"] for p in st["plans"]]
    assert st["first_plan_passed"] == st["plans"][0]["passed"]
    assert sum(r["levels"].values()) == len(r["nodes"]) == 4
    assert r["bytes"]["compressed"] == sum(n["bytes"] for n in r["nodes"])
    assert r["bytes"]["reduction"] == pytest.approx(1 - r["bytes"]["compressed"] / r["bytes"]["reference"])
    assert r["bytes"]["reference"] == 4 * sum(int(np.prod(n.weight_shape))
                                              for n in find_compressible(onnx.load(EX_MODEL))[0])
    assert r["config"]["quant"]["bits"] == [8, 16, "float"] and r["tolerance"] == 0.01
    d = example["report"]
    for f in ("report.json", "report.md", "report.html"):
        assert os.path.getsize(os.path.join(d, f)) > 100
    pngs = [f for f in os.listdir(d) if f.endswith(".png")]
    assert len(pngs) == 3
    for f in pngs:
        with open(os.path.join(d, f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(d, "report.json")) as f:
        rj = json.load(f)
    assert rj["verified"] == r["verified"] and rj["bytes"] == r["bytes"] and rj["splits"] == r["splits"]
    with open(os.path.join(d, "report.md")) as f:
        md = f.read()
    assert "VERIFIED" in md and "NOT VERIFIED" not in md and "which data did what" in md
    with open(os.path.join(d, "report.html")) as f:
        page = f.read()
    assert "<table>" in page and "<td>solver" in page and "| split" not in page  # real tables, not raw Markdown
    assert sorted(os.path.basename(p) for p in r["report_files"]) == sorted(os.listdir(d))


def test_example_sweep_points_are_measured_on_validation(example):
    r = one_json(example["stdout"])
    sw = r["stages"][0]["sweep"]
    assert [p["budget"] for p in sw] == [0.3, 0.5]
    for p in sw:
        assert 0 < p["bytes"] <= p["budget"] * r["bytes"]["reference"]
        assert np.isfinite(p["val_loss"]) and p["val_loss"] > 0
    assert sw[0]["bytes"] <= sw[1]["bytes"]
    fr = r["stages"][0]["frontier"]
    assert len(fr) >= 2 and all(a["bytes"] <= b["bytes"] for a, b in zip(fr, fr[1:]))


@pytest.fixture(scope="module")
def example_budget(tmp_path_factory):
    """``python -m llc_onnx optimize`` as a subprocess with --budget 0.3."""
    tmp = tmp_path_factory.mktemp("budget")
    out = tmp / "b.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "llc_onnx", "optimize", EX_MODEL, "--data", EX_DATA, "-o", str(out),
                        "--measure-samples", "200", "--budget", "0.3", "--json"],
                       capture_output=True, text=True, cwd=str(tmp), timeout=300, env=env)
    return p, str(out)


def test_example_subprocess_exit_code_matches_result(example_budget):
    p, out = example_budget
    assert p.returncode in (0, 1), p.stderr
    r = one_json(p.stdout)
    st = r["stages"][0]
    assert st["settings"]["budget_bytes"] == int(0.3 * r["bytes"]["reference"])
    assert st["settings"]["objective"] == "budget"
    assert (p.returncode == 0) == r["verified"] == os.path.exists(out)
    if r["verified"]:
        assert meta(onnx.load(out))["llc_onnx.verified"] == "true"
    assert r["bytes"]["compressed"] <= 0.3 * r["bytes"]["reference"]  # the budget holds, verified or not
    assert all(pl["bytes"] <= 0.3 * r["bytes"]["reference"] for pl in st["plans"])


# ----------------------------------------------------------------------------------- tiny models
@pytest.fixture
def tiny(tmp_path):
    return write_mlp_files(tmp_path)


def test_test_split_is_evaluated_once_after_validation(tiny, tmp_path, monkeypatch):
    """The contract of flows/context.py: the test split is evaluated exactly twice — the float and the final
    model — and only after every plan was measured on the validation split."""
    import llc_onnx
    from llc_onnx.flows import context

    model, data = tiny
    calls = []
    real = context.FlowContext.evaluate

    def spy(self, m, ds, samples=False):
        role = "test" if ds is self.test else "val" if ds is self.val else "calib" if ds is self.calib else "?"
        calls.append(role)
        return real(self, m, ds, samples)

    monkeypatch.setattr(context.FlowContext, "evaluate", spy)
    res = llc_onnx.optimize(model, data, llc_onnx.OptimizeConfig(quant=llc_onnx.QuantConfig(bits=(2, 4, 8, "float"))))
    assert calls.count("test") == 2
    first_test = calls.index("test")
    assert "val" not in calls[first_test:] and calls.count("val") >= 2  # float + at least the solver's plan
    assert res.splits["test"].reference is not None and res.stages[0].trials[0].name == "solver"


def test_forced_failure_writes_nothing_and_allow_loss_increase_marks_it(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "o.onnx"
    before = _sha(model)
    args = ["optimize", model, "--data", data, "-o", str(out), "--bits", "2", "--budget", "1", "--max-rounds", "0",
            "--target", "qdq"]
    rc, stdout, stderr = run_cli(args + ["--json"])
    r = one_json(stdout)
    assert rc == 1 and not r["verified"] and r["output"] is None
    assert not out.exists()
    t = r["splits"]["test"]
    assert t["compressed"]["loss"] > t["reference"]["loss"]
    assert len(r["stages"][0]["plans"]) >= 1
    rc, stdout, _ = run_cli(args)  # the table output says so, too
    assert rc == 1 and "NOT VERIFIED" in stdout and "no model written" in stdout and not out.exists()

    rc, stdout, _ = run_cli(args + ["--json", "--allow-loss-increase"])
    r2 = one_json(stdout)
    assert rc == 0 and r2["verified"] is False and r2["output"] == str(out)
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    md = meta(m)
    assert md["llc_onnx.verified"] == "false"
    assert float(md["llc_onnx.test_loss_compressed"]) == pytest.approx(r2["splits"]["test"]["compressed"]["loss"])
    assert float(md["llc_onnx.test_loss_compressed"]) > float(md["llc_onnx.test_loss_reference"])
    assert _sha(model) == before


def test_same_seed_gives_byte_identical_models(tiny, tmp_path):
    model, data = tiny
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for o in outs:
        rc, _, err = run_cli(["optimize", model, "--data", data, "-o", str(o), "--bits", "4,8,float", "--json",
                              "--seed", "3", "--allow-loss-increase"])
        assert rc == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()
    # and the split depends on the seed: a different seed gives a different test set
    rc, s1, _ = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "c.onnx"), "--bits", "8,float",
                         "--json", "--seed", "4"])
    rc2, s2, _ = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "c.onnx"), "--bits", "8,float",
                          "--json", "--seed", "3"])
    assert one_json(s1)["splits"]["test"]["reference"]["loss"] != one_json(s2)["splits"]["test"]["reference"]["loss"]


@pytest.mark.parametrize("extra,needle", [
    (["--data", "missing.npz"], "missing.npz"),
    (["--output", "nope"], "nope"),
    (["-o", "SELF"], "overwrite"),
    (["--budget", "2"], "--budget"),
    (["--tolerance", "-1"], "--tolerance"),
    (["--bits", "3"], "--bits"),
])
def test_bad_input_exits_2_with_one_line_error(tiny, tmp_path, extra, needle):
    model, data = tiny
    out = tmp_path / "o.onnx"
    before = _sha(model)
    args = ["optimize", model]
    if "--data" not in extra:
        args += ["--data", data]
    if "-o" not in extra:
        args += ["-o", str(out)]
    args += [model if a == "SELF" else (str(tmp_path / a) if a == "missing.npz" else a) for a in extra]
    rc, stdout, stderr = run_cli(args)
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr
    assert stdout == ""
    assert not out.exists() and _sha(model) == before
    assert sorted(os.listdir(tmp_path)) == ["data.npz", "model.onnx"]  # nothing else written either


def test_budget_and_activations_on_tiny_model(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "o.onnx"
    rc, stdout, err = run_cli(["optimize", model, "--data", data, "-o", str(out), "--budget", "0.3",
                               "--activations", "--json", "--allow-loss-increase", "--target", "qdq"])
    assert rc == 0, err
    r = one_json(stdout)
    assert r["stages"][0]["settings"]["activations"] is True
    assert r["bytes"]["compressed"] <= 0.3 * r["bytes"]["reference"]
    src = onnx.load(model)
    m, int_fed = check_quantized_output(str(out), src)
    assert set(int_fed) == {n["node"] for n in r["nodes"] if n["level"].startswith("qdq-int")}
    # each quantized node's activation input is DequantizeLinear(QuantizeLinear(original input))
    producer = {o: n for n in m.graph.node for o in n.output}
    by_name = {n.name: n for n in m.graph.node}
    orig_inputs = {n.name: n.input[0] for n in src.graph.node}
    for name in int_fed:
        dq = producer[by_name[name].input[0]]
        assert dq.op_type == "DequantizeLinear"
        q = producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear" and q.input[0] == orig_inputs[name]
    # the test loss the command reports is the written model's, on the documented test split
    _, _, test = documented_splits(data, src)
    loss = make_loss("ce", "logits")
    got, ref = evaluate(m, test, loss, session=EXACT).loss, evaluate(src, test, loss, session=EXACT).loss
    assert got == pytest.approx(r["splits"]["test"]["compressed"]["loss"], rel=1e-9)
    assert r["verified"] == (got <= ref)


def test_budget_without_float_level(tiny, tmp_path):
    model, data = tiny
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "o.onnx"),
                                  "--bits", "4,8", "--budget", "0.5", "--json", "--allow-loss-increase"])
    assert rc == 0, stderr
    r = one_json(stdout)
    assert r["bytes"]["reference"] == 4 * (32 * 16 + 32 * 4)


def test_infeasible_sweep_point_does_not_discard_the_model(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "o.onnx"
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(out), "--bits", "8,16,float",
                                  "--sweep", "0.1,0.5", "--json", "--tolerance", "0.05"])
    assert rc == 0, stderr
    assert out.exists()
    sw = one_json(stdout)["stages"][0]["sweep"]
    assert [p["budget"] for p in sw] == [0.1, 0.5] and sw[0]["bytes"] is None and "infeasible" in sw[0]["note"]


def test_cet_cost_mode_uses_second_order_estimates(tiny, tmp_path):
    """--cost cet: no measured ΔL; each candidate's second-order estimate is the CET prediction g·δ + ½Σλ(v·δ)² +
    ½ρ‖δ⊥‖² from the node's eigenpairs, and the neighbourhood check is on the curvature term."""
    model, data = tiny
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "o.onnx"),
                                  "--cost", "cet", "--bits", "4,8,float", "--json", "--allow-loss-increase",
                                  "--target", "qdq"])
    assert rc == 0, stderr
    r = one_json(stdout)
    st = r["stages"][0]
    assert st["settings"]["cost"] == "cet"
    # the curvature pass (defaults): the sampled Fisher of a sub-sample of the measure part (the prediction is
    # out of sample for anything fitted on the fit part), one pass; no rounding curvature (no CET rounding)
    cv = st["settings"]["curvature"]
    assert set(cv) == {"prediction"}
    p = cv["prediction"]
    assert p["source"] == "fisher" and p["part"] == "calibration" and p["k"] == 32 and p["passes"] == 1
    m = r["stages"][0]["measurement"]
    assert m["measure_samples"] < p["samples"] <= min(128, m["fit_samples"] + m["measure_samples"])
    assert p["seconds"] > 0
    quantized = [c for c in st["candidates"] if not c["reference"]]
    assert quantized and all(c["measured"] is None and c["second_order"] is not None for c in quantized)
    for c in quantized:
        assert c["inside"] == (abs(c["second_order"] - c["predicted"]) <= r["config"]["criterion"]["error_max"])
    # 4-bit noise is larger than 8-bit noise, so its curvature term is too (per node)
    by = {(c["node"], c["level"]): c for c in quantized}
    for node in {c["node"] for c in quantized}:
        q4 = by[(node, "qdq-int4-b32")]["second_order"] - by[(node, "qdq-int4-b32")]["predicted"]
        q8 = by[(node, "qdq-int8")]["second_order"] - by[(node, "qdq-int8")]["predicted"]
        assert q4 > q8 >= 0


def test_llc_rounding_only_inside_the_neighbourhood(tiny, tmp_path):
    """--rounding llc uses sign-directed rounding where nearest rounding's relative noise is within
    --llc-radius and plain nearest rounding beyond it: with radius 0 every level is nearest-rounded, so the
    candidates equal those of --rounding nearest; with a huge radius they equal pure LLC rounding."""
    model, data = tiny

    def cands(*extra):
        rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "o.onnx"), "--bits",
                                      "4,8,float", "--json", "--allow-loss-increase", *extra])
        assert rc == 0, stderr
        return {(c["node"], c["level"]): c["rel_noise"] for c in one_json(stdout)["stages"][0]["candidates"]
                if not c["reference"]}
    nearest = cands("--rounding", "nearest")
    gated0 = cands("--rounding", "llc", "--llc-radius", "0")
    pure, gated_all = cands("--rounding", "llc", "--llc-radius", "1e9"), cands("--rounding", "llc")
    assert gated0 == nearest
    assert any(pure[k] != nearest[k] for k in pure)  # LLC rounding does move weights
    for k, v in gated_all.items():  # default radius: each level is one of the two
        assert v == nearest[k] or v == pure[k]


def test_auto_rounding_picks_one_rounding_per_level_outside_the_neighbourhood(tiny, tmp_path):
    """--rounding auto (the default): LLC where nearest rounding's relative error is within --llc-radius; elsewhere
    nearest and GPTQ are both measured and, per level, GPTQ is kept unless nearest's summed measured ΔL is lower by
    more than 2 standard errors of the difference — the same one for every node of that level outside the
    neighbourhood. --rounding gptq uses GPTQ everywhere."""
    model, data = tiny
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "o.onnx"), "--bits",
                                  "2,4,8,float", "--json", "--allow-loss-increase", "--target", "qdq"])
    assert rc == 0, stderr
    st = one_json(stdout)["stages"][0]
    per_level = st["settings"]["rounding_per_level"]
    assert per_level and all(set(v["sums"]) == {"nearest", "gptq"} for v in per_level.values())
    for level, v in per_level.items():
        s, se = v["sums"], v["se"]
        nearest_wins = s["nearest"] + 2 * (se["nearest"] ** 2 + se["gptq"] ** 2) ** 0.5 < s["gptq"]
        assert v["chosen"] == ("nearest" if nearest_wins else "gptq")
        rounds = {c["rounding"] for c in st["candidates"] if c["level"] == level and c["rel_noise"] > 0.05}
        assert rounds <= {v["chosen"]}
    inside = [c for c in st["candidates"] if not c["reference"] and c["rounding"] == "llc"]
    assert inside and all(c["level"] == "qdq-int8" or c["level"] == "qdq-int16" for c in inside)
    # one candidate per (node, level) reaches the solver
    keys = [(c["node"], c["level"]) for c in st["candidates"]]
    assert len(keys) == len(set(keys))
    # every joint re-solve round reports the predicted sum next to the joint measurement
    joint = st["settings"]["joint"]
    assert joint and all({"bytes", "predicted", "joint", "se"} <= set(r) for r in joint)
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "g.onnx"), "--bits",
                                  "2,4,float", "--json", "--allow-loss-increase", "--target", "qdq", "--rounding", "gptq"])
    assert rc == 0, stderr
    cands = one_json(stdout)["stages"][0]["candidates"]
    assert {c["rounding"] for c in cands if not c["reference"]} == {"gptq"}


def test_cet_rounding_and_cheap_cet_cost(tiny, tmp_path):
    """--rounding cet reports codes changed and the short-axis projection per candidate; --cost cet gives every
    candidate a CET estimate from the eigenpairs (no measurement); a cached run rebuilds identical bytes."""
    model, data = tiny
    cache = str(tmp_path / "cache")
    args = ["optimize", model, "--data", data, "--bits", "4,8,float", "--json", "--allow-loss-increase", "--target",
            "qdq", "--rounding", "cet", "--cet-k", "4", "--cache", cache]
    rc, stdout, stderr = run_cli(args + ["-o", str(tmp_path / "a.onnx")])
    assert rc == 0, stderr
    st = one_json(stdout)["stages"][0]
    cet = [c for c in st["candidates"] if not c["reference"]]
    assert all(c["rounding"] == "cet" and c["info"]["projection_after"] <= c["info"]["projection_before"] + 1e-12
               for c in cet)
    rc, stdout, stderr = run_cli(args + ["-o", str(tmp_path / "b.onnx")])
    assert rc == 0 and one_json(stdout)["stages"][0]["cache"]["hit"] is True
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    rc, stdout, stderr = run_cli(["optimize", model, "--data", data, "-o", str(tmp_path / "c.onnx"), "--bits",
                                  "4,8,float", "--json", "--allow-loss-increase", "--target", "qdq", "--cost", "cet",
                                  "--rounding", "nearest"])
    assert rc == 0, stderr
    r = one_json(stdout)
    quantized = [c for c in r["stages"][0]["candidates"] if not c["reference"]]
    assert all(c["measured"] is None and c["second_order"] is not None for c in quantized)
    assert "curvature" in r["seconds"] and "candidates" in r["seconds"]


@pytest.mark.parametrize("curvature", ["fisher", "lanczos"])
def test_cet_rounding_with_cet_cost_predicts_out_of_sample(tiny, tmp_path, curvature):
    """CET rounding reads the fit part's curvature, --cost cet then predicts with the measure part's (out of
    sample): two passes on disjoint parts, both in the report and in the cache (a hit rebuilds the same bytes
    without either)."""
    model, data = tiny
    cache = str(tmp_path / "cache")
    args = ["optimize", model, "--data", data, "--bits", "4,8,float", "--json", "--allow-loss-increase", "--target",
            "qdq", "--rounding", "cet", "--cost", "cet", "--cet-curvature", curvature, "--cache", cache]
    rc, stdout, stderr = run_cli(args + ["-o", str(tmp_path / "a.onnx")])
    assert rc == 0, stderr
    r = one_json(stdout)
    cv = r["stages"][0]["settings"]["curvature"]
    src = "fisher" if curvature == "fisher" else "lanczos"
    assert cv["rounding"]["part"] == "fit" and cv["prediction"]["part"] == "measure"
    assert cv["rounding"]["source"] == cv["prediction"]["source"] == src
    assert cv["rounding"]["k"] == (32 if curvature == "fisher" else 8)
    assert cv["rounding"]["passes"] == (1 if curvature == "fisher" else 16)
    rc, stdout, stderr = run_cli(args + ["-o", str(tmp_path / "b.onnx")])
    r2 = one_json(stdout)
    assert rc == 0 and r2["stages"][0]["cache"]["hit"] is True and "curvature" not in r2["seconds"]
    assert r2["stages"][0]["settings"]["curvature"]["cached"] is True
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_compare_cet_reports_the_prediction_next_to_the_measurement_without_changing_the_choice(tiny, tmp_path):
    model, data = tiny
    base = ["optimize", model, "--data", data, "--bits", "4,8,float", "--json", "--allow-loss-increase", "--target",
            "qdq"]
    rc, stdout, stderr = run_cli(base + ["-o", str(tmp_path / "a.onnx")])
    assert rc == 0, stderr
    rep = tmp_path / "rep"
    rc, stdout, stderr = run_cli(base + ["-o", str(tmp_path / "b.onnx"), "--compare-cet", "--report", str(rep)])
    assert rc == 0, stderr
    st = one_json(stdout)["stages"][0]
    quantized = [c for c in st["candidates"] if not c["reference"]]
    assert quantized and all(c["measured"] is not None and c["second_order"] is not None for c in quantized)
    # the CET term adds curvature to the first-order prediction: ½δᵀFδ ≥ 0 for the PSD Fisher model
    assert all(c["second_order"] >= c["predicted"] - 1e-12 for c in quantized)
    assert st["settings"]["curvature"]["prediction"]["part"] == "calibration"  # no rounding fitted to a curvature
    assert (rep / "cet_vs_measured.png").stat().st_size > 1000 and "cet_vs_measured.png" in (rep / "report.html").read_text()
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
