"""Exact grouped (multiple-choice) knapsack by dynamic programming over capacities.

Problem: n groups (nodes), group i has levels j with cost ``c[i][j]`` (predicted loss change) and
integer size ``s[i][j]`` (bytes).  Choose exactly one level per group.

* :func:`solve_budget`: minimise ``Σ c`` subject to ``Σ s ≤ budget``.
* :func:`solve_lossless`: the smallest ``Σ s`` whose minimal ``Σ c`` is ``≤ 0``; among the solutions of
  that size, the lowest cost.
* :func:`pareto_sweep`: :func:`solve_budget` for many budgets from one DP table.

Algorithm
---------
``dp_i[c]`` = minimal cost of groups ``0..i`` with total (discretised) size ``≤ c``, for every capacity
``c = 0..C``; ``dp_{-1} ≡ 0`` and ``dp_i[c] = min_j dp_{i-1}[c − s_ij] + c_ij`` (``+inf`` when
``c < s_ij``).  One numpy pass per (group, level) over the capacity vector; the argmin level of every
capacity is stored per group (int8/int16) and the solution is recovered by backtracking from the
final capacity.  Time ``O(Σ levels · C)``, memory ``O(n · C)`` bytes.  Ties go to the lowest level index.

Size discretisation
-------------------
With ``max_total = Σ_i max_j s_ij`` the unit is ``u = max(1, ceil(max_total / units))``; every item's
size is rounded **up** to whole units ``⌈s/u⌉`` and the capacity is ``⌊budget/u⌋``.  Hence:

* anything the DP accepts truly fits: ``Σ s ≤ u·Σ⌈s/u⌉ ≤ u·⌊budget/u⌋ ≤ budget``;
* every solution with true size ``≤ budget − n·(u − 1)`` is seen by the DP (its rounded size is
  ``≤ (Σ s + n(u−1))/u ≤ budget/u``, an integer, so ``≤ ⌊budget/u⌋``), so the returned cost is at most
  the true optimum for ``budget − n·(u−1)``.  The DP may miss solutions whose true size lies within
  ``n·(u−1) < n·u`` bytes of the budget.  With ``u == 1`` (``max_total ≤ units``) the result is exact.

For :func:`solve_lossless` "smallest size" is the smallest in units (exact when ``u == 1``; otherwise
within ``n·(u−1)`` bytes of the true smallest lossless size).
"""

from __future__ import annotations

import numpy as np

from llc_onnx.errors import LLCError


class KnapsackError(LLCError, ValueError):
    """Bad or infeasible knapsack input (a ValueError and an LLCError: the CLI prints one line)."""


# ----------------------------------------------------------------------------------- helpers
def _validate(costs, sizes) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(costs) != len(sizes):
        raise KnapsackError(f"knapsack: {len(costs)} cost lists but {len(sizes)} size lists; "
                            "pass one list of levels per group for both")
    if len(costs) == 0:
        raise KnapsackError("knapsack: no groups to choose levels for; pass at least one compressible node")
    cs, ss = [], []
    for i, (c, s) in enumerate(zip(costs, sizes)):
        c = np.asarray(c, dtype=np.float64).reshape(-1)
        s_raw = np.asarray(s).reshape(-1)
        if c.size == 0 or c.size != s_raw.size:
            raise KnapsackError(f"knapsack: group {i} has {c.size} costs and {s_raw.size} sizes; "
                                "every group needs the same, non-zero number of both")
        if c.size > 32767:
            raise KnapsackError(f"knapsack: group {i} has {c.size} levels; at most 32767 are supported")
        if np.any(np.isnan(c)) or np.any(c == -np.inf):
            raise KnapsackError(f"knapsack: group {i} has a NaN or -inf cost; costs must be finite "
                                "(+inf marks a forbidden level)")
        s_f = s_raw.astype(np.float64)
        if np.any(~np.isfinite(s_f)) or np.any(s_f != np.round(s_f)) or np.any(s_f < 0):
            raise KnapsackError(f"knapsack: group {i} sizes {s_raw.tolist()} must be non-negative integers (bytes)")
        cs.append(c)
        ss.append(s_raw.astype(np.int64))
    return cs, ss


def _unit(sizes: list[np.ndarray], units: int) -> int:
    if int(units) < 1:
        raise KnapsackError(f"knapsack: units={units} must be >= 1")
    max_total = int(sum(int(s.max()) for s in sizes))
    return max(1, -(-max_total // int(units)))


def _min_size(costs: list[np.ndarray], sizes: list[np.ndarray]) -> int:
    return int(sum(int(s.min()) for s in sizes))


class _Table:
    """dp over capacities 0..cap for every group, with stored argmin choices."""

    def __init__(self, costs: list[np.ndarray], sizes: list[np.ndarray], u: int, cap: int):
        self.costs, self.sizes, self.u = costs, sizes, u
        self.usizes = [-(-s // u) for s in sizes]            # rounded UP to units
        cap = max(0, min(int(cap), int(sum(int(s.max()) for s in self.usizes))))
        self.cap = cap
        dp = np.zeros(cap + 1, dtype=np.float64)             # no group yet: cost 0 at every capacity
        self.choices: list[np.ndarray] = []
        for c, us in zip(costs, self.usizes):
            dtype = np.int8 if c.size <= 127 else np.int16
            new = np.full(cap + 1, np.inf)
            choice = np.zeros(cap + 1, dtype=dtype)
            for j in range(c.size):
                k = int(us[j])
                if k > cap:
                    continue
                cand = dp[: cap + 1 - k] + c[j]
                seg = new[k:]
                better = cand < seg                            # strict: ties keep the lower level
                seg[better] = cand[better]
                choice[k:][better] = j
            dp = new
            self.choices.append(choice)
        self.dp = dp                                           # min cost with units <= c, non-increasing

    def backtrack(self, c: int) -> list[int]:
        out = [0] * len(self.choices)
        for i in range(len(self.choices) - 1, -1, -1):
            j = int(self.choices[i][c])
            out[i] = j
            c -= int(self.usizes[i][j])
        assert c >= 0
        return out


def _totals(costs, sizes, choice) -> tuple[float, int]:
    return (float(sum(float(c[j]) for c, j in zip(costs, choice))),
            int(sum(int(s[j]) for s, j in zip(sizes, choice))))


def _smallest_choice(costs, sizes) -> list[int]:
    """Per group the smallest level, ties to the lowest cost then the lowest index."""
    return [int(np.lexsort((np.arange(s.size), c, s))[0]) for c, s in zip(costs, sizes)]


def _infeasible(budget: int, min_size: int) -> KnapsackError:
    return KnapsackError(f"knapsack: budget of {budget} bytes is infeasible; the smallest possible size "
                         f"(every node at its smallest level) is {min_size} bytes — raise the budget "
                         f"to at least {min_size}")


def _solve_with_table(tab: _Table, costs, sizes, budget: int) -> list[int]:
    c = min(int(budget) // tab.u, tab.cap)
    if np.isfinite(tab.dp[c]):
        return tab.backtrack(c)
    # rounding every item up can make a truly feasible budget look infeasible to the DP; the
    # all-smallest assignment always fits when Σ min sizes <= budget.
    choice = _smallest_choice(costs, sizes)
    if _totals(costs, sizes, choice)[1] <= budget and all(np.isfinite(c_[j]) for c_, j in zip(costs, choice)):
        return choice
    raise KnapsackError(f"knapsack: no assignment of finite cost fits the budget of {budget} bytes; "
                        "allow more levels or raise the budget")


# --------------------------------------------------------------------------------------- API
def solve_budget(costs: list[list[float]], sizes: list[list[int]], budget: int,
                 units: int = 20000) -> list[int]:
    """One level per group minimising ``Σ cost`` with ``Σ size ≤ budget`` (see module docstring).

    Raises :class:`KnapsackError` (a ValueError) when ``budget`` is below ``Σ min sizes``.
    """
    cs, ss = _validate(costs, sizes)
    budget = int(budget)
    mn = _min_size(cs, ss)
    if budget < mn:
        raise _infeasible(budget, mn)
    u = _unit(ss, units)
    tab = _Table(cs, ss, u, budget // u)
    return _solve_with_table(tab, cs, ss, budget)


def solve_lossless(costs: list[list[float]], sizes: list[list[int]], units: int = 20000) -> list[int]:
    """The smallest total size whose minimal ``Σ cost`` is ``≤ 0`` (lowest cost among those).

    Raises :class:`KnapsackError` when no assignment has ``Σ cost ≤ 0``.
    """
    cs, ss = _validate(costs, sizes)
    u = _unit(ss, units)
    tab = _Table(cs, ss, u, sum(int(s.max()) for s in ss))     # capped at Σ max units inside
    ok = np.flatnonzero(tab.dp <= 0.0)
    if ok.size == 0:
        best = float(tab.dp[-1])
        raise KnapsackError(f"knapsack: no assignment has predicted loss change <= 0 (the best is {best:.6g}); "
                            "include a lossless level (e.g. keep float, cost 0) or use a size budget")
    return tab.backtrack(int(ok[0]))


def pareto_sweep(costs: list[list[float]], sizes: list[list[int]], budgets,
                 units: int = 20000) -> list[tuple[int, list[int], float, int]]:
    """:func:`solve_budget` for every budget from a single DP table.

    Returns ``[(budget, choice, total_cost, total_size), ...]`` in the order of ``budgets`` (true,
    un-discretised totals).  Raises :class:`KnapsackError` if any budget is below ``Σ min sizes``.
    """
    cs, ss = _validate(costs, sizes)
    budgets = [int(b) for b in budgets]
    if not budgets:
        return []
    mn = _min_size(cs, ss)
    low = min(budgets)
    if low < mn:
        raise _infeasible(low, mn)
    u = _unit(ss, units)
    tab = _Table(cs, ss, u, max(budgets) // u)
    out = []
    for b in budgets:
        choice = _solve_with_table(tab, cs, ss, b)
        tc, ts = _totals(cs, ss, choice)
        out.append((b, choice, tc, ts))
    return out


__all__ = ["KnapsackError", "pareto_sweep", "solve_budget", "solve_lossless"]
