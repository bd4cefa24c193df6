"""The latency budget met on the written model (``flows.latency.fit_measured``): the solver's plan is timed, then
moved towards its nodes' fastest formats in rounds, cheapest loss increase first, until it meets the budget.

The timing here is a fixed function of the plan (a model of integer regions whose float/integer boundaries cost
time, the effect the one-unit table misses), so the rounds are deterministic; the real timing is
``plan_fraction`` (ONNX Runtime, interleaved with the float model), run end to end by the last test."""

from __future__ import annotations

import os

import pytest

from llc_onnx.errors import LLCError
from llc_onnx.flows.latency import fastest_levels, fit_measured, unit_fastest_levels
from llc_onnx.solvers.cost_model import Candidate

EX = os.path.join(os.path.dirname(__file__), "..", "examples")
CHAIN = [f"n{i}" for i in range(8)]


def ladder(node: str, cost_int8: float, cost_int4: float) -> list[Candidate]:
    """int4 (smallest), int8, float — the order of a solver ladder."""
    return [Candidate(node, "int4", 1, 0.0, 0.0, 0.1, True, cost_int4),
            Candidate(node, "int8", 2, 0.0, 0.0, 0.01, True, cost_int8),
            Candidate(node, "float", 8, 0.0, 0.0, 0.0, True, 0.0, reference=True)]


# int8 is the fast integer kernel, int4 a slow weight-only one (as W8A8 vs a 4-bit DQ in front of a Conv)
UNIT_MS = {"int8": -1.0, "int4": 0.5, "float": 0.0}


def unit(node: str, level: str) -> float:
    return UNIT_MS[level]


def chain_fraction(ladders):
    """A chain of 8 equal nodes, 1 unit each in float, 0.4 as int8; every float↔int8 boundary costs 0.5."""
    def measure(choice):
        kind = ["int8" if ladders[n][choice[n]].level == "int8" else "other" for n in CHAIN]
        t = sum(0.4 if k == "int8" else 1.0 for k in kind)
        t += 0.5 * sum(a != b for a, b in zip(kind, kind[1:]))
        return t / len(CHAIN)
    return measure


@pytest.fixture
def ladders():
    costs = [0.05, 0.01, 0.03, 0.02, 0.00, 0.04, 0.06, 0.07]
    return {n: ladder(n, c, 1.0) for n, c in zip(CHAIN, costs)}


def test_fastest_levels_are_the_fastest_quantized_formats(ladders):
    fast = fastest_levels(ladders, unit)
    assert all(ladders[n][i].level == "int8" for n, i in fast.items())
    # float included: int8 still wins here; with int8 slower than float in its unit, float is the unit-fastest
    slow = unit_fastest_levels(ladders, lambda n, lv: {"int8": 0.2, "int4": 0.5}[lv])
    assert all(ladders[n][i].reference for n, i in slow.items())


def test_a_plan_within_budget_is_kept_after_one_timing(ladders):
    start = {n: 2 for n in CHAIN}                       # all float: fraction 1.0
    calls = []

    def measure(ch):
        calls.append(dict(ch))
        return chain_fraction(ladders)(ch)
    plan, rows = fit_measured(ladders, start, fastest_levels(ladders, unit), measure, 1.0)
    assert plan == start and len(calls) == 1 and rows == [{"round": 0, "fraction": 1.0, "moved": []}]


def test_rounds_move_cheapest_nodes_first_until_the_budget_is_met(ladders):
    """Islands of int8 between float nodes pay boundaries: the one-unit sum would call the alternating plan
    0.7 of float; timed it is 1.14. The rounds move the float nodes to int8 one per round, cheapest first
    (n4 at 0.00, then n2 at 0.03), and stop at the first plan timed within the budget (0.74)."""
    start = {n: (1 if i % 2 else 2) for i, n in enumerate(CHAIN)}   # n1, n3, n5, n7 int8: alternating
    measure = chain_fraction(ladders)
    assert measure(start) == pytest.approx((4 * 0.4 + 4 * 1.0 + 7 * 0.5) / 8)
    plan, rows = fit_measured(ladders, start, fastest_levels(ladders, unit), measure, 0.75, rounds=4)
    # 4 nodes movable (n0, n2, n4, n6), 4 rounds: one per round
    assert [r["moved"] for r in rows] == [[], ["n4"], ["n2"]]
    assert [round(r["fraction"], 4) for r in rows] == [1.1375, 0.9375, 0.7375]
    assert plan["n0"] == plan["n6"] == 2 and all(ladders[n][plan[n]].level == "int8" for n in ("n2", "n4"))


def test_budget_out_of_reach_is_refused_with_the_measured_fraction(ladders):
    start = {n: 2 for n in CHAIN}
    with pytest.raises(LLCError, match=r"latency budget 0.3: .* measured 0.400× .* at batch 32"):
        fit_measured(ladders, start, fastest_levels(ladders, unit), chain_fraction(ladders), 0.3, batch="32")


def test_unit_fastest_plan_is_tried_last(ladders):
    """Where integer kernels never pay off (small layers), the unit table's fastest plan — float — is timed after
    the fastest quantized one, and kept when it meets the budget."""
    start = {n: 1 for n in CHAIN[:4]} | {n: 0 for n in CHAIN[4:]}

    def measure(ch):
        return 1.0 + 0.2 * sum(not ladders[n][i].reference for n, i in ch.items())
    plan, rows = fit_measured(ladders, start, fastest_levels(ladders, unit), measure, 1.05,
                              unit_fastest={n: 2 for n in CHAIN})
    assert all(ladders[n][i].reference for n, i in plan.items())
    assert rows[-1]["plan"] == "one-unit fastest" and rows[-1]["fraction"] == 1.0


def test_optimize_with_a_latency_budget_times_the_plan():
    """End to end on the bundled example: the plan that goes to validation was timed in ONNX Runtime against
    the float model, and the summary rows say so. A budget no plan can meet on this machine (0.01) is refused
    with the measured fraction, and nothing is written."""
    import llc_onnx
    from llc_onnx.config import CriterionConfig, OptimizeConfig, TargetConfig

    cfg = OptimizeConfig(target=TargetConfig(latency_budget=3.0, measure_latency=False),
                         criterion=CriterionConfig(allow_loss_increase=True))
    res = llc_onnx.optimize(os.path.join(EX, "fashion_cnn.onnx"), os.path.join(EX, "fashion_data.npz"), cfg)
    lat = res.stages[0].settings["latency"]
    assert lat["measured"] and lat["measured"][0]["round"] == 0 and lat["measured"][-1]["fraction"] <= 3.0
    assert res.stages[0].trials[0].name.startswith("solver")
    cfg = OptimizeConfig(target=TargetConfig(latency_budget=0.01, measure_latency=False),
                         criterion=CriterionConfig(allow_loss_increase=True))
    with pytest.raises(LLCError, match="latency budget 0.01: the fastest plans tried"):
        llc_onnx.optimize(os.path.join(EX, "fashion_cnn.onnx"), os.path.join(EX, "fashion_data.npz"), cfg)


def test_backoff_under_a_latency_budget_raises_only_admissible_nodes():
    """Back-off raises the most harmful nodes first; under a latency budget the raised nodes are cut to the
    longest prefix of that order that stays within it (halving), and a node that breaks it alone is pinned, so
    later rounds do not time it again."""
    from llc_onnx.flows.latency import admissible
    from llc_onnx.verify import _raise_nodes

    lad = {n: [Candidate(n, "int8", 1, 0.0, m, 0.01, True, m), Candidate(n, "float", 4, 0.0, 0.0, 0.0, True, 0.0,
                                                                          reference=True)]
           for n, m in (("a", 0.3), ("b", 0.2), ("c", 0.5), ("d", 0.1))}
    # raising c (or a together with c) to float breaks the budget: float↔int8 boundaries around it
    log: list[dict] = []
    timings = []

    def measure(ch):
        timings.append(dict(ch))
        return 0.9 if ch["c"] == 1 else 0.5
    ok = admissible(measure, 0.66, log)
    choice, pinned = {n: 0 for n in lad}, set()
    # c, a together: over; c alone (the prefix of 1): over, pinned; a alone: within
    assert _raise_nodes(lad, choice, 2, None, ok, pinned) == ["a"]
    assert pinned == {"c"} and choice == {"a": 1, "b": 0, "c": 0, "d": 0}
    assert [row["within"] for row in log] == [False, False, True]
    n = len(timings)
    assert _raise_nodes(lad, choice, 2, None, ok, pinned) == ["b", "d"] and len(timings) == n + 1
    # a long order: the halving finds the longest prefix within budget in log2(k) + 1 timings
    many = {f"n{i:02d}": [Candidate(f"n{i:02d}", "int8", 1, 0.0, 1.0 - i / 100, 0.01, True, 1.0 - i / 100),
                          Candidate(f"n{i:02d}", "float", 4, 0.0, 0.0, 0.0, True, 0.0, reference=True)]
            for i in range(32)}
    log2: list[dict] = []
    ok2 = admissible(lambda ch: 0.5 + 0.03 * sum(ch.values()), 0.66, log2)   # 5 raises fit, 6 do not
    ch2 = {n: 0 for n in many}
    assert _raise_nodes(many, ch2, 16, None, ok2, set()) == [f"n{i:02d}" for i in range(4)]
    assert len(log2) == 3                                                   # 16, 8, 4
    # without a budget the order alone decides
    plain = {n: 0 for n in lad}
    assert _raise_nodes(lad, plain, 2, None) == ["c", "a"]


def test_latency_batches_are_made_from_the_calibration_samples():
    """``--latency-batches``: a batch of n is the first n calibration samples in order, repeated when there are
    fewer; a model with a fixed batch, or batches whose shapes differ beyond the batch dimension, give a
    one-line error naming the flag."""
    import numpy as np

    from llc_onnx.calib.data import Batch, Dataset
    from llc_onnx.flows.latency import batch_inputs

    xs = [np.full((2, 3), i, np.float32) for i in range(3)]
    data = Dataset([Batch({"x": x}, None) for x in xs], "mem")
    assert batch_inputs(data, 1)["x"].tolist() == [[0, 0, 0]]
    assert batch_inputs(data, 5)["x"][:, 0].tolist() == [0, 0, 1, 1, 2]
    assert batch_inputs(data, 8)["x"][:, 0].tolist() == [0, 0, 1, 1, 2, 2, 0, 0]
    fixed = Dataset([Batch({"x": x}, None) for x in xs], "mem", fixed_batch=True)
    assert batch_inputs(fixed, 2)["x"].shape == (2, 3)
    with pytest.raises(LLCError, match="--latency-batches 4: the model's batch dimension is fixed at 2"):
        batch_inputs(fixed, 4)
    ragged = Dataset([Batch({"x": np.zeros((2, 3), np.float32)}, None),
                      Batch({"x": np.zeros((2, 5), np.float32)}, None)], "mem")
    with pytest.raises(LLCError, match="--latency-batches 4: the calibration batches' inputs differ in shape"):
        batch_inputs(ragged, 4)


def test_a_latency_budget_at_several_batches_times_each(monkeypatch):
    """With ``latency_batches`` the fit times the plan at every listed batch and takes the largest fraction
    (a plan fast at one batch and slow at the other is over budget), and the summary times those batches."""
    import llc_onnx
    from llc_onnx.config import CriterionConfig, OptimizeConfig, QuantConfig, TargetConfig
    from llc_onnx.flows import latency as lat_mod

    seen = []
    real = lat_mod.time_sessions

    def spy(sessions, feeds, **kw):
        seen.append(next(iter(feeds.values())).shape[0])
        return real(sessions, feeds, **kw)

    monkeypatch.setattr(lat_mod, "time_sessions", spy)
    cfg = OptimizeConfig(target=TargetConfig(latency_budget=3.0, latency_batches=(1, 300)),
                         quant=QuantConfig(budget=0.3),     # something compressed: the summary times it
                         criterion=CriterionConfig(allow_loss_increase=True))
    res = llc_onnx.optimize(os.path.join(EX, "fashion_cnn.onnx"), os.path.join(EX, "fashion_data.npz"), cfg)
    lat = res.stages[0].settings["latency"]
    assert lat["timed_batches"] == ["1", "300"] and lat["batch"] == "300"
    assert seen[:2] == [1, 300]                     # the fit's first timing: both batches
    assert set(res.target["latency"]) == {"1", "300"}


def test_a_plan_fraction_is_the_worse_batch(monkeypatch):
    """``plan_fraction`` over several batches returns the largest fraction: a plan 0.4× the float model at
    batch 1 and 0.9× at batch 4 is 0.9× (the timings here are fixed per batch; the sessions are real)."""
    from types import SimpleNamespace

    import numpy as np
    import onnx

    from llc_onnx.calib.data import Batch, Dataset
    from llc_onnx.config import OptimizeConfig, TargetConfig
    from llc_onnx.flows import latency as lat_mod
    from llc_onnx.targets import get_target

    model = onnx.load(os.path.join(EX, "fashion_cnn.onnx"))
    name = model.graph.input[0].name
    x = np.load(os.path.join(EX, "fashion_data.npz"))
    x = next(v for v in x.values() if v.ndim == 4)[:2].astype(np.float32)
    ctx = SimpleNamespace(config=OptimizeConfig(target=TargetConfig(latency_batches=(1, 4))), target=get_target(),
                          model=model, calib=Dataset([Batch({name: x}, None)], "mem"), restore_weights=lambda: None)

    class T:
        def __init__(self, ms):
            self.min_ms = ms

    monkeypatch.setattr(lat_mod, "time_sessions", lambda s, f, **kw: {
        "model": T(10.0), "plan": T(4.0 if next(iter(f.values())).shape[0] == 1 else 9.0)})
    ladders = {"n": [SimpleNamespace(reference=False), SimpleNamespace(reference=True)]}
    measure = lat_mod.plan_fraction(ctx, lambda ch: model, lat_mod.budget_batches(ctx), ladders)
    assert measure({"n": 0}) == pytest.approx(0.9)
    assert measure({"n": 1}) == 1.0                  # the float plan is not timed
    assert lat_mod.budget_batches(ctx) == ["1", "4"]
