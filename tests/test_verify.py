"""verify.verify_with_backoff with real models (weights perturbed per ladder index) evaluated in ORT."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _models import torch_threads, mlp, ort_logits, save_npz, teacher_labels
from llc_onnx.calib.data import load_dataset
from llc_onnx.calib.losses import make_loss
from llc_onnx.ort_eval import Evaluation, evaluate
from llc_onnx.solvers.cost_model import Candidate
from llc_onnx.verify import plan_bytes, verify_with_backoff


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
    held = load_dataset(save_npz(tmp / "h.npz", y, x=x), model, batch_size=32)
    loss = make_loss("ce", "logits")
    return model, w, held, loss, evaluate(model, held, loss)


def ladder(node, measured, sizes):
    """Ladder of len(measured) noisy levels (measured calibration ΔL given) plus the reference last."""
    out = [Candidate(node, f"lvl{i}", s, 0.0, m, 0.1, True, m) for i, (m, s) in enumerate(zip(measured, sizes))]
    return out + [Candidate(node, "float", 1000, 0.0, 0.0, 0.0, True, 0.0, reference=True)]


def make_build(model, w, ladders, scales, calls):
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


def test_stops_at_round_zero_when_not_worse(setup):
    model, w, held, loss, ref = setup
    ladders = {"fc1": ladder("fc1", [0.3, 0.2], [10, 20]), "fc2": ladder("fc2", [0.1, 0.05], [10, 20])}
    calls = []
    build = make_build(model, w, ladders, [2.0, 1.0], calls)
    res = verify_with_backoff(build, ladders, {"fc1": 2, "fc2": 2}, held, loss, ref)
    assert len(res.rounds) == 1 and len(calls) == 1 and res.verified
    assert res.evaluation.loss == pytest.approx(ref.loss, abs=1e-7)
    # a noisy plan within the tolerance is also accepted as is
    noisy = evaluate(build({"fc1": 1, "fc2": 1}), held, loss).loss
    assert noisy > ref.loss + 1e-3
    calls.clear()
    res = verify_with_backoff(build, ladders, {"fc1": 1, "fc2": 1}, held, loss, ref,
                              tolerance=noisy - ref.loss + 1e-6)
    assert res.verified and len(res.rounds) == 1 and res.choice == {"fc1": 1, "fc2": 1}
    assert res.rounds[0].nbytes == 40 and res.rounds[0].raised == []


def test_raises_largest_measured_contribution_first(setup):
    model, w, held, loss, ref = setup
    # fc1's levels contribute more than fc2's at the matching position; order interleaves by contribution
    ladders = {"fc1": ladder("fc1", [0.30, 0.04, 0.01], [10, 20, 30]),
               "fc2": ladder("fc2", [0.20, 0.05, 0.02], [11, 21, 31])}
    calls = []
    build = make_build(model, w, ladders, [1.5, 1.0, 0.5], calls)
    res = verify_with_backoff(build, ladders, {"fc1": 0, "fc2": 0}, held, loss, ref, max_rounds=8)
    # k = ceil(2 movable / 8 rounds) = 1 node per round, the largest current contribution first
    raised = [r.raised for r in res.rounds[1:]]
    assert raised == [["fc1"], ["fc2"], ["fc2"], ["fc1"], ["fc2"], ["fc1"]]
    for r, ch in zip(res.rounds, calls):
        assert r.nbytes == plan_bytes(ladders, ch)
        assert r.held_loss == pytest.approx(evaluate(build(ch), held, loss).loss, abs=1e-12)
    # every round but the last was above the reference (else it would have stopped)
    assert all(r.held_loss > ref.loss for r in res.rounds[:-1])
    assert res.verified == (res.rounds[-1].held_loss <= ref.loss)
    assert res.verified  # at the latest, all-float is the reference model itself
    assert res.evaluation.loss == res.rounds[-1].held_loss and res.choice == calls[-1]


def test_never_exceeds_max_rounds_and_reports_failure(setup):
    model, w, held, loss, ref = setup
    ladders = {n: ladder(n, [0.5, 0.4, 0.3, 0.2, 0.1], [10, 20, 30, 40, 50]) for n in ("fc1", "fc2")}
    calls = []
    build = make_build(model, w, ladders, [3.0, 2.5, 2.0, 1.5, 1.0], calls)
    res = verify_with_backoff(build, ladders, {"fc1": 0, "fc2": 0}, held, loss, ref, max_rounds=2)
    assert len(res.rounds) == 3 == len(calls)
    assert [r.index for r in res.rounds] == [0, 1, 2]
    assert not res.verified and res.evaluation.loss > ref.loss
    assert all(len(r.raised) == 1 for r in res.rounds[1:])  # ceil(2 / 2)
    # max_rounds=0: exactly one build, no back-off
    calls.clear()
    res = verify_with_backoff(build, ladders, {"fc1": 0, "fc2": 0}, held, loss, ref, max_rounds=0)
    assert len(calls) == 1 and len(res.rounds) == 1 and not res.verified
    # max_rounds=1 with 2 movable nodes: both raised together
    calls.clear()
    res = verify_with_backoff(build, ladders, {"fc1": 0, "fc2": 0}, held, loss, ref, max_rounds=1)
    assert sorted(res.rounds[1].raised) == ["fc1", "fc2"] and res.choice == {"fc1": 1, "fc2": 1}


def test_unreachable_reference_stops_when_everything_is_at_the_top(setup):
    model, w, held, loss, ref = setup
    ladders = {n: ladder(n, [0.2], [10]) for n in ("fc1", "fc2")}
    calls = []
    build = make_build(model, w, ladders, [2.0], calls)
    better = Evaluation(ref.loss - 0.05, {}, ref.n)  # a reference nothing here can reach
    res = verify_with_backoff(build, ladders, {"fc1": 0, "fc2": 0}, held, loss, better, max_rounds=8)
    assert res.choice == {"fc1": 1, "fc2": 1}
    assert len(res.rounds) == 3  # round 0, raise fc?, raise the other, then nothing left to raise
    assert not res.verified
    assert res.evaluation.loss == pytest.approx(ref.loss, abs=1e-7)
