"""Knapsack with a latency constraint, against brute force on small random instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llc_onnx.solvers.knapsack import KnapsackError, solve_constrained


def instance(rng, n_max=6, k_max=4, int_lat=True, int_cost=False):
    n = int(rng.integers(2, n_max + 1))
    costs, sizes, lats = [], [], []
    for _ in range(n):
        k = int(rng.integers(1, k_max + 1))
        sizes.append([int(v) for v in rng.integers(0, 13, size=k)])
        costs.append([float(v) for v in (rng.integers(-5, 6, size=k) if int_cost else rng.normal(size=k))])
        lats.append([float(v) for v in (rng.integers(-4, 5, size=k) if int_lat else rng.normal(size=k))])
    return costs, sizes, lats


def enum(costs, sizes, lats):
    for ch in itertools.product(*[range(len(c)) for c in costs]):
        yield (list(ch), sum(c[j] for c, j in zip(costs, ch)), sum(s[j] for s, j in zip(sizes, ch)),
               sum(l[j] for l, j in zip(lats, ch)))


def totals(costs, sizes, lats, ch):
    return (sum(c[j] for c, j in zip(costs, ch)), sum(s[j] for s, j in zip(sizes, ch)),
            sum(l[j] for l, j in zip(lats, ch)))


def test_latency_only_is_exact_on_integer_latencies():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        costs, sizes, lats = instance(rng)
        lo = sum(min(l) for l in lats)
        hi = sum(max(l) for l in lats)
        L = float(rng.integers(int(lo), int(hi) + 2))
        sol = solve_constrained(costs, sizes, lats, latency_budget=L)
        c, s, l = totals(costs, sizes, lats, sol.choice)
        assert l <= L + 1e-9 and (c, s, l) == pytest.approx((sol.cost, sol.size, sol.latency))
        best = min(c for _, c, _, l in enum(costs, sizes, lats) if l <= L + 1e-9)
        assert sol.cost == pytest.approx(best, abs=1e-9)
        assert sol.method == "dp-latency-grid" and sol.gap == 0.0
        checked += 1
    assert checked == 300


def test_latency_only_on_a_grid_is_feasible_and_bounded():
    """Real-valued latencies on a coarse grid: always within budget; never worse than the optimum of the
    budget n·q smaller."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        costs, sizes, lats = instance(rng, int_lat=False)
        units = int(rng.integers(5, 40))
        n = len(costs)
        lo, hi = sum(min(l) for l in lats), sum(max(l) for l in lats)
        L = float(rng.uniform(lo, hi + 0.5))
        sol = solve_constrained(costs, sizes, lats, latency_budget=L, units=units)
        assert sol.latency <= L + 1e-9
        q = sum(max(l) - min(l) for l in lats) / units
        tighter = [c for _, c, _, l in enum(costs, sizes, lats) if l <= L - n * q]
        if tighter:
            assert sol.cost <= min(tighter) + 1e-9


def test_bytes_and_latency_lagrangian_certificate():
    """Feasible, never better than the optimum (sanity), its lower bound never above the optimum, and a
    zero gap means optimal. Also measures how often the Lagrangian solution is optimal."""
    rng = np.random.default_rng(2)
    n_opt = n_total = 0
    gaps = []
    for _ in range(150):
        costs, sizes, lats = instance(rng, int_lat=False)
        lo_b = sum(min(s) for s in sizes)
        B = int(rng.integers(lo_b, sum(max(s) for s in sizes) + 2))
        feas_b = [(c, l) for _, c, s, l in enum(costs, sizes, lats) if s <= B]
        min_l = min(l for _, l in feas_b)
        L = float(min_l + rng.uniform(0, 2.0))
        opt = min(c for c, l in feas_b if l <= L + 1e-12)
        sol = solve_constrained(costs, sizes, lats, byte_budget=B, latency_budget=L)
        c, s, l = totals(costs, sizes, lats, sol.choice)
        assert s <= B and l <= L + 1e-9
        assert c >= opt - 1e-9
        assert sol.lower_bound <= opt + 1e-9
        assert sol.gap == pytest.approx(c - sol.lower_bound, abs=1e-9)
        if sol.gap <= 1e-12:
            assert c == pytest.approx(opt, abs=1e-9)
        n_total += 1
        n_opt += abs(c - opt) <= 1e-9
        gaps.append(c - opt)
    assert n_opt / n_total > 0.75                  # measured: most instances solved to optimality
    assert np.mean(gaps) < 0.25


def test_lossless_with_latency():
    rng = np.random.default_rng(3)
    n_solved = n_none = n_opt = 0
    for _ in range(150):
        costs, sizes, lats = instance(rng, int_cost=True, int_lat=False)
        L = float(sum(min(l) for l in lats) + rng.uniform(0, 3.0))
        ok = [(s, c) for _, c, s, l in enum(costs, sizes, lats) if c <= 0 and l <= L + 1e-12]
        if not ok:
            with pytest.raises(KnapsackError):
                solve_constrained(costs, sizes, lats, latency_budget=L, lossless=True)
            n_none += 1
            continue
        best_size = min(s for s, _ in ok)
        sol = solve_constrained(costs, sizes, lats, latency_budget=L, lossless=True)
        c, s, l = totals(costs, sizes, lats, sol.choice)
        assert c <= 0 and l <= L + 1e-9
        assert s >= best_size and sol.lower_bound <= best_size + 1e-9
        if sol.gap == 0:
            assert s == best_size
        n_solved += 1
        n_opt += s == best_size
    assert n_solved > 50 and n_none > 0 and n_opt / n_solved > 0.75


def test_without_latency_budget_matches_byte_solvers():
    costs = [[0.0, -0.5, 0.4, -2.0], [0.0, 0.2, 0.1]]
    sizes = [[8, 4, 2, 4], [8, 4, 4]]
    lats = [[0.0, 1.0, -1.0, 2.0], [0.0, -0.5, 0.5]]
    sol = solve_constrained(costs, sizes, lats, lossless=True)
    assert sol.choice == [3, 2] and sol.method == "dp"
    # the latency budget moves the choice: level 3 of group 0 costs +2 latency
    sol2 = solve_constrained(costs, sizes, lats, lossless=True, latency_budget=1.0)
    assert sol2.latency <= 1.0 and sol2.cost <= 0
    sol3 = solve_constrained(costs, sizes, lats, byte_budget=12)
    assert sol3.size <= 12 and sol3.gap == 0.0


def test_infeasible_and_bad_input():
    costs, sizes, lats = [[0.0, 1.0]], [[4, 2]], [[0.0, -1.0]]
    with pytest.raises(KnapsackError, match="latency budget .* infeasible"):
        solve_constrained(costs, sizes, lats, latency_budget=-2.0)
    with pytest.raises(KnapsackError, match="latencies"):
        solve_constrained(costs, sizes, [[0.0]], latency_budget=0.0)
    with pytest.raises(KnapsackError, match="finite"):
        solve_constrained(costs, sizes, [[0.0, float("nan")]], latency_budget=0.0)
    with pytest.raises(KnapsackError, match="lossless"):
        solve_constrained(costs, sizes, lats, lossless=True, byte_budget=3)
    # bytes force the slow level: no assignment within 2 bytes is fast enough
    with pytest.raises(KnapsackError):
        solve_constrained([[0.0, 1.0]], [[4, 2]], [[-1.0, 0.0]], byte_budget=2, latency_budget=-0.5)
