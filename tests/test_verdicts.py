"""The statistical procedure behind VERIFIED (issue 9): groups keep correlated samples on one side of every
split and widen the standard error; the lossless objective cannot buy a catastrophic node with small gains;
the fidelity objective needs no labels; the summary says when measurements are in-sample or the model is
adapted to its calibration data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llc_onnx
from _models import mlp, mlp_forward, save_npz, teacher_labels, torch_threads, write_mlp_files
from llc_onnx.calib.data import fit_measure_split, load_dataset, split_dataset
from llc_onnx.calib.noise import LossSamples, paired_delta
from llc_onnx.solvers.cost_model import Candidate, CostTable, undominated


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def grouped_data(tmp_path, n_groups=60, views=4, seed=0):
    """model.onnx + data.npz whose samples come in groups of ``views`` near-copies (augmented views of one
    'photo'): labels from a perturbed teacher, ``groups`` = the photo index."""
    model, w = mlp(seed, 16, 32, 4)
    rng = np.random.default_rng(seed + 7)
    base = rng.normal(size=(n_groups, 16)).astype(np.float32)
    x = np.repeat(base, views, axis=0) + 0.05 * rng.normal(size=(n_groups * views, 16)).astype(np.float32)
    teacher = {k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32) * np.abs(v).mean() for k, v in w.items()}
    y = teacher_labels(mlp_forward(teacher, x), seed=seed + 1, flip=0.1)
    groups = np.repeat(np.arange(n_groups), views)
    import onnx

    onnx.save_model(model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "data.npz", x=x, labels=y, groups=groups)
    return str(tmp_path / "model.onnx"), str(tmp_path / "data.npz"), model, groups


def test_splits_keep_groups_whole(tmp_path):
    _, data, model, groups = grouped_data(tmp_path)
    ds = load_dataset(data, model, batch_size=32)
    rest, test = split_dataset(ds, 0.5, 0)
    calib, val = split_dataset(rest, 0.25, 1)
    fit, meas = fit_measure_split(calib, None, 0)
    parts = [test, val, fit, meas]
    sets = [set(np.concatenate([b.groups for b in p.batches]).tolist()) for p in parts]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]  # no group on two sides of any split
    assert sum(p.n_samples for p in parts) == ds.n_samples
    assert all(p.n_samples % 4 == 0 for p in parts)  # whole groups of 4 views


def test_clustered_standard_error_is_wider_for_correlated_units():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(50), 4)
    e = np.repeat(rng.normal(size=50), 4) + 0.01 * rng.normal(size=200)  # 4 near-identical copies per group
    n = 200.0
    d0, se_iid = paired_delta(e, n)
    d1, se_cl = paired_delta(e, n, g)
    assert d0 == pytest.approx(d1)
    assert se_cl > 1.7 * se_iid  # ~sqrt(4) wider: the copies carry no new information
    # independent units: the clustered SE is the iid one
    assert paired_delta(e, n, np.arange(200))[1] == pytest.approx(se_iid)
    s = LossSamples(np.ones(200) + e, np.ones(200), g)
    assert s.delta(LossSamples(np.ones(200), np.ones(200), g))[1] == pytest.approx(se_cl)


def test_optimize_with_groups_reports_group_aware_splits(tmp_path):
    model, data, _, _ = grouped_data(tmp_path)
    res = llc_onnx.optimize(model, data, llc_onnx.OptimizeConfig(target=llc_onnx.TargetConfig(name="qdq"),
                                                                  quant=llc_onnx.QuantConfig(bits=(8, "float"))))
    s = res.splits
    assert s["test"].n % 4 == 0 and s["validation"].n % 4 == 0 and s["calibration"].n % 4 == 0
    assert s["calibration"].extra["fit"] % 4 == 0


def test_lossless_does_not_buy_a_catastrophic_node_with_small_gains():
    """Nine nodes whose cheap level 'gains' −0.1 each (fitted noise) and one node whose cheap level costs
    +0.6: with the papers' plain sum the gains pay for it; gain credit ½ and the per-node bound refuse it."""
    cands = []
    for i in range(9):
        cands += [Candidate(f"n{i}", "int8", 10, -0.1, -0.1, 0.01, True, -0.1, se=0.05),
                  Candidate(f"n{i}", "float", 40, 0, 0, 0, True, 0.0, reference=True)]
    cands += [Candidate("out", "int2", 5, 1.0, 0.6, 0.4, False, 0.6),
              Candidate("out", "int8", 10, 0.0, 0.001, 0.01, True, 0.001),
              Candidate("out", "float", 40, 0, 0, 0, True, 0.0, reference=True)]
    table = CostTable.from_candidates(cands)
    from llc_onnx.solvers import knapsack

    def lossless(gain_credit, bound):
        nodes, kept, costs, sizes = table.solver_inputs(gain_credit, bound)
        pick = knapsack.solve_lossless(costs, sizes)
        return {n: kept[i][j].level for i, (n, j) in enumerate(zip(nodes, pick))}

    assert lossless(1.0, None)["out"] == "int2"  # the plain sum: 9 × 0.1 of "gains" pay for +0.6
    assert lossless(0.5, None)["out"] == "int8"  # gains count half: 0.45 < 0.6
    assert lossless(1.0, 0.1)["out"] == "int8"  # a single node may not cost more than the bound


def test_dominated_levels_are_not_offered():
    c = [Candidate("n", "int4", 300, 0, 0.1, 0.1, True, 0.1), Candidate("n", "int8", 250, 0, 0.01, 0.01, True, 0.01),
         Candidate("n", "float", 1000, 0, 0, 0, True, 0.0, reference=True)]
    order = {"int4": 4, "int8": 8, "float": 99}
    kept = undominated(c, lambda x: order[x.level])
    assert [x.level for x in kept] == ["int8", "float"]  # int4 takes more bytes than int8: never offered


def test_formats_tied_in_fidelity_and_bytes_both_stay():
    """Static and dynamic W8A8 store the same bits in the same bytes: neither dominates the other (the solver
    weighs their loss and time); a coarser level with as many bytes is still dominated by both."""
    c = [Candidate("n", "w8a8-static", 250, 0, 0.03, 0.03, True, 0.03),
         Candidate("n", "w8a8-dynamic", 250, 0, 0.01, 0.01, True, 0.01),
         Candidate("n", "int4", 250, 0, 0.1, 0.1, True, 0.1),
         Candidate("n", "int2", 120, 0, 0.3, 0.3, True, 0.3),
         Candidate("n", "float", 1000, 0, 0, 0, True, 0.0, reference=True)]
    order = {"int2": (0, 2), "int4": (0, 4), "w8a8-static": (0, 8), "w8a8-dynamic": (0, 8), "float": (1, 32)}
    kept = undominated(c, lambda x: (*order[x.level], x.nbytes))
    assert [x.level for x in kept] == ["w8a8-static", "w8a8-dynamic", "int2", "float"]
    from llc_onnx.solvers import knapsack

    table = CostTable.from_candidates(c)
    nodes, ladders, costs, sizes = table.solver_inputs(1.0, None, lambda x: (*order[x.level], x.nbytes))
    pick = knapsack.solve_budget(costs[0:1], sizes[0:1], 250)
    assert ladders[0][pick[0]].level == "w8a8-dynamic"          # the same bytes, the lower loss


def test_fidelity_objective_needs_no_labels(tmp_path):
    model, data = write_mlp_files(tmp_path, n=600)
    with np.load(data) as z:
        np.savez(tmp_path / "unlabelled.npz", x=z["x"])
    res = llc_onnx.optimize(model, str(tmp_path / "unlabelled.npz"),
                            llc_onnx.OptimizeConfig(target=llc_onnx.TargetConfig(name="qdq"),
                                                    quant=llc_onnx.QuantConfig(bits=(4, 8, "float"))))
    assert res.objective == "fidelity" and res.loss == "fidelity" and res.tolerance == 0.002
    t = res.splits["test"]
    assert t.reference.loss == pytest.approx(0.0, abs=1e-12)  # the float model is its own teacher
    assert res.verified == (t.compressed.loss <= 0.002)
    assert "agree" in t.compressed.metrics and 0 <= t.compressed.metrics["agree"] <= 1
    # with labels, --objective fidelity still reports the labelled loss on the test split
    res2 = llc_onnx.optimize(model, data, llc_onnx.OptimizeConfig(
        target=llc_onnx.TargetConfig(name="qdq"), quant=llc_onnx.QuantConfig(bits=(8, "float")),
        criterion=llc_onnx.CriterionConfig(objective="fidelity")))
    assert res2.objective == "fidelity" and res2.splits["test"].extra["task_loss"]["name"] == "ce"


def test_in_sample_and_adapted_notes(tmp_path, capsys):
    """One calibration batch: fit and measure coincide and the summary says so on the console; the LLC rounding
    fitted on those very samples lowers their loss by more than its standard error allows, and the summary flags
    the model as adapted to its calibration data."""
    from llc_onnx.cli import main

    model, data = write_mlp_files(tmp_path, n=120)
    rc = main(["optimize", model, "--data", data, "-o", str(tmp_path / "o.onnx"), "--batch-size", "512",
               "--target", "qdq", "--bits", "8,float", "--allow-loss-increase"])
    out = capsys.readouterr().out
    assert rc == 0 and "fit and measure parts coincide" in out and "adapted to the calibration data" in out


def test_the_gain_report_describes_the_plan_kept(tmp_path):
    """How much of the plan rests on measured gains is reported for the plan that was kept (here a 0.3 budget:
    whichever of the solver's plan, an alternative or a back-off round won), named, from its own candidates."""
    from llc_onnx.solvers.cost_model import plan_costs

    model, data = write_mlp_files(tmp_path, n=400)
    res = llc_onnx.optimize(model, data, llc_onnx.OptimizeConfig(
        target=llc_onnx.TargetConfig(name="qdq"), quant=llc_onnx.QuantConfig(bits=(2, 4, 8, "float"), budget=0.3)))
    st = res.stages[0]
    pc = st.plan_costs
    assert pc["plan"] == st.chosen_plan
    by_key = {(c.node, c.level): c for c in st.candidates}
    kept = [by_key[(n.node, n.level)] for n in st.nodes]
    expect = plan_costs(kept, st.settings["gain_credit"])
    assert {k: v for k, v in pc.items() if k != "plan"} == expect


def test_the_summary_says_when_standard_errors_rest_on_few_or_shared_units():
    """Few groups, few samples, or spans of one sequence: the note names the split, the count and the remedy;
    enough independent units: no note."""
    from llc_onnx.calib.noise import LossSamples
    from llc_onnx.flows.context import se_units_note

    few = LossSamples(np.ones(12), np.ones(12), np.repeat(np.arange(3), 4))
    note = se_units_note(few, 12, "validation")
    assert note.startswith("validation standard errors rest on 3 independent groups") and "\n" not in note
    assert se_units_note(LossSamples(np.ones(5), np.ones(5)), 5, "validation").endswith("(at least 10 samples)")
    spans = se_units_note(LossSamples(np.ones(16), np.full(16, 64.0)), 4, "validation")
    assert "16 spans of 4 sequence(s)" in spans and "lower estimate" in spans
    assert se_units_note(LossSamples(np.ones(40), np.ones(40), np.arange(40) // 2), 40, "validation") is None
    assert se_units_note(LossSamples(np.ones(40), np.ones(40)), 40, "validation") is None
    assert se_units_note(None, 40, "validation") is None


def test_few_validation_groups_are_noted_in_the_result(tmp_path):
    model, data, _, _ = grouped_data(tmp_path, n_groups=16, views=4)
    res = llc_onnx.optimize(model, data, llc_onnx.OptimizeConfig(target=llc_onnx.TargetConfig(name="qdq"),
                                                                  quant=llc_onnx.QuantConfig(bits=(8, "float"))))
    assert any(n.startswith("validation standard errors rest on") and "groups" in n for n in res.notes), res.notes


def test_fidelity_to_a_probability_output_compares_the_probabilities(tmp_path):
    """A model ending in Softmax: the fidelity KL reads its output as a probability (log, no second softmax), so
    KL between two probability outputs equals KL(p ‖ q) computed by hand; an output that only sums to 1 (no
    Softmax node) is read the same way."""
    import onnx
    from onnx import helper

    from llc_onnx.calib.losses import FidelityLoss
    from llc_onnx.config import OptimizeConfig, QuantConfig, TargetConfig
    from llc_onnx.flows.context import create_context

    model, w = mlp(0, 16, 32, 4)
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["p"], axis=1, name="softmax"))
    model.graph.output[0].name = "p"
    path = tmp_path / "softmax.onnx"
    onnx.save_model(model, str(path))
    x = np.random.default_rng(3).normal(size=(400, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    ctx = create_context(str(path), str(tmp_path / "x.npz"),
                         OptimizeConfig(target=TargetConfig(name="qdq"), quant=QuantConfig(bits=(8, "float"))))
    assert isinstance(ctx.loss, FidelityLoss) and ctx.loss.probs
    p = np.exp(mlp_forward(w, x[:5]))
    p /= p.sum(1, keepdims=True)
    q = np.roll(p, 1, axis=1)
    kl = float((p * (np.log(p) - np.log(q))).sum())
    s, n = ctx.loss.terms(torch.tensor(q), torch.tensor(p))
    assert n == 5 and float(s) == pytest.approx(kl, rel=1e-9)
    # no Softmax node to tell (Exp divided by its row sums): the teacher's values sum to 1, read the same way
    exp_model, _ = mlp(0, 16, 32, 4)
    exp_model.graph.node.extend([helper.make_node("Exp", ["logits"], ["e"]),
                                 helper.make_node("ReduceSum", ["e"], ["s"], keepdims=1),
                                 helper.make_node("Div", ["e", "s"], ["p"])])
    exp_model.graph.output[0].name = "p"
    exp_model.graph.node[-2].input.append("axes")
    exp_model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "axes"))
    onnx.save_model(exp_model, str(tmp_path / "div.onnx"))
    ctx2 = create_context(str(tmp_path / "div.onnx"), str(tmp_path / "x.npz"),
                          OptimizeConfig(target=TargetConfig(name="qdq"), quant=QuantConfig(bits=(8, "float"))))
    assert ctx2.loss.probs


def test_a_group_across_batches_is_never_split_between_fit_and_measure():
    """Batch-unit data (a directory or reader) is split by whole batches: a group in two batches that the
    fit/measure split would separate is the same one-line error as for the other splits; groups kept inside
    their batches split cleanly."""
    from llc_onnx.calib.data import Batch, Dataset
    from llc_onnx.errors import LLCError

    def ds(groups_per_batch):
        return Dataset([Batch({"x": np.zeros((len(g), 2), np.float32)}, np.zeros(len(g), np.int64),
                              np.asarray(g, np.int64)) for g in groups_per_batch], "dir/")

    with pytest.raises(LLCError, match=r"^dir/: group 1 has samples in several batches") as e:
        fit_measure_split(ds([[0, 1], [1, 2], [3, 3], [4, 4]]), seed=0)
    assert "\n" not in str(e.value)
    fit, meas = fit_measure_split(ds([[0, 0], [1, 1], [2, 2], [3, 3]]), seed=0)
    a = {int(g) for b in fit.batches for g in b.groups}
    b = {int(g) for b in meas.batches for g in b.groups}
    assert a and b and not a & b and a | b == {0, 1, 2, 3}


def test_an_explicit_validation_file_the_fallback_and_the_plans_measured(tmp_path):
    """``val=`` is the validation split as given (the calibration split keeps everything the test split does not
    take); too little data for a validation part falls back to the calibration data and says so; the plans
    measured jointly start with the solver's, then the uniform levels smaller than it."""
    model, data = write_mlp_files(tmp_path, n=400)
    with np.load(data) as z:
        np.savez(tmp_path / "val.npz", x=z["x"][:60], labels=z["labels"][:60])
    cfg = llc_onnx.OptimizeConfig(target=llc_onnx.TargetConfig(name="qdq"),
                                  quant=llc_onnx.QuantConfig(bits=(4, 8, "float")))
    res = llc_onnx.optimize(model, data, cfg, val=str(tmp_path / "val.npz"))
    v, c, t = res.splits["validation"], res.splits["calibration"], res.splits["test"]
    assert v.n == 60 and "val.npz" in v.source and not v.extra["same_as_calibration"]
    assert c.n + t.n == 400                      # nothing of --data went to validation
    trials = res.stages[0].trials
    assert trials[0].name == "solver"
    # the alternatives are measured smallest first, while none of at most their size has passed: uniform int4
    # (smaller than the solver's plan here) is always among them
    small = [tr for tr in trials if tr.name == "uniform int4"]
    assert small and small[0].nbytes < trials[0].nbytes
    tiny = tmp_path / "tiny.npz"
    with np.load(data) as z:
        np.savez(tiny, x=z["x"][:6], labels=z["labels"][:6])
    few = llc_onnx.optimize(model, str(tiny), cfg)
    assert few.splits["validation"].extra["same_as_calibration"]
    assert any(n.startswith("validation = calibration data") for n in few.notes)
