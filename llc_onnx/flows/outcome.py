"""What a method's flow hands to plan selection: its cost table, the ladders, the plans to measure jointly
on the validation split (the solver's first) and how to build any plan as an ONNX model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx

from ..solvers.cost_model import Candidate, CostTable


@dataclass
class MethodOutcome:
    method: str  # "quant" | "lowrank"
    table: CostTable
    ladders: dict[str, list[Candidate]]  # per node, offered candidates in fidelity order (reference last)
    plans: list[tuple[str, dict[str, int]]]  # (name, ladder index per node); plans[0] is the solver's
    build: Callable[[dict[str, int]], onnx.ModelProto]
    max_bytes: int | None  # a byte budget back-off may not exceed
    settings: dict  # what the report lists under the method's settings
    cache: dict | None = None  # {"entry", "hit", "seconds"} with a cache directory
    search: list[dict] = field(default_factory=list)  # low-rank: the global search on calibration
    sweep: list[tuple[float, dict[str, int] | None, str | None]] = field(default_factory=list)  # (budget, plan, note)
    frontier: list[dict] = field(default_factory=list)  # the solver's predicted cost at a grid of byte budgets
    notes: Callable[[dict[str, int]], list[str]] | None = None  # what the rewrite of a built plan noted
    # a latency budget: whether a plan back-off would reach still meets it (timed; flows.latency.admissible)
    admissible: Callable[[dict[str, int]], bool] | None = None
