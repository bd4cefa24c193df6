"""Verification on the held-out split with back-off, shared by every compression method.

A plan is one candidate index per node into that node's *ladder* (its kept candidates sorted by size, the
reference level last). ``verify_with_backoff`` builds the ONNX graph for the plan, measures its held-out loss
in ONNX Runtime and compares it with the reference model's held-out loss. While the compressed loss is above
``reference + tolerance`` it moves the ``k`` nodes with the largest measured calibration contribution one step
up their ladder (more bits / higher rank) and tries again, at most ``max_rounds`` times. The last round's
result is returned with ``verified`` telling the truth either way.
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


def contribution(c: Candidate) -> float:
    """A candidate's measured calibration ΔL (its prediction when it was not measured)."""
    return c.measured if c.measured is not None else c.predicted


def verify_with_backoff(build: Callable[[dict[str, int]], onnx.ModelProto], ladders: dict[str, list[Candidate]],
                        choice: dict[str, int], held: Dataset, loss: TaskLoss, reference: Evaluation,
                        tolerance: float = 0.0, max_rounds: int = 8,
                        progress: Callable[[int], None] | None = None) -> VerifiedResult:
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
        if not below_top:  # everything is at the reference level and still not verified
            return VerifiedResult(model, choice, ev, reference, tolerance, rounds)
        below_top.sort(key=lambda n: (-contribution(ladders[n][choice[n]]), n))
        raised = below_top[:k]
        for n in raised:
            choice[n] += 1
    raise AssertionError("unreachable")
