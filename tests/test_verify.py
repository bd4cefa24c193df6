"""verify.select_plan (validation split) and verify.verdict (test split) with real models — weights perturbed
per ladder index — evaluated in ONNX Runtime."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _models import mlp, ort_logits, save_npz, teacher_labels, torch_threads
from llc_onnx.calib.data import load_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.ort_eval import Evaluation, evaluate
from llc_onnx.solvers.cost_model import Candidate
from llc_onnx.verify import plan_bytes, select_plan, verdict


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


WEIGHT = {"fc1": "W1", "fc2": "W2"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    model, w = mlp(seed=3)
    x = np.random.default_rng(4).normal(size=(60, 8)).astype(np.float32)
    y = teacher_labels(ort_logits(model, x=x), flip=0.05)
    val = load_dataset(save_npz(tmp / "h.npz", y, x=x), model, batch_size=32)
    loss = make_loss("ce", "logits")

    def ev(m, data=val):
        return evaluate(m, data, loss, samples=True)

    return model, w, val, loss, ev, ev(model)


def ladder(node, measured, sizes):
    """Ladder of len(measured) noisy levels (measured calibration ΔL given) plus the reference last."""
    out = [Candidate(node, f"lvl{i}", s, 0.0, m, 0.1, True, m) for i, (m, s) in enumerate(zip(measured, sizes))]
    return out + [Candidate(node, "float", 1000, 0.0, 0.0, 0.0, True, 0.0, reference=True)]


def make_build(model, w, ladders, scales, calls, sign=None):
    """Level i of node n perturbs its weight by fixed noise times scales[i]; the reference level is exact."""
    rng = np.random.default_rng(11)
    noise = {n: rng.normal(size=w[WEIGHT[n]].shape).astype(np.float32) for n in ladders}

    def build(choice):
        calls.append(dict(choice))
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for init in m.graph.initializer:
            for n, wname in WEIGHT.items():
                if init.name == wname and n in choice:
                    i = choice[n]
                    s = 0.0 if ladders[n][i].reference else scales[i]
                    init.CopyFrom(numpy_helper.from_array(w[wname] + s * noise[n], wname))
        return m
    return build


def test_stops_when_the_solvers_plan_passes(setup):
    model, w, val, loss, ev, ref = setup
    ladders = {"fc1": ladder("fc1", [0.3, 0.2], [10, 20]), "fc2": ladder("fc2", [0.1, 0.05], [10, 20])}
    calls = []
    build = make_build(model, w, ladders, [2.0, 1.0], calls)
    sel = select_plan(build, ladders, [("solver", {"fc1": 2, "fc2": 2})], ev, ref)
    # one build per trial, and the chosen plan's once more at the end (no plan's model is held meanwhile)
    assert len(sel.trials) == 1 and calls == [{"fc1": 2, "fc2": 2}] * 2
    assert sel.first_plan_passed and sel.trial.name == "solver"
    assert sel.val.loss == pytest.approx(ref.loss, abs=1e-7)
    # a noisy plan within the tolerance is also accepted as is
    noisy = ev(build({"fc1": 1, "fc2": 1})).loss
    assert noisy > ref.loss + 1e-3
    calls.clear()
    sel = select_plan(build, ladders, [("solver", {"fc1": 1, "fc2": 1})], ev, ref, tolerance=noisy - ref.loss + 1e-6)
    assert sel.first_plan_passed and sel.choice == {"fc1": 1, "fc2": 1} and sel.trials[0].nbytes == 40


def test_raises_largest_measured_contribution_first_and_keeps_the_passing_plan(setup):
    model, w, val, loss, ev, ref = setup
    ladders = {"fc1": ladder("fc1", [0.30, 0.04, 0.01], [10, 20, 30]),
               "fc2": ladder("fc2", [0.20, 0.05, 0.02], [11, 21, 31])}
    calls = []
    build = make_build(model, w, ladders, [1.5, 1.0, 0.5], calls)
    sel = select_plan(build, ladders, [("solver", {"fc1": 0, "fc2": 0})], ev, ref, max_rounds=8)
    # k = ceil(2 movable / 8 rounds) = 1 node per round, the largest current contribution first
    assert len(calls) == len(sel.trials) + 1 and calls[-1] == sel.choice  # the chosen plan built once more
    raised = [t.raised for t in sel.trials[1:]]
    assert raised == [["fc1"], ["fc2"], ["fc2"], ["fc1"], ["fc2"], ["fc1"]][:len(raised)]
    for t, ch in zip(sel.trials, calls):
        assert t.nbytes == plan_bytes(ladders, ch)
        assert t.val_loss == pytest.approx(ev(build(ch)).loss, abs=1e-12)
    assert not sel.first_plan_passed
    assert all(not t.passed for t in sel.trials[:-1]) and sel.trials[-1].passed  # stopped at the first pass
    assert sel.trial is sel.trials[-1] and sel.choice == sel.trials[-1].choice


def test_the_best_plan_is_kept_not_the_last(setup):
    """When nothing passes, the plan with the lowest validation loss is returned, even if later rounds were
    worse (raising a node can raise the loss)."""
    model, w, val, loss, ev, ref = setup
    ladders = {n: ladder(n, [0.5, 0.4, 0.3], [10, 20, 30]) for n in ("fc1", "fc2")}
    calls = []
    build = make_build(model, w, ladders, [0.6, 3.0, 2.0], calls)  # the "higher" levels are noisier
    better = Evaluation(ref.loss - 1.0, {}, ref.n)  # unreachable: nothing passes
    sel = select_plan(build, ladders, [("solver", {"fc1": 0, "fc2": 0})], ev, better, max_rounds=3)
    assert not any(t.passed for t in sel.trials)
    best = min(sel.trials, key=lambda t: t.val_loss)
    assert sel.trial is best and best is not sel.trials[-1]
    assert ev(sel.model).loss == pytest.approx(best.val_loss, abs=1e-12)


def test_smaller_alternative_wins_only_with_a_margin(setup):
    model, w, val, loss, ev, ref = setup
    ladders = {n: ladder(n, [0.01, 0.001], [10, 20]) for n in ("fc1", "fc2")}
    calls = []
    build = make_build(model, w, ladders, [0.02, 0.01], calls)
    solver = ("solver", {"fc1": 1, "fc2": 1})
    small = ("uniform small", {"fc1": 0, "fc2": 0})
    tol = 0.05  # both plans are far inside it
    sel = select_plan(build, ladders, [solver, small], ev, ref, tolerance=tol, margin_z=1.0)
    assert sel.trial.name == "uniform small" and [t.name for t in sel.trials] == ["solver", "uniform small"]
    # an alternative whose Δ + z·SE exceeds the tolerance does not pass, though its Δ alone would
    t = sel.trials[1]
    tight = t.val_delta + 0.5 * t.val_se
    sel = select_plan(build, ladders, [solver, small], ev, ref, tolerance=max(tight, sel.trials[0].val_delta),
                      margin_z=1.0)
    if t.val_se > 0:
        assert sel.trial.name == "solver"
    # a size budget excludes alternatives above it and stops back-off at it
    sel = select_plan(build, ladders, [small, ("uniform large", {"fc1": 2, "fc2": 2})], ev,
                      Evaluation(ref.loss - 1.0, {}, ref.n), max_rounds=4, max_bytes=30)
    assert all(t.nbytes <= 30 for t in sel.trials)


def test_verdict_uses_the_test_split_once(setup, tmp_path):
    model, w, val, loss, ev, ref = setup
    x = np.random.default_rng(9).normal(size=(40, 8)).astype(np.float32)
    test = load_dataset(save_npz(tmp_path / "t.npz", teacher_labels(ort_logits(model, x=x)), x=x), model)
    seen = []

    def evaluate_once(m, data):
        seen.append(data)
        return evaluate(m, data, loss)

    v = verdict(model, model, test, evaluate_once, 0.0)
    assert v.verified and seen == [test, test]  # float and compressed, each once, on the test split only
    ladders = {"fc1": ladder("fc1", [0.1], [10]), "fc2": ladder("fc2", [0.1], [10])}
    worse = make_build(model, w, ladders, [3.0], [])({"fc1": 0, "fc2": 0})
    assert not verdict(worse, model, test, evaluate_once, 0.0).verified
