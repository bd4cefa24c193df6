"""Verification on the held-out split with back-off, shared by every compression method.

A plan is one candidate index per node into that node's *ladder* (its kept candidates in fidelity order:
fewer bits / lower rank first, the reference level last). ``verify_with_backoff`` builds the ONNX graph for
the plan, measures its held-out loss in ONNX Runtime and compares it with the reference model's held-out loss.
While the compressed loss is above ``reference + tolerance`` it moves the ``k`` nodes with the largest
calibration contribution one step up their ladder (more bits / higher rank) and tries again, at most
``max_rounds`` times. The contribution is the plausible worst case  m + 3·SE  of the measured ΔL: a failed
check means some estimate was wrong, and the most uncertain one (typically a low-bit level whose "gain" was
picked from many noisy candidates) is the likeliest culprit, so it is raised before a node whose small effect
is sure.
With ``max_bytes`` (a size budget) a raise that would exceed it is not taken; when no raise fits, back-off
stops. The last round's result is returned with ``verified`` telling the truth either way; the held-out
split is only ever used for this pass/fail check, never to rank nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import onnx

from .calib.data import Dataset
from .calib.losses import TaskLoss
from .ort_eval import Evaluation, evaluate
from .solvers.cost_model import Candidate


@dataclass
class Round:
    index: int
    held_loss: float
    nbytes: int
    raised: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"round": self.index, "held_loss": self.held_loss, "bytes": self.nbytes, "raised": self.raised}


@dataclass
class VerifiedResult:
    model: onnx.ModelProto
    choice: dict[str, int]
    evaluation: Evaluation
    reference: Evaluation
    tolerance: float
    rounds: list[Round]

    @property
    def verified(self) -> bool:
        return self.evaluation.loss <= self.reference.loss + self.tolerance


def plan_bytes(ladders: dict[str, list[Candidate]], choice: dict[str, int]) -> int:
    return sum(ladders[n][i].nbytes for n, i in choice.items())


def contribution(c: Candidate, margin_z: float = 0.0) -> float:
    """Upper confidence bound of a candidate's calibration ΔL: measured + z·SE (else the second-order
    estimate, else the first-order prediction)."""
    for value in (c.measured, c.second_order, c.predicted):
        if value is not None:
            return value + margin_z * c.se
    return 0.0


BACKOFF_Z = 3.0  # standard errors in the back-off ranking (see the module doc)


def verify_with_backoff(build: Callable[[dict[str, int]], onnx.ModelProto], ladders: dict[str, list[Candidate]],
                        choice: dict[str, int], held: Dataset, loss: TaskLoss, reference: Evaluation,
                        tolerance: float = 0.0, max_rounds: int = 8,
                        progress: Callable[[int], None] | None = None, max_bytes: int | None = None
                        ) -> VerifiedResult:
    choice = dict(choice)
    movable = [n for n, i in choice.items() if i < len(ladders[n]) - 1]
    k = max(1, math.ceil(len(movable) / max(max_rounds, 1)))
    rounds: list[Round] = []
    raised: list[str] = []
    for r in range(max_rounds + 1):
        model = build(choice)
        ev = evaluate(model, held, loss)
        rounds.append(Round(r, ev.loss, plan_bytes(ladders, choice), raised))
        if progress:
            progress(1)
        if ev.loss <= reference.loss + tolerance or r == max_rounds:
            return VerifiedResult(model, choice, ev, reference, tolerance, rounds)
        below_top = [n for n, i in choice.items() if i < len(ladders[n]) - 1]
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
        if not raised:  # everything at the reference level, or no raise fits the budget
            return VerifiedResult(model, choice, ev, reference, tolerance, rounds)
    raise AssertionError("unreachable")
