"""solvers.cost_model: the neighbourhood rule, costs, margins and the solver inputs."""

import pytest

from llc_onnx.solvers.cost_model import Candidate, CostTable, classify


def cand(pred, meas, se=0.0, node="n", level="int4", nbytes=10, reference=False):
    return Candidate(node, level, nbytes, pred, meas, 0.1, True, None, reference=reference, se=se)


def test_inside_uses_prediction_outside_uses_measurement():
    c = classify(cand(-0.010, -0.01005), error_max=1e-4, base_loss=2.0, relative=False, outside="measured")
    assert c.inside and c.cost == -0.010
    c = classify(cand(-0.010, 0.02), error_max=1e-4, base_loss=2.0, relative=False, outside="measured")
    assert not c.inside and c.cost == 0.02
    # boundary: exactly error_max apart is inside
    c = classify(cand(0.0, 0.5), error_max=0.5, base_loss=2.0, relative=False, outside="measured")
    assert c.inside and c.cost == 0.0


def test_relative_error_max_scales_with_base_loss():
    # |m - p| = 0.003: outside 1e-3 absolute, inside 1e-3 x |L| for L = 4 (tol 0.004), outside for L = -2 (0.002)
    assert not classify(cand(0.0, 0.003), 1e-3, 4.0, False, "measured").inside
    assert classify(cand(0.0, 0.003), 1e-3, 4.0, True, "measured").inside
    assert not classify(cand(0.0, 0.003), 1e-3, -2.0, True, "measured").inside
    assert classify(cand(0.0, 0.003), 1e-3, -4.0, True, "measured").inside  # |L|


def test_outside_drop_gives_no_cost_and_solver_inputs_remove_it():
    ref = cand(0.0, 0.0, level="float", nbytes=40, reference=True)
    good = cand(-0.01, -0.01, level="int8", nbytes=20)
    bad = cand(-0.01, 0.3, level="int4", nbytes=10)
    for c in (ref, good, bad):
        classify(c, 1e-3, 1.0, False, "drop")
    assert bad.cost is None and not bad.inside
    assert good.cost == -0.01 and ref.cost == 0.0
    other = [classify(cand(0.1, 0.1, node="m", level=lv, nbytes=s), 1e-3, 1.0, False, "drop")
             for lv, s in (("int8", 5), ("float", 9))]
    table = CostTable.from_candidates([ref, bad, good] + other)
    assert [c.level for c in table.groups["n"]] == ["int4", "int8", "float"]  # sorted by size
    nodes, kept, costs, sizes = table.solver_inputs()
    assert nodes == ["n", "m"]
    assert [c.level for c in kept[0]] == ["int8", "float"]
    assert costs[0] == [-0.01, 0.0] and sizes[0] == [20, 40]
    assert costs[1] == [0.1, 0.1] and sizes[1] == [5, 9]
    assert len(table.rows()) == 5 and table.rows()[0]["level"] == "int4"


def test_margin_adds_z_standard_errors_to_both_cost_kinds():
    c = classify(cand(-0.01, -0.01, se=0.002), 1e-3, 1.0, False, "measured", margin_z=2.0)
    assert c.inside and c.cost == pytest.approx(-0.01 + 2 * 0.002)
    c = classify(cand(-0.01, 0.05, se=0.002), 1e-3, 1.0, False, "measured", margin_z=1.5)
    assert not c.inside and c.cost == pytest.approx(0.05 + 1.5 * 0.002)
    c = classify(cand(-0.01, 0.05, se=0.002), 1e-3, 1.0, False, "drop", margin_z=1.5)
    assert c.cost is None
    c = classify(cand(-0.01, -0.01, se=0.002), 1e-3, 1.0, False, "measured", margin_z=0.0)
    assert c.cost == -0.01


def test_reference_always_costs_zero_and_unmeasured_uses_prediction():
    r = classify(cand(5.0, 7.0, se=1.0, reference=True), 1e-9, 1.0, False, "drop", margin_z=3.0)
    assert r.inside and r.cost == 0.0
    # an invalid 'outside' is not even looked at for the reference, but is rejected otherwise
    assert classify(cand(1.0, 1.0, reference=True), 1e-3, 1.0, False, "bogus").cost == 0.0
    with pytest.raises(ValueError, match="outside"):
        classify(cand(0.0, 0.0), 1e-3, 1.0, False, "bogus")
    u = classify(cand(-0.02, None), 1e-9, 1.0, False, "drop")
    assert u.inside and u.cost == -0.02


def test_cet_second_order_estimate_replaces_the_measurement():
    c = Candidate("n", "int4", 10, -0.01, None, 0.1, True, None, second_order=-0.00995)
    c = classify(c, error_max=1e-4, base_loss=2.0, relative=False, outside="measured")
    assert c.inside and c.cost == -0.01  # curvature term negligible: first order
    c = Candidate("n", "int2", 5, -0.01, None, 0.1, True, None, second_order=0.03)
    c = classify(c, error_max=1e-4, base_loss=2.0, relative=False, outside="measured")
    assert not c.inside and c.cost == 0.03  # outside: the second-order estimate
    c = Candidate("n", "int2", 5, -0.01, None, 0.1, True, None, second_order=0.03)
    assert classify(c, 1e-4, 2.0, False, "drop").cost is None
