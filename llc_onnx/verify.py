"""Choosing the plan on the validation split, and the one-shot verdict on the test split.

A *plan* is one candidate index per node into that node's *ladder* (its offered candidates in fidelity order:
fewer bits / lower rank first, the reference level last). Per-node costs are measured one node at a time; far
from the first-order neighbourhood they stop adding up, so before any verdict the plans are measured
**jointly** — the whole rewritten model in ONNX Runtime, in the target's session — on the **validation**
split (:func:`select_plan`):

1. the solver's plan is measured; then the alternative plans (e.g. the solver without gain credit, uniform
   levels) in ascending size, each only while no plan of at most its size has passed. The solver's plan (and
   its back-off rounds) *passes* when its validation loss change against the float model is ≤ the tolerance —
   the test's own rule. An alternative must pass with a margin, ΔL_val + z·SE ≤ tol (``margin_z`` paired
   standard errors): with several plans measured, one of them would otherwise pass by chance, and a result
   that holds only on the data that steered it is not lossless. A few jointly measured plans let the
   smallest plan that is actually no worse win;
2. when none passes, *back-off* starts from the solver's plan: the ``k`` nodes with the largest plausible harm
   m + 3·SE of their measured ΔL move one step up their ladder (a failed check means some estimate was wrong,
   and the most uncertain one, typically a low-bit "gain" picked from many noisy candidates, is the likeliest
   culprit), at most ``max_rounds`` times; with a size budget a raise that would exceed it is not taken;
3. the **best** plan seen is kept — the smallest that passed, else the one with the lowest validation loss —
   never simply the last one (raising nodes can make the loss go up).

:func:`verdict` then evaluates the chosen model and the float model on the **test** split, once. The test
split steers nothing; a plan that passes only on the data that steered it is not verified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import onnx

from .calib.data import Dataset
from .ort_eval import Evaluation, SessionInput
from .memory import release
from .progress import Advance
from .solvers.cost_model import Candidate

BACKOFF_Z = 3.0  # standard errors in the back-off ranking (see the module doc)


@dataclass
class Trial:
    """One plan measured jointly on the validation split."""

    name: str  # "solver", "uniform int8", "back-off round 2", ...
    choice: dict[str, int]
    nbytes: int
    val_loss: float
    passed: bool
    raised: list[str] = field(default_factory=list)
    val_delta: float = 0.0  # validation loss − the float model's (paired)
    val_se: float = 0.0  # paired standard error of val_delta (clustered by group)

    def to_dict(self) -> dict:
        return {"plan": self.name, "bytes": self.nbytes, "val_loss": self.val_loss, "val_delta": self.val_delta,
                "val_se": self.val_se, "passed": self.passed, "raised": self.raised}


@dataclass
class Selection:
    """The plan chosen on the validation split (see the module doc)."""

    model: onnx.ModelProto
    choice: dict[str, int]
    trial: Trial
    trials: list[Trial]
    val: Evaluation  # the chosen model on the validation split
    first_plan_passed: bool  # the solver's own plan passed without back-off


@dataclass
class Verdict:
    reference: Evaluation
    compressed: Evaluation
    tolerance: float

    @property
    def verified(self) -> bool:
        return self.compressed.loss <= self.reference.loss + self.tolerance


def plan_bytes(ladders: dict[str, list[Candidate]], choice: dict[str, int]) -> int:
    return sum(ladders[n][i].nbytes for n, i in choice.items())


def contribution(c: Candidate, margin_z: float = 0.0) -> float:
    """Upper confidence bound of a candidate's calibration ΔL: measured + z·SE (else the second-order
    estimate, else the first-order prediction)."""
    for value in (c.measured, c.second_order, c.predicted):
        if value is not None:
            return value + margin_z * c.se
    return 0.0


#: under a latency budget, at most this many single nodes are pinned (timed and undone) per back-off round
PIN_TRIES = 3


def _raise_nodes(ladders, choice, k: int, max_bytes: int | None,
                 admissible: Callable[[dict[str, int]], bool] | None = None, pinned: set | None = None) -> list[str]:
    """Move the k nodes with the largest m + 3·SE one step up (in place); the names raised. With
    ``admissible`` (a latency budget, each call a timing) the raised nodes must keep the plan admissible: the
    k together, else the first half of them, a quarter, … (the longest prefix of the order that fits, in
    ⌈log₂ k⌉ + 1 timings); when not even the first node fits, it is pinned (``pinned``, kept across rounds)
    and the next is tried, at most ``PIN_TRIES`` per round."""
    pinned = pinned if pinned is not None else set()
    below_top = [n for n, i in choice.items() if i < len(ladders[n]) - 1 and n not in pinned]
    below_top.sort(key=lambda n: (-contribution(ladders[n][choice[n]], BACKOFF_Z), n))
    raised, size = [], plan_bytes(ladders, choice)
    for n in below_top:
        grow = ladders[n][choice[n] + 1].nbytes - ladders[n][choice[n]].nbytes
        if max_bytes is not None and size + grow > max_bytes:
            continue
        choice[n] += 1
        size += grow
        raised.append(n)
        if len(raised) == k:
            break
    if admissible is None or not raised or admissible(choice):
        return raised
    for n in raised:                                   # together they break the budget: shorter prefixes
        choice[n] -= 1
    prefix = len(raised) // 2
    while prefix >= 1:
        for n in raised[:prefix]:
            choice[n] += 1
        if admissible(choice):
            return raised[:prefix]
        for n in raised[:prefix]:
            choice[n] -= 1
        prefix //= 2
    for n in raised[:PIN_TRIES]:                       # not even the first node fits: pin it, try the next
        pinned.add(n)
        rest = [m for m in raised if m not in pinned]
        if not rest:
            break
        choice[rest[0]] += 1
        if admissible(choice):
            return [rest[0]]
        choice[rest[0]] -= 1
    return []


def select_plan(build: Callable[[dict[str, int]], onnx.ModelProto], ladders: dict[str, list[Candidate]],
                plans: list[tuple[str, dict[str, int]]], evaluate: Callable[[onnx.ModelProto | str], Evaluation],
                reference: Evaluation, tolerance: float = 0.0, max_rounds: int = 8,
                max_bytes: int | None = None, progress: Advance | None = None, margin_z: float = 0.0,
                admissible: Callable[[dict[str, int]], bool] | None = None) -> Selection:
    """Measure ``plans`` (the first is the solver's) jointly with ``evaluate`` (validation split, target
    session; Evaluations with per-unit ``samples`` when ``margin_z`` > 0), back off from the first when none
    passes, keep the best (module doc). ``admissible``: back-off raises only nodes whose raise keeps the plan
    admissible (a latency budget, timed: :func:`_raise_nodes`)."""
    trials: list[Trial] = []
    # the best trial so far and its evaluation; its model is built again at the end (builds are deterministic
    # and reuse the quantized codes): no plan's model is held while the next one is built and measured
    kept: list = [None, None]
    seen: set[tuple] = set()

    def better(t: Trial, cur: Trial | None) -> bool:
        """The order of the final choice: passed before not passed; among passed the fewest bytes, then the
        lowest validation loss; among failed the lowest validation loss; the earlier trial on ties."""
        if cur is None or t.passed != cur.passed:
            return cur is None or t.passed
        return (t.nbytes, t.val_loss) < (cur.nbytes, cur.val_loss) if t.passed else t.val_loss < cur.val_loss

    def run(name: str, choice: dict[str, int], raised=(), z: float = 0.0) -> Trial:
        # a large model reaches ONNX Runtime as files, and its proto is dropped before the session is made
        with SessionInput(build(choice)) as src:
            release()  # the plan's proto is gone (files now): its memory back before the session is made
            ev = evaluate(src.source)
        if ev.samples is not None and reference.samples is not None:
            delta, se = ev.samples.delta(reference.samples)
        else:
            delta, se = ev.loss - reference.loss, 0.0
        t = Trial(name, dict(choice), plan_bytes(ladders, choice), ev.loss, delta + z * se <= tolerance,
                  list(raised), delta, se)
        trials.append(t)
        if better(t, kept[0]):
            kept[:] = [t, ev]
        if progress:
            progress(1)
        return t

    distinct = []
    for name, choice in plans:
        key = tuple(sorted(choice.items()))
        if key not in seen and (max_bytes is None or plan_bytes(ladders, choice) <= max_bytes or not distinct):
            seen.add(key)
            distinct.append((name, choice))
    solver = distinct[0]
    first_passed = run(*solver).passed
    for name, choice in sorted(distinct[1:], key=lambda p: plan_bytes(ladders, p[1])):
        size = plan_bytes(ladders, choice)
        if any(t.passed and t.nbytes <= size for t in trials):
            continue  # a plan at most this size already passed
        run(name, choice, z=margin_z)
    if not any(t.passed for t in trials):
        choice = dict(solver[1])
        movable = [n for n, i in choice.items() if i < len(ladders[n]) - 1]
        k = max(1, math.ceil(len(movable) / max(max_rounds, 1)))
        pinned: set[str] = set()
        for r in range(1, max_rounds + 1):
            raised = _raise_nodes(ladders, choice, k, max_bytes, admissible, pinned)
            if not raised:
                break
            if run(f"back-off round {r}", choice, raised).passed:
                break
    best, ev = kept
    return Selection(build(dict(best.choice)), dict(best.choice), best, trials, ev, first_passed)


def verdict(model: onnx.ModelProto, reference_model: onnx.ModelProto, test: Dataset,
            evaluate: Callable[[onnx.ModelProto, Dataset], Evaluation], tolerance: float) -> Verdict:
    """The float and the compressed model on the test split, once each: verified when the compressed loss is
    ≤ the float loss + ``tolerance``."""
    return Verdict(evaluate(reference_model, test), evaluate(model, test), tolerance)
