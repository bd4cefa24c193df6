"""What an optimization returns: :class:`OptimizeResult`, typed; the terminal tables, ``--json`` and the
report files are views of it (``to_dict``).

Splits (see ``flows.context``): ``calibration`` chose, ``validation`` steered (plans measured jointly,
back-off), ``test`` gave the verdict once. Each split reports its size, the float and the compressed model's
loss and metrics (ONNX Runtime, the target's session); on the calibration split also the paired standard error
of the difference, which flags a model *adapted* to its calibration data.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field

import onnx

from .config import OptimizeConfig, to_dict as config_dict
from .errors import LLCError
from .ort_eval import Evaluation
from .report import to_jsonable
from .solvers.cost_model import Candidate
from .verify import Trial

__all__ = ["OptimizeResult", "StageResult", "SplitResult", "NodeDecision", "NotVerifiedError"]


class NotVerifiedError(LLCError):
    """Saving a model that is not verified without ``force`` (exit code 1, like a failed verdict)."""

    exit_code = 1


def _ev(e: Evaluation | None) -> dict | None:
    return None if e is None else {"loss": e.loss, "metrics": dict(e.metrics)}


@dataclass
class SplitResult:
    """One data split: its role, size and source, and both models' loss on it (None where not evaluated)."""

    name: str  # "calibration" | "validation" | "test"
    role: str  # what the split did
    n: int
    source: str
    reference: Evaluation | None = None
    compressed: Evaluation | None = None
    extra: dict = field(default_factory=dict)

    @property
    def delta(self) -> float | None:
        if self.reference is None or self.compressed is None:
            return None
        return self.compressed.loss - self.reference.loss

    def to_dict(self) -> dict:
        return {"role": self.role, "n": self.n, "source": self.source, "reference": _ev(self.reference),
                "compressed": _ev(self.compressed), "delta": self.delta, **self.extra}


@dataclass
class NodeDecision:
    node: str
    op: str
    shape: str
    level: str
    bytes: int
    predicted: float
    measured: float | None
    se: float
    inside: bool
    rel_noise: float

    @classmethod
    def of(cls, node, cand: Candidate) -> "NodeDecision":
        return cls(node.name, node.op_type, "x".join(map(str, node.weight_shape)), cand.level, cand.nbytes,
                   cand.predicted, cand.measured, cand.se, cand.inside, cand.rel_noise)


@dataclass
class StageResult:
    """One method's part of the optimization."""

    method: str
    nodes: list[NodeDecision]
    candidates: list[Candidate]
    trials: list[Trial]  # plans measured jointly on the validation split, in the order they were measured
    chosen_plan: str
    first_plan_passed: bool
    plan_costs: dict  # how much of the plan kept ("plan": its name) rests on measured gains
    reference_bytes: int
    compressed_bytes: int
    seconds: dict[str, float]
    settings: dict
    measurement: dict
    cache: dict | None = None
    search: list[dict] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)
    frontier: list[dict] = field(default_factory=list)

    @property
    def levels(self) -> dict[str, int]:
        return dict(sorted(Counter(n.level for n in self.nodes).items()))

    def to_dict(self) -> dict:
        return {"method": self.method, "levels": self.levels, "chosen_plan": self.chosen_plan,
                "first_plan_passed": self.first_plan_passed,
                "backoff_rounds": sum(t.name.startswith("back-off") for t in self.trials),
                "plan_costs": self.plan_costs,
                "bytes": {"reference": self.reference_bytes, "compressed": self.compressed_bytes},
                "plans": [t.to_dict() for t in self.trials], "nodes": [dataclasses.asdict(n) for n in self.nodes],
                "candidates": [c.to_dict() for c in self.candidates], "settings": self.settings,
                "measurement": self.measurement, "cache": self.cache, "search": self.search, "sweep": self.sweep,
                "frontier": self.frontier, "seconds": self.seconds}


@dataclass
class OptimizeResult:
    """The compressed model, the verdict and everything that led to it."""

    model: onnx.ModelProto
    source: str
    config: OptimizeConfig
    objective: str  # "task" | "fidelity"
    loss: str  # the loss's name ("ce", "lm", "fidelity", ...)
    tolerance: float
    verified: bool
    splits: dict[str, SplitResult]
    stages: list[StageResult]
    target: dict  # {"name", "session"}
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    output: str | None = None  # where the model was written, if it was

    @property
    def reference_bytes(self) -> int:
        return self.stages[0].reference_bytes

    @property
    def compressed_bytes(self) -> int:
        return self.stages[-1].compressed_bytes

    @property
    def reduction(self) -> float:
        return 1.0 - self.compressed_bytes / self.reference_bytes if self.reference_bytes else 0.0

    @property
    def test(self) -> SplitResult:
        return self.splits["test"]

    def to_dict(self) -> dict:
        last = self.stages[-1]
        return to_jsonable({
            "model": self.source, "output": self.output, "verified": self.verified, "objective": self.objective,
            "loss": self.loss, "tolerance": self.tolerance, "method": ",".join(s.method for s in self.stages),
            "target": self.target,
            "splits": {k: v.to_dict() for k, v in self.splits.items()},
            "bytes": {"reference": self.reference_bytes, "compressed": self.compressed_bytes,
                      "reduction": self.reduction},
            "levels": last.levels, "nodes": [dataclasses.asdict(n) for n in last.nodes],
            "stages": [s.to_dict() for s in self.stages],
            "skipped": [{"node": n, "reason": r} for n, r in self.skipped],
            "notes": list(self.notes), "seconds": self.seconds, "config": config_dict(self.config)})

    def metadata(self) -> dict[str, str]:
        """The ``llc_onnx.*`` metadata written into the saved model."""
        t = self.test
        return {"llc_onnx.method": ",".join(s.method for s in self.stages),
                "llc_onnx.verified": str(self.verified).lower(), "llc_onnx.objective": self.objective,
                "llc_onnx.target": self.target["name"],
                "llc_onnx.test_loss_reference": repr(t.reference.loss),
                "llc_onnx.test_loss_compressed": repr(t.compressed.loss),
                **({"llc_onnx.w8a8_codes": "8: full-range int8 weight codes; exact only on CPUs whose int8 kernels "
                                           "do not saturate (x86 AVX512-VNNI/AVX-VNNI, ARM64)"}
                   if self.config.target.w8a8_codes == 8 else {})}

    def save(self, path: str, *, force: bool = False) -> str:
        """Write the compressed model (atomically, with ``llc_onnx.*`` metadata) to ``path``. A model that is
        not verified is refused (:class:`NotVerifiedError`) unless ``force``; it is then marked
        ``llc_onnx.verified=false``."""
        from .model_io import save_with_metadata

        if not self.verified and not force:
            raise NotVerifiedError(f"{path}: not written: the model is NOT VERIFIED on the test split "
                                   f"({self.test.compressed.loss:.6g} vs float {self.test.reference.loss:.6g}); "
                                   "pass force=True (--allow-loss-increase) to write it marked as not verified")
        self.output = save_with_metadata(self.model, path, self.metadata())
        return self.output

    def save_json(self, path: str) -> None:
        """``to_dict()`` as a JSON file (atomic)."""
        from .atomic import write_bytes_atomic

        write_bytes_atomic(path, (json.dumps(self.to_dict(), allow_nan=False, indent=1) + "\n").encode())
