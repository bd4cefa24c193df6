"""Time the grouped knapsack on 500 groups x 5 levels (random sizes/costs, default units=20000).

Run from the repository root: ``python -m bench.bench_knapsack [--groups 500] [--levels 5]
[--repeats 5]``; prints the median wall time of each solver over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from llc_onnx.solvers.knapsack import pareto_sweep, solve_budget, solve_lossless


def make_instance(n_groups: int, n_levels: int, seed: int = 0):
    """Node-like levels: sizes shrink and costs grow as bits drop; level 0 is 'keep' (cost 0)."""
    rng = np.random.default_rng(seed)
    numel = rng.integers(1_000, 4_000_000, size=n_groups)
    bits = np.array([32, 16, 8, 4, 2, 3, 5, 6, 7, 1][:n_levels])
    costs, sizes = [], []
    for i in range(n_groups):
        sizes.append([int(numel[i] * b // 8) for b in bits])
        sens = rng.lognormal(-8, 2)
        c = [0.0] + [float(sens * 4.0 ** -(b / 2) * rng.normal(1.0, 0.3)) for b in bits[1:]]
        # some levels have a negative predicted loss change (LLC rounding), as in real runs
        costs.append([v if rng.random() > 0.2 else -abs(v) for v in c])
    return costs, sizes


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--groups", type=int, default=500)
    ap.add_argument("--levels", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--units", type=int, default=20000)
    a = ap.parse_args(argv)
    costs, sizes = make_instance(a.groups, a.levels)
    total_max = sum(max(s) for s in sizes)
    total_min = sum(min(s) for s in sizes)
    budget = (total_max + 3 * total_min) // 4
    budgets = list(np.linspace(total_min, total_max, 20).astype(int))
    t_b = _median_time(lambda: solve_budget(costs, sizes, budget, units=a.units), a.repeats)
    t_l = _median_time(lambda: solve_lossless(costs, sizes, units=a.units), a.repeats)
    t_p = _median_time(lambda: pareto_sweep(costs, sizes, budgets, units=a.units), a.repeats)
    print(f"knapsack {a.groups} groups x {a.levels} levels, units={a.units}, median of {a.repeats}:")
    print(f"  solve_budget    {t_b * 1e3:8.1f} ms")
    print(f"  solve_lossless  {t_l * 1e3:8.1f} ms")
    print(f"  pareto_sweep    {t_p * 1e3:8.1f} ms  ({len(budgets)} budgets, one table)")


if __name__ == "__main__":
    main()
