"""Deployment targets: one module per runtime (``ort_cpu``, ``ort_cuda``, ``tensorrt``, ``qdq``).

``get_target("ort-cpu")`` returns the target object; ``DEFAULT_TARGET`` is what a user who names none gets.
See :mod:`llc_onnx.targets.base` for the contract (formats, offers, plans, session settings, rewrite).
"""

from __future__ import annotations

from llc_onnx.errors import LLCError
from llc_onnx.targets.base import FLOAT, Format, GraphContext, NodePlan, Offer, Rewrite, SessionSettings, Target
from llc_onnx.targets.ort_cpu import OrtCpuTarget
from llc_onnx.targets.ort_cuda import OrtCudaTarget
from llc_onnx.targets.qdq import QdqTarget
from llc_onnx.targets.tensorrt import TensorRTTarget, Violation, check_tensorrt

__all__ = [
    "DEFAULT_TARGET",
    "FLOAT",
    "Format",
    "GraphContext",
    "NodePlan",
    "Offer",
    "Rewrite",
    "SessionSettings",
    "TARGETS",
    "Target",
    "Violation",
    "check_tensorrt",
    "get_target",
]

TARGETS = {"ort-cpu": OrtCpuTarget, "ort-cuda": OrtCudaTarget, "tensorrt": TensorRTTarget, "qdq": QdqTarget}
DEFAULT_TARGET = "ort-cpu"


def get_target(name: str = DEFAULT_TARGET, **options) -> Target:
    """The target called ``name`` (``options`` go to its constructor, e.g. ``plugins=True`` for tensorrt)."""
    cls = TARGETS.get(name)
    if cls is None:
        raise LLCError(f"target '{name}' is unknown; use one of {', '.join(TARGETS)}")
    return cls(**options)
