import itertools

import numpy as np
import pytest

from llc_onnx.errors import LLCError
from llc_onnx.solvers.knapsack import KnapsackError, pareto_sweep, solve_budget, solve_lossless


def _instance(rng, max_groups=6, max_levels=4, max_size=12, int_costs=False):
    n = int(rng.integers(2, max_groups + 1))
    costs, sizes = [], []
    for _ in range(n):
        k = int(rng.integers(1, max_levels + 1))
        sizes.append([int(v) for v in rng.integers(0, max_size + 1, size=k)])
        if int_costs:
            costs.append([float(v) for v in rng.integers(-5, 6, size=k)])
        else:
            costs.append([float(v) for v in rng.normal(size=k)])
    return costs, sizes


def _all(costs, sizes):
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        yield (list(choice), sum(c[j] for c, j in zip(costs, choice)),
               sum(s[j] for s, j in zip(sizes, choice)))


def _brute_budget(costs, sizes, budget):
    best = None
    for ch, c, s in _all(costs, sizes):
        if s <= budget and (best is None or c < best):
            best = c
    return best


def _totals(costs, sizes, choice):
    assert len(choice) == len(costs)
    assert all(0 <= j < len(c) for c, j in zip(costs, choice))
    return (sum(c[j] for c, j in zip(costs, choice)), sum(s[j] for s, j in zip(sizes, choice)))


def test_budget_matches_brute_force():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        costs, sizes = _instance(rng)
        lo = sum(min(s) for s in sizes)
        hi = sum(max(s) for s in sizes)
        budget = int(rng.integers(lo, hi + 2))
        choice = solve_budget(costs, sizes, budget)          # max_total <= 72 << units: u == 1, exact
        c, s = _totals(costs, sizes, choice)
        assert s <= budget
        assert c == pytest.approx(_brute_budget(costs, sizes, budget), abs=1e-9)
        checked += 1
    assert checked >= 200


def test_lossless_matches_brute_force():
    rng = np.random.default_rng(1)
    n_solved = n_none = 0
    for _ in range(300):
        costs, sizes = _instance(rng, int_costs=True)        # integer costs: sums exact, "≤ 0" unambiguous
        ok = [(s, c) for _, c, s in _all(costs, sizes) if c <= 0]
        if not ok:
            with pytest.raises(KnapsackError):
                solve_lossless(costs, sizes)
            n_none += 1
            continue
        best_size, best_cost = min(ok)
        c, s = _totals(costs, sizes, solve_lossless(costs, sizes))
        assert (s, c) == (best_size, best_cost)
        n_solved += 1
    assert n_solved >= 200 and n_none > 0


def test_discretised_fits_and_bounded():
    """u > 1: result always fits and is at least as good as the exact optimum for budget − n·u."""
    rng = np.random.default_rng(2)
    n_coarse = 0
    for _ in range(200):
        costs, sizes = _instance(rng, max_size=1000)
        units = int(rng.integers(3, 40))
        n = len(costs)
        max_total = sum(max(s) for s in sizes)
        u = max(1, -(-max_total // units))
        n_coarse += u > 1
        lo = sum(min(s) for s in sizes)
        budget = int(rng.integers(lo, max_total + 2))
        choice = solve_budget(costs, sizes, budget, units=units)
        c, s = _totals(costs, sizes, choice)
        assert s <= budget
        ref = _brute_budget(costs, sizes, budget - n * u)
        if ref is not None:
            assert c <= ref + 1e-9
        assert c >= _brute_budget(costs, sizes, budget) - 1e-9
    assert n_coarse > 150


def test_infeasible_budget():
    costs = [[0.0, 1.0], [0.0, 2.0, 3.0]]
    sizes = [[10, 4], [8, 3, 2]]
    with pytest.raises(ValueError, match=r"smallest possible size .* is 6 bytes"):
        solve_budget(costs, sizes, 5)
    with pytest.raises(LLCError):                  # the CLI prints it as one line
        solve_budget(costs, sizes, 5)
    assert _totals(costs, sizes, solve_budget(costs, sizes, 6)) == (4.0, 6)
    with pytest.raises(KnapsackError):
        pareto_sweep(costs, sizes, [5, 20])
    with pytest.raises(KnapsackError, match="<= 0"):
        solve_lossless([[1.0, 2.0], [0.5]], [[1, 2], [3]])


def test_feasible_budget_survives_coarse_units():
    # true sizes 5 + 5 = 10 fit budget 10 but each rounds up to a full unit of 9 bytes
    costs = [[0.0, 1.0], [0.0, 1.0]]
    sizes = [[9, 5], [9, 5]]
    assert solve_budget(costs, sizes, 10, units=2) == [1, 1]


def test_single_level_groups():
    costs = [[0.7], [0.0, -1.0, 2.0], [0.3]]
    sizes = [[5], [6, 3, 1], [2]]
    assert solve_budget(costs, sizes, 100) == [0, 1, 0]
    assert solve_budget(costs, sizes, 8) == [0, 2, 0]
    assert solve_lossless([[0.0], [0.0]], [[3], [4]]) == [0, 0]
    assert solve_lossless([[0.5], [0.0, -1.0]], [[3], [4, 9]]) == [0, 1]


def test_lossless_prefers_smallest_then_cheapest():
    costs = [[0.0, -0.5, 0.4, -2.0], [0.0, 0.2, 0.1]]
    sizes = [[8, 4, 2, 4], [8, 4, 4]]
    # size 6 (level 2 + level 1|2) costs >= 0.5 > 0; at size 8 the cheapest is -2.0 + 0.1
    assert solve_lossless(costs, sizes) == [3, 2]
    # a zero-cost level that is larger is only used when nothing smaller is lossless
    assert solve_lossless([[0.0, 0.1], [0.0, -0.1]], [[10, 5], [10, 6]]) == [1, 1]
    assert solve_lossless([[0.0, 0.3], [0.0, -0.1]], [[10, 5], [10, 6]]) == [0, 1]


def test_pareto_sweep_matches_individual_solves():
    rng = np.random.default_rng(3)
    for _ in range(30):
        costs, sizes = _instance(rng, max_groups=5, max_size=20)
        lo = sum(min(s) for s in sizes)
        hi = sum(max(s) for s in sizes)
        budgets = sorted({int(b) for b in rng.integers(lo, hi + 3, size=6)})
        sweep = pareto_sweep(costs, sizes, budgets)
        assert [b for b, *_ in sweep] == budgets
        prev = np.inf
        for b, choice, tc, ts in sweep:
            assert (tc, ts) == pytest.approx(_totals(costs, sizes, choice))
            assert ts <= b
            assert tc == pytest.approx(_brute_budget(costs, sizes, b), abs=1e-9)
            assert tc <= prev + 1e-12                          # more bytes never cost more
            prev = tc
            assert choice == solve_budget(costs, sizes, b)


def test_many_levels_and_bad_input():
    rng = np.random.default_rng(4)
    costs = [list(rng.normal(size=200)) for _ in range(3)]      # >127 levels: int16 choices
    sizes = [list(rng.integers(1, 50, size=200)) for _ in range(3)]
    budget = 60
    choice = solve_budget(costs, sizes, budget)
    c, s = _totals(costs, sizes, choice)
    assert s <= budget
    # exact check without the DP: enumerate pairs of the first two groups, then the third
    pair = {}
    for (c0, s0), (c1, s1) in itertools.product(zip(costs[0], sizes[0]), zip(costs[1], sizes[1])):
        if s0 + s1 <= budget:
            pair[s0 + s1] = min(pair.get(s0 + s1, np.inf), c0 + c1)
    best = min(pc + c2 for ps, pc in pair.items() for c2, s2 in zip(costs[2], sizes[2]) if ps + s2 <= budget)
    assert c == pytest.approx(best, abs=1e-9)
    with pytest.raises(KnapsackError):
        solve_budget([[0.0]], [[1], [2]], 5)
    with pytest.raises(KnapsackError):
        solve_budget([[0.0, 1.0]], [[1]], 5)
    with pytest.raises(KnapsackError):
        solve_budget([[0.0]], [[1.5]], 5)
    with pytest.raises(KnapsackError):
        solve_budget([[float("nan")]], [[1]], 5)
    with pytest.raises(KnapsackError):
        solve_budget([], [], 5)
